"""A run's measured (KL, win rate) against the theory's curves: its gain fraction and KL efficiency (issue 15).

For a curve `W` of :mod:`infalign.theory.efficiency` (the tilt of the run's own transform, `tilt_efficiency`, or
the optimum, `optimum_efficiency`), `gain_fraction = (w - 0.5) / (W(k) - 0.5)` and `kl_efficiency = W^-1(w) / k`:
both 1 on the curve, above 1 the run beat it (possible against the tilt, which maximises `E[Phi] - beta KL`, not
the metric). The edge cases (a run at the reference's KL, at or below `KL_FLOOR`; a win rate above the curve's
reach, where the KL efficiency is a lower bound) are said in the `Efficiency`'s note; `efficiency_columns`
flattens both into the columns the study records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from infalign.core.checks import check_n
from infalign.theory.efficiency import (
    KL_FLOOR,
    optimal_tilt_at_kl,
    optimum_at,
    optimum_kl_for_win_rate,
    target_metric,
    tilt_kl_for_win_rate,
)

__all__ = ["Efficiency", "efficiency_columns", "gain_fraction", "optimum_efficiency", "tilt_efficiency"]


# ---------------------------------------------------------------------------------------------- efficiency
@dataclass(frozen=True)
class Efficiency:
    """A run's (KL, win rate) against one curve (module docstring)."""

    metric: str
    kl: float  # measured
    win_rate: float  # measured, on `metric`
    curve_win_rate: float  # the curve's win rate at the measured KL
    kl_needed: float  # the KL the curve needs for the measured win rate
    gain_fraction: float
    kl_efficiency: float
    note: str = ""


def gain_fraction(win: float, curve_win: float) -> float:
    """(win - 0.5) / (curve_win - 0.5): the share of the curve's gain over the reference the run got; NaN without
    a curve or with no gain to share."""
    gain = curve_win - 0.5
    return (win - 0.5) / gain if math.isfinite(gain) and gain > 1e-12 else math.nan


def _efficiency(metric: str, kl: float, win: float, curve_at_kl, kl_for_win, what: str) -> Efficiency:
    if not (math.isfinite(kl) and math.isfinite(win)):
        return Efficiency(metric, kl, win, math.nan, math.nan, math.nan, math.nan, f"{what}: no measured KL or win rate")
    if kl <= KL_FLOOR:  # the reference: the curve's gain and the KL spent are both 0, their ratios undefined
        return Efficiency(metric, kl, win, 0.5, math.nan, math.nan, math.nan,
                          f"{what}: measured KL at the reference (<= {KL_FLOOR:g} nats): no efficiency defined")
    notes = []
    try:
        at_kl = curve_at_kl(kl)
    except ValueError as e:
        at_kl, capped_at = math.nan, str(e)
        notes.append(f"{what} n/a at this KL: {capped_at}")
    needed, capped = kl_for_win(win)
    if capped:
        notes.append(f"{what}: measured win rate {win:.4f} is above all it reaches; KL needed capped at its end "
                     f"({needed:.4g} nats), so the KL efficiency is a lower bound")
    return Efficiency(metric, kl, win, at_kl, needed, gain_fraction(win, at_kl), needed / kl, "; ".join(notes))


def tilt_efficiency(transform, kl: float, win: float, n: int, metric: str, m: int | None = None,
                    grid=None) -> Efficiency | None:
    """The run against the optimal tilt of its own transform (through its `m`-sample calibration); None for
    raw rewards (`transform` None or uncalibrated: no closed form)."""
    if transform is None or getattr(transform, "needs_calibration", True) is False:
        return None
    metric, n = target_metric(metric=metric), check_n(n)
    return _efficiency(metric, float(kl), float(win),
                       lambda k: optimal_tilt_at_kl(transform, k, n, metric, m, grid),
                       lambda w: tilt_kl_for_win_rate(transform, w, n, metric, m, grid), "tilt")


def optimum_efficiency(kl: float, win: float, n: int, metric: str) -> Efficiency:
    """The run against the best any policy reaches on `metric` (`optimum_at`)."""
    metric, n = target_metric(metric=metric), check_n(n)
    return _efficiency(metric, float(kl), float(win), lambda k: optimum_at(n, metric, k),
                       lambda w: optimum_kl_for_win_rate(n, metric, w), "optimum")


def efficiency_columns(transform, kl: float, win: float, n: int, metric: str, m: int | None = None) -> dict:
    """The flat columns final_metrics.json and the study record for one run:

    metric, win_rate (measured, on the metric), tilt_win_rate_at_kl, tilt_kl_needed, gain_fraction,
    kl_efficiency (against the tilt of the run's transform; NaN for raw), optimum_win_rate_at_kl,
    optimum_kl_needed, gain_fraction_optimum, kl_efficiency_optimum, efficiency_note."""
    tilt = tilt_efficiency(transform, kl, win, n, metric, m)
    opt = optimum_efficiency(kl, win, n, metric)
    nan = math.nan
    notes = [e.note for e in (tilt, opt) if e is not None and e.note]
    if tilt is None:
        notes.insert(0, "raw reward: no tilt of a calibrated transform to compare with (optimum only)")
    return {"metric": opt.metric, "win_rate": win,
            "tilt_win_rate_at_kl": tilt.curve_win_rate if tilt else nan,
            "tilt_kl_needed": tilt.kl_needed if tilt else nan,
            "gain_fraction": tilt.gain_fraction if tilt else nan,
            "kl_efficiency": tilt.kl_efficiency if tilt else nan,
            "optimum_win_rate_at_kl": opt.curve_win_rate, "optimum_kl_needed": opt.kl_needed,
            "gain_fraction_optimum": opt.gain_fraction, "kl_efficiency_optimum": opt.kl_efficiency,
            "efficiency_note": "; ".join(notes)}
