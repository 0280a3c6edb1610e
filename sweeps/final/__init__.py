"""Final training: the best config(s) of a sweep trained with a longer budget over seeds, as Ray Tune trials,
selected and calibrated on validation, then evaluated once on the test split. `python sweeps/train_best.py`.

  choose   which configs: a config file, or a sweep's configs ranked on validation
  members  a member (config x seed), its selected epoch read back from its checkpoint
  fit      the members as Ray Tune trials (or, without Ray, one after another in this process)
  predict  the decisions on validation (thresholds) and the test predictions, on test-blinded data
  track    its MLflow run (run_type=final): members as child runs, test metrics, report files, the model
  cli      the command line: checks, then choose -> fit -> predict -> report (dashboards/final_report.py) -> track
"""
