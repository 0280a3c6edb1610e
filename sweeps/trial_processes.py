"""The processes of a local sweep's trials, found from /proc: fault injection (tests/test_faults.py,
benchmarks/chaos.py) kills one trial's worker and nothing else.

Only processes below a given root (the driver of a sweep started with `--address local`) are ever looked at, so
another user's Ray on the same machine is never touched.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

WORKER_COMMAND = "ray::ImplicitFunc"        # how Ray names the actor process of a function trainable


def descendants(root: int) -> list[int]:
    """Every process below `root` (not root itself)."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def trial_workers(root: int, trial_name: str) -> list[int]:
    """Ray worker processes below `root` running the function trainable of trial `trial_name`.

    Tune makes the trial's own working folder (named by sweeps.trial_description.tune_trial_dirname: `<arm>-s<seed>_<trial
    id>`) the worker's current directory."""
    pids = []
    for pid in descendants(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if command.startswith(WORKER_COMMAND) and Path(cwd).name.startswith(f"{trial_name}_"):
            pids.append(pid)
    return pids
