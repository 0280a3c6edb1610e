"""The one palette of verdicts: forest plot, heatmaps and the HTML report's row tints all read it from here.

Green helps, red hurts, blue equivalent, orange inconclusive (undecided), grey not estimable or provisional (a
one-seed arm's borrowed variance). The Δ heatmaps run from the hurts colour through white to the helps colour,
so a cell and its arm's dot in the forest plot agree in colour.
"""
from __future__ import annotations

from matplotlib.colors import LinearSegmentedColormap, to_hex, to_rgb

from .effects import EQUIVALENT, HELPS, HURTS, INCONCLUSIVE, NOT_ESTIMABLE

VERDICT_COLOURS = {HELPS: "#1a9850", HURTS: "#d73027", EQUIVALENT: "#4575b4", INCONCLUSIVE: "#e08214"}
GREY = "#9e9e9e"         # not estimable, and rows resting on a variance borrowed for a one-seed arm

# Δ < 0 (the arm is worse than the baseline) in the hurts colour, Δ > 0 in the helps colour.
DELTA_CMAP = LinearSegmentedColormap.from_list("delta", [VERDICT_COLOURS[HURTS], "#ffffff", VERDICT_COLOURS[HELPS]])


def verdict_colour(verdict: str, provisional: bool = False) -> str:
    return GREY if provisional or verdict == NOT_ESTIMABLE else VERDICT_COLOURS.get(verdict, GREY)


def tint(colour: str, strength: float = 0.2) -> str:
    """`colour` mixed with white (strength 1: the colour itself), for backgrounds that text must stay legible on."""
    return to_hex([1 - strength * (1 - channel) for channel in to_rgb(colour)])
