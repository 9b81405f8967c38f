"""exp.eval in process: the adapter scores as lm-eval's own Hugging Face path does, the built-in tasks, the results
as exp records them, and bad task input refused in one line."""

import ast
import json

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from exp import export
from exp.config import EvalConfig
from exp.data.tokenizer import ByteTokenizer
from exp.errors import ConfigError
from exp.eval import harness, stdlib_tasks
from exp.eval.adapter import ExpLM

from .test_export_hf import write_checkpoint

LIMIT = 24
SEQ_LEN = 128


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(exp's adapter, lm-eval's HFLM) over the same random model: exp's in memory, HF's exported with --format hf.
    A context of 128 tokens: every multiple-choice example fits, the held-out pieces take several windows."""
    root = tmp_path_factory.mktemp("eval")
    path, model = write_checkpoint(root / "ckpt", seq_len=SEQ_LEN)
    assert export.main([str(path), str(root / "hf"), "--format", "hf"]) == 0
    ours = ExpLM(model, ByteTokenizer(), batch_size=5)
    theirs = HFLM(pretrained=str(root / "hf"), device="cpu", dtype="float32", batch_size=3)
    return ours, theirs


def samples(lm, tasks):
    spec = harness.Spec(tasks=tasks, limit=LIMIT)
    out = simple_evaluate(
        model=lm, tasks=tasks, limit=LIMIT, task_manager=harness.check_tasks(spec), log_samples=True, bootstrap_iters=0
    )
    return out


def scores(sample) -> list[float]:
    return [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in sample["filtered_resps"]]


def test_adapter_gives_the_harness_hf_path_loglikelihoods_and_scores(pair):
    ours, theirs = (samples(lm, ["exp_stdlib_mc", "exp_stdlib_ppl"]) for lm in pair)
    for task in ("exp_stdlib_mc", "exp_stdlib_ppl"):
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == (LIMIT if task == "exp_stdlib_mc" else min(LIMIT, len(stdlib_tasks.held_out_docs())))
        for x, y in zip(a, b, strict=True):
            assert scores(x) == pytest.approx(scores(y), abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert min(scores(s)[0] for s in ours["samples"]["exp_stdlib_ppl"]) < -100  # whole pieces, many windows


def test_greedy_generation_matches_transformers_generate(pair):
    ours, theirs = pair
    requests = [
        Instance("generate_until", {}, ("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), 0),
        Instance("generate_until", {}, ("import os\n" * 5, {"until": ["os"], "max_gen_toks": 9}), 1),
        Instance("generate_until", {}, ("class A:", {"max_gen_toks": 20}), 2),
    ]
    got, want = ours.generate_until(requests), theirs.generate_until(requests)
    assert got == want and any(got)


def test_long_contexts_are_cut_on_the_left_as_the_harness_cuts_them(pair):
    ours, theirs = pair
    requests = [
        Instance("loglikelihood", {}, ("# a long comment line\n" * 12 + "def f(", "x):\n    return x\n"), 0),
        Instance("loglikelihood", {}, ("import sys\n" * 30, " sys.exit(0)"), 1),  # trailing space moves over
        Instance("loglikelihood", {}, ("", "import os"), 2),  # empty context: end-of-text before it
    ]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    with pytest.raises(ValueError, match="longer than the model's context"):
        ours.loglikelihood([Instance("loglikelihood", {}, ("a", "b" * (SEQ_LEN + 5)), 0)])


def test_builtin_multiple_choice_task_is_fixed_and_fair():
    docs = stdlib_tasks.multiple_choice_docs()
    stdlib_tasks.multiple_choice_docs.cache_clear()
    assert stdlib_tasks.multiple_choice_docs() == docs and len(docs) == stdlib_tasks.NUM_EXAMPLES
    labels = [d["label"] for d in docs]
    assert all(0.2 <= labels.count(i) / len(docs) <= 0.3 for i in range(4))  # no favourite slot
    for doc in docs[:50]:
        assert len(set(doc["choices"])) == 4 and doc["context"].startswith("def ")
        code = doc["context"] + doc["choices"][doc["label"]]
        ast.parse(code)  # the right body completes its def line into a valid function
        assert len(code.encode()) <= stdlib_tasks.MAX_DEF_BYTES
    assert stdlib_tasks.CHANCE == harness.CHANCE["exp_stdlib_mc"]["acc"] == 0.25


def test_metrics_are_named_eval_task_metric():
    results = {
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 9},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        }
    }
    assert harness.metrics_of(results) == {
        "eval/arc_easy/acc": 0.5,
        "eval/arc_easy/acc_stderr": 0.1,
        "eval/gsm8k/exact_match@strict-match": 0.25,
    }
    assert json.loads(harness.results_json({"f": print}))["f"].startswith("<built-in")


def test_task_yaml_that_does_not_parse_is_named_with_its_line(tmp_path):
    (tmp_path / "good.yaml").write_text("task: mine\ncustom_dataset: !function my.load\n")
    (tmp_path / "bad.yaml").write_text("task: mine2\nmetric_list: [acc\n")
    with pytest.raises(ConfigError, match=r"eval.include_path: .*bad.yaml line \d+: not a task YAML"):
        harness.check_include_path(str(tmp_path))
    with pytest.raises(ConfigError, match="no such folder"):
        harness.check_include_path(str(tmp_path / "missing"))


def test_unknown_task_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="eval.tasks: unknown task 'no_such_task'"):
        harness.check_tasks(harness.Spec(tasks=["exp_stdlib_mc", "no_such_task"]))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"harness": "helm"}, "eval.harness=helm"),
        ({"harness": "lm_eval", "batch_size": 0}, "eval.batch_size"),
        ({"harness": "lm_eval", "limit": 0}, "eval.limit=0"),
        ({"harness": "lm_eval", "num_fewshot": -1}, "eval.num_fewshot=-1"),
    ],
)
def test_eval_config_values_are_checked(keys, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**keys)


def test_fsdp_style_batches_run_as_many_forwards_as_the_largest_rank():
    calls = []
    model = torch.nn.Sequential(torch.nn.Embedding(264, 8), torch.nn.Linear(8, 264))
    model.register_forward_hook(lambda *a: calls.append(1))
    lm = ExpLM(model, ByteTokenizer(), batch_size=2, max_length=16, collective=True)
    lm.dist.max = lambda n: 5  # another rank has five batches
    assert lm._loglikelihood_tokens([(None, [1, 2], [3]), (None, [4], [5, 6]), (None, [7], [8])])
    assert len(calls) == 5
