"""Issue 30, item 1: yardsticks that are right. Each test fails on the code before it:

1. a prediction (or shape transfer) never mixes metrics: the paired comparison's prediction scales the tilts'
   difference on a metric by the two groups' gain fractions on that same metric (it used one gain fraction
   averaged over each group's own target metric), and every run has a gain fraction per metric;
2. a distill member's tilt yardstick is at M = distill.m - 1 (its target is calibrated leave-one-out against the
   pool's other samples), not calibration.m;
3. comparisons at matched KL: each method's metric regressed on KL across its seeds and evaluated at a common
   KL recovers a method offset exactly where the raw mean difference does not; the study writes orderings.csv
   with exactly the columns of the issue's Done-when.
"""

import csv
import json
import math

import numpy as np
import pytest
from test_study import fake_final, write_per_prompt

from infalign.core.transforms import BoNExpTransform, IdentityTransform
from infalign.study import analyze_sweep, write_study
from infalign.study.analysis import predicted_difference
from infalign.theory.efficiency import tilt_at_kl

BON_EXP_CFG = {"_target_": "infalign.theory.factories.bon_exp", "t": "auto"}
IDENTITY_CFG = {"_target_": "infalign.core.transforms.IdentityTransform"}
RAW_CFG = {"_target_": "infalign.core.transforms.RawTransform"}


def member(root, name, final, transform_cfg, **cfg):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(json.dumps({"n": final["n"], "beta": final["beta"],
                                                          "transform": transform_cfg, **cfg}))
    (d / "final_metrics.json").write_text(json.dumps(final))
    return d


# ------------------------------------------------------------------------------------- 1. no mixed metrics
def test_prediction_scales_the_tilts_difference_by_gain_fractions_on_the_same_metric():
    # bon_exp realises half its tilt's gain on best-of-4 (its target); calibrated 0.9 of its tilt's gain on the
    # standard win rate (its target) but only 0.3 on best-of-4. On best-of-4 the prediction is the tilts'
    # difference times (0.5 + 0.3) / 2, never times (0.5 + 0.9) / 2 (calibrated's standard-win-rate fraction).
    a = {"theory_bon": 0.80, "gain_fraction": 0.5, "gain_fraction_std": 0.6, "gain_fraction_bon": 0.5,
         "gain_fraction_won": 0.8, "metric": "bon", "seeds": 4}
    b = {"theory_bon": 0.76, "gain_fraction": 0.9, "gain_fraction_std": 0.9, "gain_fraction_bon": 0.3,
         "gain_fraction_won": 0.4, "metric": "std", "seeds": 4}
    p = predicted_difference(a, b, "bon", se=0.01)
    assert p["tilt_diff"] == pytest.approx(0.04)
    assert p["gain_fraction"] == pytest.approx(0.4) and p["predicted_diff"] == pytest.approx(0.016)
    assert p["predicted_diff"] != pytest.approx(0.04 * 0.7)  # the old mixed-metric number


@pytest.fixture(scope="module")
def per_metric_sweep(tmp_path_factory):
    """Runs whose measured win rates are the M = 16 tilt's with a different share of its gain on each metric."""
    root = tmp_path_factory.mktemp("per_metric")
    share = {"std": 0.9, "bon": 0.3, "won": 0.6}
    t = IdentityTransform()
    from test_study import on_tilt_at_m

    for seed in (0, 1):
        a = on_tilt_at_m(t, 0.3)
        win = {"std": a["win_rate"], "bon": a["bon_win_rate"], "won": a["won_win_rate"]}
        win = {k: 0.5 + share[k] * (w - 0.5) for k, w in win.items()}
        final = fake_final("calibrated", "identity", 0.3, seed, a["kl"], win["std"], win["bon"], win["won"])
        final.update(solver="rloo", calibration_m=16)
        d = member(root, str(seed), final, IDENTITY_CFG, calibration={"m": 16})
        write_per_prompt(d, [{"prompt_id": f"p{j}", "bon_win_rate@1": 0.6, "bon_win_rate@4": 0.6,
                              "won_win_rate@4": 0.6} for j in range(3)])
    return root, share


def test_every_run_has_a_gain_fraction_per_metric(per_metric_sweep):
    root, share = per_metric_sweep
    paths = write_study(root)
    study = analyze_sweep(root)
    for r in study.runs:
        for key, s in share.items():
            assert r[f"gain_fraction_{key}"] == pytest.approx(s, abs=1e-6), key
        assert r["gain_fraction"] == pytest.approx(share["std"], abs=1e-6)  # the target's: calibrated -> std
        assert math.isnan(r["gain_fraction_bon_held_in"])  # no held-in evaluation recorded
    rows = list(csv.DictReader(open(paths["efficiency"])))
    for key, s in share.items():
        assert float(rows[0][f"gain_fraction_{key}"]) == pytest.approx(s, abs=1e-6)
        assert f"gain_fraction_{key}_held_in" in rows[0]


# ------------------------------------------------------------------------------------- 2. distill's M
@pytest.fixture(scope="module")
def distill_sweep(tmp_path_factory):
    """The same bon_exp run twice at KL 0.388: trained by distillation from a 256-sample pool, and by RL
    (rloo); both with calibration.m = 16 in the config. The distill one also carries a held-in evaluation."""
    root = tmp_path_factory.mktemp("distill_m")
    for name, solver in (("distill", "distill"), ("rl", "rloo")):
        final = fake_final("bon_exp", "bon_exp", 0.24, 0, 0.388, 0.6, 0.66, 0.62)
        final.update(t=10.0, solver=solver, calibration_m=16)
        if solver == "distill":
            final.update({"eval_held_in/kl": 0.388, "eval_held_in/bon_win_rate@1": 0.6,
                          "eval_held_in/bon_win_rate@4": 0.66, "eval_held_in/won_win_rate@4": 0.62})
        member(root, name, final, BON_EXP_CFG, solver=solver, calibration={"m": 16}, distill={"m": 256})
    return root


def test_a_distill_members_yardstick_is_at_the_pools_m_minus_one(distill_sweep):
    runs = {r["member"]: r for r in analyze_sweep(distill_sweep).runs}
    at_255 = tilt_at_kl(BoNExpTransform(t=10.0), 0.388, 4, 255)
    at_16 = tilt_at_kl(BoNExpTransform(t=10.0), 0.388, 4, 16)
    assert abs(at_255["bon"] - at_16["bon"]) > 0.02  # the two yardsticks are far apart here
    d, rl = runs["distill"], runs["rl"]
    assert d["m"] == 255 and d["calibration_m"] == 16 and rl["m"] == 16
    for key in ("std", "bon", "won"):
        assert d[f"theory_{key}"] == pytest.approx(at_255[key], abs=1e-9)
        assert rl[f"theory_{key}"] == pytest.approx(at_16[key], abs=1e-9)
    assert d["tilt_win_rate_at_kl"] == pytest.approx(at_255["bon"], abs=1e-9)
    assert d["gain_fraction"] == pytest.approx((0.66 - 0.5) / (at_255["bon"] - 0.5), abs=1e-9)
    # the held-in evaluation (same numbers here) gets the same yardstick
    assert d["gain_fraction_bon_held_in"] == pytest.approx(d["gain_fraction_bon"], abs=1e-9)


# ------------------------------------------------------------------------------------- 3. matched KL
def test_matched_difference_recovers_a_method_offset_the_mean_difference_misses():
    from infalign.study.orderings import matched_difference

    a0, slope, offset = 0.55, 0.35, 0.013
    xa = np.array([0.30, 0.33, 0.37, 0.41, 0.44])
    xb = np.array([0.40, 0.42, 0.47, 0.52, 0.56, 0.60])
    ya, yb = a0 + slope * xa + offset, a0 + slope * xb
    d = matched_difference(xa, ya, xb, yb)
    assert d["diff"] == pytest.approx(offset, abs=1e-9)
    assert d["kl"] == pytest.approx(0.5 * (xa.mean() + xb.mean()))
    assert d["se"] == pytest.approx(0.0, abs=1e-9) and (d["seeds_a"], d["seeds_b"]) == (5, 6)
    assert abs((ya.mean() - yb.mean()) - offset) > 0.03  # the raw mean difference is mostly the KL difference
    # noise: the s.e. is the two fits' prediction s.e. at the common KL
    rng = np.random.default_rng(0)
    ya2, yb2 = ya + rng.normal(0, 0.01, len(xa)), yb + rng.normal(0, 0.01, len(xb))
    d2 = matched_difference(xa, ya2, xb, yb2)
    se = []
    for x, y in ((xa, ya2), (xb, yb2)):
        fit = np.polyfit(x, y, 1)
        s2 = ((y - np.polyval(fit, x)) ** 2).sum() / (len(x) - 2)
        se.append(s2 * (1 / len(x) + (d2["kl"] - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum()))
        assert (d2["slope_a"] if x is xa else d2["slope_b"]) == pytest.approx(fit[0])
    assert d2["se"] == pytest.approx(math.sqrt(sum(se))) and d2["z"] == pytest.approx(d2["diff"] / d2["se"])


OFFSETS = {"calibrated": (0.40, 0.0, 0.0), "bon_exp": (0.30, 0.0, 0.02), "raw": (0.50, -0.01, 0.0)}  # kl0, std, bon


@pytest.fixture(scope="module")
def matched_sweep(tmp_path_factory):
    """Four seeds of calibrated, bon_exp and raw (rloo, M = 16) at different KLs; every metric exactly linear in
    the KL (and in the calibrated KL, 0.2 of it), plus a method offset: bon_exp +0.02 on best-of-4, raw -0.01 on
    the standard win rate."""
    root = tmp_path_factory.mktemp("matched")
    cfgs = {"calibrated": ("identity", IDENTITY_CFG, None), "bon_exp": ("bon_exp", BON_EXP_CFG, 10.0),
            "raw": ("raw", RAW_CFG, None)}
    for method, (kl0, off_std, off_bon) in OFFSETS.items():
        name, cfg, t = cfgs[method]
        for seed in range(4):
            kl = kl0 + 0.05 * seed + 0.01 * seed**2
            final = fake_final(method, name, 0.2, seed, kl, 0.55 + 0.2 * kl + off_std, 0.6 + 0.3 * kl + off_bon, 0.7)
            final.update({"t": t, "solver": "rloo", "calibration_m": 16, "eval/kl_calibrated": 0.2 * kl})
            member(root, f"{method}_seed{seed}", final, cfg, calibration={"m": 16})
    return root


@pytest.fixture(scope="module")
def matched_paths(matched_sweep):
    """write_study(matched_sweep), once (the tests below read its files)."""
    return write_study(matched_sweep)


def test_orderings_csv_at_matched_kl_with_the_shape_transfer(matched_sweep, matched_paths):
    paths = matched_paths
    with open(paths["orderings"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["a", "b", "metric", "matched", "diff", "se", "z", "seeds_a", "seeds_b",
                                 "shape_transfer", "shape_transfer_se", "config"]
    got = {(r["a"], r["b"], r["metric"], r["matched"]): r for r in rows}
    assert set(got) == {("bon_exp", "calibrated", "bon@4", m) for m in ("calibrated_kl", "kl")} | {
        ("calibrated", "raw", "std", m) for m in ("calibrated_kl", "kl")}  # no won_exp in the sweep: no row
    for m in ("calibrated_kl", "kl"):
        assert float(got[("bon_exp", "calibrated", "bon@4", m)]["diff"]) == pytest.approx(0.02, abs=1e-9)
        assert float(got[("calibrated", "raw", "std", m)]["diff"]) == pytest.approx(0.01, abs=1e-9)
        assert got[("bon_exp", "calibrated", "bon@4", m)]["seeds_a"] == "4"
        assert math.isnan(float(got[("calibrated", "raw", "std", m)]["shape_transfer"]))  # raw: no tilt
    # the study's raw difference of the means is not the offset (bon_exp spent less KL)
    study = analyze_sweep(matched_sweep)
    mean = {m: np.mean([r["bon@4"] for r in study.runs if r["method"] == m]) for m in ("bon_exp", "calibrated")}
    assert abs(mean["bon_exp"] - mean["calibrated"] - 0.02) > 0.02
    # shape transfer: the matched difference over the tilts' difference at the common calibrated KL, M = 16
    o = next(o for o in study.orderings if o["a"] == "bon_exp" and o["matched"] == "calibrated_kl")
    kls = {m: np.mean([r["kl_calibrated"] for r in study.runs if r["method"] == m]) for m in ("bon_exp", "calibrated")}
    x0 = 0.5 * (kls["bon_exp"] + kls["calibrated"])
    assert o["at_kl"] == pytest.approx(x0)
    tilt = tilt_at_kl(BoNExpTransform(t=10.0), x0, 4, 16)["bon"] - tilt_at_kl(IdentityTransform(), x0, 4, 16)["bon"]
    assert o["tilt_diff"] == pytest.approx(tilt, abs=1e-9) and tilt > 0.01
    row = got[("bon_exp", "calibrated", "bon@4", "calibrated_kl")]
    assert float(row["shape_transfer"]) == pytest.approx(0.02 / tilt, rel=1e-6)
    assert float(row["shape_transfer_se"]) == pytest.approx(float(row["se"]) / tilt, abs=1e-12)
    # matched on sequence KL: no shape transfer (a tilt's KL is over calibrated ranks; it has no sequence KL)
    assert math.isnan(float(got[("bon_exp", "calibrated", "bon@4", "kl")]["shape_transfer"]))
    assert "## The claimed orderings at matched KL" in paths["markdown"].read_text()


# ------------------------------------------------------------- issue 31: maxk against CTRL; held-in beside held-out
@pytest.fixture(scope="module")
def maxk_sweep(tmp_path_factory):
    """Four seeds each of maxk (solver maxk, method maxk, recording the bon_exp transform it did not use),
    bon_exp and calibrated (solver rloo), every metric linear in the KL, with offsets on best-of-4: maxk +0.03,
    bon_exp +0.02 (held-out); on the training prompts (eval_held_in/*) bon_exp +0.05 and maxk +0.04."""
    root = tmp_path_factory.mktemp("maxk")
    arms = {"maxk": ("maxk", "bon_exp", BON_EXP_CFG, 0.03, 0.04, 0.35), "bon_exp": ("rloo", "bon_exp", BON_EXP_CFG, 0.02,
                                                                                 0.05, 0.30),
            "calibrated": ("rloo", "identity", IDENTITY_CFG, 0.0, 0.0, 0.40)}
    for method, (solver, transform, cfg, off, off_in, kl0) in arms.items():
        for seed in range(4):
            kl = kl0 + 0.05 * seed + 0.01 * seed**2
            final = fake_final(method, transform, 0.2, seed, kl, 0.55 + 0.2 * kl, 0.6 + 0.3 * kl + off, 0.7)
            final.update({"t": 10.0 if transform == "bon_exp" else None, "solver": solver, "metric": "bon",
                          "calibration_m": 16, "eval/kl_calibrated": 0.2 * kl, "eval_held_in/kl": kl + 0.1,
                          "eval_held_in/kl_calibrated": 0.2 * (kl + 0.1),
                          "eval_held_in/bon_win_rate@1": 0.56 + 0.2 * kl,
                          "eval_held_in/bon_win_rate@4": 0.62 + 0.3 * kl + off_in,
                          "eval_held_in/won_win_rate@4": 0.7})
            member(root, f"{method}_seed{seed}", final, cfg, calibration={"m": 16})
    return root


@pytest.fixture(scope="module")
def maxk_study(maxk_sweep):
    """analyze_sweep(maxk_sweep), once (the two tests below read it)."""
    return analyze_sweep(maxk_sweep)


def test_maxk_is_compared_with_each_method_of_another_solver_without_a_tilt(maxk_study):
    study = maxk_study
    maxk_runs = [r for r in study.runs if r["solver"] == "maxk"]
    assert len(maxk_runs) == 4 and all(math.isnan(r["theory_bon"]) for r in maxk_runs)  # not bon_exp's tilt
    assert all(r["metric"] == "bon" for r in maxk_runs)
    got = {(o["a"], o["b"], o["metric"], o["matched"]): o for o in study.orderings}
    for b, off in (("bon_exp", 0.01), ("calibrated", 0.03)):
        for m in ("calibrated_kl", "kl"):
            o = got[("maxk", b, "bon@4", m)]
            assert o["diff"] == pytest.approx(off, abs=1e-9)
            assert math.isnan(o["shape_transfer"]) and "solver_a=maxk solver_b=rloo" in o["config"]
    assert ("maxk", "bon_exp", "std", "kl") not in got and not any(o["a"] == "won_exp" for o in study.orderings)


def test_orderings_on_the_training_prompts_beside_the_held_out_ones(maxk_study):
    study = maxk_study
    got = {(o["a"], o["b"], o["metric"], o["matched"]): o for o in study.orderings}
    assert got[("bon_exp", "calibrated", "bon@4", "calibrated_kl")]["diff"] == pytest.approx(0.02, abs=1e-9)
    held_in = got[("bon_exp", "calibrated", "bon@4_held_in", "calibrated_kl")]
    assert held_in["diff"] == pytest.approx(0.05, abs=1e-9)
    assert got[("maxk", "bon_exp", "bon@4_held_in", "kl")]["diff"] == pytest.approx(-0.01, abs=1e-9)
    # its shape transfer: over the tilts' difference at the held-in common KL
    assert held_in["shape_transfer"] == pytest.approx(0.05 / held_in["tilt_diff"], rel=1e-9)


def test_collect_joins_several_studies_tables(maxk_sweep, matched_sweep, matched_paths, tmp_path):
    from infalign.study.collect import main

    write_study(maxk_sweep)  # matched_sweep's tables: matched_paths
    assert main([str(maxk_sweep), str(matched_sweep), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "orderings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["config"].split(":")[0] for r in rows} == {maxk_sweep.name, matched_sweep.name}
    with open(maxk_sweep / "orderings.csv", newline="") as f:
        assert rows[:len(list(csv.DictReader(f)))] == [r for r in rows if r["config"].startswith(maxk_sweep.name)]
    with open(tmp_path / "solver_efficiency.csv", newline="") as f:
        eff = list(csv.DictReader(f))
    assert {r["study"] for r in eff} == {maxk_sweep.name, matched_sweep.name} and "gain_fraction_bon_held_in" in eff[0]
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
