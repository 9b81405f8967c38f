"""Train a language model: `python train.py optimizer=adamw scheduler=cosine`. Returns the final val loss."""

import hydra
from omegaconf import DictConfig

from exp.job import run_cli, run_job


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from exp.tracking import prestart

    prestart(cfg)  # MLflow's start-up runs beside the trainer's (importing torch, building the model)
    return run_job(cfg)


if __name__ == "__main__":
    run_cli(main)
