"""Names of the files in every trial checkpoint folder, importable without torch (the report readers need them)."""

STATE_FILE = "state.pt"                    # model, optimizer, scheduler, progress, config
PREDICTIONS_FILE = "val_predictions.npz"   # images, labels, probs, findings of the validation split
THRESHOLDS_FILE = "thresholds.json"        # per-finding F1 thresholds chosen on validation
