"""The main job behind `python train.py`: check the config, build or load everything, fit, report.

Order matters for users' time: every config check runs before any model is built or loaded, and the
expensive shared artefacts (reference policy, reward model, calibration cache) come from the cache.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import sys
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
from infalign.models.data import load_partitions, partition_fingerprint, truncate_prompt
from infalign.models.lora import check_lora_settings, check_target_modules
from infalign.models.policy import format_prompts, load_policy
from infalign.models.pure_sampling import sampling_kwargs
from infalign.models.reward import load_reward_model
from infalign.runtime.artifacts import fingerprint
from infalign.runtime.atomic import give_plain_modes
from infalign.runtime.checkpoint_io import SafeCheckpointIO
from infalign.runtime.console import format_number, quiet_console
from infalign.runtime.loggers import build_loggers, finish_loggers, run_identity, swept_keys
from infalign.runtime.run_dir import accept_run, hold_run_dir
from infalign.trainer.calibration_cache import load_or_build_reference_samples
from infalign.trainer.checkpointing import LastCheckpoint, TrainingInterrupted, exit_on_stop_signal
from infalign.trainer.datamodule import RolloutDataModule
from infalign.trainer.evaluation import WinRateCallback, atomic_write_json
from infalign.trainer.module import InfAlignModule
from infalign.trainer.progress import IterationProgressBar, win_rate_shown
from infalign.trainer.resume import check_resume, finish_restored_loops, resolve_resume, resume_command, run_record

# The frozen reference (and the policy, whose dropout we turn off) are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

log = logging.getLogger(__name__)

__all__ = ["run"]


def _prompt_sets(cfg, partitions, tokenizer) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Unique (prompt_id, policy text, reward text) lists: a seeded subset of train, the first of the eval
    partition. The HH prompt is cut from the left to the token budget; the policy sees it in its own format
    (raw HH text or its chat template), the reward model the HH text it was trained on."""

    def unique(records):
        seen = {}
        for r in records:
            seen.setdefault(r.prompt_id, r.prompt)
        return list(seen.items())

    train = unique(partitions["train"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(cfg.calibration.seed)))
    train = [train[i] for i in order[: int(cfg.data.train_prompts)].tolist()]
    part = cfg.data.eval_partition  # a held-out partition (infalign.config)
    held_out = unique(partitions[part])[: int(cfg.data.eval_prompts)]
    for name, got, want in (("train", train, cfg.data.train_prompts), (part, held_out, cfg.data.eval_prompts)):
        if len(got) < want:
            raise ValueError(f"the {name} partition has {len(got)} unique prompts, fewer than the {want} asked "
                             f"(data.{'train' if name == 'train' else 'eval'}_prompts); lower it or use more data")
    budget, fmt = int(cfg.data.max_prompt_tokens), cfg.model.get("prompt_format", "raw")

    def render(items):
        hh = [truncate_prompt(p, tokenizer, budget) for _, p in items]
        return list(zip([pid for pid, _ in items], format_prompts(hh, tokenizer, fmt), hh))

    return render(train), render(held_out)


def _check_context(model, cfg) -> None:
    """The longest sequence a model is fed fits its context: ConfigError (one line) as it loads, before it computes.
    The policy: a prompt (`data.max_prompt_tokens`) and its sample (`generation.max_new_tokens`). The reward model
    (a `RewardModel`): a prompt's tail and a response's head (`reward.max_*_tokens`, else `data.max_*_tokens`)."""
    from infalign.models.checks import check_context, context_of, fitting_budgets
    from infalign.models.reward import RewardModel, check_reward_context

    if isinstance(model, RewardModel):
        check_reward_context(model, *(f"reward.{k}" if cfg.reward.get(k) is not None else f"data.{k}"
                                      for k in ("max_prompt_tokens", "max_response_tokens")))
        return
    context, model_cfg = context_of(model.config), cfg.get("model") or {}
    prompt, new = int(cfg.data.max_prompt_tokens), int(cfg.generation.max_new_tokens)
    what = "data.max_prompt_tokens + generation.max_new_tokens"
    if str(model_cfg.get("_target_", "")).endswith(".tiny_policy"):  # its context is made from data.max_*_tokens
        response = int(cfg.data.max_response_tokens)
        check_context(prompt + new, what, context, "model=tiny",
                      f"model=tiny is built with data.max_prompt_tokens + data.max_response_tokens + 1 positions: set "
                      f"generation.max_new_tokens={response + 1} (at most), or data.max_response_tokens={new - 1} "
                      "(which rebuilds the model)")
        return
    name = model_cfg.get("name_or_path") or model_cfg.get("gguf_file")
    a, b = fitting_budgets(context[0], prompt, new) if context else (prompt, new)
    check_context(prompt + new, what, context, f"model.name_or_path={name}" if model_cfg.get("name_or_path")
                  else f"model={model_cfg.get('name', '?')}" + (f" ({name})" if name else ""),
                  f"lower them to fit, e.g. data.max_prompt_tokens={a} generation.max_new_tokens={b}")


def _save_policy(policy, tokenizer, out: Path, merged=None) -> None:
    """save_pretrained (safetensors) into a temp dir, then an atomic rename over the old one. The files get the
    mode a plain write gives (0o666 less the umask; safetensors alone writes model.safetensors owner-only).
    With LoRA `policy` is the peft model (its files: adapter_config.json, adapter_model.safetensors) and `merged`,
    when asked for (model.lora.save_merged), the merged model, written with the tokenizer to `merged/`."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # padding/truncation are what the last encode call left (each call sets its own):
        backend.no_padding()  # saved, tokenizer.json would depend on the run's history (a resumed run's differed)
        backend.no_truncation()
    tokenizer.save_pretrained(tmp)
    if merged is not None:  # its own folder: beside adapter_config.json, transformers would load the adapter instead
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    give_plain_modes(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


POLICY_ONLY_KEYS = ("lora", "gradient_checkpointing")  # model.* keys that change the trained policy, not the reference


def calibration_key(cfg: DictConfig, partitions, prompt_ids: list[str], gen_kwargs: dict) -> dict:
    """What the calibration cache's reference samples and rewards depend on (its content address)."""
    # version 3: batch seeds from infalign.runtime.seeds; version 2: samples no longer take the model's own
    # generation_config processors (repetition penalty, ...)
    # model.lora and model.gradient_checkpointing shape the trained policy only: the reference samples are the base's
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in POLICY_ONLY_KEYS}
    return {"version": 3, "model": model,
            # how many pairs share a forward pass changes float rounding only, not what is scored
            "reward": {k: v for k, v in OmegaConf.to_container(cfg.reward, resolve=True).items()
                       if k != "max_batch_tokens"},
            "data": partition_fingerprint(partitions), "max_prompt_tokens": int(cfg.data.max_prompt_tokens),
            "prompts": fingerprint(prompt_ids), "m": int(cfg.calibration.m), "seed": int(cfg.calibration.seed),
            # the KV-cache layout changes no probabilities, so it does not split the cache
            "generation": {k: v for k, v in gen_kwargs.items() if k != "cache_implementation"}}


@exit_on_stop_signal  # SIGINT/SIGTERM at any stage: says what was stopped and what to run next
def run(cfg: DictConfig) -> dict:
    started = time.time()
    quiet_console()  # Lightning's lines once, no tips, no per-load bars (infalign.runtime.console)
    choices = HydraConfig.get().runtime.choices
    check_targets(cfg, choices)  # Lightning's and the optimizer's own parameters (the rest: train.py's check_config)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    hold_run_dir(run_dir)  # one command at a time: refused here, in one line, while another one runs there
    resume_from = resolve_resume(run_dir, cfg.resume, cfg.overwrite)  # refuses a bad checkpoint here, in seconds
    record, resume_entry = run_record(cfg, choices), None
    if resume_from is not None:  # still before any model: a changed experiment is refused, a finished run left as is
        plan = check_resume(run_dir, resume_from, record, allow_changes=bool(cfg.get("resume_allow_changes", False)),
                            iterations=int(cfg.rl.iterations), n=int(cfg.n), overrides=HydraConfig.get().overrides.task)
        if plan.finished is not None:
            print(f"infalign: {run_dir} is already finished (iteration {plan.finished['iteration']} of "
                  f"rl.iterations={cfg.rl.iterations}; final_metrics.json, eval_metrics.csv and policy/ complete): "
                  "nothing to resume, no file changed. Raise rl.iterations to train it further.", flush=True)
            log.info("resume: %s is already finished; nothing done", run_dir)
            return plan.finished
        resume_entry = plan.entry
    accept_run(run_dir, cfg)  # only now: .hydra/*.yaml and train.log (a refused command changed no file there)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    calibrator, transform = instantiate(cfg.calibrator), instantiate(cfg.transform)
    if transform.needs_calibration != calibrator.needs_reference:
        raise ValueError(f"transform={choices.get('transform')} and calibrator={choices.get('calibrator')} do not fit: "
                         "raw rewards go with calibrator=passthrough, calibrated transforms with calibrator=empirical")

    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=cfg.progress)
    _check_context(reference, cfg)
    lora = check_lora_settings(cfg.model.get("lora"))
    if lora:  # the module names before the reward model and the calibration cache cost anything
        check_target_modules(reference, lora)
    reward_model = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions,
                                     progress=cfg.progress)
    _check_context(reward_model, cfg)  # its prompt + response budgets, before it scores anything
    train_prompts, eval_prompts = _prompt_sets(cfg, partitions, tokenizer)
    gen_kwargs = sampling_kwargs(cfg.generation)
    everything = train_prompts + eval_prompts
    ids = [p[0] for p in everything]
    key = calibration_key(cfg, partitions, ids, gen_kwargs)
    # Loaded or built in the datamodule's setup, where under DDP every process and the process group exist:
    # the ranks share the generation and rank 0 stores it once.
    reference_samples = functools.partial(
        load_or_build_reference_samples,
        cache_root=cfg.cache_root, key=key, prompt_ids=ids, prompts=[p[1] for p in everything],
        reward_prompts=[p[2] for p in everything],
        reference=reference, tokenizer=tokenizer, reward_model=reward_model, m=int(cfg.calibration.m),
        gen_kwargs=gen_kwargs, seed=int(cfg.calibration.seed), prompts_per_batch=int(cfg.calibration.prompts_per_batch),
        progress=cfg.progress)

    distill = OmegaConf.to_container(cfg.distill, resolve=True)
    distill_pool = None
    if distill["iterations"] > 0:  # the reference samples distillation fits: their own entry, their own seeds
        train_ids = [p[0] for p in train_prompts]
        pool_key = {**calibration_key(cfg, partitions, train_ids, gen_kwargs), "m": int(distill["m"]),
                    "stream": "distill_pool", "token_ids": 1}  # token_ids: entries that store the sampled paths
        distill_pool = functools.partial(
            load_or_build_reference_samples,
            cache_root=cfg.cache_root, key=pool_key, prompt_ids=train_ids, prompts=[p[1] for p in train_prompts],
            reward_prompts=[p[2] for p in train_prompts], reference=reference, tokenizer=tokenizer,
            reward_model=reward_model, m=int(distill["m"]), gen_kwargs=gen_kwargs, seed=int(cfg.calibration.seed),
            prompts_per_batch=int(distill["prompts_per_batch"]), progress=cfg.progress, stream="distill_pool",
            what="distillation pool")
    scheduler = instantiate(cfg.scheduler, _convert_="all") if cfg.get("scheduler") else None
    module = InfAlignModule(reference, tokenizer, reward_model, calibrator, transform, beta=float(cfg.beta),
                            rl=OmegaConf.to_container(cfg.rl, resolve=True),
                            optimizer=instantiate(cfg.optimizer, _convert_="all"), gen_kwargs=gen_kwargs,
                            seed=int(cfg.seed), scheduler=scheduler, distill=distill, lora=lora,
                            gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)))
    if lora:
        trainable, total = module.trainable_parameters()
        log.info("LoRA r=%d on %s: %s of %s policy parameters train (%.2f%%); the reference shares the base weights",
                 lora["r"], lora["target_modules"], f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    datamodule = RolloutDataModule(train_prompts, eval_prompts, reference_samples, cfg.rl.prompts_per_iteration, cfg.seed,
                                   distill_pool=distill_pool)
    ns = sorted({int(x) for x in cfg.eval.ns} | {int(cfg.n)})
    # the samples table shows the run's own pick: best-of-n, or worst-of-n for a worst-of-N method
    target = _bar_metric({"method": choices.get("method") or choices.get("transform")}, transform)
    win_rates = WinRateCallback(eval_prompts, None, ns, cfg.eval.k, cfg.eval.every, gen_kwargs, run_dir,
                                seed=int(cfg.seed), batch_prompts=int(cfg.eval.prompts_per_batch),
                                log_samples=int(cfg.eval.get("log_samples", 0)), n=int(cfg.n),
                                mode="won" if target == "won" else "bon")
    # last.ckpt between iterations, and on SIGINT/SIGTERM (infalign.trainer.checkpointing)
    # after win_rates in the callbacks: the final checkpoint follows (and holds) the final evaluation
    checkpoints = LastCheckpoint(run_dir, every=int(cfg.checkpoint.every), run_record=record, resume_entry=resume_entry)
    # logs/metrics.csv (every logged metric) + the configured logger, guarded: W&B failing never stops training;
    # the remote run named by method, n, beta, seed, grouped by its sweep
    identity = _run_identity(cfg, choices)
    loggers = build_loggers(cfg.get("logger"), run_dir, resuming=resume_from is not None, identity=identity)
    # method: the method preset chosen (conf/method/; studies group runs by it), else the transform's name;
    # solver: the solver preset chosen (conf/solver/; infalign.runtime.presets keeps it true to what trains);
    # t: the exp family's t as used (t=auto resolved)
    run_info = {"n": int(cfg.n), "beta": float(cfg.beta), "transform": choices.get("transform"),
                "method": choices.get("method") or choices.get("transform"), "solver": choices.get("solver"),
                "t": getattr(transform, "t", None),
                "t_auto": getattr(transform, "auto", None),
                "calibrator": choices.get("calibrator"), "seed": int(cfg.seed), "run_dir": str(run_dir)}
    for lg in loggers:  # the name, group and tags too: logs/hparams.yaml keeps what W&B shows
        lg.log_hyperparams({**run_info, **{f"run_{k}": v for k, v in identity.items()},
                            **OmegaConf.to_container(cfg, resolve=True)})
    # use_distributed_sampler=False: IterationSampler shards each iteration's prompts by rank itself; Lightning's
    # DistributedSampler would pad with repeats and reshuffle them.
    # SafeCheckpointIO: atomic, checksummed, weights_only checkpoints; LastCheckpoint replaces ModelCheckpoint
    # LearningRateMonitor: the learning rate at each iteration's first optimizer step, as train/lr (the scheduler
    # config's name; lr-<Optimizer> with scheduler=null)
    callbacks = [win_rates, checkpoints, LearningRateMonitor(logging_interval="step")]
    if cfg.progress:  # one bar over the iterations, after win_rates: it shows the evaluation of its iteration
        callbacks.append(IterationProgressBar(win_rates, *win_rate_shown(_bar_metric(run_info, transform), int(cfg.n))))
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks,
                          enable_progress_bar=bool(cfg.progress), default_root_dir=str(run_dir),
                          use_distributed_sampler=False, plugins=[SafeCheckpointIO()], enable_checkpointing=False)
    finish_restored_loops(trainer)  # resumed from the final checkpoint: the final evaluation still runs
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                        weights_only=True)
        except TrainingInterrupted as stop:
            print(f"\n{stop}.\nContinue it with:\n  {resume_command(HydraConfig.get().overrides.task, run_dir)}",
                  file=sys.stderr, flush=True)
            raise SystemExit(stop.exit_code) from None
        if win_rates.final is None:  # never a final_metrics.json without the final evaluation
            raise RuntimeError(f"training in {run_dir} ended without its final evaluation; resume it with "
                               f"{resume_command(HydraConfig.get().overrides.task, run_dir)}")
        if trainer.is_global_zero:
            _save_policy(module.policy_to_save(), tokenizer, run_dir / "policy",
                         merged=module.merged_policy() if lora and lora["save_merged"] else None)
        calibration = datamodule.reference_samples
        final = {**run_info, **(win_rates.final or {}), "calibration_cache": str(calibration.cache_path),
                 "calibration_cache_hit": calibration.cache_hit}
        # what the run was built for and the M it calibrated with; the research yardsticks (gain fraction, KL
        # efficiency, the tilt's and the optimum's win rates) are the study tools' (python -m infalign.study)
        final.update(metric=target, calibration_m=int(cfg.calibration.m))
        final["wall_seconds"] = round(time.time() - started, 1)
        if trainer.is_global_zero:
            atomic_write_json(run_dir / "final_metrics.json", final)
            _print_summary(final, run_dir, int(cfg.n))
        return final
    finally:
        finish_loggers(loggers)  # between multirun members, so one run's W&B logger never swallows the next


def _run_identity(cfg: DictConfig, choices) -> dict:
    """The remote run's name, group and tags (`infalign.runtime.loggers.run_identity`). In a multirun: grouped by
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


def _bar_metric(run_info: dict, transform) -> str:
    """The metric whose win rate the progress bar shows: the run's target (bon / won / std), bon if none is known."""
    from infalign.theory.efficiency import target_metric

    try:
        return target_metric(run_info.get("method"), transform)
    except ValueError:
        return "bon"


def _t_label(final: dict) -> str:
    """` (t=21.09, auto for n=4)` for the exp family: the t the run trained with, and whether the theory chose it."""
    t = final.get("t")
    if t is None:
        return ""
    return f" (t={t:.4g}{', auto for n=' + str(final['n']) if final.get('t_auto') else ''})"


def _print_summary(final: dict, run_dir: Path, n: int) -> None:
    """The end of the run in plain words, for someone who has not read the paper: what each win rate compares, the
    KL per response (an estimate near 0 shown as ~0), where the files are. Research diagnostics (gain fraction, KL
    efficiency, calibrated KL) stay in final_metrics.json and the study tools."""

    def num(key):
        v = final.get(key)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def rate(key):
        if not num(key):
            return "n/a"
        return f"{final[key]:.3f} ± {final[f'{key}_se']:.3f}" if num(f"{key}_se") else f"{final[key]:.3f}"

    def kl_text():
        # k1 is unbiased, so sampling noise can take it below 0 where the true KL is small: an estimate below 0, or
        # within 2 standard errors of it, is shown as ~0 with its raw value (without a standard error: below 0 only)
        if not num("eval/kl"):
            return "n/a"
        kl, se = final["eval/kl"], final.get("eval/kl_se") if num("eval/kl_se") else None
        below = "; a KL cannot be below 0, its estimate's sampling noise can" if kl < 0 else ""
        if se is not None and kl < 2 * se:
            return f"≈ 0 nats per response (estimate {kl:.3f} ± {se:.3f}, within 2 standard errors of 0{below})"
        if kl < 0:
            return f"≈ 0 nats per response (estimate {kl:.3f}{below})"
        return f"{kl:.3f}{f' ± {se:.3f}' if se is not None else ''} nats per response"

    prompts = f" on {final['eval/prompts']} held-out prompts" if num("eval/prompts") else ""
    lines = [
        "",
        f"infalign run finished in {final['wall_seconds']:.0f} s: transform={final['transform']}{_t_label(final)} n={n} "
        f"beta={final['beta']}",
        f"Win rates of the policy against the reference policy{prompts}, judged by the reward model "
        "(± one standard error; 0.5 = no better than the reference):",
    ]
    if n > 1:
        lines += [f"  best-of-{n} win rate   {rate(f'eval/bon_win_rate@{n}')}  (the policy's best of {n} samples beats "
                  f"the reference's best of {n})",
                  f"  worst-of-{n} win rate  {rate(f'eval/won_win_rate@{n}')}  (the policy's worst of {n} samples "
                  f"beats the reference's worst of {n})"]
    lines += [f"  standard win rate    {rate('eval/bon_win_rate@1')}  (one policy sample beats one reference sample)",
              f"KL(policy || reference) {kl_text()}  (how far training moved the policy from the reference)"]
    if num("eval/response_tokens") and num("eval/reference_response_tokens"):
        lines.append(f"Mean response length: policy {final['eval/response_tokens']:.1f} tokens, reference "
                     f"{final['eval/reference_response_tokens']:.1f} tokens")
    lines.append(f"Files in {run_dir}: final_metrics.json (every number), train.log, eval_metrics.csv, "
                 "eval_samples.jsonl, logs/metrics.csv, policy/, checkpoints/")
    wandb_run = getattr(sys.modules.get("wandb"), "run", None)  # W&B is quiet (conf/logger/wandb.yaml): its one line
    if wandb_run is not None and wandb_run.settings.mode in ("offline", "dryrun"):
        lines.append(f"W&B logged offline; upload the run with: wandb sync {wandb_run.settings.sync_dir}")
    print("\n".join(lines), flush=True)
    # the log file's record of the end, one short line: every value is in final_metrics.json
    bon, won = (f"{mode}@{n}={format_number(final.get(f'eval/{mode}_win_rate@{n}'))} ± "
                f"{format_number(final.get(f'eval/{mode}_win_rate@{n}_se'))}" for mode in ("bon", "won"))
    log.info("final metrics: %s, %s, kl=%s (all of them: %s)", bon, won, format_number(final.get("eval/kl")),
             run_dir / "final_metrics.json")
