"""Tilt fit: how closely a trained policy is the tilt its transform asks for, measured with no sampling.

The optimum of the KL-regularised objective is the tilt pi*(y|x) = pi_ref(y|x) exp(Phi(C(x, y)) / beta) / Z(x)
(math page, section 2). So on reference samples y_1..y_M of a prompt x the exact tilt has

    log pi(y_j|x) - log pi_ref(y_j|x) = Phi(C_j) / beta - log Z(x):

within a prompt, the log-ratio is an exact straight line in Phi(C)/beta with slope 1. `tilt_fit` scores the
run's stored reference samples (their token ids, as drawn) under the run's saved policy and the reference,
calibrates each sample leave-one-out against the prompt's other M - 1 samples (`leave_one_out_calibrated`), applies
the run's transform (its recorded t), and regresses. Statistics (`fit_slope`; "~" = demeaned within the prompt,
which removes log Z(x); every prompt's samples pooled):

- `slope`: OLS of logratio~ on (Phi(C)/beta)~. 1 = the tilt exactly; 0 = the reference (or a policy whose
  log-ratio does not move with Phi(C) on these samples); between = a tilt at a larger beta. `slope_se`: its
  standard error clustered by prompt (`slope_se_simple`: the homoscedastic one). `r2`: share of the within-prompt
  variance of the log-ratio that Phi(C)/beta explains (1 for the exact tilt; the rest is drift the calibrated
  reward does not see).
- `shape`: the coefficient on Phi(C)/beta when the log-ratio~ is regressed on Phi(C)/beta~ and C/beta~ together,
  i.e. the slope on the part of Phi that is not linear in C (for bon_exp its convexity, for won_exp its
  concavity). 1 for the exact tilt, 0 for any policy whose log-ratio is linear in C (the identity's shape:
  calibrated RLHF at any beta, and the reference); for the transform's tilt at another temperature s (log-ratio =
  s Phi(C)/beta) it is s, like the slope. `shape_se`: clustered by prompt.
- `shape_ratio` = shape / slope: 1 = the policy follows the transform's shape (in proportion to how far it
  follows the tilt at all), 0 = it tilts linearly in C, as the identity would. Noisy when the slope is near 0.
  None (with `shape`) for a transform linear in C (identity), where there is no shape beyond the identity's.
- `prompt_slope_median`, `prompt_slope_q25`, `prompt_slope_q75`: the per-prompt slopes' spread; `per_prompt`
  lists each prompt's slope.
- `logratio_mean`: the mean log-ratio on reference samples, an estimate of -KL(pi_ref || pi) (nats).

Samples: `prompts="held_out"`: the calibration cache's M samples of each evaluation prompt (fresh reference
samples the run never trained on); `prompts="train"`: the distillation pool's paths (the samples a distill run
trained on) when the run has a pool, else the calibration cache's samples of the training prompts (an RL run's
calibration set). Nothing is sampled or scored by the reward model: the cache entries hold the token ids and
rewards, and a missing entry is an error (the run's cache_root: pass `cache_root=` for a moved cache).

    python -m infalign.study.tilt_fit <run_dir> [--prompts held_out|train|both] [--max-prompts N]
                                      [--max-samples K] [--cache-root DIR] [--device cpu]

prints one JSON line and writes `<run_dir>/tilt_fit.json` ({"held_out": {...}, "train": {...}}, each prompt set
replacing only its own entry, written atomically). The study tables read its `held_out` slope and shape
(`infalign.study.analysis`). The run's own config builds its models (as a resume would), so run it only on runs
you trust; the study tables only read the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np

__all__ = ["OUTPUT", "fit_slope", "read_tilt_fit", "tilt_fit"]

OUTPUT = "tilt_fit.json"
PROMPT_SETS = ("held_out", "train")
_LINEAR = 1e-10  # Phi's part not linear in C, relative to Phi's variance, below which the shape is undefined


# ------------------------------------------------------------------------------------------------ the regression
def _demean(x: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    sums = np.bincount(groups, weights=x, minlength=count)
    sizes = np.bincount(groups, minlength=count)
    return x - (sums / np.maximum(sizes, 1))[groups]


def _ols(x: np.ndarray, y: np.ndarray, groups: np.ndarray, count: int, dof: int):
    """Coefficients of y on the columns of x (no intercept: both demeaned), their clustered and simple s.e."""
    xtx = x.T @ x
    inv = np.linalg.inv(xtx)
    coef = inv @ (x.T @ y)
    resid = y - x @ coef
    scores = np.zeros((count, x.shape[1]))
    np.add.at(scores, groups, x * resid[:, None])
    used = int((np.bincount(groups, minlength=count) > 0).sum())
    n, k = len(y), x.shape[1]
    if used > 1 and n > k:
        correction = used / (used - 1) * (n - 1) / max(n - k, 1)
        clustered = np.sqrt(np.maximum(np.diag(inv @ (scores.T @ scores) @ inv) * correction, 0.0))
    else:
        clustered = np.full(k, np.nan)
    sigma2 = float(resid @ resid) / dof if dof > 0 else np.nan
    simple = np.sqrt(np.maximum(np.diag(inv) * sigma2, 0.0))
    return coef, clustered, simple, resid


def _number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def fit_slope(logratio, phi_over_beta, prompt_ids, c_over_beta=None) -> dict:
    """The within-prompt regression of `logratio` (log pi - log pi_ref of each sample) on `phi_over_beta`
    (Phi(C)/beta), samples grouped by `prompt_ids` (any hashable labels, one per sample); with `c_over_beta`
    (C/beta) also the shape statistic. Pure numpy: the module docstring defines every number returned (None where
    undefined: no sample varies in Phi(C) within its prompt, or a transform linear in C for the shape)."""
    y = np.asarray(logratio, dtype=np.float64).ravel()
    f = np.asarray(phi_over_beta, dtype=np.float64).ravel()
    labels = list(np.asarray(prompt_ids, dtype=object).ravel())
    if not (len(y) == len(f) == len(labels)) or (c_over_beta is not None and len(np.ravel(c_over_beta)) != len(y)):
        raise ValueError(f"fit_slope: logratio, phi_over_beta, prompt_ids (and c_over_beta) need one value per "
                         f"sample, got {len(y)}, {len(f)}, {len(labels)}")
    if not (np.isfinite(y).all() and np.isfinite(f).all()):
        raise ValueError("fit_slope: logratio and phi_over_beta must be finite")
    index: dict = {}
    groups = np.array([index.setdefault(p, len(index)) for p in labels], dtype=np.int64)
    count = len(index)
    yd, fd = _demean(y, groups, count), _demean(f, groups, count)
    sxx = float(fd @ fd)
    out: dict = {"samples": len(y), "prompts": count, "slope": None, "slope_se": None, "slope_se_simple": None,
                 "r2": None, "shape": None, "shape_se": None, "shape_ratio": None, "prompt_slope_median": None,
                 "prompt_slope_q25": None, "prompt_slope_q75": None, "logratio_mean": _number(y.mean()) if len(y)
                 else None, "per_prompt": []}
    # per prompt
    sxy_p = np.bincount(groups, weights=fd * yd, minlength=count)
    sxx_p = np.bincount(groups, weights=fd * fd, minlength=count)
    sizes = np.bincount(groups, minlength=count)
    scale = np.bincount(groups, weights=f * f, minlength=count)
    varies = sxx_p > 1e-12 * np.maximum(scale, 1e-300)
    per = np.where(varies, sxy_p / np.where(varies, sxx_p, 1.0), np.nan)
    out["per_prompt"] = [{"prompt_id": str(p), "samples": int(sizes[i]), "slope": _number(per[i])}
                         for p, i in index.items()]
    if varies.any():
        q25, median, q75 = np.percentile(per[varies], [25, 50, 75])
        out.update(prompt_slope_median=float(median), prompt_slope_q25=float(q25), prompt_slope_q75=float(q75))
    if sxx <= 0 or not varies.any():
        return out
    coef, clustered, simple, resid = _ols(fd[:, None], yd, groups, count, dof=len(y) - count - 1)
    syy = float(yd @ yd)
    out.update(slope=float(coef[0]), slope_se=_number(clustered[0]), slope_se_simple=_number(simple[0]),
               r2=_number(1.0 - float(resid @ resid) / syy) if syy > 0 else None)
    if c_over_beta is not None:
        cd = _demean(np.asarray(c_over_beta, dtype=np.float64).ravel(), groups, count)
        # Phi's part not linear in C: without one, Phi and C are the same regressor (the identity)
        nonlinear = fd - cd * (float(cd @ fd) / float(cd @ cd)) if float(cd @ cd) > 0 else fd
        if float(nonlinear @ nonlinear) > _LINEAR * sxx:
            coef2, clustered2, _, _ = _ols(np.stack([fd, cd], axis=1), yd, groups, count, dof=len(y) - count - 2)
            out.update(shape=float(coef2[0]), shape_se=_number(clustered2[0]))
            out["shape_ratio"] = _number(coef2[0] / coef[0]) if coef[0] != 0 else None
    return out


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
    solver, iterations = build_solver(cfg), int(cfg.rl.iterations)  # as run.py decides whether the run has a pool
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
    try:  # the study's reader of a run's transform (allow-listed, the recorded t), in run_config.py or runs.py
        from infalign.study.run_config import transform_from_run
    except ImportError:
        from infalign.study.runs import transform_from_run
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
            rollout = type(rollout)(**{f: getattr(rollout, f).to(device) if torch.is_tensor(getattr(rollout, f))
                                       else getattr(rollout, f) for f in ("input_ids", "attention_mask",
                                                                           "response_mask", "prompt_len")})
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
        out = run_dir / OUTPUT
        try:
            stored = json.loads(out.read_text()) if out.is_file() else {}
        except (OSError, ValueError):
            stored = {}
        stored = stored if isinstance(stored, dict) else {}
        stored[prompts] = result
        atomic_write_json(out, stored)
    return result


def read_tilt_fit(member_dir, prompt_set: str = "held_out") -> dict:
    """`<member>/tilt_fit.json`'s entry for `prompt_set` (empty when absent or unreadable): data only."""
    path = Path(member_dir) / OUTPUT
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    entry = stored.get(prompt_set) if isinstance(stored, dict) else None
    return entry if isinstance(entry, dict) else {}


def main(argv: list[str]) -> int:
    doc = __doc__.strip()
    parser = argparse.ArgumentParser(prog="python -m infalign.study.tilt_fit", description=doc.split("\n\n")[0],
                                     epilog="\n\n".join(doc.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
