"""Dashboards: what the sweeps' saved predictions say, read back from MLflow.

The ablation report: effects (paired bootstrap, intervals, verdicts) · importance (search sweeps: factor
importance and direction) · sweep_reader (MLflow -> arrays) · plots · html_report · simulate (sweeps with known
effects, to check the method) · ablation_report (the CLI). The final model's test evaluation: final_report and
the modules it uses.
"""
