"""Ablation sweep: arms x seeds on Ray Tune, logged to MLflow. `python sweeps/run_ablation.py --help`."""
import sys
from pathlib import Path

# Run as `python sweeps/run_ablation.py`, installed or not: import the project from the repo root, and keep this
# folder off the path (Ray would otherwise put it on every worker's path too).
HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

from sweeps.ablation import Ablation  # noqa: E402
from sweeps.runner import main  # noqa: E402
from trainable.errors import exit_promptly  # noqa: E402

if __name__ == "__main__":
    exit_promptly(main(Ablation))
