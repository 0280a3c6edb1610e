"""The figures, rendered (Agg) and read back from their artists: the ROC grid's labels and single legend, the
heatmap's colour bar in the cells' unit, and one verdict palette across forest plot and heatmap."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from sklearn.metrics import roc_auc_score

from dashboards import plots
from dashboards.effects import EQUIVALENT, HELPS, HURTS, INCONCLUSIVE, MEAN, NOT_ESTIMABLE
from dashboards.final_report import roc_figure
from dashboards.html_report import STYLE
from dashboards.palette import GREY, VERDICT_COLOURS
from trainable.findings import FINDINGS, NUM_FINDINGS

ARM_VERDICTS = {"focal": HELPS, "sgd": HURTS, "jitter": EQUIVALENT, "crop": INCONCLUSIVE}
ARM_DELTAS = {"focal": 0.021, "sgd": -0.034, "jitter": 0.001, "crop": 0.006}


def rendered(figure):
    FigureCanvasAgg(figure).draw()
    return figure


@pytest.fixture(scope="module")
def effects() -> pd.DataFrame:
    """An effect table as dashboards.effects writes it: per arm, the mean row then one row per finding."""
    rng = np.random.default_rng(0)
    rows = []
    for arm, verdict in ARM_VERDICTS.items():
        for finding in (MEAN, *FINDINGS):
            delta = ARM_DELTAS[arm] if finding == MEAN else ARM_DELTAS[arm] + rng.normal(0, 0.01)
            rows.append({"arm": arm, "finding": finding, "metric": "auc", "delta": delta, "ci_low": delta - 0.01,
                         "ci_high": delta + 0.01, "verdict": verdict if finding == MEAN else NOT_ESTIMABLE,
                         "provisional": False, "n_seeds": 3, "n_baseline_seeds": 3})
    return pd.DataFrame(rows)


# --- ROC grid ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def roc():
    rng = np.random.default_rng(1)
    labels = (rng.random((300, NUM_FINDINGS)) < 0.3).astype(float)
    labels[:, FINDINGS.index("Hernia")] = 0                      # one class only: no curve
    probs = rng.random(labels.shape) * 0.6 + labels * 0.3
    return labels, probs, rendered(roc_figure(labels, probs, "Test ROC curves"))


def test_roc_grid_has_plain_axis_labels(roc):
    _, _, figure = roc
    panels = figure.axes[:NUM_FINDINGS]
    texts = [axis.get_xlabel() for axis in figure.axes] + [axis.get_ylabel() for axis in figure.axes]
    assert not [text for text in texts if "Positive label" in text or "Rate" in text]
    assert {axis.get_xlabel() for axis in panels} == {"", "false positive rate"}
    assert {axis.get_ylabel() for axis in panels} == {"", "true positive rate"}
    # the lowest panel of each of the 4 columns carries the x label, the first column the y label
    assert [k for k, axis in enumerate(panels) if axis.get_xlabel()] == [10, 11, 12, 13]
    assert [k for k, axis in enumerate(panels) if axis.get_ylabel()] == [0, 4, 8, 12]


def test_roc_grid_has_one_shared_legend(roc):
    _, _, figure = roc
    assert [axis for axis in figure.axes if axis.get_legend() is not None] == []
    assert len(figure.legends) == 1
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["ROC curve (test)",
                                                                             "chance level (AUC 0.5)"]


def test_roc_panel_titles_carry_sklearns_auc(roc):
    labels, probs, figure = roc
    for k, (axis, finding) in enumerate(zip(figure.axes, FINDINGS)):
        if finding == "Hernia":
            assert axis.get_title() == "Hernia (no AUC: one class only)" and not axis.get_lines()
            continue
        shown = float(re.fullmatch(rf"{finding} \(AUC (\d\.\d+)\)", axis.get_title()).group(1))
        assert shown == pytest.approx(roc_auc_score(labels[:, k], probs[:, k]), abs=5e-4)


# --- heatmap -----------------------------------------------------------------------------------------------

def test_heatmap_colour_bar_is_in_the_cells_unit(effects):
    figure = rendered(plots.effect_heatmap(effects, "auc"))
    heatmap, bar = figure.axes
    assert bar.get_ylabel() == "Δ AUC × 100 vs baseline"
    cells = [float(re.match(r"[+-]\d+\.\d", text.get_text()).group()) for text in heatmap.texts]
    expected = effects["delta"].to_numpy() * 100
    assert len(cells) == len(expected) == 4 * (NUM_FINDINGS + 1)
    np.testing.assert_allclose(sorted(cells), sorted(np.round(expected, 1)), atol=0.051)
    limit = np.abs(expected).max()                               # about 3.4 points (×100), not 0.034
    image = heatmap.get_images()[0]
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((-limit, limit))
    assert bar.get_ylim() == pytest.approx((-limit, limit))
    ticks = [tick for tick in bar.get_yticks() if -limit <= tick <= limit]
    assert max(ticks) - min(ticks) >= limit                      # ticks span points of AUC, not fractions
    assert all(abs(cell) <= limit + 0.05 for cell in cells)


def test_heatmap_and_forest_plot_share_one_palette(effects):
    heatmap = rendered(plots.effect_heatmap(effects, "auc")).axes[0]
    cmap = heatmap.get_images()[0].get_cmap()
    assert to_hex(cmap(1.0)) == VERDICT_COLOURS[HELPS]           # the arm better than baseline
    assert to_hex(cmap(0.0)) == VERDICT_COLOURS[HURTS]
    assert cmap(0.5)[:3] == pytest.approx((1, 1, 1), abs=0.01)  # no difference: white
    forest = rendered(plots.forest_plot(effects, "auc", margin=0.005)).axes[0]
    dots = {line.get_ydata()[0]: to_hex(line.get_color()) for line in forest.get_lines() if line.get_marker() == "o"}
    labels = [tick.get_text().split()[0] for tick in forest.get_yticklabels()]
    assert {labels[int(y)]: colour for y, colour in dots.items()} == {arm: VERDICT_COLOURS[verdict]
                                                                      for arm, verdict in ARM_VERDICTS.items()}
    margins = {to_hex(line.get_color()) for line in forest.get_lines() if line.get_linestyle() == ":"}
    assert margins == {VERDICT_COLOURS[EQUIVALENT]}


def test_provisional_and_unestimable_rows_are_the_palettes_grey(effects):
    table = effects.copy()
    table.loc[table["arm"] == "crop", "provisional"] = True
    table.loc[(table["arm"] == "jitter") & (table["finding"] == MEAN), "verdict"] = NOT_ESTIMABLE
    forest = rendered(plots.forest_plot(table, "auc")).axes[0]
    labels = [tick.get_text().split()[0] for tick in forest.get_yticklabels()]
    dots = {labels[int(line.get_ydata()[0])]: to_hex(line.get_color()) for line in forest.get_lines()
            if line.get_marker() == "o"}
    assert dots["crop"] == dots["jitter"] == GREY


def test_html_row_tints_come_from_the_palette():
    backgrounds = dict(re.findall(r"\.([a-z]+) \{ background: (#[0-9a-f]{6}); \}", STYLE))
    for verdict in (HELPS, HURTS, EQUIVALENT):
        tint, full = (np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)]) for c in (backgrounds[verdict],
                                                                                  VERDICT_COLOURS[verdict]))
        # a light tint of the verdict's colour: between it and white, channel by channel, in the same proportion
        share = (255 - tint) / (255 - full)
        assert np.all(tint > full) and np.ptp(share) < 0.03, verdict
