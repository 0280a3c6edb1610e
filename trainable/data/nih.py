"""NIH ChestX-ray14 metadata, labels and patient-wise splits.

Reads the Data_Entry CSV (2017 release with `058Y` ages, or the v2020 release with integer ages) into one row per
image, finds the PNGs in NIH's flat layout (`images/`) or Kaggle's (`images_NNN/images/`), splits patient-wise
(official lists or stratified), and saves the split as a fingerprinted CSV that every trial reads back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from ..findings import FINDINGS, NO_FINDING

CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
SYNTHETIC_MARKER = "SYNTHETIC.md"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLITS = ("train", "val", "test")
SPLIT_CSV = "split.csv"
SPLIT_JSON = "split.json"

SEXES = ("M", "F")
VIEWS = ("PA", "AP")
MAX_AGE_YEARS = 120.0
# Age units of the 2017 release ('058Y', '005M', '010D', DICOM-style); a bare number (v2020) is years.
AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
AGE_PATTERN = r"^(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[YMWD]?)$"

IMAGE_COLUMN = "Image Index"
LABELS_COLUMN = "Finding Labels"
META_COLUMNS = ("image", "path", "patient_id", "follow_up", "age", "sex", "view", *FINDINGS)


@dataclass(frozen=True)
class UnknownAges:
    """Ages outside 0-120 years in the CSV, loaded as unknown (NaN): how many, and the first one."""
    count: int = 0
    first_image: str | None = None
    first_value: str | None = None

    @classmethod
    def of(cls, images: pd.Series, values: pd.Series, impossible: pd.Series) -> "UnknownAges":
        if not impossible.any():
            return cls()
        first = int(np.argmax(impossible.to_numpy()))
        return cls(int(impossible.sum()), str(images.iloc[first]), str(values.iloc[first]))

    def note(self) -> str | None:
        """The one line a CLI prints, or None when every age was possible."""
        if not self.count:
            return None
        return (f"{self.count} image(s) with an age outside 0-{MAX_AGE_YEARS:g} years (first {self.first_image}: "
                f"{self.first_value!r}) loaded with the age unknown; demographic inputs impute it")


# --- parsing the Data_Entry CSV ---------------------------------------------------------------------------

def _non_negative_int(values: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers.where((numbers >= 0) & (numbers % 1 == 0))


def _age_years(values: pd.Series) -> pd.Series:
    """Years; NaN for text that is no age at all. A well-formed age outside 0-120 (the 2017 release has a few,
    148 … 414) stays a number here: `parse_entries` turns it into an unknown age and counts it."""
    parts = values.str.upper().str.extract(AGE_PATTERN)
    return pd.to_numeric(parts["number"]) * parts["unit"].map(AGE_UNIT_YEARS)


def _one_of(valid: tuple[str, ...], values: pd.Series) -> pd.Series:
    upper = values.str.upper()
    return upper.where(upper.isin(valid))


# CSV column -> (our column, parser that returns NaN for an invalid value, what a valid value looks like)
FIELD_PARSERS: dict[str, tuple[str, Callable[[pd.Series], pd.Series], str]] = {
    "Patient ID": ("patient_id", _non_negative_int, "a non-negative integer"),
    "Follow-up #": ("follow_up", _non_negative_int, "a non-negative integer"),
    "Patient Age": ("age", _age_years, "an age such as 58, 058Y, 005M or 010D"),
    "Patient Gender": ("sex", partial(_one_of, SEXES), "M or F"),
    "View Position": ("view", partial(_one_of, VIEWS), "PA or AP"),
}
OPTIONAL_COLUMNS = {"Follow-up #": 0}   # absent column -> this value for every image
REQUIRED_COLUMNS = (IMAGE_COLUMN, LABELS_COLUMN, *(c for c in FIELD_PARSERS if c not in OPTIONAL_COLUMNS))


def _reject_rows(csv_path: Path, column: str, bad: pd.Series, values: pd.Series, images: pd.Series,
                 expected: str) -> None:
    """Raise naming the CSV, the column, the first offending image and value, and how many rows are affected."""
    if bad.any():
        first = int(np.argmax(bad.to_numpy()))
        raise DataError(f"{csv_path}: column {column!r} has {int(bad.sum())} bad row(s), first at image "
                        f"{images.iloc[first]}: {values.iloc[first]!r}; expected {expected}")


def read_text_csv(csv_path: Path) -> pd.DataFrame:
    """Every cell as text ('' for an empty one), header names stripped; a DataError naming the file otherwise."""
    try:
        # index_col=False: the 2017 file ends every line with a comma, which would otherwise shift columns.
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{csv_path}: not a readable CSV ({reason})") from None
    raw.columns = raw.columns.str.strip()
    return raw


def _read_raw_csv(csv_path: Path) -> pd.DataFrame:
    raw = read_text_csv(csv_path)
    missing = [name for name in REQUIRED_COLUMNS if name not in raw.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}; "
                        f"expected the NIH header with {', '.join(REQUIRED_COLUMNS)}{_separator_hint(raw.columns)}")
    if raw.empty:
        raise DataError(f"{csv_path}: has a header but no rows; expected one row per image")
    present = [name for name in (IMAGE_COLUMN, LABELS_COLUMN, *FIELD_PARSERS) if name in raw.columns]
    return raw[present].apply(lambda column: column.str.strip())


def _separator_hint(columns: pd.Index) -> str:
    """A header read as one column that holds the NIH names joined by another separator: say so."""
    if len(columns) != 1:
        return ""
    for separator, name in ((";", "semicolon"), ("\t", "tab"), ("|", "'|'")):
        if sum(required in columns[0].split(separator) for required in REQUIRED_COLUMNS) >= 2:
            return (f" (the header is one column with {name}-separated names: the file is likely saved with "
                    f"{separator!r} as separator; save it comma-separated)")
    return ""


def _check_image_names(csv_path: Path, images: pd.Series) -> None:
    _reject_rows(csv_path, IMAGE_COLUMN, images.eq("") | images.str.contains(r"[/\\]", regex=True), images,
                 images, "a plain file name such as 00000001_000.png")
    duplicated = images.duplicated(keep=False)
    if duplicated.any():
        name = images[duplicated].iloc[0]
        raise DataError(f"{csv_path}: image {name} is listed {int(images.eq(name).sum())} times "
                        f"({int(duplicated.sum())} rows share a name); expected each image name once")


def _label_matrix(csv_path: Path, labels: pd.Series, images: pd.Series) -> pd.DataFrame:
    """One uint8 0/1 column per finding, in FINDINGS order; `No Finding` is all zeros."""
    dummies = labels.str.replace(r"\s*\|\s*", "|", regex=True).str.get_dummies(sep="|")
    known = {*FINDINGS, NO_FINDING}
    unknown = [column for column in dummies.columns if column not in known]
    if unknown:
        rows = dummies[unknown[0]].astype(bool)
        raise DataError(f"{csv_path}: unknown finding {unknown[0]!r} in {LABELS_COLUMN!r} of image "
                        f"{images[rows].iloc[0]} ({int(rows.sum())} row(s)); expected {NO_FINDING!r} or "
                        f"'|'-joined names from: {', '.join(FINDINGS)}")
    matrix = dummies.reindex(columns=list(FINDINGS), fill_value=0).astype(np.uint8)
    if NO_FINDING in dummies:
        _reject_rows(csv_path, LABELS_COLUMN, dummies[NO_FINDING].astype(bool) & matrix.any(axis=1).astype(bool),
                     labels, images, f"{NO_FINDING!r} alone, not combined with findings")
    return matrix


def parse_entries(csv_path: str | os.PathLike) -> pd.DataFrame:
    """The Data_Entry CSV as a table (no image paths): image, patient_id, follow_up, age, sex, view, 14 labels."""
    csv_path = Path(csv_path)
    raw = _read_raw_csv(csv_path)
    images = raw[IMAGE_COLUMN]
    for column in REQUIRED_COLUMNS:
        _reject_rows(csv_path, column, raw[column].eq(""), raw[column], images, "a value (the field is empty)")
    _check_image_names(csv_path, images)
    table = pd.DataFrame({"image": images})
    for column, (name, parse, expected) in FIELD_PARSERS.items():
        if column not in raw.columns:
            table[name] = OPTIONAL_COLUMNS[column]
            continue
        parsed = parse(raw[column])
        _reject_rows(csv_path, column, parsed.isna(), raw[column], images, expected)
        table[name] = parsed
    impossible = ~table["age"].between(0, MAX_AGE_YEARS)
    table["age"] = table["age"].where(~impossible)
    table = table.astype({"patient_id": np.int64, "follow_up": np.int64, "age": np.float64, "sex": str, "view": str})
    entries = pd.concat([table, _label_matrix(csv_path, raw[LABELS_COLUMN], images)], axis=1)
    entries.attrs["unknown_ages"] = UnknownAges.of(images, raw["Patient Age"], impossible)
    return entries


# --- locating files ---------------------------------------------------------------------------------------

def _require_folder(data_dir: Path) -> None:
    if data_dir.is_file():
        raise DataError(f"{data_dir}: is a file; expected the NIH ChestX-ray14 folder holding {CSV_NAMES[0]} and "
                        f"images/ (perhaps {data_dir.parent})")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found; expected the NIH ChestX-ray14 folder holding "
                        f"{CSV_NAMES[0]} and images/ (or Kaggle's images_NNN/images/)")


def find_csv(data_dir: str | os.PathLike) -> Path:
    """The Data_Entry CSV at the top of data_dir (plain or .gz)."""
    data_dir = Path(data_dir)
    _require_folder(data_dir)
    # The newest release wins when both are present: v2020 corrected the 2017 ages.
    for name in reversed(CSV_NAMES):
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{data_dir}: no metadata CSV; expected {' or '.join(CSV_NAMES)} (optionally .gz) "
                    f"at the top of the folder")


def image_folders(data_dir: Path) -> list[Path]:
    """NIH's flat `images/` first, then Kaggle's `images_NNN/images/` in name order."""
    return [folder for folder in (data_dir / "images", *sorted(data_dir.glob("images_*/images"))) if folder.is_dir()]


def scan_images(data_dir: str | os.PathLike) -> dict[str, str]:
    """Image file name -> absolute path, one directory listing per folder (fast for 112k files)."""
    found: dict[str, str] = {}
    for folder in reversed(image_folders(Path(data_dir).absolute())):   # reversed: earlier folders win
        try:
            with os.scandir(folder) as entries:
                found.update({entry.name: entry.path for entry in entries
                              if entry.name.lower().endswith(".png") and _is_image_file(entry)})
        except OSError as err:
            raise DataError(f"{folder}: cannot list the image folder ({err.strerror or err})") from None
    return found


def _is_image_file(entry: os.DirEntry) -> bool:
    """A regular file (or a link to one); a looping or broken link, or an entry that cannot be read, is an
    error naming it: left alone it would surface later as a missing image or a traceback."""
    try:
        if entry.is_file():
            return True
        if entry.is_symlink():
            os.stat(entry.path)          # raises: where it points is gone
    except OSError as err:
        raise DataError(f"{entry.path}: unreadable entry in the image folder ({err.strerror or err}); "
                        f"expected a PNG file or a symlink to one") from None
    return False


def load_metadata(data_dir: str | os.PathLike, *, skip_missing: bool = False) -> pd.DataFrame:
    """One row per image on disk: META_COLUMNS. attrs: `synthetic`, `skipped_missing`, `unknown_ages` (of the CSV)."""
    data_dir = Path(data_dir).absolute()
    csv_path = find_csv(data_dir)
    entries = parse_entries(csv_path)
    paths = entries["image"].map(scan_images(data_dir))
    missing = paths.isna()
    where = f"under {data_dir}/images/ or {data_dir}/images_*/images/"
    if missing.all():
        raise DataError(f"{csv_path}: none of its {len(entries)} images was found {where}")
    if missing.any() and not skip_missing:
        raise DataError(f"{csv_path}: {int(missing.sum())} of {len(entries)} images are not on disk, first "
                        f"{entries['image'][missing].iloc[0]}; expected them {where} "
                        f"(skip_missing / --skip-missing drops them)")
    meta = entries.assign(path=paths.astype(str)).loc[~missing, list(META_COLUMNS)].reset_index(drop=True)
    meta.attrs.update(synthetic=(data_dir / SYNTHETIC_MARKER).is_file(), skipped_missing=int(missing.sum()),
                      unknown_ages=entries.attrs["unknown_ages"])
    return meta


def _read_names(path: Path) -> set[str]:
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the split list ({err}); expected one image name per line") from None


def read_split_lists(data_dir: str | os.PathLike) -> tuple[set[str], set[str]] | None:
    """(train_val names, test names) from the official lists, or None when neither file exists."""
    paths = [Path(data_dir) / name for name in (TRAIN_VAL_LIST, TEST_LIST)]
    present = [path.is_file() for path in paths]
    if not any(present):
        return None
    if not all(present):
        have, lack = (paths[0], paths[1]) if present[0] else (paths[1], paths[0])
        raise DataError(f"{lack}: missing while {have.name} exists; the official split needs both lists")
    train_val, test = (_read_names(path) for path in paths)
    return train_val, test


# --- what to train on ---------------------------------------------------------------------------------------

def _only_view(view: str, meta: pd.DataFrame) -> pd.DataFrame:
    return meta[meta["view"] == view]


VIEW_FILTERS: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "all": lambda meta: meta,
    **{view: partial(_only_view, view) for view in VIEWS},
}


def filter_view(meta: pd.DataFrame, view: str) -> pd.DataFrame:
    if view not in VIEW_FILTERS:
        raise ConfigError(f"data: view={view!r} is not one of: {', '.join(VIEW_FILTERS)}")
    return VIEW_FILTERS[view](meta).reset_index(drop=True)


def subset_patients(meta: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """Whole, randomly chosen patients until max_images is reached (0 = everything)."""
    if max_images <= 0 or len(meta) <= max_images:
        return meta
    counts = meta.groupby("patient_id").size()      # sorted by patient id, so independent of row order
    shuffled = counts.iloc[np.random.default_rng(seed).permutation(len(counts))]
    before = shuffled.cumsum() - shuffled          # images already taken when this patient comes up
    keep = shuffled.index[before < max_images]
    return meta[meta["patient_id"].isin(keep)].reset_index(drop=True)


# --- splits -------------------------------------------------------------------------------------------------

def _iterative_stratification(counts: np.ndarray, images: np.ndarray, fractions: np.ndarray,
                              rng: np.random.Generator) -> np.ndarray:
    """Split index per patient: Sechidis et al.'s iterative stratification (ECML PKDD 2011) on count vectors.

    counts (P, K) holds each patient's positive images per finding, images (P,) their image counts. Each split s
    wants fractions[s] of every finding's positive images and of all images. The finding with the fewest
    positives still unassigned is taken next; its patients (most positive images first, ties in random order)
    each go to the split that still wants most of that finding (ties: the one that wants most images), which
    then wants their other findings and images less. Patients without any finding fill the image demand,
    largest first.

    Why not iterative-stratification's MultilabelStratifiedShuffleSplit: it casts labels to 0/1 and counts
    patients, while prevalence is per image and NIH patients have 1 to 184 images. On the real 112,120 rows it
    left findings up to 18% (Hernia 39%) relative off their overall prevalence; this count version stays within
    1.5% (tests/test_nih.py::test_real_metadata_patient_split_keeps_every_prevalence), after `_rebalance`.
    """
    order = rng.permutation(len(counts))
    counts, images = counts[order], images[order]
    wanted = np.outer(fractions, counts.sum(axis=0)).astype(np.float64)       # (S, K) positives still wanted
    wanted_images = fractions * float(images.sum())
    split = np.full(len(counts), -1)
    left = np.ones(len(counts), dtype=bool)
    while left.any():
        remaining = counts[left].sum(axis=0)
        if not remaining.any():
            break
        finding = int(np.where(remaining > 0, remaining, np.inf).argmin())
        members = np.flatnonzero(left & (counts[:, finding] > 0))
        for patient in members[np.argsort(-counts[members, finding], kind="stable")]:
            want = wanted[:, finding]
            best = np.flatnonzero(want == want.max())
            chosen = best[np.argmax(wanted_images[best])]
            split[patient], left[patient] = chosen, False
            wanted[chosen] -= counts[patient]
            wanted_images[chosen] -= images[patient]
    rest = np.flatnonzero(left)
    for patient in rest[np.argsort(-images[rest], kind="stable")]:
        chosen = int(np.argmax(wanted_images))
        split[patient] = chosen
        wanted_images[chosen] -= images[patient]
    _rebalance(counts, images, fractions, split, rng)
    unshuffled = np.empty_like(split)
    unshuffled[order] = split
    return unshuffled


def _rebalance(counts: np.ndarray, images: np.ndarray, fractions: np.ndarray, split: np.ndarray,
               rng: np.random.Generator, passes: int = 10) -> None:
    """Move single patients (those with a finding) to another split while that lowers
    sum over splits s and columns k of (count[s, k] - target[s, k])^2 / target[s, k], columns = findings + images.

    The greedy pass above cannot undo a finding's overshoot that rarer findings' patients brought along (on the
    real metadata about one seed in ten left a common finding 4-5% off); these moves remove it. Each pass screens
    every patient at once against the current counts, then makes the improving moves one by one, re-checked
    against the counts as they change.
    """
    values = np.column_stack([counts, images]).astype(np.float64)
    target = np.outer(fractions, values.sum(axis=0))
    inverse = np.divide(1.0, target, out=np.zeros_like(target), where=target > 0)
    current = np.zeros_like(target)
    np.add.at(current, split, values)
    movable = np.flatnonzero(counts.any(axis=1))

    def changes(patients: np.ndarray) -> np.ndarray:
        """(patients, splits): change of the sum if each patient moved to each split (0 for its own)."""
        value, here = values[patients], split[patients]
        leave = (value * (value - 2 * (current[here] - target[here])) * inverse[here]).sum(axis=1)
        join = np.einsum("pk,sk->ps", value * value, inverse) + 2 * value @ ((current - target) * inverse).T
        change = leave[:, None] + join
        change[np.arange(len(patients)), here] = 0.0
        return change

    for _ in range(passes):
        candidates = movable[(changes(movable).min(axis=1) < -1e-9)]
        moved = 0
        for patient in candidates[rng.permutation(len(candidates))]:
            change = changes(np.array([patient]))[0]
            there = int(np.argmin(change))
            if change[there] < -1e-9:
                current[split[patient]] -= values[patient]
                current[there] += values[patient]
                split[patient] = there
                moved += 1
        if not moved:
            break


def assign_patients(meta: pd.DataFrame, fractions: Mapping[str, float], seed: int) -> pd.Series:
    """Split name per image: patient-wise, by iterative stratification of the patients' positive-image counts.

    Every finding's positive images and all images are shared out in proportion to `fractions` (ordered
    name -> fraction, summing to 1), so each finding's prevalence comes out nearly the same in every split;
    `seed` breaks ties and orders the patients.
    """
    if meta.empty:
        return pd.Series([], index=meta.index, dtype=str)
    per_patient = meta.groupby("patient_id")
    counts = per_patient[list(FINDINGS)].sum()
    split = _iterative_stratification(counts.to_numpy(np.int64), per_patient.size().to_numpy(np.int64),
                                      np.asarray(list(fractions.values()), dtype=np.float64),
                                      np.random.default_rng(seed))
    split_of_patient = pd.Series(np.asarray(list(fractions))[split], index=counts.index)
    return meta["patient_id"].map(split_of_patient).astype(str)


def _official_lists(data_dir: Path) -> tuple[set[str], set[str]]:
    lists = read_split_lists(data_dir)
    if lists is None:
        raise DataError(f"{data_dir}: the official split needs {TRAIN_VAL_LIST} and {TEST_LIST}, which are absent; "
                        f"use --split patient for a patient-wise stratified split")
    train_val, test = lists
    both = sorted(train_val & test)
    if both:
        raise DataError(f"{data_dir}: image {both[0]} is in both {TRAIN_VAL_LIST} and {TEST_LIST} "
                        f"({len(both)} such names); expected each image in one list")
    return train_val, test


def official_split(meta: pd.DataFrame, spec: "DataSpec", data_dir: Path) -> pd.Series:
    """test = test_list.txt; val = val_fraction of the train_val images, carved patient-wise and stratified."""
    train_val, test = _official_lists(Path(data_dir))
    in_test = meta["image"].isin(test)
    unlisted = ~in_test & ~meta["image"].isin(train_val)
    if unlisted.any():
        raise DataError(f"{data_dir}: image {meta['image'][unlisted].iloc[0]} is in neither {TRAIN_VAL_LIST} nor "
                        f"{TEST_LIST} ({int(unlisted.sum())} such images); expected every image in one list")
    mixed = in_test.groupby(meta["patient_id"]).nunique() > 1
    if mixed.any():
        raise DataError(f"{data_dir}: patient {mixed.index[mixed][0]} has images in both {TRAIN_VAL_LIST} and "
                        f"{TEST_LIST} ({int(mixed.sum())} such patients); expected patient-wise lists")
    split = pd.Series("test", index=meta.index, dtype=str)
    fractions = {"val": spec.val_fraction, "train": 1.0 - spec.val_fraction}
    split[~in_test] = assign_patients(meta[~in_test], fractions, spec.split_seed)
    return split


def patient_split(meta: pd.DataFrame, spec: "DataSpec", data_dir: Path) -> pd.Series:
    """Patient-wise, stratified on findings; test_fraction and val_fraction are fractions of all images."""
    fractions = {"test": spec.test_fraction, "val": spec.val_fraction,
                 "train": 1.0 - spec.test_fraction - spec.val_fraction}
    return assign_patients(meta, fractions, spec.split_seed)


SPLITTERS: dict[str, Callable[[pd.DataFrame, "DataSpec", Path], pd.Series]] = {
    "official": official_split,
    "patient": patient_split,
}


def check_no_patient_leak(frame: pd.DataFrame) -> None:
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    leaked = splits_per_patient.index[splits_per_patient > 1]
    if len(leaked):
        patient = leaked[0]
        seen = sorted(frame.loc[frame["patient_id"] == patient, "split"].unique())
        raise DataError(f"patient {patient} has images in splits {', '.join(seen)} ({len(leaked)} such patients); "
                        f"expected every patient in exactly one split")


# --- the data set specification -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DataSpec:
    data_dir: str
    split: str = "official"          # registry: SPLITTERS
    val_fraction: float = 0.1        # patient: of all images; official: of the train_val images
    test_fraction: float = 0.2       # patient only; official uses test_list.txt
    split_seed: int = 0
    view: str = "all"                # registry: VIEW_FILTERS
    max_images: int = 0              # 0 = all; otherwise whole patients up to about this many images
    skip_missing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.data_dir, (str, os.PathLike)):
            raise ConfigError(f"data: data_dir={self.data_dir!r} must be a folder path")
        object.__setattr__(self, "data_dir", os.fspath(self.data_dir))
        for key, registry in (("split", SPLITTERS), ("view", VIEW_FILTERS)):
            if getattr(self, key) not in registry:
                raise ConfigError(f"data: {key}={getattr(self, key)!r} is not one of: {', '.join(registry)}")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"data: {key}={value!r} must be a number between 0 and 1 (exclusive)")
        if self.split == "patient" and self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"data: val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                              f"must be below 1 so the train split is not empty")
        for key in ("split_seed", "max_images"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"data: {key}={value!r} must be an integer >= 0")
        if not isinstance(self.skip_missing, bool):
            raise ConfigError(f"data: skip_missing={self.skip_missing!r} must be true or false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- fingerprint, saved splits ------------------------------------------------------------------------------

def _require_columns(frame: pd.DataFrame, columns, source: str) -> None:
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")


def fingerprint(frame: pd.DataFrame) -> str:
    """16 hex digits of sha256 over image names, split and labels; independent of row order."""
    columns = ["image", "split", *FINDINGS]
    _require_columns(frame, columns, "fingerprint")
    canonical = (frame[columns].astype({name: np.uint8 for name in FINDINGS})
                 .sort_values("image", kind="stable").to_csv(index=False, lineterminator="\n"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temp file beside `path`, then rename, so no reader ever sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass
class PreparedData:
    frame: pd.DataFrame          # META_COLUMNS + split, sorted by image
    fingerprint: str
    split_csv: Path
    synthetic: bool
    skipped_missing: int = 0     # images listed in the CSV but absent on disk, dropped by --skip-missing
    unknown_ages: UnknownAges = UnknownAges()   # impossible ages in the CSV, loaded as NaN

    def notes(self) -> list[str]:
        """One line per thing the user should know about how the data was loaded."""
        notes = [self.unknown_ages.note()]
        if self.skipped_missing:
            notes.append(f"skipped {self.skipped_missing} image(s) listed in the CSV but not on disk (--skip-missing)")
        for split, consequence in (("train", "the model sees no positive example of them"),
                                   ("val", "their validation AUC is undefined and left out of val_auc_mean")):
            absent = [finding for finding, count in zip(FINDINGS, self.labels(split).sum(axis=0)) if count == 0]
            if absent:
                notes.append(f"warning: the {split} split has no positive image of {len(absent)} finding(s), "
                             f"{', '.join(absent)}: {consequence}")
        return [note for note in notes if note]

    def train_age_mean(self) -> float:
        """Mean known age of the training split: what demographic inputs impute for an unknown age."""
        ages = self.subset("train")["age"]
        return float(ages.mean()) if ages.notna().any() else float("nan")

    def subset(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise ConfigError(f"data: split {split!r} is not one of: {', '.join(SPLITS)}")
        rows = self.frame[self.frame["split"] == split]
        return rows.sort_values("image", kind="stable").reset_index(drop=True)

    def labels(self, split: str) -> np.ndarray:
        return self.subset(split)[list(FINDINGS)].to_numpy(np.float32)

    def split_sizes(self) -> dict[str, dict[str, int]]:
        grouped = self.frame.groupby("split")["patient_id"]
        images, patients = grouped.size(), grouped.nunique()
        return {name: {"images": int(images.get(name, 0)), "patients": int(patients.get(name, 0))}
                for name in SPLITS}


def _check_splits_non_empty(frame: pd.DataFrame, spec: DataSpec) -> None:
    sizes = frame["split"].value_counts()
    for name in SPLITS:
        if sizes.get(name, 0) == 0:
            raise DataError(f"{spec.data_dir}: split {name!r} is empty ({len(frame)} images after filters "
                            f"split={spec.split}, view={spec.view}, max_images={spec.max_images}, "
                            f"val_fraction={spec.val_fraction:g}, test_fraction={spec.test_fraction:g}); "
                            f"use more images or larger fractions")


def prepare_dataset(spec: DataSpec, out_dir: str | os.PathLike) -> PreparedData:
    """Load, filter, split, check, then write out_dir/split.csv and split.json (nothing on error)."""
    meta = load_metadata(spec.data_dir, skip_missing=spec.skip_missing)
    synthetic, skipped, unknown_ages = (meta.attrs[key] for key in ("synthetic", "skipped_missing", "unknown_ages"))
    meta = subset_patients(filter_view(meta, spec.view), spec.max_images, spec.split_seed)
    frame = meta.assign(split=SPLITTERS[spec.split](meta, spec, Path(spec.data_dir)))
    check_no_patient_leak(frame)
    _check_splits_non_empty(frame, spec)
    frame = frame.sort_values("image", kind="stable").reset_index(drop=True)
    prepared = PreparedData(frame, fingerprint(frame), Path(out_dir) / SPLIT_CSV, synthetic, skipped, unknown_ages)
    summary = {"fingerprint": prepared.fingerprint, "spec": spec.to_dict(), "sizes": prepared.split_sizes(),
               "synthetic": synthetic, "skipped_missing": skipped, "unknown_ages": dataclasses.asdict(unknown_ages)}
    write_atomically(prepared.split_csv, lambda tmp: frame.to_csv(tmp, index=False))
    write_text_atomically(prepared.split_csv.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return prepared


SAVED_DTYPES = {"image": str, "path": str, "patient_id": np.int64, "follow_up": np.int64, "age": np.float64,
                "sex": str, "view": str, "split": str, **{name: np.uint8 for name in FINDINGS}}


def _read_summary(json_path: Path) -> dict:
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{json_path}: not readable JSON ({err}); re-run data preparation") from None


def load_prepared(split_csv: str | os.PathLike) -> PreparedData:
    """Read a split.csv back; checks it against the fingerprint in the split.json beside it, when present."""
    split_csv = Path(split_csv)
    try:
        frame = pd.read_csv(split_csv, dtype={"image": str, "path": str, "sex": str, "view": str, "split": str})
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{split_csv}: not a readable split CSV ({str(err).splitlines()[0]})") from None
    _require_columns(frame, list(SAVED_DTYPES), str(split_csv))
    bad_split = ~frame["split"].isin(SPLITS)
    bad_labels = ~frame[list(FINDINGS)].isin([0, 1]).all(axis=1)
    for bad, expected in ((bad_split, f"split in {', '.join(SPLITS)}"), (bad_labels, "labels 0 or 1")):
        if bad.any():
            raise DataError(f"{split_csv}: {int(bad.sum())} row(s) without {expected}, first image "
                            f"{frame['image'][bad].iloc[0]}; re-run data preparation")
    frame = frame[[*META_COLUMNS, "split"]].astype(SAVED_DTYPES)
    prepared = PreparedData(frame, fingerprint(frame), split_csv, synthetic=False)
    json_path = split_csv.with_suffix(".json")
    if json_path.is_file():
        summary = _read_summary(json_path)
        if summary.get("fingerprint") != prepared.fingerprint:
            raise DataError(f"{split_csv}: fingerprint {prepared.fingerprint} does not match "
                            f"{summary.get('fingerprint')!r} in {json_path.name}; the split was edited after it was "
                            f"prepared; re-run data preparation")
        prepared.synthetic = bool(summary.get("synthetic", False))
        prepared.skipped_missing = int(summary.get("skipped_missing", 0))
        prepared.unknown_ages = UnknownAges(**summary.get("unknown_ages", {}))
    return prepared
