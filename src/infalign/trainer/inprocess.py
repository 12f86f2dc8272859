"""Run `train.py`'s job inside the current Python process (tests, notebooks, the soak benchmark).

`compose_run_config` does with Hydra's compose API what `hydra.main` does before calling the job (compose the
config, fill `hydra.runtime` and make it the global `HydraConfig`, drop the `hydra` node), so the job sees what it
sees under `python train.py`. Repeated runs in one process also expose leaks that separate processes would hide.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from infalign.runtime.paths import conf_dir

__all__ = ["compose_run_config", "run_checked", "run_in_process"]


def compose_run_config(overrides: list[str], run_dir: str | Path) -> DictConfig:
    """The job config for `python train.py <overrides> hydra.run.dir=<run_dir>`, with HydraConfig set."""
    run_dir = Path(run_dir)
    overrides = [*overrides, f"hydra.run.dir={run_dir}"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)  # set by Hydra's run_job, not by compose
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_checked(cfg: DictConfig) -> dict:
    """What `python train.py` runs: the config check (`infalign.config.check.check_config`, once, with Hydra's
    choices and overrides), then `infalign.trainer.run.run`, which checks only what needs torch or the model."""
    from infalign.config.check import check_config, report
    from infalign.trainer.run import run

    hydra = HydraConfig.get()
    report(check_config(cfg, hydra.runtime.choices, overrides=list(hydra.overrides.task)))
    return run(cfg)


def run_in_process(overrides: list[str], run_dir: str | Path) -> dict:
    """The checked run (`run_checked`) of the composed config; returns the final metrics."""
    return run_checked(compose_run_config(overrides, run_dir))
