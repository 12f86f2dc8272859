"""Studies: the method presets and study configs compose as documented; infalign.study's numbers (gaps to
theory, mean ± SE over seeds, matched KL) against closed forms; a smoke study end to end; both notebooks
execute on it and are committed without outputs."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from conftest import finish_started, stop_started, study_sweep
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import open_dict

from infalign.core.transforms import BoNExpTransform, IdentityTransform, LogTransform, WoNExpTransform
from infalign.runtime.paths import REPO_ROOT, conf_dir
from infalign.study import analyze_sweep, markdown, optimum_at, runs, write_study
from infalign.study.analysis import RAW_NOTE, Study, matched_kl, predicted_difference, response_lengths, theory_at_kl
from infalign.study.runs import SWEEP_DIR_ENV, find_sweep_dir
from infalign.theory import analyze, best_t, factories

NOTEBOOKS = REPO_ROOT / "notebooks"
METHODS = {  # preset -> (transform class, calibrator class)
    "raw": ("RawTransform", "PassThroughCalibrator"),
    "calibrated": ("IdentityTransform", "EmpiricalCalibrator"),
    "bon_distill": ("LogTransform", "EmpiricalCalibrator"),
    "bon_exp": ("factories.bon_exp", "EmpiricalCalibrator"),
    "won_exp": ("factories.won_exp", "EmpiricalCalibrator"),
}


def compose_train(*overrides):
    """The composed config; Hydra's config set as train.py has it (a study's beta reads the method choice)."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("method", METHODS)
def test_method_presets_choose_transform_and_calibrator(method):
    cfg = compose_train(f"method={method}", "n=4", "beta=0.2")
    transform_cls, calibrator_cls = METHODS[method]
    assert "method" not in cfg  # Hydra records the choice: no key repeats the preset's file name
    assert cfg.transform._target_.endswith(transform_cls) and cfg.calibrator._target_.endswith(calibrator_cls)
    transform = instantiate(cfg.transform)
    if method.endswith("_exp"):  # t: auto resolves through the theory; transform.t=4 fixes it
        assert cfg.transform.t == "auto" and transform.auto and 1.0 < transform.t < 100.0
        assert instantiate(compose_train(f"method={method}", "transform.t=4").transform).t == 4.0


@pytest.mark.parametrize("study, min_seeds", [("bon", 3), ("won", 3), ("compact", 3), ("smoke", 2)])
def test_study_sweeps_every_method_over_its_own_beta_grid(study, min_seeds):
    params = study_sweep(study)
    parser = OverridesParser.create()

    def values(key):
        override = parser.parse_override(f"{key}={params[key]}")
        return list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]

    methods, levels, seeds = values("method"), [int(i) for i in values("study.beta_index")], values("seed")
    assert len(seeds) >= min_seeds and set(methods) <= set(METHODS)
    for method in methods:
        for level in {levels[0], levels[-1]}:  # composing is slow-ish: the ends of the grid suffice
            cfg = compose_train(f"study={study}", f"method={method}", f"study.beta_index={level}")
            assert HydraConfig.get().runtime.choices.method == method
            assert cfg.beta == cfg.study.betas[method][level]
        betas = list(cfg.study.betas[method])
        assert len(betas) == len(levels) == len(set(betas)), f"{method}: grid and swept indices differ, or repeats"
        assert all(b > 0 for b in betas)
    assert set(cfg.study.betas) == set(methods), "a grid for every swept method and none unused"
    bad = compose_train(f"study={study}", f"method={methods[0]}", "study.beta_index=99")
    with pytest.raises(Exception, match="outside the list"):
        _ = bad.beta


# ------------------------------------------------------------------------------------------ analysis
def identity_closed_form(beta: float) -> tuple[float, float]:
    """KL and standard win rate of p(u) ∝ exp(u / beta), written out by hand (independent of the grid code)."""
    a = 1.0 / beta
    mean = 1.0 / (-math.expm1(-a)) - beta
    log_z = math.log(beta) + a + math.log(-math.expm1(-a))
    return mean / beta - log_z, mean


def fake_member(root, i, final, transform_cfg):
    d = root / str(i)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(json.dumps({"n": final["n"], "beta": final["beta"], "transform": transform_cfg}))
    (d / "final_metrics.json").write_text(json.dumps(final))


def fake_final(method, transform, beta, seed, kl, std, bon, won, se=0.02):
    out = {"method": method, "transform": transform, "calibrator": "passthrough" if transform == "raw" else "empirical",
           "n": 4, "beta": beta, "seed": seed, "t": None, "eval/kl": kl}
    for n, (b, w) in {1: (std, std), 4: (bon, won)}.items():
        out.update({f"eval/bon_win_rate@{n}": b, f"eval/won_win_rate@{n}": w,
                    f"eval/bon_win_rate@{n}_se": se, f"eval/won_win_rate@{n}_se": se})
    return out


@pytest.fixture(scope="module")
def closed_form_sweep(tmp_path_factory):
    """calibrated runs exactly on identity's closed form plus a per-seed offset, and two raw runs."""
    root, i = tmp_path_factory.mktemp("closed_form"), 0
    for beta in (0.5, 0.2, 0.1):
        kl, std = identity_closed_form(beta)
        a = analyze(IdentityTransform(), beta, 4)
        for seed in (0, 1, 2):
            delta = 0.01 * (seed - 1)
            final = fake_final("calibrated", "identity", beta, seed, kl, std + delta, a["bon_win_rate"] + delta,
                               a["won_win_rate"] + delta)
            fake_member(root, i, final, {"_target_": "infalign.core.transforms.IdentityTransform"})
            i += 1
    for seed in (0, 1):
        final = fake_final("raw", "raw", 1.0, seed, 0.3 + 0.1 * seed, 0.6, 0.62, 0.7)
        fake_member(root, i, final, {"_target_": "infalign.core.transforms.RawTransform"})
        i += 1
    return root


def test_gaps_to_theory_recover_the_offset_from_the_closed_form(closed_form_sweep):
    study = analyze_sweep(closed_form_sweep)
    assert study.methods == ["calibrated", "raw"] and len(study.runs) == 11
    for r in study.runs:
        if r["method"] == "raw":
            assert r["note"] == RAW_NOTE and math.isnan(r["theory_bon"]) and math.isnan(r["gap_theory_std"])
            assert math.isfinite(r["gap_opt_bon"])
            continue
        delta = 0.01 * (r["seed"] - 1)
        assert r["theory_beta"] == pytest.approx(r["beta"], rel=1e-3)  # beta_for_kl inverted the closed-form KL
        for key in ("std", "bon", "won"):
            assert r[f"gap_theory_{key}"] == pytest.approx(delta, abs=3e-4), (key, r["beta"])
        assert r["gap_opt_std"] == pytest.approx(delta, abs=3e-4)  # identity is the standard win rate's optimum
        assert r["gap_opt_bon"] < delta - 0.02  # but far from the best-of-4 optimum at these KL


def test_seed_mean_and_standard_error_per_method_and_beta(closed_form_sweep):
    study = analyze_sweep(closed_form_sweep)
    groups = {(g["method"], g["beta"]): g for g in study.groups}
    assert len(groups) == 4 and groups[("raw", 1.0)]["seeds"] == 2
    g = groups[("calibrated", 0.2)]
    kl, std = identity_closed_form(0.2)
    assert g["seeds"] == 3 and g["kl"] == pytest.approx(kl) and g["kl_se"] == pytest.approx(0.0, abs=1e-12)
    assert g["std"] == pytest.approx(std) and g["std_se"] == pytest.approx(np.std([-0.01, 0, 0.01], ddof=1) / math.sqrt(3))
    assert g["gap_theory_bon"] == pytest.approx(0.0, abs=3e-4)
    assert groups[("raw", 1.0)]["kl"] == pytest.approx(0.35) and groups[("raw", 1.0)]["kl_se"] == pytest.approx(0.05)


def test_matched_kl_interpolates_inside_each_curve_only(closed_form_sweep):
    (kl_lo, std_lo), (kl_hi, std_hi) = identity_closed_form(0.5), identity_closed_form(0.2)
    target = 0.5 * (kl_lo + kl_hi)
    study = analyze_sweep(closed_form_sweep, kls=[target, 1.5])
    rows = {(m["method"], m["kl"]): m for m in study.matched}
    assert rows[("calibrated", target)]["std"] == pytest.approx(0.5 * (std_lo + std_hi))
    # the optimum (identity itself for N = 1) is concave in KL: above the chord, below the upper end
    assert 0.5 * (std_lo + std_hi) < rows[("calibrated", target)]["opt_std"] < std_hi
    assert math.isnan(rows[("calibrated", 1.5)]["std"])  # beyond the curve (KL <= 1.3): no extrapolation
    assert math.isnan(rows[("raw", target)]["std"])  # beyond raw's largest KL (0.4)
    auto = analyze_sweep(closed_form_sweep).matched  # common range of calibrated (0.15..1.3) and raw (0.3..0.4)
    assert auto and all(0.3 - 1e-9 <= m["kl"] <= 0.4 + 1e-9 and math.isfinite(m["bon"]) for m in auto)


def test_matched_kl_never_reports_the_chord_to_the_reference(closed_form_sweep):
    """Below a method's smallest measured KL there is no value (the chord from the reference is drawn in the
    figures only); measured ranges that do not overlap give no automatic matched KL at all."""
    study = analyze_sweep(closed_form_sweep, kls=[0.14])  # raw's points are at KL 0.3 and 0.4 (mean 0.35)
    raw = next(m for m in study.matched if m["method"] == "raw")
    assert all(math.isnan(raw[k]) for k in ("std", "bon", "won")) and "anchored" not in raw
    groups = [g for g in study.groups if g["method"] == "raw"]
    groups += [dict(g, method="high", label="high", kl=g["kl"] + 5.0) for g in groups]  # ranges that never overlap
    assert matched_kl(groups) == []
    assert "no KL range common" in markdown(Study(closed_form_sweep, study.runs, groups, [], [4], ["raw", "high"]))


# ------------------------------------------------------------------------------------------ KL efficiency, paired
def on_tilt_at_m(transform, beta, m=16):
    """KL and win rates of the tilt of `transform` through an m-sample calibration (the exact fixed-cache form
    the efficiency uses)."""
    from infalign.theory.efficiency import TILT_DRAWS
    from infalign.theory.finite_m import cache_averaged_summary

    return cache_averaged_summary(transform, beta, m, 4, draws=TILT_DRAWS, seed=0)


def write_per_prompt(member_dir, rows):
    with open(member_dir / "eval_per_prompt.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def efficiency_sweep(tmp_path_factory):
    """Runs exactly on the at_m tilt of their transform (M = 16 from the saved config), solver rloo; the same
    calibrated runs at half the gain with solver ppo; per-prompt tables with known differences for rloo."""
    root, i = tmp_path_factory.mktemp("efficiency"), 0
    cases = [("calibrated", "identity", IdentityTransform(), {"_target_": "infalign.core.transforms.IdentityTransform"},
              None, "std"),
             ("bon_exp", "bon_exp", BoNExpTransform(t=10.0), {"_target_": "infalign.theory.factories.bon_exp", "t": "auto"},
              10.0, "bon")]
    for solver, share in (("rloo", 1.0), ("ppo", 0.5)):
        for method, name, transform, cfg, t, metric in cases:
            if solver == "ppo" and method != "calibrated":
                continue
            for beta in (0.5, 0.3):
                a = on_tilt_at_m(transform, beta)
                win = {"std": a["win_rate"], "bon": a["bon_win_rate"]}
                win[metric] = 0.5 + share * (win[metric] - 0.5)  # the metric the method targets: a share of the gain
                for seed in (0, 1):
                    final = fake_final(method, name, beta, seed, a["kl"], win["std"], win["bon"], a["won_win_rate"])
                    final.update(t=t, solver=solver)
                    d = root / str(i)
                    (d / ".hydra").mkdir(parents=True)
                    (d / ".hydra" / "config.yaml").write_text(json.dumps(
                        {"n": 4, "beta": beta, "transform": cfg, "calibration": {"m": 16}, "rl": {"algo": solver}}))
                    (d / "final_metrics.json").write_text(json.dumps(final))
                    if solver == "rloo":  # per prompt: bon_exp wins 0.1 more on every prompt, seeds shift the level
                        base, step = (0.6, 0.001) if method == "calibrated" else (0.7, 0.002)
                        write_per_prompt(d, [{"prompt_id": f"p{j}", "bon_win_rate@1": base + 0.01 * j + step * seed,
                                              "bon_win_rate@4": base + 0.01 * j + step * seed, "won_win_rate@4": 0.5,
                                              "kl": a["kl"], "reward_calibrated": 0.5} for j in range(10)])
                    i += 1
    return root


@pytest.fixture(scope="module")
def efficiency_study(efficiency_sweep):
    """analyze_sweep(efficiency_sweep), once: the tests below read it (write_study analyses the sweep itself)."""
    return analyze_sweep(efficiency_sweep)


def test_runs_on_the_at_m_tilt_have_gain_fraction_and_kl_efficiency_one(efficiency_study):
    study = efficiency_study
    assert {r["m"] for r in study.runs} == {16} and {r["solver"] for r in study.runs} == {"rloo", "ppo"}
    for r in study.runs:
        key = r["metric"]
        assert key == ("std" if r["method"] == "calibrated" else "bon")
        if r["solver"] == "rloo":
            assert r[f"gap_theory_{key}"] == pytest.approx(0.0, abs=1e-6)
            assert r["gain_fraction"] == pytest.approx(1.0, abs=1e-6) and r["kl_efficiency"] == pytest.approx(1.0, abs=1e-6)
        else:
            assert r["gain_fraction"] == pytest.approx(0.5, abs=1e-6) and 0 < r["kl_efficiency"] < 0.5
        # the optimum dominates the tilt (identity is the standard win rate's optimum: equal, up to the traced
        # optimum curve's interpolation)
        assert r["gain_fraction_optimum"] <= r["gain_fraction"] + 1e-3
    # the continuous form (M ignored) would put the bon_exp runs off their curve: at_m matters here
    bon = next(r for r in study.runs if r["method"] == "bon_exp")
    continuous = analyze(BoNExpTransform(t=10.0), theory_at_kl(BoNExpTransform(t=10.0), bon["kl"], 4)["beta"], 4)
    assert abs(continuous["bon_win_rate"] - bon["bon@4"]) > 1e-3


def test_solver_efficiency_csv_and_the_markdown_tables(efficiency_sweep):
    paths = write_study(efficiency_sweep)
    rows = list(csv.DictReader(open(efficiency_sweep / "solver_efficiency.csv")))
    want = ["solver", "method", "beta", "seeds", "kl", "metric", "win_rate", "optimum_win_rate_at_kl", "gain_fraction",
            "kl_efficiency", "kl_calibrated"]
    assert set(want) <= set(rows[0])
    assert [(r["solver"], r["method"], float(r["beta"])) for r in rows] == [
        ("rloo", "calibrated", 0.5), ("rloo", "calibrated", 0.3), ("rloo", "bon_exp", 0.5), ("rloo", "bon_exp", 0.3),
        ("ppo", "calibrated", 0.5), ("ppo", "calibrated", 0.3)]
    for r in rows:
        assert r["seeds"] == "2" and float(r["gain_fraction"]) == pytest.approx(1.0 if r["solver"] == "rloo" else 0.5,
                                                                                abs=1e-6)
    md = paths["markdown"].read_text()
    assert "## KL efficiency of the solver" in md and "## Paired comparisons on the held-out prompts" in md
    assert "calibrated [ppo]" in md  # two solvers: one curve per (method, solver)


def test_paired_comparison_per_prompt_mean_and_standard_error(efficiency_study):
    study = efficiency_study
    rows = [p for p in study.paired if (p["method_a"], p["method_b"]) == ("calibrated [rloo]", "bon_exp [rloo]")]
    assert {p["metric"] for p in rows} == {"std", "bon"} and len(rows) == 4  # 2 betas of calibrated x 2 metrics
    for p in rows:
        # per prompt: (0.6 + 0.01 j + 0.001 s) - (0.7 + 0.01 j + 0.002 s), averaged over seeds 0, 1: -0.1005
        assert p["prompts"] == 10 and p["diff"] == pytest.approx(-0.1005) and p["se_prompts"] == pytest.approx(0, abs=1e-12)
        se_seeds = math.sqrt(np.var([0.0, 0.001], ddof=1) / 2 + np.var([0.0, 0.002], ddof=1) / 2)
        assert p["se_seeds"] == pytest.approx(se_seeds) and p["se"] == pytest.approx(se_seeds)
        assert p["kl_b"] == pytest.approx(min(g["kl"] for g in study.groups if g["label"] == "bon_exp [rloo]"
                                              and abs(g["kl"] - p["kl_a"]) == min(abs(h["kl"] - p["kl_a"])
                                              for h in study.groups if h["label"] == "bon_exp [rloo]")))
    assert not [p for p in study.paired if "ppo" in p["method_a"] + p["method_b"]]  # no per-prompt tables: no rows
    for p in rows:  # the prediction from the groups' own theory columns and gain fractions (1: runs on the tilt)
        ga = next(g for g in study.groups if g["label"] == p["method_a"] and g["kl"] == p["kl_a"])
        gb = next(g for g in study.groups if g["label"] == p["method_b"] and g["kl"] == p["kl_b"])
        tilt = ga[f"theory_{p['metric']}"] - gb[f"theory_{p['metric']}"]
        assert p["predicted_diff"] == pytest.approx(tilt, abs=1e-6) and p["z_predicted"] == pytest.approx(tilt / p["se"])


def test_predicted_difference_and_the_seeds_it_needs():
    a = {"theory_bon": 0.80, "gain_fraction_bon": 0.6, "seeds": 4}  # each on the metric compared (issue 30 item 1)
    b = {"theory_bon": 0.76, "gain_fraction_bon": 0.4, "seeds": 5}
    p = predicted_difference(a, b, "bon", se=0.01)
    # tilt 0.04 x mean gain fraction 0.5 = 0.02 = 2 s.e.; 3 s.e. needs (3/2)^2 = 2.25x the smaller side's 4 seeds
    assert p["tilt_diff"] == pytest.approx(0.04) and p["predicted_diff"] == pytest.approx(0.02)
    assert p["z_predicted"] == pytest.approx(2.0) and p["seeds_for_3se"] == 9
    raw = predicted_difference({"theory_bon": math.nan, "gain_fraction_bon": math.nan, "seeds": 4}, b, "bon", se=0.01)
    assert math.isnan(raw["predicted_diff"]) and math.isnan(raw["seeds_for_3se"])
    assert math.isnan(predicted_difference(a, b, "bon", se=math.nan)["z_predicted"])


def test_response_lengths_first_iteration_and_mean_of_the_last_three(tmp_path):
    (tmp_path / "logs").mkdir()
    rows = ["epoch,train/policy/response_length,eval/kl", "0,40.0,", "0,,0.1"]  # eval rows carry no length
    rows += [f"{i},{40.0 - 5 * i},"for i in range(1, 6)]  # 35, 30, 25, 20, 15
    (tmp_path / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert response_lengths(tmp_path) == (40.0, 20.0)
    assert all(math.isnan(v) for v in response_lengths(tmp_path / "missing"))


def test_optimum_dominates_every_transform_and_exp_family_nearly_reaches_it():
    for transform in (IdentityTransform(), LogTransform(), BoNExpTransform(t=12.0), WoNExpTransform(t=8.0)):
        for beta in (0.5, 0.3):  # KL below ~1.5 nats: the optimum curves already traced for the tests above
            a = analyze(transform, beta, 4)
            assert a["bon_win_rate"] <= optimum_at(4, "bon", a["kl"]) + 1e-4
            assert a["won_win_rate"] <= optimum_at(4, "won", a["kl"]) + 1e-4
            assert a["win_rate"] <= optimum_at(1, "std", a["kl"]) + 1e-4
    for mode in ("bon", "won"):  # the paper's point: the exp family at its best t is within a fraction of a point
        best = best_t(mode, 4, 0.5)
        assert optimum_at(4, mode, 0.5) - 0.005 < best["win_rate"] <= optimum_at(4, mode, 0.5) + 1e-4


def test_write_study_writes_tables_and_figures(closed_form_sweep):
    paths = write_study(closed_form_sweep)
    for key in ("figure_bon", "figure_won", "figure_std"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
    runs = list(csv.DictReader(open(paths["runs"])))
    assert len(runs) == 11 and {"gap_theory_bon", "gap_opt_won", "theory_std", "note"} <= set(runs[0])
    md = paths["markdown"].read_text()
    assert "| calibrated | 4 | 0.5 |" in md and "| raw | 4 | 1 |" in md and "n/a / n/a / n/a" in md


# ------------------------------------------------------------------------------------------ smoke study
@pytest.fixture(scope="module", autouse=True)
def smoke_study_started(start_train, tmp_path_factory):
    """`python train.py -m study=smoke`, started with this module's first test: it runs beside the tests above
    (configs and analyses in this process, none of which reads it) until `smoke_study` waits for it."""
    sweep = tmp_path_factory.mktemp("study") / "smoke"
    proc = start_train("-m", "study=smoke", "progress=false", "num_threads=1", f"hydra.sweep.dir={sweep}")
    yield sweep, proc
    stop_started(proc)  # if no test read it (a selection of the other tests)


@pytest.fixture(scope="module")
def smoke_study(smoke_study_started):
    """`python train.py -m study=smoke`: calibrated and bon_exp x 1 beta x 2 seeds on the smoke models."""
    sweep, proc = smoke_study_started
    finish_started(proc, "the smoke study", timeout=900)
    return sweep


def test_smoke_study_end_to_end(smoke_study):
    finals = [json.loads(p.read_text()) for p in sorted(smoke_study.glob("*/final_metrics.json"))]
    assert sorted((f["method"], f["seed"]) for f in finals) == [("bon_exp", 0), ("bon_exp", 1), ("calibrated", 0),
                                                               ("calibrated", 1)]
    assert len({f["calibration_cache"] for f in finals}) == 1  # one cache, one set of eval prompts and references
    assert {f["beta"] for f in finals} == {0.05}
    t_auto = factories.bon_exp(t="auto", n=4, beta=0.05).t
    assert all(f["t"] == pytest.approx(t_auto) for f in finals if f["method"] == "bon_exp")
    rows = list(csv.DictReader(open(smoke_study / "study_results.csv")))
    assert [r["method"] for r in rows] == ["calibrated", "bon_exp"] and {r["seeds"] for r in rows} == {"2"}
    for r in rows:  # the table's seed mean and SE, recomputed from the runs themselves
        kls = [f["eval/kl"] for f in finals if f["method"] == r["method"]]
        assert float(r["kl"]) == pytest.approx(np.mean(kls))
        assert float(r["kl_se"]) == pytest.approx(np.std(kls, ddof=1) / math.sqrt(2))
        assert math.isfinite(float(r["gap_theory_bon"])) and math.isfinite(float(r["gap_opt_won"]))
    for name in ("study_bon.png", "study_won.png", "study_standard.png", "sweep_summary.png"):
        assert (smoke_study / name).read_bytes()[:4] == b"\x89PNG", name
    assert "bon_exp" in (smoke_study / "study_results.md").read_text()
    for r in rows:  # the length column: the runs' logged rollout lengths
        assert 0 < float(r["length_start"]) and 0 < float(r["length_end"])


def test_rerunning_a_study_into_its_directory_skips_finished_members(run_train, smoke_study, tmp_path):
    """`resume=auto` on a sweep: a member that finished is left untouched (nothing loaded or written), a member
    that is missing is trained, and the study is rewritten over all of them. On a copy of the smoke study (its
    members: calibrated seeds 0, 1, then bon_exp seeds 0, 1), the same command again with `resume=auto`."""
    sweep = tmp_path / "study"
    shutil.copytree(smoke_study, sweep)
    args = ["-m", "study=smoke", "progress=false", "num_threads=1", "resume=auto", f"hydra.sweep.dir={sweep}"]
    finals = {i: (sweep / str(i) / "final_metrics.json").read_bytes() for i in range(4)}
    final = json.loads(finals[0])
    assert final["solver"] == "rloo" and final["metric"] == "std" and final["calibration_m"] == 8  # calibrated
    assert math.isfinite(final["eval/kl_calibrated"]) and "kl_calibrated" not in final  # one name per metric
    assert "gain_fraction" not in final and "kl_efficiency" not in final  # research yardsticks: the study's
    per_prompt = list(csv.DictReader(open(sweep / "0" / "eval_per_prompt.csv")))
    assert len(per_prompt) == 6 and {"prompt_id", "bon_win_rate@4", "won_win_rate@2", "kl", "reward_calibrated"} \
        <= set(per_prompt[0])
    mean = np.mean([float(r["bon_win_rate@4"]) for r in per_prompt])
    assert mean == pytest.approx(final["eval/bon_win_rate@4"], abs=1e-9)  # the per-prompt rows average to the metric
    stamps = {i: (sweep / str(i) / "checkpoints" / "last.ckpt").stat().st_mtime_ns for i in range(3)}
    assert json.loads(finals[3])["method"] == "bon_exp"
    shutil.rmtree(sweep / "3")  # as if the sweep had been stopped before its last member
    (sweep / "solver_efficiency.csv").unlink()  # rewritten by the rerun

    out = run_train(*args)
    assert out.stdout.count("nothing to resume, no file changed") == 3  # members 0, 1 and 2 only
    for i in range(3):
        assert (sweep / str(i) / "final_metrics.json").read_bytes() == finals[i]
        assert (sweep / str(i) / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamps[i]
    assert json.loads((sweep / "3" / "final_metrics.json").read_text())["method"] == "bon_exp"  # trained again
    rows = list(csv.DictReader(open(sweep / "solver_efficiency.csv")))
    assert [(r["solver"], r["method"]) for r in rows] == [("rloo", "calibrated"), ("rloo", "bon_exp")]


def test_study_diagnostics_table_recomputes_the_runs(smoke_study):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "study_diagnostics.py"), str(smoke_study)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out[2:]}
    assert set(rows) == {"calibrated", "bon_exp"}
    finals = [json.loads(p.read_text()) for p in smoke_study.glob("*/final_metrics.json")]
    for method, cells in rows.items():
        eval_std = np.mean([f["eval/bon_win_rate@1"] for f in finals if f["method"] == method])
        assert float(cells[-1].strip(" |")) == pytest.approx(eval_std, abs=5e-4)  # eval std: mean over seeds
        assert 0 < float(cells[2]) < 10  # the closed-form KL at the run's beta


def execute(*notebooks: tuple[str, str]) -> list[nbformat.NotebookNode]:
    """Each `(name, parameters)` notebook executed with its `parameters` cell replaced, all side by side (one
    kernel each); the executed notebooks, in order."""
    import asyncio

    from nbclient import NotebookClient

    nbs, clients = [], []
    for name, parameters in notebooks:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{name}: one cell tagged `parameters`"
        cells[0].source = parameters
        nbs.append(nb)
        clients.append(NotebookClient(nb, timeout=300, kernel_name="python3",
                                      resources={"metadata": {"path": str(REPO_ROOT)}}))

    async def run_all():
        await asyncio.gather(*(c.async_execute() for c in clients))

    asyncio.run(run_all())
    return nbs


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_notebooks_execute(smoke_study):
    sweep_nb, theory_nb = execute(("sweep_results.ipynb", f"sweep_dir = {str(smoke_study)!r}\nmatched_kl = None"),
                                  ("theory_explorer.ipynb", "ns = [4]\npoints = 6\nkl_grid = [0.5]\ncells = 1024"))
    assert images(sweep_nb) >= 4  # bon, won, standard, gaps
    text = "".join(o.get("text", "") for c in sweep_nb.cells for o in c.get("outputs", []))
    assert "4 runs" in text and "calibrated" in text
    assert images(theory_nb) >= 4


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before committing"


def make_sweep(root, name, members, mtime):
    """A sweep directory `root/name` whose first `members` members finished (final_metrics.json dated `mtime`)
    and one more that did not."""
    sweep = root / name
    for i in range(members):
        fake_member(sweep, i, fake_final("calibrated", "identity", 0.2, i, 0.5, 0.6, 0.7, 0.65), {})
        os.utime(sweep / str(i) / "final_metrics.json", (mtime, mtime))
    (sweep / str(members) / ".hydra").mkdir(parents=True)  # a member that failed: no final metrics
    return sweep


def test_sweep_dir_is_the_parameter_else_the_environment_else_the_newest(tmp_path, monkeypatch):
    root = tmp_path / "multirun"
    new = make_sweep(root, "2026-01-01_00-00-00", 1, mtime=2_000_000_100)
    old = make_sweep(root, "2026-01-02_00-00-00", 2, mtime=2_000_000_000)  # made later, sorts last: finished first
    make_sweep(root, "crashed", 0, mtime=2_000_000_200)  # newest, but nothing finished
    custom = make_sweep(tmp_path / "elsewhere", "my_sweep", 1, mtime=1_000_000_000)
    no_env = {}
    assert find_sweep_dir(None, root, no_env) == new.resolve()
    assert find_sweep_dir("", root, {SWEEP_DIR_ENV: " "}) == new.resolve()  # blank counts as unset
    assert find_sweep_dir(None, root, {SWEEP_DIR_ENV: str(custom)}) == custom.resolve()
    assert find_sweep_dir(str(old), root, {SWEEP_DIR_ENV: str(custom)}) == old.resolve()  # the parameter wins
    # relative: from the repository root, else from the current directory
    monkeypatch.setattr(runs, "REPO_ROOT", tmp_path / "repo")
    in_repo = make_sweep(tmp_path / "repo", "outputs/sweep", 1, mtime=1_000_000_000)
    make_sweep(tmp_path / "elsewhere", "outputs/sweep", 1, mtime=1_000_000_000)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert find_sweep_dir("outputs/sweep", root, no_env) == in_repo.resolve()
    assert find_sweep_dir("my_sweep", root, {SWEEP_DIR_ENV: "outputs/sweep"}) == custom.resolve()
    with pytest.raises(FileNotFoundError, match="no finished run.*one run's directory"):
        find_sweep_dir(custom / "0", root, no_env)
    with pytest.raises(FileNotFoundError, match=rf"\${SWEEP_DIR_ENV}: .*crashed has no finished run"):
        find_sweep_dir(None, root, {SWEEP_DIR_ENV: str(root / "crashed")})
    with pytest.raises(FileNotFoundError, match="sweep_dir: .*missing is not a directory"):
        find_sweep_dir(tmp_path / "missing", root, no_env)
    with pytest.raises(FileNotFoundError, match=f"no sweep with a finished run .*{SWEEP_DIR_ENV}"):
        find_sweep_dir(None, tmp_path / "empty", no_env)


def test_sweep_dir_reads_the_environment_by_default(tmp_path, monkeypatch):
    sweep = make_sweep(tmp_path, "s", 1, mtime=1_000_000_000)
    monkeypatch.setenv(SWEEP_DIR_ENV, str(sweep))
    assert find_sweep_dir(root=tmp_path / "empty") == sweep.resolve()


def notebook_imports(path) -> set[str]:
    """Top-level names of the modules the notebook's code cells import (magics skipped)."""
    import ast

    names = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def test_every_package_the_notebooks_import_is_declared():
    """Each third-party import of notebooks/*.ipynb is a dependency or in the `notebooks` extra (and so in `dev`,
    whose tests execute them)."""
    import re
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    extras = project["optional-dependencies"]
    installed = packages_distributions()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for module in notebook_imports(path) - set(sys.stdlib_module_names) - {"infalign"}:
            dists = {d.lower().replace("_", "-") for d in installed.get(module, [module])}
            for declared in (names(project["dependencies"]) | names(extras["notebooks"]),
                             names(project["dependencies"]) | names(extras["dev"])):
                assert dists & declared, f"{path.name} imports {module} ({dists}), not declared in pyproject.toml"
