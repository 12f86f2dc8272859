"""The main job behind `python train.py`, as a recipe read top to bottom: check the config and the run directory
(before any model: a bad value or a busy directory is refused in seconds), load the models, build the pieces
(`infalign.trainer.pieces` or Hydra `instantiate`), fit, save the policy and write final_metrics.json.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from infalign.config.check import check_targets
from infalign.models.data import load_partitions
from infalign.models.lora import merged_copy
from infalign.models.pure_sampling import sampling_kwargs
from infalign.runtime.checkpoint_io import SafeCheckpointIO
from infalign.runtime.console import quiet_console
from infalign.runtime.identity import run_identity, swept_keys
from infalign.runtime.loggers import build_loggers, finish_loggers
from infalign.runtime.run_dir import accept_run, hold_run_dir
from infalign.trainer.checkpointing import LastCheckpoint, exit_on_stop_signal
from infalign.trainer.datamodule import RolloutDataModule
from infalign.trainer.evaluation import WinRateCallback, atomic_write_json
from infalign.trainer.experience import RolloutBuilder
from infalign.trainer.module import InfAlignModule
from infalign.trainer.pieces import build_solver, load_models, sample_sets, save_policy
from infalign.trainer.progress import IterationProgressBar, win_rate_shown
from infalign.trainer.prompts import prompt_sets
from infalign.trainer.resume import (
    ResumePlan,
    check_resume,
    finish_restored_loops,
    resolve_resume,
    resume_command,
    run_record,
)
from infalign.trainer.summary import bar_metric, print_summary

# The frozen reference (and the policy, whose dropout we turn off) are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

log = logging.getLogger(__name__)

__all__ = ["run"]


@exit_on_stop_signal  # SIGINT/SIGTERM at any stage: says what was stopped and what to run next
def run(cfg: DictConfig) -> dict:
    started = time.time()
    quiet_console()  # Lightning's lines once, no tips, no per-load bars (infalign.runtime.console)
    hydra = HydraConfig.get()
    choices, run_dir = hydra.runtime.choices, Path(hydra.runtime.output_dir)
    check_targets(cfg, choices)  # Lightning's and the optimizer's own parameters (the rest: train.py's check_config)
    hold_run_dir(run_dir)  # one command at a time: refused here, in one line, while another one runs there
    resume_from = resolve_resume(run_dir, cfg.resume, cfg.overwrite)  # refuses a bad checkpoint here, in seconds
    record = run_record(cfg, choices)
    plan = ResumePlan() if resume_from is None else check_resume(
        run_dir, resume_from, record, allow_changes=bool(cfg.get("resume_allow_changes", False)),
        iterations=int(cfg.rl.iterations), n=int(cfg.n), overrides=hydra.overrides.task)
    if plan.finished is not None:  # still before any model: a changed experiment refused, a finished run left as is
        return plan.finished
    accept_run(run_dir, cfg)  # only now: .hydra/*.yaml and train.log (a refused command changed no file there)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    calibrator, transform = instantiate(cfg.calibrator), instantiate(cfg.transform)  # they fit: check_config

    partitions = load_partitions(cfg.data)
    reference, tokenizer, reward_model, lora = load_models(cfg, partitions)
    train_prompts, eval_prompts = prompt_sets(cfg, partitions, tokenizer)
    gen_kwargs = sampling_kwargs(cfg.generation)
    solver, iterations = build_solver(cfg), int(cfg.rl.iterations)
    calibration, pool = sample_sets(
        cfg, partitions, train_prompts, eval_prompts, dict(reference=reference, tokenizer=tokenizer,
                                                           reward_model=reward_model), gen_kwargs,
        with_pool=any(solver.experience(i).kind == "pool" for i in range(iterations)))
    module = InfAlignModule(reference, tokenizer, reward_model, calibrator, transform, solver=solver,
                            optimizer=instantiate(cfg.optimizer, _convert_="all"), iterations=iterations,
                            seed=int(cfg.seed), lora=lora,
                            scheduler=instantiate(cfg.scheduler, _convert_="all") if cfg.get("scheduler") else None,
                            gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)))
    builder = RolloutBuilder(policy=module.policy, reference=module.reference, tokenizer=tokenizer,
                             reward_model=reward_model, calibrator=calibrator, transform=transform,
                             gen_kwargs=gen_kwargs, seed=int(cfg.seed), calibration=calibration, pool=pool,
                             null_control=bool(cfg.rl.null_control))
    datamodule = RolloutDataModule(train_prompts, builder, solver, cfg.rl.prompts_per_iteration, cfg.seed)

    # method: the method preset chosen (studies group runs by it), else the transform's name; a solver that uses
    # no transform (maxk) ran its own method, named by its preset; t: the exp family's t as used (t=auto resolved)
    method = (choices.get("method") or choices.get("transform")) if solver.uses_transform else choices.get("solver")
    run_info = {"n": int(cfg.n), "beta": float(cfg.beta), "transform": choices.get("transform"),
                "method": method, "solver": choices.get("solver"), "t": getattr(transform, "t", None),
                "t_auto": getattr(transform, "auto", None),
                "calibrator": choices.get("calibrator"), "seed": int(cfg.seed), "run_dir": str(run_dir)}
    # what the run is built for: the method's target metric, or the win rate a solver without transform optimises
    target = bar_metric(run_info, transform) if solver.uses_transform else solver.target_metric
    # its samples table shows the run's own pick: best-of-n, or worst-of-n for a worst-of-N method. Held-in: the
    # first eval.held_in_prompts training prompts, which prompt_sets drew in an order fixed by calibration.seed
    # alone (the same subset for every run seed, method and data.train_prompts)
    win_rates = WinRateCallback(eval_prompts, calibration, ns=sorted({int(x) for x in cfg.eval.ns} | {int(cfg.n)}),
                                k=cfg.eval.k, every=cfg.eval.every, gen_kwargs=gen_kwargs, out_dir=run_dir,
                                seed=int(cfg.seed), batch_prompts=int(cfg.eval.prompts_per_batch),
                                log_samples=int(cfg.eval.get("log_samples", 0)), n=int(cfg.n),
                                mode="won" if target == "won" else "bon",
                                held_in_prompts=train_prompts[: int(cfg.eval.held_in_prompts)] or None)
    loggers = _loggers(cfg, choices, run_dir, resume_from, run_info)
    # last.ckpt between iterations, and on SIGINT/SIGTERM (infalign.trainer.checkpointing); after win_rates in the
    # callbacks: the final checkpoint follows (and holds) the final evaluation
    # LearningRateMonitor: the learning rate at each iteration's first optimizer step, as train/lr
    callbacks = [win_rates, LastCheckpoint(run_dir, every=int(cfg.checkpoint.every), run_record=record,
                                           resume_entry=plan.entry), LearningRateMonitor(logging_interval="step")]
    if cfg.progress:  # one bar over the iterations, after win_rates: it shows the evaluation of its iteration
        callbacks.append(IterationProgressBar(win_rates, *win_rate_shown(target, int(cfg.n))))
    # use_distributed_sampler=False: IterationSampler shards each iteration's prompts by rank itself; Lightning's
    # DistributedSampler would pad with repeats and reshuffle them.
    # SafeCheckpointIO: atomic, checksummed, weights_only checkpoints; LastCheckpoint replaces ModelCheckpoint
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks,
                          enable_progress_bar=bool(cfg.progress), default_root_dir=str(run_dir),
                          use_distributed_sampler=False, plugins=[SafeCheckpointIO()], enable_checkpointing=False)
    finish_restored_loops(trainer)  # resumed from the final checkpoint: the final evaluation still runs
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)  # a signal: TrainingInterrupted after the iteration's checkpoint
        if win_rates.final is None:  # never a final_metrics.json without the final evaluation
            raise RuntimeError(f"training in {run_dir} ended without its final evaluation; resume it with "
                               f"{resume_command(HydraConfig.get().overrides.task, run_dir)}")
        if trainer.is_global_zero:
            save_policy(module.policy_to_save(), tokenizer, run_dir / "policy",
                        merged=merged_copy(module.peft_model) if lora and lora["save_merged"] else None)
        # the research yardsticks (gain fraction, KL efficiency) are the study tools' (python -m infalign.study)
        final = {**run_info, **win_rates.final, "calibration_cache": str(calibration.get().cache_path),
                 "calibration_cache_hit": calibration.get().cache_hit, "metric": target,
                 "calibration_m": int(cfg.calibration.m), "wall_seconds": round(time.time() - started, 1)}
        if trainer.is_global_zero:
            atomic_write_json(run_dir / "final_metrics.json", final)
            print_summary(final, run_dir, int(cfg.n))
        return final
    finally:
        finish_loggers(loggers)  # between multirun members, so one run's W&B logger never swallows the next


def _loggers(cfg: DictConfig, choices, run_dir: Path, resume_from, run_info: dict) -> list:
    """logs/metrics.csv (every logged metric) + the configured logger, guarded: W&B failing never stops training;
    the remote run named by method, n, beta, seed, grouped by its sweep; the hyperparameters logged."""
    identity = _run_identity(cfg, choices)
    loggers = build_loggers(cfg.get("logger"), run_dir, resuming=resume_from is not None, identity=identity)
    for lg in loggers:  # the name, group and tags too: logs/hparams.yaml keeps what W&B shows
        lg.log_hyperparams({**run_info, **{f"run_{k}": v for k, v in identity.items()},
                            **OmegaConf.to_container(cfg, resolve=True)})
    return loggers


def _run_identity(cfg: DictConfig, choices) -> dict:
    """The remote run's name, group and tags (`infalign.runtime.identity.run_identity`). In a multirun: grouped by
    the sweep directory, and named apart by the keys the sweep varies (its command line's sweep overrides, which
    Hydra keeps in <sweep dir>/multirun.yaml, and the config's `hydra.sweeper.params`)."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return run_identity(cfg, choices)
    sweep_dir = Path(hydra.sweep.dir)
    try:
        original = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
    except Exception:  # noqa: BLE001 - only the name's suffix depends on it
        original = []
    params = hydra.sweeper.get("params") if "sweeper" in hydra else None
    return run_identity(cfg, choices, sweep_dir=sweep_dir, member_overrides=list(hydra.overrides.task),
                        swept=swept_keys(list(original), OmegaConf.to_container(params) if params else None))
