"""Out-of-distribution test sets in the layouts their users have: CheXpert, MIMIC-CXR-JPG and PadChest.

Each is read into one row per frontal image (lateral ones are left out by default) with the columns of an NIH
split (image, path, patient_id, age, sex, view) and the 14 NIH findings as float labels: 1, 0, or NaN where the
data set does not label that finding for the image (a finding it lacks altogether, or an uncertain CheXpert /
MIMIC label under `--uncertain ignore`). Which of its labels stand for which NIH finding is stated once, below,
as data; it follows torchxrayvision's dataset classes (CheX_Dataset, MIMIC_Dataset, PC_Dataset of 1.5.7), whose
label maps are local to their constructors and so are restated here rather than imported.

    chexpert  DIR/train.csv and/or DIR/valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA, observations 1/0/-1/blank),
              images at DIR/<Path without its first folder>, e.g. DIR/valid/patient64541/study1/view1_frontal.jpg
    mimic     DIR/mimic-cxr-2.0.0-metadata.csv[.gz] + DIR/mimic-cxr-2.0.0-chexpert.csv[.gz],
              images at DIR/files/p10/p10000032/s50414267/<dicom_id>.jpg; sex and age from MIMIC-IV's
              patients.csv[.gz] when it is in DIR (otherwise unknown)
    padchest  DIR/PADCHEST_*.csv[.gz] (ImageID, ImageDir, PatientID, PatientBirth, PatientSex_DICOM, Projection,
              StudyDate_DICOM, Labels), 16-bit PNGs at DIR/<ImageDir>/<ImageID> or DIR/<ImageID>
"""
from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from ..findings import FINDINGS
from .nih import read_text_csv

UNCERTAIN_POLICIES: dict[str, float] = {"zeros": 0.0, "ones": 1.0, "ignore": float("nan")}
DEFAULT_UNCERTAIN = "ignore"
VIEWS = ("PA", "AP")

# CheXpert and MIMIC-CXR (the CheXpert labeler) observation -> NIH finding. torchxrayvision renames only
# "Pleural Effusion" to "Effusion"; the other shared ones have NIH's own names.
CHEXPERT_TO_NIH: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
}
# Observations that resemble an NIH finding but are not it, and why they are left out.
CHEXPERT_NOT_MAPPED: dict[str, str] = {
    "Lung Lesion": "any lesion (mass, nodule, cavity, ...): neither Mass nor Nodule",
    "Lung Opacity": "any opacity: broader than Infiltration or Consolidation",
    "Pleural Other": "pleural thickening among other things: not Pleural_Thickening alone",
    "Enlarged Cardiomediastinum": "the mediastinum as well: not Cardiomegaly",
}
NO_FINDING_COLUMN = "No Finding"
# PadChest: NIH finding -> label terms that mark it (a term inside a label, as torchxrayvision's PC_Dataset
# matches: the finding's own name in lower case plus its synonyms, e.g. "consolidation" also marks Infiltration).
PADCHEST_TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("effusion",),
    "Infiltration": ("infiltration", "infiltrates", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern", "alveolar pattern",
                     "consolidation", "air bronchogram"),
    "Mass": ("mass",),
    "Nodule": ("nodule",),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("fibrosis",),
    "Pleural_Thickening": ("pleural thickening",),
    "Hernia": ("hernia",),
}
# Labels that contain a finding's term but are not that finding (a pseudonodule is a nipple shadow).
PADCHEST_NOT_TERMS: dict[str, tuple[str, ...]] = {"Nodule": ("pseudonodule",)}
PADCHEST_FRONTAL = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP"}     # Projection -> view
FRAME_COLUMNS = ("image", "path", "patient_id", "age", "sex", "view", *FINDINGS)


@dataclass
class ExternalData:
    """One external test set as read: its rows, the NIH findings it labels, how its labels map onto them."""
    layout: str
    folder: Path
    frame: pd.DataFrame                 # FRAME_COLUMNS; findings float 1/0/NaN (NaN: not labelled)
    shared: tuple[str, ...]             # NIH findings this data set labels, in FINDINGS order
    mapping: list[str]                  # one line per mapped or deliberately unmapped label
    notes: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """16 hex digits of sha256 over image paths and labels: keys the image cache."""
        canonical = self.frame[["path", *FINDINGS]].to_csv(index=False, lineterminator="\n")
        return hashlib.sha256(f"{self.layout}\n{canonical}".encode()).hexdigest()[:16]

    @property
    def cache_key(self) -> str:
        return f"{self.layout}-{self.fingerprint}"

    def labels(self) -> np.ndarray:
        return self.frame[list(FINDINGS)].to_numpy(np.float64)


# --- shared parsing helpers ---------------------------------------------------------------------------------

def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    frame = read_text_csv(path)
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; expected "
                        f"{', '.join(required)}")
    if frame.empty:
        raise DataError(f"{path}: has a header but no rows")
    return frame.apply(lambda column: column.str.strip())


def _reject(path: Path, column: str, bad: pd.Series, values: pd.Series, rows: pd.Series, expected: str) -> None:
    if bad.any():
        first = int(np.argmax(bad.to_numpy()))
        raise DataError(f"{path}: column {column!r} has {int(bad.sum())} bad row(s), first at {rows.iloc[first]}: "
                        f"{values.iloc[first]!r}; expected {expected}")


def _find_file(folder: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{folder}: no {what}; expected {' or '.join(names)} (optionally .gz) at the top of the folder")


def _observations(path: Path, frame: pd.DataFrame, rows: pd.Series, uncertain: str) -> pd.DataFrame:
    """CheXpert-labeler columns -> NIH findings: 1 positive, 0 negative, blank 0 (not mentioned in the report:
    the CheXpert authors' reading; torchxrayvision leaves it NaN), -1 by the uncertain policy; `No Finding` = 1
    makes every mapped observation 0, as torchxrayvision does."""
    labels = pd.DataFrame(np.nan, index=frame.index, columns=list(FINDINGS))
    healthy = frame[NO_FINDING_COLUMN].map(lambda text: _label_value(text) == 1.0) \
        if NO_FINDING_COLUMN in frame.columns else pd.Series(False, index=frame.index)
    for column, finding in CHEXPERT_TO_NIH.items():
        values = frame[column].map(_label_value)
        _reject(path, column, values.isna(), frame[column], rows, "1, 0, -1 or blank")
        values = values.replace(-1.0, UNCERTAIN_POLICIES[uncertain])
        labels[finding] = values.where(~healthy, 0.0)
    return labels


def _label_value(text: str) -> float:
    """'1', '1.0' -> 1.0; '0' -> 0.0; '-1' -> -1.0; '' -> 0.0 (not mentioned); anything else NaN (invalid)."""
    if text == "":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        return float("nan")
    return value if value in (1.0, 0.0, -1.0) else float("nan")


def _ages(values: pd.Series) -> pd.Series:
    ages = pd.to_numeric(values, errors="coerce")
    return ages.where(ages.between(0, 120, inclusive="right"))     # 0 or blank: unknown (CheXpert writes 0)


def _chexpert_mapping(source: str) -> list[str]:
    return [*(f"{source} `{label}` -> {finding}" for label, finding in CHEXPERT_TO_NIH.items()),
            *(f"{source} `{label}` is not mapped ({why})" for label, why in CHEXPERT_NOT_MAPPED.items())]


def _finish(layout: str, folder: Path, frame: pd.DataFrame, shared: Sequence[str], mapping: list[str],
            notes: list[str], skip_missing: bool, source: Path) -> ExternalData:
    """Check the images are on disk (all, or some with skip_missing) and that frontal rows remain."""
    if frame.empty:
        raise DataError(f"{source}: no frontal image ({'/'.join(VIEWS)}) left to evaluate")
    on_disk = frame["path"].map(os.path.isfile)
    if not on_disk.any():
        raise DataError(f"{source}: none of its {len(frame)} frontal images is on disk, first expected at "
                        f"{frame['path'].iloc[0]}")
    if not on_disk.all():
        missing = ~on_disk
        if not skip_missing:
            raise DataError(f"{source}: {int(missing.sum())} of {len(frame)} frontal images are not on disk, first "
                            f"{frame['path'][missing].iloc[0]} (--skip-missing evaluates the others)")
        notes.append(f"skipped {int(missing.sum())} image(s) listed but not on disk (--skip-missing)")
        frame = frame[on_disk]
    frame = frame.sort_values("image", kind="stable").reset_index(drop=True)
    frame = frame.astype({"image": str, "path": str, "patient_id": str, "age": np.float64, "sex": str, "view": str,
                          **{name: np.float64 for name in FINDINGS}})
    return ExternalData(layout, folder, frame[list(FRAME_COLUMNS)], tuple(f for f in FINDINGS if f in shared),
                        mapping, notes)


def _uncertain_note(uncertain: str, count: int) -> str:
    what = {"zeros": "counted as negative", "ones": "counted as positive",
            "ignore": "left out of that finding's metrics"}[uncertain]
    return f"{count} uncertain (-1) label(s) of the shared findings: {what} (--uncertain {uncertain})"


# --- CheXpert -----------------------------------------------------------------------------------------------

CHEXPERT_CSVS = ("train.csv", "valid.csv")
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_TO_NIH)
CHEXPERT_SEXES = {"Male": "M", "Female": "F", "Unknown": ""}
CHEXPERT_SPLITS = ("train", "valid", "test")


def _chexpert_path(folder: Path, path: str) -> str:
    """'CheXpert-v1.0-small/valid/patient64541/...' -> folder/valid/patient64541/... (the first folder is the
    release's name, whatever the user renamed it to)."""
    parts = Path(path).parts
    relative = parts if parts and parts[0] in CHEXPERT_SPLITS else parts[1:]
    return str(folder.joinpath(*relative))


def load_chexpert(folder: Path, uncertain: str, skip_missing: bool = False) -> ExternalData:
    csvs = [folder / name for name in CHEXPERT_CSVS if (folder / name).is_file()]
    if not csvs:
        raise DataError(f"{folder}: no CheXpert CSV; expected {' and/or '.join(CHEXPERT_CSVS)} at the top of the "
                        f"folder (CheXpert-v1.0 or CheXpert-v1.0-small)")
    tables, lateral, uncertain_count = [], 0, 0
    for csv in csvs:
        raw = _read_csv(csv, CHEXPERT_COLUMNS)
        rows = raw["Path"]
        _reject(csv, "Path", rows.eq(""), rows, rows.index.to_series() + 2, "an image path")
        patient = rows.str.extract(r"(patient\d+)", expand=False)
        _reject(csv, "Path", patient.isna(), rows, rows, "a path holding patientNNNNN")
        kind = raw["Frontal/Lateral"]
        _reject(csv, "Frontal/Lateral", ~kind.isin(["Frontal", "Lateral"]), kind, rows, "Frontal or Lateral")
        sex = raw["Sex"]
        _reject(csv, "Sex", ~sex.isin(list(CHEXPERT_SEXES)), sex, rows, ", ".join(CHEXPERT_SEXES))
        age = pd.to_numeric(raw["Age"].replace("", "0"), errors="coerce")
        _reject(csv, "Age", age.isna() | (age < 0), raw["Age"], rows, "an age in years (0: unknown)")
        frontal = kind.eq("Frontal")
        lateral += int((~frontal).sum())
        uncertain_count += int(sum(raw.loc[frontal, c].map(_label_value).eq(-1.0).sum() for c in CHEXPERT_TO_NIH))
        labels = _observations(csv, raw, rows, uncertain)
        table = pd.DataFrame({"image": rows, "path": rows.map(lambda p: _chexpert_path(folder, p)),
                              "patient_id": patient, "age": _ages(raw["Age"]), "sex": sex.map(CHEXPERT_SEXES),
                              # a frontal image without AP/PA (a few) has its view unknown
                              "view": raw["AP/PA"].where(raw["AP/PA"].isin(VIEWS), "")})
        tables.append(pd.concat([table, labels], axis=1)[frontal])
    notes = [f"{lateral} lateral image(s) left out (frontal only)", _uncertain_note(uncertain, uncertain_count)]
    frame = pd.concat(tables, ignore_index=True)
    duplicated = frame["image"].duplicated()
    if duplicated.any():
        raise DataError(f"{folder}: image {frame['image'][duplicated].iloc[0]} is listed twice "
                        f"(in {' and '.join(c.name for c in csvs)}); expected each image once")
    return _finish("chexpert", folder, frame, CHEXPERT_TO_NIH.values(), _chexpert_mapping("CheXpert"), notes,
                   skip_missing, csvs[0] if len(csvs) == 1 else folder)


# --- MIMIC-CXR-JPG ------------------------------------------------------------------------------------------

MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_PATIENTS = "patients.csv"          # MIMIC-IV hosp/patients: gender, anchor_age, anchor_year
STUDY_KEYS = ["subject_id", "study_id"]


def _mimic_demographics(folder: Path, frame: pd.DataFrame, notes: list[str]) -> tuple[pd.Series, pd.Series]:
    """(age, sex) per row from MIMIC-IV's patients table (age at the study: anchor_age + years since the
    anchor_year, both on MIMIC's shifted calendar); unknown without it."""
    path = next((p for p in (folder / MIMIC_PATIENTS, folder / f"{MIMIC_PATIENTS}.gz") if p.is_file()), None)
    if path is None:
        notes.append(f"no {MIMIC_PATIENTS} (MIMIC-IV) in the folder: sex and age unknown, so no sex or age "
                     f"subgroups; a model with demographic inputs sees them as imputed")
        return pd.Series(np.nan, index=frame.index), pd.Series("", index=frame.index)
    patients = _read_csv(path, ("subject_id", "gender", "anchor_age", "anchor_year")).set_index("subject_id")
    patients = patients[~patients.index.duplicated()]
    known = frame["subject_id"].map(patients["gender"])
    anchor_age = pd.to_numeric(frame["subject_id"].map(patients["anchor_age"]), errors="coerce")
    anchor_year = pd.to_numeric(frame["subject_id"].map(patients["anchor_year"]), errors="coerce")
    study_year = pd.to_numeric(frame["StudyDate"].str[:4], errors="coerce")
    age = _ages(anchor_age + (study_year - anchor_year))
    return age, known.where(known.isin(["M", "F"]), "")


def load_mimic(folder: Path, uncertain: str, skip_missing: bool = False) -> ExternalData:
    meta_path = _find_file(folder, [MIMIC_METADATA], "MIMIC-CXR-JPG metadata")
    labels_path = _find_file(folder, [MIMIC_LABELS], "MIMIC-CXR-JPG CheXpert labels")
    meta = _read_csv(meta_path, ("dicom_id", *STUDY_KEYS, "ViewPosition", "StudyDate"))
    raw = _read_csv(labels_path, (*STUDY_KEYS, *CHEXPERT_TO_NIH))
    for path, table in ((meta_path, meta), (labels_path, raw)):
        for key in STUDY_KEYS:
            _reject(path, key, ~table[key].str.fullmatch(r"\d+"), table[key], table.index.to_series() + 2,
                    "a number")
    frontal = meta["ViewPosition"].isin(VIEWS)
    notes = [f"{int((~frontal).sum())} non-frontal image(s) left out (frontal only: ViewPosition PA or AP)"]
    meta = meta[frontal]
    study_rows = raw.set_index(STUDY_KEYS).index
    if study_rows.duplicated().any():
        first = study_rows[study_rows.duplicated()][0]
        raise DataError(f"{labels_path}: study {first[1]} of subject {first[0]} has more than one row; expected one "
                        f"row per study")
    uncertain_count = int(sum(raw[c].map(_label_value).eq(-1.0).sum() for c in CHEXPERT_TO_NIH))
    labels = pd.concat([raw[STUDY_KEYS], _observations(labels_path, raw, "study " + raw["study_id"], uncertain)],
                       axis=1)
    frame = meta.merge(labels, on=STUDY_KEYS, how="left", validate="many_to_one", indicator=True)
    unlabelled = frame["_merge"].eq("left_only")
    if unlabelled.any():
        notes.append(f"{int(unlabelled.sum())} frontal image(s) of studies without a row in {labels_path.name} "
                     f"left out")
        frame = frame[~unlabelled].reset_index(drop=True)
    notes.append(_uncertain_note(uncertain, uncertain_count))
    age, sex = _mimic_demographics(folder, frame, notes)
    frame = frame.assign(
        image=frame["dicom_id"], patient_id=frame["subject_id"], age=age, sex=sex, view=frame["ViewPosition"],
        path=[str(folder / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
              for s, t, d in zip(frame["subject_id"], frame["study_id"], frame["dicom_id"])])
    return _finish("mimic", folder, frame, CHEXPERT_TO_NIH.values(), _chexpert_mapping("MIMIC-CXR (CheXpert labeler)"),
                   notes, skip_missing, meta_path)


# --- PadChest -----------------------------------------------------------------------------------------------

PADCHEST_CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"    # the release's name
PADCHEST_COLUMNS = ("ImageID", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection", "StudyDate_DICOM",
                    "Labels")


def _padchest_csv(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*") if p.is_file() and p.name.upper().startswith("PADCHEST")
                   and p.name.lower().endswith((".csv", ".csv.gz")))
    if not found:
        raise DataError(f"{folder}: no PadChest CSV; expected {PADCHEST_CSV_NAME} (optionally .gz, or another "
                        f"PADCHEST*.csv) at the top of the folder")
    return found[0]


def _label_list(text: str) -> list[str] | None:
    """"['pleural effusion', 'cardiomegaly']" -> the labels, lower case; None for text that is no list."""
    try:
        labels = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        return None
    return [label.strip().lower() for label in labels]


def padchest_finding(labels: Sequence[str], finding: str) -> bool:
    """Whether PadChest labels mark an NIH finding: a label holds one of its terms and is not one of its
    look-alikes (PADCHEST_TERMS, PADCHEST_NOT_TERMS)."""
    return any(any(term in label for term in PADCHEST_TERMS[finding])
               and label not in PADCHEST_NOT_TERMS.get(finding, ()) for label in labels)


def _padchest_path(folder: Path, image_dir: str, image: str) -> str:
    nested = folder / image_dir / image
    return str(nested if image_dir and nested.is_file() else folder / image)


def load_padchest(folder: Path, uncertain: str, skip_missing: bool = False) -> ExternalData:
    csv = _padchest_csv(folder)
    raw = _read_csv(csv, PADCHEST_COLUMNS)
    rows = raw["ImageID"]
    frontal = raw["Projection"].isin(list(PADCHEST_FRONTAL))
    notes = [f"{int((~frontal).sum())} non-frontal image(s) left out (frontal only: Projection "
             f"{', '.join(PADCHEST_FRONTAL)})"]
    raw, rows = raw[frontal], rows[frontal]
    unlabelled = raw["Labels"].eq("")
    if unlabelled.any():
        notes.append(f"{int(unlabelled.sum())} frontal image(s) without labels left out (as torchxrayvision does)")
        raw, rows = raw[~unlabelled], rows[~unlabelled]
    parsed = raw["Labels"].map(_label_list)
    _reject(csv, "Labels", parsed.isna(), raw["Labels"], rows, "a list of labels such as ['pleural effusion']")
    birth = pd.to_numeric(raw["PatientBirth"], errors="coerce")
    year = pd.to_numeric(raw["StudyDate_DICOM"].str[:4], errors="coerce")
    _reject(csv, "StudyDate_DICOM", year.isna() & raw["StudyDate_DICOM"].ne(""), raw["StudyDate_DICOM"], rows,
            "a date YYYYMMDD")
    image_dir = raw["ImageDir"] if "ImageDir" in raw.columns else pd.Series("", index=raw.index)
    frame = pd.DataFrame({
        "image": rows, "path": [_padchest_path(folder, d, i) for d, i in zip(image_dir, rows)],
        "patient_id": raw["PatientID"], "age": _ages(year - birth),
        "sex": raw["PatientSex_DICOM"].where(raw["PatientSex_DICOM"].isin(["M", "F"]), ""),
        "view": raw["Projection"].map(PADCHEST_FRONTAL),
        **{finding: parsed.map(lambda labels, f=finding: float(padchest_finding(labels, f))) for finding in FINDINGS},
    })
    mapping = [f"PadChest labels containing {' / '.join(f'`{t}`' for t in PADCHEST_TERMS[finding])} -> {finding}"
               + (f" (except {', '.join(PADCHEST_NOT_TERMS[finding])})" if finding in PADCHEST_NOT_TERMS else "")
               for finding in FINDINGS]
    return _finish("padchest", folder, frame, FINDINGS, mapping, notes, skip_missing, csv)


# --- the registry and the command line's NAME=DIR ----------------------------------------------------------

LAYOUTS: dict[str, Callable[..., ExternalData]] = {
    "chexpert": load_chexpert,
    "mimic": load_mimic,
    "padchest": load_padchest,
}


def parse_external(values: Sequence[str]) -> list[tuple[str, Path]]:
    """`--external NAME=DIR` values -> (layout, absolute folder); each layout at most once."""
    chosen: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not folder:
            raise ConfigError(f"--external {value!r}: expected NAME=DIR with NAME one of: {', '.join(LAYOUTS)}")
        if name not in LAYOUTS:
            raise ConfigError(f"--external {value}: unknown data set {name!r}; expected one of: {', '.join(LAYOUTS)}")
        if name in chosen:
            raise ConfigError(f"--external {value}: {name} is given twice; expected each data set once")
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise DataError(f"--external {value}: {path} is not a folder; expected the {name} data set's folder")
        chosen[name] = path
    return list(chosen.items())


def load_external(layout: str, folder: str | os.PathLike, *, uncertain: str = DEFAULT_UNCERTAIN,
                  skip_missing: bool = False) -> ExternalData:
    if layout not in LAYOUTS:
        raise ConfigError(f"external data set {layout!r} is not one of: {', '.join(LAYOUTS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"--uncertain {uncertain!r} is not one of: {', '.join(UNCERTAIN_POLICIES)}")
    return LAYOUTS[layout](Path(folder).expanduser().resolve(), uncertain, skip_missing)


def load_externals(values: Sequence[str], *, uncertain: str = DEFAULT_UNCERTAIN, skip_missing: bool = False
                   ) -> list[ExternalData]:
    """Every `--external NAME=DIR`, read and checked (a DataError naming file, column and value otherwise)."""
    return [load_external(layout, folder, uncertain=uncertain, skip_missing=skip_missing)
            for layout, folder in parse_external(values)]
