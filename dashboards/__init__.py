"""Dashboards: what the sweeps' saved validation predictions say about each modification.

effects (paired bootstrap, intervals, verdicts) · importance (search sweeps: factor importance and direction) ·
sweep_reader (MLflow -> arrays) · plots · html_report · ablation_report (the CLI that ties them together).
"""
