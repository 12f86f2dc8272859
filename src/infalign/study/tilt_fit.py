"""Tilt fit: how closely a trained policy is the tilt its transform asks for, measured with no sampling.

The exact tilt pi*(y|x) ∝ pi_ref(y|x) exp(Phi(C(x, y)) / beta) has, on a prompt's reference samples, log pi -
log pi_ref = Phi(C)/beta - log Z(x): within a prompt a straight line of slope 1. The run's stored reference samples
(their token ids, as drawn) are scored under its saved policy and the reference, calibrated leave-one-out against
the prompt's other M - 1 samples, transformed with the run's recorded t, and regressed within prompts
(`fit_slope`): `slope` (1 = the tilt, 0 = the reference), `shape` (the slope on the part of Phi not linear in C:
0 for the identity's shape), `shape_ratio`, `r2`, the per-prompt slopes' spread and `logratio_mean`
(docs/sweeps.md, Tilt fit, defines each).

`held_out`: the calibration cache's samples of the evaluation prompts; `train`: the distillation pool's paths for
a run that trained on a pool, else the cache's samples of the training prompts. Nothing is sampled or scored by the
reward model: a missing cache entry is an error (--cache-root for a moved cache).

    python -m infalign.study.tilt_fit <run_dir> [--prompts held_out|train|both] [--max-prompts N]
                                      [--max-samples K] [--cache-root DIR] [--device cpu]

prints one JSON line per prompt set and writes `<run_dir>/tilt_fit.json` ({"held_out": {...}, "train": {...}},
each set replacing only its own entry, atomically), whose `held_out` slope and shape the study tables read. The
run's own config builds its models (as a resume would): run it only on runs you trust.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from infalign.study.cli import cli_parser
from infalign.study.runs import TILT_FIT
from infalign.study.tilt_regression import fit_slope

__all__ = ["read_tilt_fit", "tilt_fit"]

PROMPT_SETS = ("held_out", "train")


# ------------------------------------------------------------------------------------------------ from a run
def _run_config(run_dir: Path, cache_root):
    """The config the run started with (run_config.yaml: resolved), else .hydra/config.yaml resolved here."""
    from omegaconf import OmegaConf

    from infalign.runtime.paths import register_resolvers

    register_resolvers()
    record = run_dir / "run_config.yaml"
    if record.is_file():
        cfg = OmegaConf.create(OmegaConf.load(record)["config"])
    elif (run_dir / ".hydra" / "config.yaml").is_file():
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    else:
        raise FileNotFoundError(f"{run_dir}: neither run_config.yaml nor .hydra/config.yaml; is it a run directory?")
    for key in ("train_prompts", "eval_prompts", "eval_partition"):  # a run recorded before they moved to data.*
        if key in (cfg.get("calibration") or {}) and key not in (cfg.get("data") or {}):
            cfg.data[key] = cfg.calibration.pop(key)
    if cache_root is not None:
        cfg.cache_root = str(cache_root)
    return cfg


def _load_trained(run_dir: Path, reference):
    """The run's saved policy (`<run>/policy/`): the whole model, or with LoRA the adapter on the reference."""
    import torch

    path = run_dir / "policy"
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(reference), str(path)).eval()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: the run has not saved its policy (is it finished?)")
    dtype = next(reference.parameters()).dtype if any(True for _ in reference.parameters()) else torch.float32
    return type(reference).from_pretrained(str(path), use_safetensors=True, dtype=dtype).eval()


def _sample_entry(cfg, partitions, train, held_out, gen_kwargs, which: str):
    """(ReferenceSamples, the prompts asked, source name) of the cache entry the run used; never builds one."""
    from infalign.runtime.artifacts import lookup
    from infalign.trainer.calibration_cache import KIND, load_reference_samples
    from infalign.trainer.pieces import build_solver, sample_sets

    none = dict(reference=None, tokenizer=None, reward_model=None)
    calibration, pool = sample_sets(cfg, partitions, train, held_out, none, gen_kwargs, with_pool=True)
    if isinstance(cfg.get("solver"), str):  # a run recorded before solvers were objects: distill.iterations switched
        trained_on_pool = int(cfg.distill.iterations) > 0
    else:  # as run.py decides whether the run has a pool
        solver, iterations = build_solver(cfg), int(cfg.rl.iterations)
        trained_on_pool = any(solver.experience(i).kind == "pool" for i in range(iterations))
    candidates = [(pool, "distill_pool")] if which == "train" and trained_on_pool else []
    candidates.append((calibration, "calibration_cache"))
    for cached, source in candidates:
        entry = lookup(cfg.cache_root, KIND, cached.kwargs["key"])
        if entry is None:
            continue
        samples = load_reference_samples(entry.path, cached.kwargs["prompt_ids"], cached.kwargs["m"])
        if samples.response_tokens is None:
            continue
        return samples, (train if which == "train" else held_out), source
    raise FileNotFoundError(f"no calibration-cache entry with token ids for this run under cache_root={cfg.cache_root} "
                            "(tilt_fit samples nothing): pass the cache the run used (--cache-root), or re-run "
                            "`python train.py` with the run's config to rebuild it")


def tilt_fit(run_dir, cache_root=None, prompts: str = "held_out", max_prompts: int | None = None,
             max_samples: int | None = None, batch_prompts: int = 8, device: str = "cpu", write: bool = True) -> dict:
    """The tilt-fit statistics (module docstring) of the finished run in `run_dir` on one prompt set ("held_out"
    or "train"), from its saved policy and cached reference samples; with `write`, stored under that set's key in
    `<run_dir>/tilt_fit.json`. `max_prompts`: the first N prompts of the set; `max_samples`: the first K of each
    prompt's samples (each still calibrated against all the others)."""
    import torch

    from infalign.core.calibration import leave_one_out_calibrated
    from infalign.models.data import load_partitions
    from infalign.models.logprobs import response_logprobs
    from infalign.models.policy import load_policy
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import rollout_from_tokens
    from infalign.runtime.atomic import atomic_write_json
    from infalign.study.run_config import transform_from_run  # allow-listed, with the recorded t
    from infalign.trainer.prompts import prompt_sets

    if prompts not in PROMPT_SETS:
        raise ValueError(f"prompts must be one of {PROMPT_SETS}, got {prompts!r}")
    run_dir = Path(run_dir)
    final_path = run_dir / "final_metrics.json"
    if not final_path.is_file():
        raise FileNotFoundError(f"{final_path} is missing: tilt_fit reads a finished run")
    final = json.loads(final_path.read_text())
    cfg = _run_config(run_dir, cache_root)
    transform = transform_from_run(final, run_dir)  # the recorded t; None for raw rewards
    beta = float(final.get("beta", cfg.beta))

    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=False)
    train, held_out = prompt_sets(cfg, partitions, tokenizer)
    samples, chosen, source = _sample_entry(cfg, partitions, train, held_out, sampling_kwargs(cfg.generation), prompts)
    chosen = chosen[: max_prompts] if max_prompts else chosen
    ids = [p.id for p in chosen]
    rewards = samples.rewards_for(ids).to(torch.float64)
    c = leave_one_out_calibrated(rewards)  # [P, M]: each sample against the prompt's other M - 1
    phi = (rewards if transform is None else transform(c)).to(torch.float64)
    tokens, lengths = samples.tokens_for(ids)
    k = min(int(max_samples), samples.m) if max_samples else samples.m
    tokens, lengths, c, phi = tokens[:, :k], lengths[:, :k], c[:, :k], phi[:, :k]

    policy = _load_trained(run_dir, reference).to(device)
    reference = reference.to(device).eval()
    ratios = []
    with torch.inference_mode():
        for start in range(0, len(chosen), batch_prompts):
            part = slice(start, start + batch_prompts)
            rollout = rollout_from_tokens(tokenizer, [p.text for p in chosen[part]], tokens[part], lengths[part])
            rollout = replace(rollout, **{f: v.to(device) for f, v in vars(rollout).items() if torch.is_tensor(v)})
            mask = rollout.response_mask.to(torch.float64)
            lp = response_logprobs(policy, rollout).to(torch.float64) * mask
            lr = response_logprobs(reference, rollout).to(torch.float64) * mask
            ratios.append((lp - lr).sum(-1).cpu())
    logratio = torch.cat(ratios).view(len(chosen), k)
    labels = np.repeat(np.array(ids, dtype=object), k)
    stats = fit_slope(logratio.numpy().ravel(), (phi / beta).numpy().ravel(), labels, (c / beta).numpy().ravel())
    result = {"run_dir": str(run_dir), "prompt_set": prompts, "source": source,
              "cache_entry": str(samples.cache_path), "m": samples.m, "samples_per_prompt": k,
              "transform": final.get("transform"), "method": final.get("method"), "solver": final.get("solver"),
              "t": final.get("t"), "beta": beta, "seed": final.get("seed"), **stats}
    if write:
        atomic_write_json(run_dir / TILT_FIT, {**_stored(run_dir), prompts: result})
    return result


def _stored(run_dir) -> dict:
    """`<run>/tilt_fit.json` as a dict (empty when absent or unreadable)."""
    path = Path(run_dir) / TILT_FIT
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def read_tilt_fit(member_dir, prompt_set: str = "held_out") -> dict:
    """`<member>/tilt_fit.json`'s entry for `prompt_set` (empty when absent or unreadable): data only."""
    entry = _stored(member_dir).get(prompt_set)
    return entry if isinstance(entry, dict) else {}


def main(argv: list[str]) -> int:

    parser = cli_parser("python -m infalign.study.tilt_fit", __doc__)
    parser.add_argument("run_dir", type=Path, help="a finished run directory (final_metrics.json, policy/)")
    parser.add_argument("--prompts", choices=(*PROMPT_SETS, "both"), default="held_out")
    parser.add_argument("--max-prompts", type=int, default=None, help="the first N prompts of the set")
    parser.add_argument("--max-samples", type=int, default=None, help="the first K samples of each prompt")
    parser.add_argument("--cache-root", type=Path, default=None, help="the cache the run used (default: its own)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one JSON line per prompt set, not a weights bar per model
    except ImportError:
        pass
    sets = PROMPT_SETS if args.prompts == "both" else (args.prompts,)
    try:
        for which in sets:
            result = tilt_fit(args.run_dir, cache_root=args.cache_root, prompts=which, max_prompts=args.max_prompts,
                              max_samples=args.max_samples, device=args.device)
            print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}), flush=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
