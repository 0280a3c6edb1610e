"""`--until-decided`: a Ray Tune Searcher that adds seeds, round by round, to the arms the analysis cannot decide yet.

Round 1 proposes every arm × seeds 0..--seeds−1. When a round's trials have all ended, the searcher reads their
validation predictions from their last checkpoints and runs the effect analysis (dashboards/effects.py) with
the sweep's sequential rule replayed over the rounds so far: arms whose primary verdict (Δ mean AUC vs the
baseline: helps, hurts or equivalent) is decided stop; the undecided ones and the baseline get the next
--seeds-per-round seeds; the sweep ends when every arm is decided or --max-seeds is reached. The repeated
looks are paid for by O'Brien–Fleming alpha spending (dashboards/sequential.py), so the primary family keeps its
family-wise error rate (measured: benchmarks/effect_calibration.py).

One Tune experiment, one MLflow parent run: the rounds are trials of the same sweep, and Tune saves this
searcher's state with the experiment, so `--resume` continues mid-round with nothing proposed twice. Every
decision is also written to `seed_rounds.json` beside sweep.json.
"""
from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.tune.search import Searcher

from dashboards.effects import DECIDED, SeedRounds, analyse, resample
from dashboards.sweep_reader import read_trial_predictions
from trainable.checkpoint_files import PREDICTIONS_FILE, THRESHOLDS_FILE
from trainable.errors import UserError
from trainable.tune import ARM_KEY

from .naming import trial_run_name
from .record import SweepLocation

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
        self.log: list[dict[str, Any]] = []
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

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as stream:
            pickle.dump(self.__dict__, stream)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as stream:
            self.__dict__.update(pickle.load(stream))

    # --- rounds -----------------------------------------------------------------------------------------------
    def _next_round(self) -> None:
        """Analyse the trials so far; queue the next seeds of the undecided arms and the baseline, or finish."""
        try:
            analysis = analyse(resample(self._predictions(), self.baseline, n_boot=self.n_boot,
                                        seed=self.bootstrap_seed),
                               self.baseline, margin=self.margin, alpha=self.alpha, rounds=self.rounds,
                               seed=self.bootstrap_seed)
        except UserError as err:
            self._finish(f"no further round: {err}")
            return
        looked = analysis.looks[-1]
        undecided = [arm for arm in self.arms if arm != self.baseline
                     and not any(analysis.stops.get(arm, "").startswith(v) for v in DECIDED)]
        later = [n for n in self.rounds.looks if n > looked]
        entry = {"look": len(analysis.looks), "seeds": looked, "stops": dict(analysis.stops),
                 "undecided": undecided, "failed": list(self.failed)}
        if undecided and later:
            self.queue = [(arm, seed) for seed in range(looked, later[0]) for arm in (*undecided, self.baseline)]
            entry["next"] = {"seeds": later[0], "arms": [*undecided, self.baseline]}
            print(f"seed round {len(analysis.looks)} ({looked} seeds): "
                  + "; ".join(f"{arm} {why}" for arm, why in analysis.stops.items() if arm not in undecided)
                  + f"{'; ' if len(undecided) < len(self.arms) - 1 else ''}undecided: {', '.join(undecided)} -> "
                    f"seeds {looked}..{later[0] - 1} for them and {self.baseline}", flush=True)
            self._write(entry)
        else:
            self._write(entry)
            self._finish("; ".join(f"{arm} {why}" for arm, why in analysis.stops.items()))

    def _finish(self, why: str) -> None:
        self.finished = True
        print(f"seed rounds done: {why}", flush=True)

    def _write(self, entry: dict[str, Any]) -> None:
        self.log = [e for e in self.log if e["look"] < entry["look"]] + [entry]
        self.location.write_text(ROUNDS_FILE, json.dumps({"rounds": self.log}, indent=2) + "\n")

    def _predictions(self) -> dict:
        """Every finished trial's validation predictions, by arm in seed order (read from its checkpoint)."""
        by_arm: dict[str, list] = {}
        with tempfile.TemporaryDirectory(prefix="seed-rounds-") as scratch:
            for key in sorted(self.checkpoints, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
                arm = key.split("/")[0]
                folder = Path(tune.Checkpoint(self.checkpoints[key]).to_directory(f"{scratch}/{key}"))
                by_arm.setdefault(arm, []).append(read_trial_predictions(
                    folder / PREDICTIONS_FILE, folder / THRESHOLDS_FILE, key.replace("/", "-s")))
        return {arm: by_arm[arm] for arm in self.arms if arm in by_arm}


def read_rounds(experiment_path: str) -> list[dict[str, Any]]:
    """The decisions an --until-decided sweep recorded in its folder (empty when there are none)."""
    fs, root = pyarrow.fs.FileSystem.from_uri(experiment_path)
    path = f"{root}/{ROUNDS_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return []
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.readall().decode())["rounds"]
