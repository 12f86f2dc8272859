"""The win-rate-vs-KL frontier of each method without training, on the default models (docs/frontier.md).

    python bench/frontier.py                                   # 48 held-out prompts, M' = 128, L = 64
    python bench/frontier.py --prompts 4 --fresh 16 --independent 8 --doc /tmp/f.md --csv /tmp/f.csv   # a check
    python bench/frontier.py n=8 calibration.m=32              # any train.py overrides

For the held-out evaluation prompts (`data.eval_prompts`) it takes the run's calibration cache (M samples
per prompt, built if missing, exactly as train.py builds it), draws M' fresh reference samples and an independent
set of L with `infalign.trainer.rollout.sample_and_score` (seeded per prompt by the streams `frontier_fresh` and
`frontier_independent`), and stores those reward tables under outputs/bench/frontier/ (reused when the key
matches). Then `infalign.study.frontier.frontier` tilts the fresh samples by weight for each method over a beta
grid spanning KL ~0.05 to ~2 nats:
- calibrated (identity), bon_distill (log, with m = M) at betas from the `at_m` closed form;
- bon_exp / won_exp with t as training chooses it at each beta (`factories.bon_exp(n, beta=beta)`), betas from
  the `at_m` form of the t chosen at the config's beta;
- raw at betas found numerically on the measured KL.
Beside each measured point: the exact fixed-cache closed form (`cache_averaged_summary`) and `at_m`.
Writes the markdown report (`--doc`) and the CSV (`--csv`), both atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET_KLS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
CACHE_VERSION = 1


def load(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from infalign.runtime.paths import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose("train", overrides=["logger=none", *overrides])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def reward_tables(cfg, prompts: int, fresh: int, independent: int, seed: int, progress: bool) -> dict:
    """{cache [P, M], fresh [P, M'], independent [P, L], prompt_ids, hit, seconds} for the first `prompts`
    held-out prompts, from the bench cache when its key matches."""
    import functools

    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    from infalign.models.data import load_partitions
    from infalign.models.policy import load_policy
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.reward import load_reward_model
    from infalign.runtime.atomic import atomic_write_bytes
    from infalign.runtime.manifest import fingerprint
    from infalign.runtime.seeds import derive_seed
    from infalign.trainer.calibration_cache import load_or_build_reference_samples
    from infalign.trainer.pieces import calibration_key
    from infalign.trainer.prompts import prompt_sets as _prompt_sets
    from infalign.trainer.rollout import sample_and_score

    started = time.perf_counter()
    partitions = load_partitions(cfg.data)
    reference, tokenizer = load_policy(cfg.model, cfg.data, cfg.cache_root, partitions=partitions, progress=progress)
    reward = load_reward_model(cfg.reward, cfg.data, cfg.model, cfg.cache_root, partitions=partitions, progress=progress)
    train, held_out = _prompt_sets(cfg, partitions, tokenizer)
    everything = train + held_out
    gen_kwargs = sampling_kwargs(cfg.generation)
    cal_key = calibration_key(cfg, partitions, [p[0] for p in everything], gen_kwargs)
    # the run's own calibration cache (train + held-out prompts: the key train.py uses), built if missing
    calibration = functools.partial(
        load_or_build_reference_samples, cache_root=cfg.cache_root, key=cal_key,
        prompt_ids=[p[0] for p in everything], prompts=[p[1] for p in everything],
        reward_prompts=[p[2] for p in everything], reference=reference, tokenizer=tokenizer, reward_model=reward,
        m=int(cfg.calibration.m), gen_kwargs=gen_kwargs, seed=int(cfg.calibration.seed),
        prompts_per_batch=int(cfg.calibration.prompts_per_batch), progress=progress)()
    chosen = held_out[:prompts]
    ids = [p[0] for p in chosen]
    cache = calibration.rewards_for(ids).double()

    key = {"version": CACHE_VERSION, "calibration": cal_key, "prompts": fingerprint(ids), "fresh": fresh,
           "independent": independent, "seed": seed}
    path = REPO / "outputs" / "bench" / "frontier" / f"{fingerprint(key)}.safetensors"
    if path.exists():
        tensors = load_tensors(path.read_bytes())
        stored = json.loads(tensors.pop("key").numpy().tobytes().decode())
        if stored == json.loads(json.dumps(key)):
            return {"cache": cache, "fresh": tensors["fresh"], "independent": tensors["independent"],
                    "prompt_ids": ids, "hit": True, "seconds": time.perf_counter() - started, "path": path}

    tables = {}
    for stream, k in (("frontier_fresh", fresh), ("frontier_independent", independent)):
        rows = []
        for i, (_, prompt, reward_prompt) in enumerate(chosen):
            # one prompt per call, seeded by its index: a prompt's samples do not depend on --prompts
            torch.manual_seed(derive_seed(seed, stream, i))
            scored = sample_and_score(reference, tokenizer, reward, [prompt], [reward_prompt], k, gen_kwargs,
                                      where=f"bench/frontier ({stream})")
            rows.append(scored.rewards.double())
            if progress:
                print(f"\r{stream}: {i + 1}/{len(chosen)} prompts x {k}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        tables[stream.removeprefix("frontier_")] = torch.cat(rows)
    # the key travels inside the file (as bytes), so a reader checks what it loads, not only the file name
    key_bytes = torch.frombuffer(bytearray(json.dumps(key, sort_keys=True).encode()), dtype=torch.uint8)
    atomic_write_bytes(path, save_tensors({**{k: v.contiguous() for k, v in tables.items()}, "key": key_bytes}))
    return {"cache": cache, **tables, "prompt_ids": ids, "hit": False, "seconds": time.perf_counter() - started,
            "path": path}


def method_points(cache: torch.Tensor, fresh: torch.Tensor, n: int, base_beta: float):
    """(method, transform or None, beta) for each point of each method's beta grid."""
    from infalign.core.transforms import IdentityTransform, LogTransform
    from infalign.study.frontier import beta_for_frontier_kl
    from infalign.theory import at_m, beta_for_kl, factories

    m = cache.shape[1]

    def closed_form_betas(transform) -> list[float]:
        betas = []
        for kl in TARGET_KLS:
            try:
                betas.append(beta_for_kl(at_m(transform, m), kl))
            except ValueError:  # out of the transform's reach: skipped, not extrapolated
                pass
        return betas

    points = [("calibrated", IdentityTransform(), b) for b in closed_form_betas(IdentityTransform())]
    log = LogTransform(m=m)
    distill_betas = sorted({*closed_form_betas(log), 1.0 / (n - 1)} if n > 1 else closed_form_betas(log))
    points += [("bon_distill", log, b) for b in distill_betas]
    for method, factory in (("bon_exp", factories.bon_exp), ("won_exp", factories.won_exp)):
        # the grid from the t training would choose at the config's beta; then t as training chooses it per beta
        for b in closed_form_betas(factory(n=n, beta=base_beta)):
            points.append((method, factory(n=n, beta=b), b))
    for kl in TARGET_KLS:
        try:
            points.append(("raw", None, beta_for_frontier_kl(cache, fresh, None, kl)))
        except ValueError:
            pass
    return points


def fmt(row: dict, key: str) -> str:
    return f"{row[key]:.3f} ± {row[key + '_se']:.3f}"


def report(rows: list[dict], header: dict) -> str:
    lines = [
        "# The frontier without training: tilting reference samples by weight",
        "",
        "Each method's optimum is a tilted reference, `pi* ∝ pi_ref exp(Phi(C)/beta)`. This realises it without any",
        "policy or RL: per held-out prompt, M' fresh reference samples are calibrated against the run's calibration",
        "cache (M samples), weighted by `softmax(Phi(C)/beta)` (raw: `softmax(r/beta)`), and the weighted (soft",
        "best-of-M') policy is scored against an independent set of L reference samples "
        "(`infalign.study.frontier`).",
        "KL = mean over prompts of `sum w log(M' w)`; ESS = `1/sum w^2`; win rates: standard, best-of-N and",
        "worst-of-N (`weighted_inference_win_rate_per_prompt`); ± one standard error over prompts. Beside them the",
        "closed forms at the same beta: *exact* = the fixed-cache expectation (`theory.cache_averaged_summary`,",
        "what this measurement estimates), *at_m* = the transform averaged over calibration sets (`theory.at_m`).",
        "A finite M' biases the KL low (at most log M'), most where the ESS is small.",
        "",
        f"- command: `{header['command']}`",
        f"- date: {header['date']}; machine: {header['machine']}; torch threads {header['threads']}",
        f"- `uptime` before: `{header['uptime_before']}`",
        f"- `uptime` after: `{header['uptime_after']}`",
        f"- prompts: {header['prompts']} held-out; M = {header['m']}, M' = {header['fresh']}, L = {header['independent']},"
        f" N = {header['n']}; reward tables {'reused from' if header['hit'] else 'sampled into'} `{header['path']}`",
        f"- wall: {header['wall']:.0f} s (models, cache and sampling {header['sampling']:.0f} s; frontier and closed "
        f"forms {header['analysis']:.0f} s)",
        "- check: mean calibrated reward against the cache (0.5 for samples of the cache's own distribution): "
        + ", ".join(f"{k} {m:.3f} ± {se:.3f}" for k, (m, se) in header["check"].items()),
        "",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        lines += [f"## {method}", "",
                  "| beta | t | KL | ESS | std | bon@N | won@N | KL exact | bon exact | won exact | KL at_m | "
                  "bon at_m | won at_m |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["method"] == method):
            t = "" if math.isnan(r["t"]) else f"{r['t']:.1f}"
            closed = " | ".join("" if math.isnan(r[k]) else f"{r[k]:.3f}" for k in (
                "kl_exact", "bon_win_rate_exact", "won_win_rate_exact", "kl_at_m", "bon_win_rate_at_m",
                "won_win_rate_at_m"))
            lines.append(f"| {r['beta']:.4g} | {t} | {fmt(r, 'kl')} | {r['ess']:.1f} | {fmt(r, 'win_rate')} | "
                         f"{fmt(r, 'bon_win_rate')} | {fmt(r, 'won_win_rate')} | {closed} |")
        lines.append("")
    calibrated = [r for r in rows if not math.isnan(r["kl_exact"])]
    if calibrated:
        lines += ["## Measured vs closed forms", "",
                  "Over the calibrated points (exact = the fixed-cache closed form at the same beta): the largest",
                  "|measured - exact|, and the largest in standard errors over prompts (se floored at 0.001):", "",
                  "| | KL | std | bon@N | won@N |", "|---|---|---|---|---|"]
        keys = ("kl", "win_rate", "bon_win_rate", "won_win_rate")
        diff = {k: max(abs(r[k] - r[f"{k}_exact"]) for r in calibrated) for k in keys}
        z = {k: max(abs(r[k] - r[f"{k}_exact"]) / max(r[f"{k}_se"], 1e-3) for r in calibrated) for k in keys}
        lines += ["| max abs diff | " + " | ".join(f"{diff[k]:.3f}" for k in keys) + " |",
                  "| max diff / se | " + " | ".join(f"{z[k]:.1f}" for k in keys) + " |", "",
                  "The exact form assumes reference rewards without ties and tilts the continuum of reference",
                  "responses; the measurement tilts M' of them, so its KL sits below the exact one where the ESS is",
                  "small (at most log M').", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py config overrides (e.g. n=8)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts (default data.eval_prompts)")
    ap.add_argument("--fresh", type=int, default=128, help="M': fresh reference samples per prompt to tilt")
    ap.add_argument("--independent", type=int, default=64, help="L: independent reference samples per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=4000, help="Monte Carlo caches of the exact closed form")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--doc", default=str(REPO / "docs" / "frontier.md"))
    ap.add_argument("--csv", default=str(REPO / "docs" / "frontier.csv"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from infalign.runtime.atomic import atomic_write_csv, atomic_write_text
    from infalign.study.frontier import FRONTIER_COLUMNS, frontier

    started, uptime_before = time.perf_counter(), uptime()
    cfg = load(args.overrides)
    n = int(cfg.n)
    prompts = args.prompts or int(cfg.data.eval_prompts)
    if args.independent < n:
        raise SystemExit(f"--independent must be >= N = {n} (the reference side of the best-of-N win rate)")
    tables = reward_tables(cfg, prompts, args.fresh, args.independent, args.seed, not args.no_progress)
    sampled = time.perf_counter()
    cache, fresh, independent = tables["cache"], tables["fresh"], tables["independent"]
    rows = []
    for method, transform, beta in method_points(cache, fresh, n, float(cfg.beta)):
        (row,) = frontier(cache, fresh, independent, transform, [beta], n, draws=args.draws, seed=args.seed)
        rows.append({"method": method, **row})
    finished = time.perf_counter()
    # exchangeability check: calibrated against the cache, reference samples average 0.5 (ties aside) if the
    # fresh and independent draws come from the distribution the cache was sampled from
    from infalign.core.calibration import EmpiricalCalibrator

    check = {}
    for name, table in (("fresh", fresh), ("independent", independent)):
        per_prompt = EmpiricalCalibrator()(table, cache).mean(dim=1)
        check[name] = (float(per_prompt.mean()), float(per_prompt.std() / math.sqrt(per_prompt.numel())))
    header = {
        "command": " ".join(["python bench/frontier.py", *sys.argv[1:]]),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "uptime_before": uptime_before, "uptime_after": uptime(),
        "prompts": cache.shape[0], "m": cache.shape[1], "fresh": fresh.shape[1], "independent": independent.shape[1],
        "n": n, "hit": tables["hit"], "path": os.path.relpath(tables["path"], REPO),
        "wall": finished - started, "sampling": sampled - started, "analysis": finished - sampled,
        "check": check,
    }
    text = report(rows, header)
    atomic_write_text(args.doc, text + "\n")
    atomic_write_csv(args.csv, rows, ["method", *FRONTIER_COLUMNS])
    print(text)
    print(f"\nwrote {args.doc} and {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
