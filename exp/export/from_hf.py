"""Read a `--format hf` folder (or any Llama-architecture transformers folder) back into exp's GPT: the code lives in
exp.checkpoint.hf_folder, where stage.init_from, teachers and exp.generate use it too."""

from exp.checkpoint.hf_folder import exp_state_dict, gpt_config, hf_folder_tokenizer, is_hf_folder, load_hf_folder

__all__ = ["exp_state_dict", "gpt_config", "hf_folder_tokenizer", "is_hf_folder", "load_hf_folder"]
