"""Sweeps: Ray Tune ablations and Optuna/ASHA searches over the trainable, logged to MLflow by the driver.

run_ablation.py and run_search.py are thin CLIs over runner.py; the pieces it wires together:
options (shared CLI arguments) · record (sweep folder and sweep.json on the Tune storage) · tracking (MLflow
URI, parent run) · mlflow_logger (the Tune callback that is the single MLflow writer) · cluster (Ray start and
resource checks) · ablation / search (what each kind of sweep runs and prints) · demo (the no-argument demo).
"""
