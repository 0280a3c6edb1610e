"""Final training of the best config(s), evaluated once on the test split. `python sweeps/train_best.py --help`."""
import sys
from pathlib import Path

# Run as `python sweeps/train_best.py`, installed or not: import the project from the repo root, and keep this
# folder off the path (its module names would shadow top-level ones).
HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

from sweeps.final.cli import main  # noqa: E402
from trainable.errors import exit_promptly  # noqa: E402

if __name__ == "__main__":
    exit_promptly(main())
