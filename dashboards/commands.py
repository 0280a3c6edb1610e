"""The follow-up commands the CLIs print: they run as pasted into a fresh shell.

A fresh shell has neither the project's environment active nor its folder as working directory, so a command
names this interpreter (`sys.executable`, whose site-packages ran the sweep), the script by its absolute path and
`mlflow` beside this interpreter; every word is shell-quoted.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

from trainable.data.options import DATA_DEFAULTS, flag

REPO_ROOT = Path(__file__).resolve().parents[1]
MLFLOW_UI_PORT = 5000
ABLATION_REPORT_SCRIPT = "dashboards/ablation_report.py"    # a sweep's effects (ablation) or importance (search)


def shell_join(words: list[Any]) -> str:
    return shlex.join(str(word) for word in words)


def python_words(script: str) -> list[str]:
    """This interpreter running a script of the project (`script` relative to the repo root)."""
    return [sys.executable, str(REPO_ROOT / script)]


def mlflow_words() -> list[str]:
    """This environment's `mlflow`: the script beside the interpreter, else `python -m mlflow`."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]


def mlflow_ui_words(backend_store_uri: str, port: int = MLFLOW_UI_PORT) -> list[str]:
    # One worker: a local UI has one reader, and each of the default four imports all of MLflow at start.
    return [*mlflow_words(), "ui", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]


def data_option_words(recorded: Mapping[str, Any]) -> list[str]:
    """The data options as flags, from a sweep's recorded arguments (parent-run params are strings: a flag's
    False is "False"); options it did not record are left to the CLI's defaults."""
    words: list[str] = []
    for key, default in DATA_DEFAULTS.items():     # what a follow-up must repeat to score on the same split
        value = recorded.get(key)
        if isinstance(default, bool):
            words += [flag(key)] if str(value) == "True" else []
        elif value not in (None, "None"):
            words += [flag(key), str(value)]
    return words
