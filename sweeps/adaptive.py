"""`--until-decided`: a Ray Tune Searcher that adds seeds, round by round, to the arms the analysis cannot decide yet.

Round 1 proposes every arm × seeds 0..--seeds−1. When a round's trials have all ended, the searcher reads their
validation predictions from their last checkpoints and runs the effect analysis (dashboards/effects.py) with
the sweep's sequential rule replayed over the rounds so far: arms whose primary verdict (Δ mean AUC vs the
baseline: helps, hurts or equivalent) is decided stop; the undecided ones and the baseline get the next
--seeds-per-round seeds; the sweep ends when every arm is decided or --max-seeds is reached. The repeated
looks are paid for by O'Brien–Fleming alpha spending (dashboards/sequential.py), so the primary family keeps its
family-wise error rate (measured: benchmarks/effect_calibration.py).

One Tune experiment, one MLflow parent run: the rounds are trials of the same sweep, and Tune saves this
searcher's state with the experiment, so `--resume` continues mid-round with nothing proposed twice. The
decisions are printed as they are made; at the end the sweep's table replays them from the trials
(`replay_rounds`, the same analysis on the same predictions) and writes them to seed_rounds.json beside
sweep.json and on the parent run. (A file written into the experiment folder mid-sweep would not survive a
resume: Tune syncs its own copy of that folder over it.)
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping

from ray import tune
from ray.tune.search import Searcher

from dashboards.effects import DECIDED, SeedRounds, analyse, resample
from dashboards.sweep_reader import read_trial_predictions
from trainable.checkpoint_files import PREDICTIONS_FILE, THRESHOLDS_FILE
from trainable.errors import UserError
from trainable.tune import ARM_KEY

from .record import SweepLocation
from .trial_description import trial_run_name

ROUNDS_FILE = "seed_rounds.json"
CHECKPOINT_DIR_KEY = "checkpoint_dir_name"      # in every result that came with a checkpoint


class AdaptiveSeeds(Searcher):
    def __init__(self, arms: list[str], baseline: str, rounds: SeedRounds, *, location: SweepLocation,
                 margin: float, alpha: float, n_boot: int = 1000, bootstrap_seed: int = 0):
        super().__init__()
        self.arms, self.baseline, self.rounds = list(arms), baseline, rounds
        self.location, self.margin, self.alpha = location, margin, alpha
        self.n_boot, self.bootstrap_seed = n_boot, bootstrap_seed
        self.queue: list[tuple[str, int]] = [(arm, seed) for seed in range(rounds.initial) for arm in self.arms]
        self.pending: dict[str, tuple[str, int]] = {}          # trial_id -> (arm, seed), proposed and not ended
        self.checkpoints: dict[str, str] = {}                  # "arm/seed" -> its last checkpoint
        self.failed: list[str] = []
        self.finished = False

    # --- Tune's Searcher interface ----------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.queue and not self.finished and not self.pending:
            self._next_round()
        if self.finished and not self.queue:
            return Searcher.FINISHED
        if not self.queue:
            return None                                  # the round is still running
        arm, seed = self.queue.pop(0)
        self.pending[trial_id] = (arm, seed)
        return {ARM_KEY: arm, "seed": seed}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        arm, seed = self.pending.pop(trial_id, (None, None))
        if arm is None:
            return
        checkpoint = (result or {}).get(CHECKPOINT_DIR_KEY)
        if error or not checkpoint:
            self.failed.append(f"{arm}/{seed}")
            return
        name = trial_run_name({ARM_KEY: arm, "seed": seed}, trial_id)
        self.checkpoints[f"{arm}/{seed}"] = f"{self.location.path}/{name}_{trial_id}/{checkpoint}"

    # What changes during a sweep, as JSON: nothing in the state a resume reads can run code when loaded.
    STATE = ("queue", "pending", "checkpoints", "failed", "finished")

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({key: getattr(self, key) for key in self.STATE}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.queue = [tuple(item) for item in state["queue"]]
        self.pending = {trial_id: tuple(item) for trial_id, item in state["pending"].items()}
        self.checkpoints, self.failed, self.finished = state["checkpoints"], state["failed"], state["finished"]

    # --- rounds -----------------------------------------------------------------------------------------------
    def _next_round(self) -> None:
        """Analyse the trials so far; queue the next seeds of the undecided arms and the baseline, or finish."""
        try:
            analysis = replay(checkpoint_predictions(self.checkpoints, self.arms), self.baseline, self.rounds,
                              margin=self.margin, alpha=self.alpha, n_boot=self.n_boot, seed=self.bootstrap_seed)
        except UserError as err:
            self._finish(f"no further round: {err}")
            return
        looked = analysis.looks[-1]
        undecided = undecided_arms(analysis)
        later = [n for n in self.rounds.looks if n > looked]
        if not (undecided and later):
            self._finish("; ".join(f"{arm} {why}" for arm, why in analysis.stops.items()))
            return
        self.queue = [(arm, seed) for seed in range(looked, later[0]) for arm in (*undecided, self.baseline)]
        decided = [f"{arm} {why}" for arm, why in analysis.stops.items() if arm not in undecided]
        print(f"seed round {len(analysis.looks)} ({looked} seeds): {'; '.join([*decided, ''])}undecided: "
              f"{', '.join(undecided)} -> seeds {looked}..{later[0] - 1} for them and {self.baseline}", flush=True)

    def _finish(self, why: str) -> None:
        self.finished = True
        print(f"seed rounds done: {why}", flush=True)


def undecided_arms(analysis) -> list[str]:
    return [arm for arm, why in analysis.stops.items() if not any(why.startswith(v) for v in DECIDED)]


def replay(predictions: dict, baseline: str, rounds: SeedRounds, *, margin: float, alpha: float,
           n_boot: int = 1000, seed: int = 0):
    """The effect analysis with the sweep's rounds replayed: the searcher's decisions, and the table's."""
    return analyse(resample(predictions, baseline, n_boot=n_boot, seed=seed), baseline, margin=margin, alpha=alpha,
                   rounds=rounds, seed=seed)


def checkpoint_predictions(checkpoints: Mapping[str, str | tune.Checkpoint], arms: list[str]) -> dict:
    """Validation predictions by arm in seed order, read from each trial's last checkpoint ("arm/seed" -> its
    path on the storage, or the tune.Checkpoint)."""
    by_arm: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="seed-rounds-") as scratch:
        for key in sorted(checkpoints, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
            arm, seed = key.split("/")
            checkpoint = checkpoints[key]
            if not isinstance(checkpoint, tune.Checkpoint):
                checkpoint = tune.Checkpoint(checkpoint)
            folder = Path(checkpoint.to_directory(f"{scratch}/{arm}-s{seed}"))
            by_arm.setdefault(arm, []).append(read_trial_predictions(
                folder / PREDICTIONS_FILE, folder / THRESHOLDS_FILE, f"{arm}-s{seed}"))
    return {arm: by_arm[arm] for arm in arms if arm in by_arm}


def rounds_record(analysis, rounds: SeedRounds, margin: float) -> str:
    """seed_rounds.json: the looks, the seeds each arm got and why it stopped."""
    seeds = {row.arm: int(row.n_seeds) for row in analysis.table.drop_duplicates("arm").itertuples()}
    return json.dumps({"rule": "O'Brien-Fleming alpha spending (Lan-DeMets), Holm over arms", "margin": margin,
                       "looks": list(analysis.looks), "max_seeds": rounds.max_seeds, "seeds": seeds,
                       "stops": dict(analysis.stops)}, indent=2) + "\n"
