"""Text tables: the Markdown read back cell by cell equals the frame (rounded, missing as an em dash), and the
published comparison keeps its columns and caveats."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dashboards.published import caveats, comparison_markdown, comparison_table
from dashboards.tables import MISSING, markdown_table, text_table
from trainable.findings import FINDINGS


def read_markdown(text: str) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    assert set("".join(rows[1])) <= set(":-")           # the alignment row
    return [rows[0], *rows[2:]]


def test_markdown_table_reads_back_as_the_frame():
    frame = pd.DataFrame({"auc": [0.81234, np.nan, np.inf, 0.5], "seed": [0, 1, 2, 3], "config": list("abcd")},
                         index=pd.Index(["Atelectasis", "Mass", "Hernia", "mean"], name="finding"))
    header, *rows = read_markdown(markdown_table(frame, digits=3))
    assert header == ["finding", "auc", "seed", "config"]
    assert [row[0] for row in rows] == list(frame.index)
    assert [row[1] for row in rows] == ["0.812", MISSING, MISSING, "0.500"]
    assert [row[2] for row in rows] == ["0", "1", "2", "3"]             # integers stay integers
    assert [row[3] for row in rows] == list("abcd")
    assert "nan" not in markdown_table(frame) and "inf" not in markdown_table(frame)
    # an unnamed index is not a column
    header, *_ = read_markdown(markdown_table(frame.reset_index(drop=True)))
    assert header == ["auc", "seed", "config"]


def test_text_table_is_indented_columns():
    frame = pd.DataFrame({"param": ["lr", "loss"], "vs_all_trials": [0.01234, -0.5], "n_trials": [12, 3]})
    lines = text_table(frame, {"vs_all_trials": "{:+.4f}".format}).splitlines()
    assert all(line.startswith("  ") for line in lines)
    assert [line.split() for line in lines] == [["param", "vs_all_trials", "n_trials"], ["lr", "+0.0123", "12"],
                                                ["loss", "-0.5000", "3"]]


def test_comparison_markdown_keeps_columns_and_caveats():
    ours = pd.DataFrame({"auc": np.linspace(0.7, 0.9, 14), "auc_ci_low": np.linspace(0.6, 0.8, 14),
                         "auc_ci_high": np.linspace(0.75, 0.95, 14)}, index=list(FINDINGS))
    ours.loc["Mass"] = np.nan
    table = comparison_table(ours)
    notes = caveats("test split")
    text = comparison_markdown(table, notes)
    assert text.startswith("**Not comparable as is:**") and all(f"- {note}" in text for note in notes)
    header, *rows = read_markdown(text)
    assert header == ["finding", "ours (95% CI)", *table.columns[3:]]
    assert [row[0] for row in rows] == [*FINDINGS, "mean"]
    cells = {row[0]: row for row in rows}
    assert cells["Atelectasis"][1] == "0.700 (0.600–0.750)"
    assert cells["Mass"][1] == MISSING
    assert cells["mean"][1] == f"{table.loc['mean', 'ours_auc']:.3f}"           # no CI of the mean
    assert cells["mean"][2] == f"{table.loc['mean', 'chexnet_2017']:.3f}" == "0.841"
