"""SmolLM2-135M-Instruct on 2 CPU cores (issue 16, item 1): generation throughput, the log-probs' memory, and a
short run of `scale=smollm2` (peak RSS, seconds per iteration, best-of-4 win rate against the reference).

    python bench/smollm2.py                          # all three parts; the table goes to docs/smollm2.md
    python bench/smollm2.py --parts generation,logprobs
    python bench/smollm2.py --parts run model.lora.r=16 optimizer.lr=2e-4   # the run with LoRA

Parts:
- `generation`: the trainer's sampler (`infalign.models.sampling.generate`, as a training rollout calls it, the
  sampled log-probs recorded) on `rl.prompts_per_iteration` held-out HH prompts x `rl.k`, in the model's chat
  template, `generation.max_new_tokens` new tokens; fp32, and under bf16 autocast (what trainer.precision=
  bf16-mixed would give the rollouts). New (real) tokens per second, the median of `--repeats`, prefill included.
- `logprobs`: one minibatch (`rl.minibatch_size` of those rollouts) of policy log-probs and their backward, in a
  fresh process each, with the scores in chunks (`infalign.models.logprobs.LOGITS_BUDGET`) and in one piece
  (the whole batch's full-vocabulary scores at once, as before): peak RSS and seconds.
- `run`: `python train.py scale=smollm2 <overrides>` in its own process: peak RSS (ru_maxrss), seconds per
  iteration (median of the logged phases, first iteration excluded), KL and best-of-4 / standard win rates
  against the reference with their standard errors over the held-out prompts.
Run it alone on a quiet machine: load averages before and after are printed with the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_memory import phases, run_train  # noqa: E402  (the same process, RSS and phase accounting)

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from infalign.runtime.paths import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=["scale=smollm2", *overrides])


def rollout_inputs(cfg):
    """The policy, its tokenizer and `rl.prompts_per_iteration` held-out prompts rendered as the trainer does."""
    from infalign.models.data import load_partitions
    from infalign.models.policy import format_prompts, load_policy
    from infalign.models.prompt_text import truncate_prompt

    model, tok = load_policy(cfg.model, cfg.data, cfg.cache_root)
    seen, prompts = set(), []
    for record in load_partitions(cfg.data)["validation"]:
        if record.prompt_id not in seen:
            seen.add(record.prompt_id)
            prompts.append(truncate_prompt(record.prompt, tok, int(cfg.data.max_prompt_tokens)))
        if len(prompts) == int(cfg.rl.prompts_per_iteration):
            break
    return model, tok, format_prompts(prompts, tok, cfg.model.prompt_format)


def bench_generation(cfg, repeats: int) -> list[dict]:
    import torch

    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import generate

    model, tok, prompts = rollout_inputs(cfg)
    gen = sampling_kwargs(cfg.generation)
    rows = []
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        times, tokens = [], []
        for r in range(repeats + 1):  # the first warms up
            torch.manual_seed(r)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                rollout = generate(model, tok, prompts, int(cfg.rl.k), gen, record_logprobs=True)
            if r:
                times.append(time.perf_counter() - start)
                tokens.append(int(rollout.response_mask.sum()))
        s = statistics.median(times)
        rows.append({"variant": name, "sequences": len(prompts) * int(cfg.rl.k), "seconds": s,
                     "new_tokens": statistics.median(tokens), "tokens_per_s": statistics.median(tokens) / s})
        print(f"generation {name}: {rows[-1]['tokens_per_s']:.0f} new tokens/s", file=sys.stderr, flush=True)
    return rows


def logprobs_child(overrides: list[str], whole: bool) -> None:
    """One minibatch of log-probs + backward; prints its seconds (the parent reads this process's peak RSS)."""
    import torch

    import infalign.models.logprobs as lp
    from infalign.models.pure_sampling import sampling_kwargs
    from infalign.models.sampling import Rollout, generate

    cfg = compose(overrides)
    model, tok, prompts = rollout_inputs(cfg)
    torch.manual_seed(0)
    rollout = generate(model, tok, prompts, int(cfg.rl.k), sampling_kwargs(cfg.generation))
    size = int(cfg.rl.minibatch_size)
    sub = Rollout(rollout.input_ids[:size], rollout.attention_mask[:size], rollout.response_mask[:size],
                  rollout.prompt_len)
    model.requires_grad_(True)
    start = time.perf_counter()
    logp = lp.response_logprobs(model, sub, budget=2**62 if whole else lp.LOGITS_BUDGET)
    logp.sum().backward()
    print(json.dumps({"seconds": time.perf_counter() - start, "tokens": int(sub.response_mask.sum()),
                      "width": int(sub.response_mask.sum(-1).max())}))


def bench_logprobs(overrides: list[str]) -> list[dict]:
    rows = []
    for name, whole in (("chunked", False), ("whole batch", True)):
        cmd = [sys.executable, __file__, "--logprobs-child", "whole" if whole else "chunked", *overrides]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{shlex.join(cmd)} failed")
        rows.append({"variant": name, **json.loads(out.strip().splitlines()[-1]), "rss_mb": usage.ru_maxrss / 1024})
        print(f"logprobs {name}: {rows[-1]['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return rows


def bench_run(overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="infalign-smollm2-")) / "run"
    out = run_train(["scale=smollm2", "logger=none", "progress=false", *overrides], run_dir)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    n = int(compose(overrides).n)
    return {"run_dir": str(run_dir), "rss_mb": out["rss_mb"], "wall": out["wall"], **phases(run_dir),
            "kl": final["eval/kl"], "bon": final[f"eval/bon_win_rate@{n}"], "bon_se": final[f"eval/bon_win_rate@{n}_se"],
            "standard": final["eval/bon_win_rate@1"], "standard_se": final["eval/bon_win_rate@1_se"], "n": n,
            "length": final.get("eval/response_length")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="train.py overrides on top of scale=smollm2")
    ap.add_argument("--parts", default="generation,logprobs,run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc", default=str(REPO / "docs" / "smollm2.md"))
    ap.add_argument("--logprobs-child", choices=["chunked", "whole"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.logprobs_child:
        return logprobs_child(args.overrides, args.logprobs_child == "whole")

    import torch

    from infalign.runtime.atomic import atomic_write_text

    parts = args.parts.split(",")
    load_before = os.getloadavg()[0]
    cfg = compose(args.overrides)
    gen = bench_generation(cfg, args.repeats) if "generation" in parts else []
    logp = bench_logprobs(args.overrides) if "logprobs" in parts else []
    run = bench_run(args.overrides) if "run" in parts else None
    load_after = os.getloadavg()[0]

    command = " ".join(["python bench/smollm2.py", shlex.join(sys.argv[1:])]).strip()
    lines = [f"### `{command}`", "",
             f"{dt.datetime.now():%Y-%m-%d %H:%M}; {platform.processor() or platform.machine()}, {os.cpu_count()} "
             f"cores, torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_before:.2f} "
             f"before, {load_after:.2f} after.", ""]
    if gen:
        lines += [f"Generation: {int(cfg.rl.prompts_per_iteration)} prompts x k = {int(cfg.rl.k)}, up to "
                  f"{int(cfg.generation.max_new_tokens)} new tokens, median of {args.repeats}:", "",
                  "| precision | sequences | new tokens | seconds | new tokens / s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['variant']} | {r['sequences']} | {r['new_tokens']:.0f} | {r['seconds']:.1f} | "
                  f"{r['tokens_per_s']:.0f} |" for r in gen] + [""]
    if logp:
        lines += [f"Log-probs and backward of one minibatch ({int(cfg.rl.minibatch_size)} sequences), each in a fresh "
                  "process (peak RSS includes the model and the rollout):", "",
                  "| scores | response tokens | longest | seconds | peak RSS (MB) |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['variant']} | {r['tokens']} | {r['width']} | {r['seconds']:.1f} | {r['rss_mb']:.0f} |"
                  for r in logp] + [""]
    if run:
        lines += [f"Short run (`python train.py scale=smollm2 {shlex.join(args.overrides)}`, {run['iterations']} timed "
                  f"iterations), evaluated on {int(cfg.data.eval_prompts)} held-out prompts x {int(cfg.eval.k)}:",
                  "", f"| peak RSS (MB) | s / iteration | update s | KL (nats) | best-of-{run['n']} win rate | standard "
                  "win rate | wall s |", "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {run['rss_mb']:.0f} | {run['iteration_s']:.1f} | {run['update_s']:.1f} | {run['kl']:.3f} | "
                  f"{run['bon']:.3f} ± {run['bon_se']:.3f} | {run['standard']:.3f} ± {run['standard_se']:.3f} | "
                  f"{run['wall']:.0f} |", "", f"Run directory: `{run['run_dir']}`.", ""]
    text = "\n".join(lines)
    previous = Path(args.doc).read_text() if Path(args.doc).exists() else "# SmolLM2-135M-Instruct on CPU\n\n"
    atomic_write_text(args.doc, previous.rstrip("\n") + "\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
