"""The end-of-run summary in plain words (`print_summary`); `bar_metric`, the win rate the run is built for."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from infalign.config.rules import is_real
from infalign.runtime.console import format_number

log = logging.getLogger("infalign.trainer.run")

__all__ = ["bar_metric", "print_summary"]


def bar_metric(run_info: dict, transform) -> str:
    """The metric whose win rate the progress bar shows: the run's target (bon / won / std), bon if none is known."""
    from infalign.theory.efficiency import target_metric

    try:
        return target_metric(run_info.get("method"), transform)
    except ValueError:
        return "bon"


def _method_label(final: dict) -> str:
    """What was trained for: the transform, with the exp family's t (` (t=21.09, auto for n=4)`: whether the theory
    chose it), or the solver, for one that uses no transform (maxk: the run's method is then the solver's name)."""
    if final.get("solver") is not None and final.get("method") == final["solver"]:
        target = {"bon": "best", "won": "worst"}.get(final.get("metric"))
        which = f"the {target}-of-{final.get('n')}" if target else "its target"
        return f"solver={final['solver']} ({which} win rate's own gradient; no transform)"
    t = final.get("t")
    auto = f", auto for n={final['n']}" if final.get("t_auto") else ""
    return f"transform={final['transform']}" + ("" if t is None else f" (t={t:.4g}{auto})")


def print_summary(final: dict, run_dir: Path, n: int) -> None:
    """The end of the run in plain words, for someone who has not read the paper: what each win rate compares, the
    KL per response (an estimate near 0 shown as ~0), where the files are. Research diagnostics (gain fraction, KL
    efficiency, calibrated KL) stay in final_metrics.json and the study tools."""

    def num(key):
        return is_real(final.get(key))

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
        f"infalign run finished in {final['wall_seconds']:.0f} s: {_method_label(final)} n={n} "
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
