"""The figures read right without the code (issue 27 item 7): what each figure draws, tested as data.

- sweep_summary.png (infalign.study.sweep.summary_series): a theory line has the colour of the runs it is the
  theory for; one line per curve, never two betas under one unlabelled line; every point its run's s.e.;
  labels name method, N and beta; the legend sits outside the panels;
- study_*.png (infalign.study.figures.metric_series): a point with one seed gets that run's own s.e. over the
  prompts (it had none drawn), several seeds their s.e.; each point named by its beta; legend outside;
- notebooks/sweep_results.ipynb on a mixed-N sweep: each run read and labelled at its own N.

The sweep is synthetic and mixes N: bon_exp trained for N = 2 and N = 4 at two betas (t recorded, as `t: auto`
resolved in training: no solver runs), calibrated at N = 4, one seed per point except one two-seed point."""

import json
import math
import re

import matplotlib
import nbformat
import numpy as np
import pytest
from test_study import fake_member

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from infalign.study import analyze_sweep  # noqa: E402
from infalign.study.figures import metric_series, study_figure  # noqa: E402
from infalign.study.runs import collect_runs  # noqa: E402

BON_EXP = {"_target_": "infalign.theory.factories.bon_exp", "t": "auto", "n": "${n}", "beta": "${beta}"}
IDENTITY = {"_target_": "infalign.core.transforms.IdentityTransform"}
T = {(2, 0.1): 6.0, (2, 0.24): 4.5, (4, 0.1): 16.0, (4, 0.24): 12.0}  # near-identical curves per N: two betas


def final(method, transform, n, beta, seed, kl, win, se):
    out = {"method": method, "transform": transform, "calibrator": "empirical", "n": n, "beta": beta, "seed": seed,
           "t": T.get((n, beta)) if transform == "bon_exp" else None, "eval/kl": kl}
    for big_n in (1, 2, 4):  # evaluated at every N, whatever N the run trained for
        for mode, shift in (("bon", 0.02 * big_n), ("won", -0.01 * big_n)):
            out[f"eval/{mode}_win_rate@{big_n}"] = win + shift
            out[f"eval/{mode}_win_rate@{big_n}_se"] = se + 0.001 * big_n
    return out


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory):
    root, i = tmp_path_factory.mktemp("mixed_n"), 0
    members = [("bon_exp", "bon_exp", BON_EXP, n, beta, 0) for n in (2, 4) for beta in (0.24, 0.1)]
    members += [("calibrated", "identity", IDENTITY, 4, 0.1, s) for s in (0, 1)]
    members += [("calibrated", "identity", IDENTITY, 4, 0.24, 0)]
    for i, (method, transform, cfg, n, beta, seed) in enumerate(members):
        kl = 0.3 + 2.0 * (0.24 - beta) + 0.1 * n + 0.05 * seed
        fake_member(root, i, final(method, transform, n, beta, seed, kl, 0.62 + 0.01 * i, 0.10 + 0.01 * i), cfg)
    # one single-seed run with its per-prompt table: its KL s.e. over prompts
    (root / "0" / "eval_per_prompt.csv").write_text("prompt_id,kl\np0,0.5\np1,0.7\np2,0.9\np3,0.3\n")
    return root


@pytest.fixture(scope="module")
def summary(mixed_sweep):
    from infalign.study.sweep import summary_series

    return summary_series(mixed_sweep, collect_runs(mixed_sweep))


@pytest.fixture(scope="module")
def study(mixed_sweep):
    return analyze_sweep(mixed_sweep)


def legend_outside_axes(fig) -> bool:
    fig.canvas.draw()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends, "no legend"
    return all(not leg.get_window_extent().overlaps(ax.get_window_extent()) for leg in legends for ax in fig.axes)


# ------------------------------------------------------------------------------------------ sweep_summary.png
def test_summary_theory_line_has_the_colour_of_its_own_runs(summary):
    for mode, series in summary.items():
        runs = [s for s in series if s["kind"] == "runs"]
        lines = [s for s in series if s["kind"] == "theory"]
        assert len({(s["method"], s["n"]) for s in runs}) == len({s["color"] for s in runs}) == 3  # a colour each
        for line in lines:
            own = [s for s in runs if (s["method"], s["n"]) == (line["method"], line["n"]) and s["beta"] in line["betas"]]
            assert own and {s["color"] for s in own} == {line["color"]}, (mode, line["label"])
            others = [s for s in runs if (s["method"], s["n"]) != (line["method"], line["n"])]
            assert line["color"] not in {s["color"] for s in others}, (mode, line["label"])


def test_summary_one_line_per_curve_each_naming_n_and_its_betas(summary):
    for series in summary.values():
        lines = [s for s in series if s["kind"] == "theory"]
        assert len({s["label"] for s in lines}) == len(lines) == 5, [s["label"] for s in lines]
        for s in series:
            if s["kind"] == "runs":
                assert f"N={s['n']}" in s["label"] and f"β={s['beta']:g}" in s["label"] and s["method"] in s["label"]
                # exactly one theory line for each run's (method, N, beta)
                assert sum(s["beta"] in t["betas"] and (t["method"], t["n"]) == (s["method"], s["n"])
                           for t in lines) == 1
        for n in (2, 4):  # bon_exp: t depends on beta, so two betas are two curves, told apart by label and style
            exp = [t for t in lines if t["method"] == "bon_exp" and t["n"] == n]
            assert sorted(b for t in exp for b in t["betas"]) == [0.1, 0.24] and len(exp) == 2
            assert len({t["linestyle"] for t in exp}) == 2
            for t in exp:
                assert f"t={T[(n, t['betas'][0])]:.3g}" in t["label"] and f"N={n}" in t["label"]
                assert f"β={t['betas'][0]:g}" in t["label"]
        identity = [t for t in lines if t["method"] == "calibrated"]  # one transform for both betas: one line
        assert len(identity) == 1 and identity[0]["betas"] == [0.1, 0.24] and "β=0.1, 0.24" in identity[0]["label"]


def test_summary_points_are_at_each_runs_own_n_with_its_se(summary, mixed_sweep):
    rows = collect_runs(mixed_sweep)
    for mode, series in summary.items():
        drawn = [(x, y, e) for s in series if s["kind"] == "runs" for x, y, e in zip(s["x"], s["y"], s["yerr"])]
        expected = [(r["eval/kl"], r[f"eval/{mode}_win_rate@{r['n']}"], r[f"eval/{mode}_win_rate@{r['n']}_se"])
                    for r in rows]
        assert sorted(drawn) == sorted(expected)


def test_summary_png_draws_its_series_with_the_legend_outside(mixed_sweep, summary, monkeypatch):
    import infalign.runtime.atomic
    from infalign.study.sweep import write_summary

    figures = []
    monkeypatch.setattr(infalign.runtime.atomic, "atomic_write_figure", lambda path, fig, **kw: figures.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figure to look at
    write_summary(mixed_sweep)
    (fig,) = figures
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [s["label"] for s in summary["bon"]]
    for ax, mode in zip(fig.axes, ("bon", "won")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for s in summary[mode]:
            if s["kind"] == "theory":
                assert matplotlib.colors.same_color(lines[s["label"]].get_color(), s["color"])
    assert legend_outside_axes(fig)
    matplotlib.pyplot.close(fig)


# ------------------------------------------------------------------------------------------ study_*.png
def test_study_points_carry_their_se_one_seed_or_several(study, mixed_sweep):
    runs = {r["member"]: r for r in study.runs}
    for key, n in (("bon", 2), ("bon", 4), ("won", 4), ("std", 1)):
        col = "std" if key == "std" else f"{key}@{n}"
        methods = [s for s in metric_series(study, key, n) if s["kind"] == "method"]
        assert len(methods) == 3
        for s in methods:
            assert f"N={s['n']}" in s["label"] and s["method"] in s["label"]
            for x, beta, seeds, xerr, yerr in zip(s["x"], s["betas"], s["seeds"], s["xerr"], s["yerr"]):
                (g,) = [g for g in study.groups if (g["method"], g["n"], g["beta"]) == (s["method"], s["n"], beta)]
                assert x == g["kl"]
                if seeds > 1:  # the spread over seeds
                    assert (xerr, yerr) == (g["kl_se"], g[f"{col}_se"]) and yerr > 0
                else:  # the run's own s.e. over the eval prompts, as it recorded it
                    run = runs[g["members"]]
                    expect = run["std_pse"] if key == "std" else run[f"{col}_pse"]
                    assert yerr == expect and yerr >= 0.10
                    if g["members"] == "0":  # the one with a per-prompt table: the KL's s.e. over its prompts
                        assert xerr == pytest.approx(np.std([0.5, 0.7, 0.9, 0.3], ddof=1) / 2)
                    else:
                        assert math.isnan(xerr)


def test_study_figure_draws_error_bars_names_betas_legend_outside(study):
    for key in ("bon", "won", "std"):
        fig = study_figure(study, key)
        for ax in fig.axes:
            assert len(ax.containers) == 3  # one error-bar curve per (method, trained N)
            for container in ax.containers:
                yerr = container.lines[2][-1]  # the y error bars: one segment per point, none of zero length
                assert min(abs(seg[1][1] - seg[0][1]) for seg in yerr.get_segments()) > 0, (key, ax.get_title())
            assert {f"β={g['beta']:g}" for g in study.groups} <= {t.get_text() for t in ax.texts}
        assert legend_outside_axes(fig)
        plt.close(fig)


def test_study_colours_are_one_per_curve_in_every_panel(study):
    colours = {}
    for key, n in (("bon", 2), ("bon", 4), ("won", 2), ("std", 1)):
        for s in metric_series(study, key, n):
            if s["kind"] == "method":
                assert colours.setdefault(s["label"], s["color"]) == s["color"]
    assert len(set(colours.values())) == len(colours) == 3


# ------------------------------------------------------------------------------------------ notebook
PROBE = """import json
table = _  # the runs table the last cell displayed
legend = (fig.legends or [axes[0].get_legend()])[0]
print("PROBE" + json.dumps({"titles": [a.get_title() for a in axes], "legend": [t.get_text() for t in legend.get_texts()],
                            "runs": table.to_dict("records"), "groups": groups.to_dict("records")}, default=str))
"""


def test_notebook_reads_and_labels_each_run_at_its_own_n(mixed_sweep):
    from infalign.runtime.paths import REPO_ROOT

    original = nbformat.read(REPO_ROOT / "notebooks" / "sweep_results.ipynb", as_version=4)
    nb = execute_with(original, nbformat.v4.new_code_cell(PROBE), f"sweep_dir = {str(mixed_sweep)!r}\nmatched_kl = None")
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    out = json.loads(text[text.index("PROBE") + 5:])
    rows = {r["member"]: r for r in collect_runs(mixed_sweep)}
    assert len(out["runs"]) == len(rows)
    for shown in out["runs"]:
        r = rows[shown["member"]]
        assert shown.get("n") == r["n"], shown
        assert shown.get("bon") == pytest.approx(r[f"eval/bon_win_rate@{r['n']}"], abs=1e-4), shown
    for g in out["groups"]:
        assert g.get("bon") == pytest.approx(g[f"bon@{g['n']}"]), g
    for method, n in {(r["method"], r["n"]) for r in rows.values()}:
        assert any(f"{method} N={n}" in label for label in out["legend"]), (method, n, out["legend"])
    assert not any(re.search(r"-of-\d", title) for title in out["titles"]), out["titles"]  # no one N for all


def execute_with(nb, extra_cell, parameters):
    """As `test_study.execute`, with `extra_cell` appended to `nb` (the committed file is left as it is)."""
    from nbclient import NotebookClient

    from infalign.runtime.paths import REPO_ROOT

    nb = nbformat.from_dict(nb)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = parameters
    nb.cells.append(extra_cell)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    return nb
