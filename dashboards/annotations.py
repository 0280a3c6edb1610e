"""Expert annotations shipped beside NIH ChestX-ray14, when present: NIH's radiologist bounding boxes
(BBox_List_2017.csv) and Google's radiologist-adjudicated labels (Majkowski et al., Radiology 2019).

Each file is looked for at the top of the data folder (plain or .gz) unless a path is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from trainable.errors import DataError
from trainable.findings import FINDINGS

BBOX_FILE = "BBox_List_2017.csv"
BBOX_IMAGE_SIZE = 1024               # box coordinates are on NIH's 1024 x 1024 PNGs
# NIH's box list names one finding differently from the labels.
BBOX_FINDING_NAMES = {"Infiltrate": "Infiltration"}
BBOX_COLUMNS = ("image", "finding", "x", "y", "w", "h")

# The combined file (with a `Set Id` column) and Google's own release (one file per set).
GOOGLE_FILES = ("google2019_nih-chest-xray-labels.csv", "four_findings_expert_labels_test_labels.csv",
                "four_findings_expert_labels_validation_labels.csv")
GOOGLE_ANSWERS = {"YES": 1.0, "NO": 0.0}

# Google finding -> (what scores it, how: from our (N, 14) probabilities).
GOOGLE_FINDINGS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "Pneumothorax": ("p(Pneumothorax)", lambda probs: probs[:, FINDINGS.index("Pneumothorax")]),
    # "Nodule or mass" is positive when either is there: the more confident of our two findings.
    "Nodule or mass": ("max(p(Nodule), p(Mass))",
                       lambda probs: np.maximum(probs[:, FINDINGS.index("Nodule")], probs[:, FINDINGS.index("Mass")])),
}


def find_files(data_dir: str | Path | None, names: Sequence[str]) -> list[Path]:
    """The files of `names` (plain or .gz) at the top of data_dir, in `names` order."""
    if data_dir is None:
        return []
    found = []
    for name in names:
        for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
    return found


def _read_csv(path: Path, **options) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **options)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).splitlines()[0] if str(err) else err})") from None


def read_bboxes(path: str | Path) -> pd.DataFrame:
    """Columns image, finding (our spelling), x, y, w, h (1024-pixel coordinates), one row per box."""
    path = Path(path)
    # The header splits `Bbox [x,y,w,h]` into four oddly named columns and adds empty ones: read by position.
    raw = _read_csv(path, header=None, skiprows=1, usecols=range(len(BBOX_COLUMNS)), names=list(BBOX_COLUMNS))
    boxes = raw.assign(finding=raw["finding"].str.strip().replace(BBOX_FINDING_NAMES), image=raw["image"].str.strip())
    unknown = ~boxes["finding"].isin(FINDINGS)
    if unknown.any():
        raise DataError(f"{path}: unknown finding {raw['finding'][unknown].iloc[0]!r} (image "
                        f"{boxes['image'][unknown].iloc[0]}); expected one of: {', '.join(FINDINGS)} or Infiltrate")
    for column in ("x", "y", "w", "h"):
        values = pd.to_numeric(boxes[column], errors="coerce")
        bad = values.isna() | (values < 0)
        if bad.any():
            raise DataError(f"{path}: box {column} of image {boxes['image'][bad].iloc[0]} is "
                            f"{raw[column][bad].iloc[0]!r}; expected a non-negative number")
        boxes[column] = values
    return boxes.reset_index(drop=True)


def read_google_labels(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Columns image, set (test/val, or the file name), and per GOOGLE_FINDINGS 1.0 / 0.0 / NaN (not read)."""
    frames = []
    for path in map(Path, paths):
        raw = _read_csv(path)
        raw.columns = raw.columns.str.strip()
        missing = [name for name in ("Image Index", *GOOGLE_FINDINGS) if name not in raw.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; expected Google's 2019 "
                            f"expert labels with Image Index and {', '.join(GOOGLE_FINDINGS)}")
        frame = pd.DataFrame({"image": raw["Image Index"].str.strip(),
                              "set": raw["Set Id"].str.strip() if "Set Id" in raw.columns else path.name})
        for finding in GOOGLE_FINDINGS:
            answers = raw[finding].str.strip().str.upper()
            unexpected = ~answers.isin([*GOOGLE_ANSWERS, ""])
            if unexpected.any():
                raise DataError(f"{path}: column {finding!r} of image {frame['image'][unexpected].iloc[0]} is "
                                f"{raw[finding][unexpected].iloc[0]!r}; expected YES, NO or empty")
            frame[finding] = answers.map(GOOGLE_ANSWERS)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).drop_duplicates("image", keep="first").reset_index(drop=True)
