"""Prediction files from anywhere (another framework, an old study), read for the same effect analysis.

    DIR/<arm>/seed<k>.csv      columns: image, patient, then for each of the 14 findings F (CSV names, e.g.
                               Pleural_Thickening) label_F (0/1) and prob_F (0..1); every file lists the same images
    DIR/<arm>/thresholds.json  optional: {finding: threshold} for that arm's F1; without it each file's F1
                               thresholds are chosen on its own labels, as the trials of a sweep do

Everything is checked before any analysis: a problem is one UserError naming the file and the column or value.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from trainable.errors import DataError
from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds

from .effects import TrialPredictions

SEED_FILE = re.compile(r"^seed(\d+)\.csv$")
THRESHOLDS_JSON = "thresholds.json"
ID_COLUMNS = ("image", "patient")


@dataclass(frozen=True)
class PredictionSet:
    """{arm: trials in seed order}, the patient of each image (the bootstrap's resampling unit), and where each
    arm's F1 thresholds came from."""
    arms: dict[str, list[TrialPredictions]]
    patients: np.ndarray
    threshold_sources: dict[str, str]


def read_predictions(folder: str | Path) -> PredictionSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--predictions {folder}: no such folder")
    arms: dict[str, list[TrialPredictions]] = {}
    sources: dict[str, str] = {}
    reference: pd.DataFrame | None = None
    for arm_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(((int(m.group(1)), p) for p in arm_dir.iterdir() if (m := SEED_FILE.match(p.name))))
        if not files:
            continue
        thresholds = _thresholds(arm_dir / THRESHOLDS_JSON)
        sources[arm_dir.name] = (f"{arm_dir.name}/{THRESHOLDS_JSON}" if thresholds is not None
                                 else "chosen on each file's own labels")
        arms[arm_dir.name] = []
        for _, path in files:
            frame = _read_file(path)
            if reference is None:
                reference = frame
            else:
                frame = _same_images(path, frame, reference)
            labels = frame[[f"label_{f}" for f in FINDINGS]].to_numpy(np.float32)
            probs = frame[[f"prob_{f}" for f in FINDINGS]].to_numpy(np.float32)
            arms[arm_dir.name].append(TrialPredictions(
                labels, probs, thresholds if thresholds is not None else choose_thresholds(labels, probs),
                frame["image"].to_numpy(str), f"{arm_dir.name}/{path.name}"))
    if reference is None:
        raise DataError(f"--predictions {folder}: no <arm>/seed<k>.csv files (e.g. {folder}/baseline/seed0.csv)")
    return PredictionSet(arms, np.unique(reference["patient"].astype(str), return_inverse=True)[1].ravel(), sources)


def _read_file(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"image": str, "patient": str})
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).splitlines()[0][:200]})") from None
    wanted = [*ID_COLUMNS, *(f"{kind}_{f}" for f in FINDINGS for kind in ("label", "prob"))]
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + f"; expected image, patient, label_<F> and prob_<F> for the 14 findings ({FINDINGS[0]}, …)")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    for column in ID_COLUMNS:
        if frame[column].isna().any():
            row = int(frame[column].isna().argmax()) + 2
            raise DataError(f"{path}: column {column} has an empty value in row {row}")
    if frame["image"].duplicated().any():
        raise DataError(f"{path}: column image lists {frame.loc[frame['image'].duplicated(), 'image'].iloc[0]} twice")
    for finding in FINDINGS:
        label, prob = frame[f"label_{finding}"], pd.to_numeric(frame[f"prob_{finding}"], errors="coerce")
        bad_label = ~label.isin([0, 1, 0.0, 1.0])
        if bad_label.any():
            raise DataError(f"{path}: column label_{finding} holds {label[bad_label].tolist()[0]!r} in row "
                            f"{int(bad_label.argmax()) + 2}; expected 0 or 1")
        bad_prob = ~(np.isfinite(prob) & (prob >= 0) & (prob <= 1))
        if bad_prob.any():
            value = frame[f"prob_{finding}"][bad_prob].tolist()[0]
            raise DataError(f"{path}: column prob_{finding} holds {value!r} in row {int(bad_prob.argmax()) + 2}; "
                            f"expected a probability in 0..1")
        frame[f"prob_{finding}"] = prob
    return frame


def _same_images(path: Path, frame: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """`frame` in the reference's image order; an error if it lists other images or other patients."""
    index = pd.Index(frame["image"])
    order = index.get_indexer(reference["image"])
    if (order < 0).any() or len(frame) != len(reference):
        example = (reference["image"][order < 0].iloc[0] if (order < 0).any()
                   else frame["image"][~frame["image"].isin(reference["image"])].iloc[0])
        raise DataError(f"{path}: column image differs from the first file's images (e.g. {example}); every file "
                        f"of a sweep lists the same validation images")
    frame = frame.iloc[order].reset_index(drop=True)
    differs = frame["patient"].to_numpy() != reference["patient"].to_numpy()
    if differs.any():
        raise DataError(f"{path}: column patient gives image {frame['image'][differs].iloc[0]} another patient than "
                        f"the first file does")
    return frame


def _thresholds(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict) or set(values) != set(FINDINGS):
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise DataError(f"{path}: expected an object with one threshold per finding ({', '.join(FINDINGS)}); got {got}")
    thresholds = np.array([values[f] for f in FINDINGS], dtype=object)
    bad = [f for f, v in zip(FINDINGS, thresholds) if not isinstance(v, (int, float)) or not 0 <= v <= 1]
    if bad:
        raise DataError(f"{path}: threshold of {bad[0]} is {values[bad[0]]!r}; expected a number in 0..1")
    return thresholds.astype(float)
