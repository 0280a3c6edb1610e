"""Sweeps: Ray Tune ablations and Optuna/ASHA searches over the trainable, logged to MLflow by the driver.

run_ablation.py and run_search.py are thin CLIs over runner.py, which wires together:
  options        the shared CLI arguments          demo       the no-argument demo's settings and data
  ablation       arms x seeds grid, per-arm table  search     Optuna TPE + ASHA, pruned trials, best config
  record         sweep folder and sweep.json       tracking   experiments and parent runs (run_type=sweep)
  mlflow_logger  the Tune callback that is the only MLflow writer (one child run per trial)
  trial_description  trial names, resolved configs and MLflow tags   cluster  Ray start, resource, storage checks
  report         results and tables                catalog    `--list`
train_best.py is the thin CLI of final training, the package final/ (its own MLflow run type, run_type=final).
"""
