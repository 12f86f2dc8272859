"""infalign.theory.efficiency: gain fraction and KL efficiency of hand-made "runs" against the tilt of their
own transform and against the optimum (issue 15)."""

import math

import pytest

from infalign.core.transforms import BoNExpTransform, IdentityTransform, RawTransform, WoNExpTransform
from infalign.theory.efficiency import (
    TILT_DRAWS,
    measured_win_rate,
    optimal_tilt_at_kl,
    optimum_at,
    optimum_kl_for_win_rate,
    target_metric,
    tilt_kl_for_win_rate,
)
from infalign.theory.finite_m import cache_averaged_summary
from infalign.theory.run_efficiency import efficiency_columns, optimum_efficiency, tilt_efficiency

M = 16
CASES = [(BoNExpTransform(t=10.0), "bon", 0.4), (WoNExpTransform(t=8.0), "won", 0.1), (IdentityTransform(), "std", 0.3)]


def on_tilt(transform, metric, beta, m=M, n=4):
    """(KL, win rate) of the tilt of `transform` through an m-sample calibration at `beta` (the exact
    fixed-cache form, with the efficiency's own draws): a run on the curve."""
    r = cache_averaged_summary(transform, beta, m, n, draws=TILT_DRAWS, seed=0)
    return r["kl"], r[{"std": "win_rate", "bon": "bon_win_rate", "won": "won_win_rate"}[metric]]


@pytest.mark.parametrize("transform, metric, beta", CASES)
def test_a_run_on_the_tilt_curve_has_gain_fraction_and_kl_efficiency_one(transform, metric, beta):
    kl, win = on_tilt(transform, metric, beta)
    assert optimal_tilt_at_kl(transform, kl, 4, metric, M) == pytest.approx(win, abs=1e-7)
    e = tilt_efficiency(transform, kl, win, 4, metric, M)
    assert e.gain_fraction == pytest.approx(1.0, abs=1e-6) and e.kl_efficiency == pytest.approx(1.0, abs=1e-6)
    assert e.note == ""


@pytest.mark.parametrize("transform, metric, beta", CASES)
def test_half_the_gain_and_what_the_tilt_needs_for_it(transform, metric, beta):
    kl, win = on_tilt(transform, metric, beta)
    half = 0.5 + 0.5 * (win - 0.5)
    e = tilt_efficiency(transform, kl, half, 4, metric, M)
    assert e.gain_fraction == pytest.approx(0.5, abs=1e-6)
    needed, capped = tilt_kl_for_win_rate(transform, half, 4, metric, M)
    assert not capped and 0 < needed < kl and e.kl_efficiency == pytest.approx(needed / kl, rel=1e-9)
    # the tilt spending `needed` reaches exactly the run's win rate
    assert optimal_tilt_at_kl(transform, needed, 4, metric, M) == pytest.approx(half, abs=1e-7)
    # the same run at twice the KL: the tilt's gain there is larger, the efficiency halves
    twice = tilt_efficiency(transform, 2 * kl, win, 4, metric, M)
    assert twice.kl_efficiency == pytest.approx(0.5, abs=1e-6) and twice.gain_fraction < 1.0


def test_the_reference_and_runs_at_or_below_half():
    t = BoNExpTransform(t=10.0)
    for e in (tilt_efficiency(t, 0.0, 0.5, 4, "bon", M), optimum_efficiency(0.0, 0.5, 4, "bon")):
        assert e.curve_win_rate == 0.5 and math.isnan(e.gain_fraction) and math.isnan(e.kl_efficiency)
        assert "reference" in e.note
    kl, win = on_tilt(t, "bon", 0.2)
    for e in (tilt_efficiency(t, kl, 0.45, 4, "bon", M), optimum_efficiency(kl, 0.45, 4, "bon")):
        assert e.gain_fraction == pytest.approx(-0.05 / (e.curve_win_rate - 0.5)) and e.gain_fraction < 0
        assert e.kl_needed == 0.0 and e.kl_efficiency == 0.0
    assert tilt_efficiency(t, kl, 0.5, 4, "bon", M).kl_efficiency == 0.0


def test_a_run_on_the_optimum_curve_and_above_it():
    kl = 0.4
    win = optimum_at(4, "bon", kl)
    e = optimum_efficiency(kl, win, 4, "bon")
    assert e.gain_fraction == pytest.approx(1.0, abs=1e-6) and e.kl_efficiency == pytest.approx(1.0, abs=1e-6)
    assert optimum_kl_for_win_rate(4, "bon", win) == (pytest.approx(kl, rel=1e-6), False)
    half = optimum_efficiency(kl, 0.5 + 0.5 * (win - 0.5), 4, "bon")
    assert half.gain_fraction == pytest.approx(0.5, abs=1e-6) and 0 < half.kl_efficiency < 0.5  # concave curve
    # the optimum dominates the tilt at every KL: a run on the tilt is below it on both numbers
    tilt_kl, tilt_win = on_tilt(BoNExpTransform(t=10.0), "bon", 0.2)
    below = optimum_efficiency(tilt_kl, tilt_win, 4, "bon")
    assert below.gain_fraction < 1.0 and below.kl_efficiency < 1.0


def test_a_win_rate_above_all_the_tilt_reaches_is_capped_and_said():
    t = WoNExpTransform(t=8.0)
    kl, win = on_tilt(t, "won", 0.1)
    e = tilt_efficiency(t, kl, 1.0 + 1e-9, 4, "won", M)  # no tilt reaches a win rate above 1
    assert "capped" in e.note and math.isfinite(e.kl_needed) and e.kl_efficiency > 1.0


def test_target_metric_of_each_method_and_explicit():
    assert [target_metric(m) for m in ("bon_exp", "bon_distill", "won_exp", "calibrated", "raw")] == \
        ["bon", "bon", "won", "std", "std"]
    assert target_metric(None, "log") == "bon" and target_metric(None, IdentityTransform()) == "std"
    assert target_metric("bon_exp", metric="won") == "won"
    with pytest.raises(ValueError, match="no target metric"):
        target_metric("mystery")
    final = {"eval/bon_win_rate@1": 0.6, "eval/bon_win_rate@4": 0.7, "eval/won_win_rate@4": 0.8}
    assert [measured_win_rate(final, k, 4) for k in ("std", "bon", "won")] == [0.6, 0.7, 0.8]


def test_efficiency_columns_for_a_calibrated_run_and_for_raw():
    t = BoNExpTransform(t=10.0)
    kl, win = on_tilt(t, "bon", 0.2)
    cols = efficiency_columns(t, kl, win, 4, "bon", M)
    assert cols["metric"] == "bon" and cols["gain_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert cols["optimum_win_rate_at_kl"] >= cols["tilt_win_rate_at_kl"] - 1e-4
    raw = efficiency_columns(RawTransform(), kl, win, 4, "std", M)
    assert math.isnan(raw["gain_fraction"]) and math.isnan(raw["kl_efficiency"]) and "raw" in raw["efficiency_note"]
    assert math.isfinite(raw["gain_fraction_optimum"])


def test_finite_m_changes_the_tilt_curve():
    """The tilt through a 16-sample calibration is not the continuous one (the study must use the run's M)."""
    t = WoNExpTransform(t=13.8)
    assert abs(optimal_tilt_at_kl(t, 0.1, 4, "won", M) - optimal_tilt_at_kl(t, 0.1, 4, "won", None)) > 5e-3
