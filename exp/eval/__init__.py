"""Downstream evaluation: lm-evaluation-harness tasks on exp's model in memory.

- adapter.py: ExpLM, the model and tokenizer as an lm_eval language model
- harness.py: which tasks (checked before a run), running them, the results as exp records them
- callback.py: TaskEval, evaluation inside a run (eval=lm_eval)
- stdlib_tasks.py and tasks/: the built-in offline tasks (exp_stdlib_mc, exp_stdlib_ppl)
- cli.py: python -m exp.eval PATH (a checkpoint, a run's every checkpoint, an export)
"""
