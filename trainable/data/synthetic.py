"""A generated data set in the exact NIH ChestX-ray14 layout, for demos and tests where the real images are absent.

Each finding gets its own strong visual signature (its own shape, texture and place on a chest-like background), so
a tiny CNN learns every finding in a couple of epochs; `age_dependent_finding` instead makes one finding depend on age
only, with nothing to see, so demographic inputs can be shown to help.

    python -m trainable.data.synthetic OUT_DIR [--patients 300] [--image-size 128] [--layout nih|kaggle] ...
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ConfigError, DataError, UserError
from ..findings import FINDINGS, NO_FINDING
from .nih import CSV_NAMES, SYNTHETIC_MARKER, TEST_LIST, TRAIN_VAL_LIST, write_atomically, write_text_atomically

# --- who is in the data set ---------------------------------------------------------------------------------

NIH_IMAGES = 112_120
NIH_LABEL_COUNTS = {   # from the reference README (Data_Entry_2017_v2020.csv)
    "Atelectasis": 11_559, "Cardiomegaly": 2_776, "Effusion": 13_317, "Infiltration": 19_894, "Mass": 5_782,
    "Nodule": 6_331, "Pneumonia": 1_431, "Pneumothorax": 5_302, "Consolidation": 4_667, "Edema": 2_303,
    "Emphysema": 2_516, "Fibrosis": 1_686, "Pleural_Thickening": 3_385, "Hernia": 227,
}
# Floored so that a 10% validation split of a few hundred images still holds positives of every finding.
PREVALENCE_FLOOR = 0.08
NO_FINDING_RATE = 0.45
IMAGES_PER_PATIENT = {1: 0.35, 2: 0.25, 3: 0.18, 4: 0.12, 5: 0.10}
AGE_RANGE = (1, 90)
MALE_RATE = 0.56          # NIH: 63,340 M of 112,120
PA_RATE = 0.60            # NIH: 67,310 PA of 112,120
TEST_PATIENT_RATE = 0.2
AGE_THRESHOLD, AGE_LABEL_NOISE = 60, 0.05
FEMALE_LABEL_NOISE = 0.3  # share of female images whose `female_noise_finding` label is flipped in the CSV
KAGGLE_FOLDERS = 12
SIGNATURE_STRENGTH = 1.3  # scales every finding's contrast; lower makes the synthetic task harder


def finding_prevalence() -> np.ndarray:
    nih = np.array([NIH_LABEL_COUNTS[name] for name in FINDINGS]) / NIH_IMAGES
    return np.maximum(nih, PREVALENCE_FLOOR)


def _patients_table(rng: np.random.Generator, patients: int) -> pd.DataFrame:
    """One row per image: patient_id, follow_up, age, sex, view."""
    counts = rng.choice(list(IMAGES_PER_PATIENT), size=patients, p=list(IMAGES_PER_PATIENT.values()))
    patient_id = np.repeat(np.arange(1, patients + 1), counts)
    follow_up = np.concatenate([np.arange(count) for count in counts])
    first_age = np.repeat(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1, patients), counts)
    years_since_last = np.where(follow_up > 0, rng.integers(0, 2, len(follow_up)), 0)   # ages never go down
    age = np.minimum(first_age + pd.Series(years_since_last).groupby(patient_id).cumsum().to_numpy(), AGE_RANGE[1])
    sex = np.repeat(np.where(rng.random(patients) < MALE_RATE, "M", "F"), counts)
    view = np.where(rng.random(len(follow_up)) < PA_RATE, "PA", "AP")
    return pd.DataFrame({"patient_id": patient_id, "follow_up": follow_up, "age": age, "sex": sex, "view": view})


def _labels(rng: np.random.Generator, ages: np.ndarray, age_dependent: int | None) -> np.ndarray:
    """(images, 14) 0/1: healthy images have none; the others at least one, several allowed."""
    within_sick = np.minimum(finding_prevalence() / (1 - NO_FINDING_RATE), 0.9)
    sick = rng.random(len(ages)) >= NO_FINDING_RATE
    labels = (rng.random((len(ages), len(FINDINGS))) < within_sick) & sick[:, None]
    empty = sick & ~labels.any(axis=1)
    labels[empty, rng.choice(len(FINDINGS), size=int(empty.sum()), p=within_sick / within_sick.sum())] = True
    if age_dependent is not None:
        noise = rng.random(len(ages)) < AGE_LABEL_NOISE
        labels[:, age_dependent] = (ages > AGE_THRESHOLD) ^ noise
    return labels.astype(np.uint8)


# --- what the images look like ------------------------------------------------------------------------------
# Shapes on a normalised grid: y (0 top .. 1 bottom), x (0 image left = patient's right .. 1).

def _ellipse(y, x, cy, cx, ry, rx):
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.float32)


def _box(y, x, top, bottom, left, right):
    return ((y >= top) & (y <= bottom) & (x >= left) & (x <= right)).astype(np.float32)


def _blob(y, x, cy, cx, sigma):
    return np.exp(-(((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))).astype(np.float32)


def _lungs(y, x):
    return np.maximum(_ellipse(y, x, 0.45, 0.32, 0.30, 0.15), _ellipse(y, x, 0.45, 0.68, 0.30, 0.15))


def _chest(y, x):
    """Body, dark lungs with curved rib stripes, heart, spine."""
    body = 0.45 * _ellipse(y, x, 0.52, 0.5, 0.50, 0.44)
    lungs = _lungs(y, x)
    ribs = 0.10 * (np.sin(2 * np.pi * (9 * y + 4 * (x - 0.5) ** 2)) > 0.4) * lungs
    heart = 0.22 * _ellipse(y, x, 0.60, 0.54, 0.11, 0.11)
    spine = 0.15 * _box(y, x, 0.0, 1.0, 0.47, 0.53)
    return 0.08 + body - 0.25 * lungs + ribs + heart + spine


def _stripes(y, x, period, dy, dx):
    """Bright lines of the given period across the direction (dy, dx): horizontal, vertical or diagonal."""
    return (np.sin(2 * np.pi * (dy * y + dx * x) / period) > 0).astype(np.float32)


def _ring(y, x, cy, cx, outer, inner):
    return _ellipse(y, x, cy, cx, outer, outer) - _ellipse(y, x, cy, cx, inner, inner)


# Finding -> its signature, added to the chest (negative = darker). Each has its own place AND its own local look
# (size, shape, texture, polarity), so a CNN whose features are pooled over the image still tells them apart;
# strong and large enough that a tiny CNN at 32-64 px learns them in a couple of epochs.
SIGNATURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Atelectasis": lambda y, x: 0.55 * _box(y, x, 0.59, 0.64, 0.18, 0.42),            # long thin plate, right base
    "Cardiomegaly": lambda y, x: 0.35 * _ellipse(y, x, 0.62, 0.54, 0.14, 0.19),       # heart much wider
    "Effusion": lambda y, x: 0.50 * _lungs(y, x) * (y > 0.66),                       # fluid at both bases
    "Infiltration": lambda y, x: 0.55 * _ellipse(y, x, 0.41, 0.66, 0.09, 0.09)        # checkered patch, left mid
    * (_stripes(y, x, 0.14, 1, 0) == _stripes(y, x, 0.14, 0, 1)),
    "Mass": lambda y, x: 0.55 * _ellipse(y, x, 0.27, 0.66, 0.075, 0.075),             # large disk, left upper
    "Nodule": lambda y, x: 0.60 * sum(_ellipse(y, x, cy, cx, 0.035, 0.035)             # small dots, right upper
                                      for cy, cx in ((0.22, 0.26), (0.27, 0.35), (0.32, 0.25))),
    "Pneumonia": lambda y, x: 0.55 * _blob(y, x, 0.50, 0.32, 0.05),                   # soft cloud, right mid
    "Pneumothorax": lambda y, x: -0.35 * _box(y, x, 0.15, 0.45, 0.76, 0.84),          # dark band, left apex
    "Consolidation": lambda y, x: 0.55 * _box(y, x, 0.50, 0.62, 0.62, 0.80)           # diagonally lined block
    * _stripes(y, x, 0.12, 1, -1),
    "Edema": lambda y, x: 0.55 * (_box(y, x, 0.46, 0.58, 0.17, 0.26)                 # Kerley lines, both sides
                                  + _box(y, x, 0.46, 0.58, 0.74, 0.83)) * _stripes(y, x, 0.08, 1, 0),
    "Emphysema": lambda y, x: -0.22 * _lungs(y, x) * (y < 0.33),                      # dark, hyperlucent apices
    "Fibrosis": lambda y, x: 0.55 * _box(y, x, 0.34, 0.46, 0.18, 0.40)                # vertical reticular lines
    * _stripes(y, x, 0.08, 0, 1),
    "Pleural_Thickening": lambda y, x: 0.50 * _box(y, x, 0.22, 0.68, 0.12, 0.17),      # long bright rim, right
    "Hernia": lambda y, x: 0.55 * _ring(y, x, 0.87, 0.50, 0.08, 0.045),               # ring below the heart
}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(centres, centres, indexing="ij")


def _templates(size: int, age_dependent: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Chest background (S, S) and one signature per finding (14, S, S); the age-dependent finding has none."""
    y, x = _grid(size)
    signatures = SIGNATURE_STRENGTH * np.stack([SIGNATURES[name](y, x) for name in FINDINGS]).astype(np.float32)
    if age_dependent is not None:
        signatures[age_dependent] = 0
    return _chest(y, x).astype(np.float32), signatures


def _render(rng: np.random.Generator, chest: np.ndarray, signatures: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One uint8 image: the chest, the image's signatures at varying strength, a small shift, noise."""
    strength = labels * rng.uniform(0.8, 1.2, len(labels))
    canvas = chest * rng.uniform(0.92, 1.08) + np.tensordot(strength, signatures, axes=1)
    max_shift = max(1, chest.shape[0] // 48)
    canvas = np.roll(canvas, tuple(rng.integers(-max_shift, max_shift + 1, 2)), axis=(0, 1))
    canvas += rng.normal(0.0, 0.04, canvas.shape)
    return (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)


def draw_cohort(rng: np.random.Generator, patients: int, age_dependent_finding: str | None = None
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """(one row per image: patient_id, follow_up, age, sex, view; (images, 14) 0/1 labels), as every generated
    layout draws them (trainable.data.external_synthetic writes the same cohorts in other layouts)."""
    age_dependent = None if age_dependent_finding is None else FINDINGS.index(age_dependent_finding)
    table = _patients_table(rng, patients)
    return table, _labels(rng, table["age"].to_numpy(), age_dependent)


def renderer(image_size: int, age_dependent_finding: str | None = None
             ) -> Callable[[np.random.Generator, np.ndarray], np.ndarray]:
    """`render(rng, labels)` -> one uint8 image of the chest with the signatures of its 14 0/1 labels."""
    age_dependent = None if age_dependent_finding is None else FINDINGS.index(age_dependent_finding)
    chest, signatures = _templates(image_size, age_dependent)
    return lambda rng, labels: _render(rng, chest, signatures, labels)


# PIL mode -> how a grayscale uint8 image is stored in it (16-bit: x257 so 255 maps to 65535).
PNG_MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "L": lambda gray: gray,
    "I;16": lambda gray: gray.astype(np.uint16) * 257,
    "RGB": lambda gray: np.dstack([gray] * 3),
    "RGBA": lambda gray: np.dstack([gray] * 3 + [np.full_like(gray, 255)]),
}

# Layout -> image folder of image number `index` of `total`.
LAYOUTS: dict[str, Callable[[int, int], str]] = {
    "nih": lambda index, total: "images",
    "kaggle": lambda index, total: f"images_{1 + index * KAGGLE_FOLDERS // total:03d}/images",
}


# --- the CSV ------------------------------------------------------------------------------------------------

def _age_2017(age: int) -> str:
    # The 2017 release stores '058Y'; infants in months ('012M' = 1 year), so both variants load identical ages.
    return f"{age * 12:03d}M" if age < 2 else f"{age:03d}Y"


@dataclass(frozen=True)
class CsvVariant:
    file_name: str
    age_text: Callable[[int], str]
    trailing_comma: bool          # the 2017 file ends every line with a comma


CSV_VARIANTS: dict[str, CsvVariant] = {
    "v2020": CsvVariant("Data_Entry_2017_v2020.csv", str, trailing_comma=False),
    "2017": CsvVariant("Data_Entry_2017.csv", _age_2017, trailing_comma=True),
}


def _finding_text(labels: np.ndarray) -> list[str]:
    """NIH style: positives joined by '|' in alphabetical order, or 'No Finding'."""
    alphabetical = sorted(range(len(FINDINGS)), key=lambda index: FINDINGS[index])
    return ["|".join(FINDINGS[i] for i in alphabetical if row[i]) or NO_FINDING for row in labels]


def _entries_csv(table: pd.DataFrame, labels: np.ndarray, size: int, variant: CsvVariant) -> pd.DataFrame:
    entries = pd.DataFrame({
        "Image Index": table["image"], "Finding Labels": _finding_text(labels),
        "Follow-up #": table["follow_up"], "Patient ID": table["patient_id"],
        "Patient Age": table["age"].map(variant.age_text), "Patient Gender": table["sex"],
        "View Position": table["view"],
        # NIH's header really splits these two pairs into four oddly named columns.
        "OriginalImage[Width": size, "Height]": size,
        "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143,
    })
    return entries.assign(**{"": ""}) if variant.trailing_comma else entries


MARKER_TEXT = """# Synthetic data set

Everything in this folder was generated by `python -m trainable.data.synthetic`; it is NOT NIH ChestX-ray14 data
and no result on it says anything about chest X-rays. It has the NIH layout (Data_Entry CSV, PNGs, official
split lists) so the whole pipeline can run end to end. Each finding is drawn as its own shape at its own place.

{details}
"""
IN_PROGRESS = "Generation in progress (or interrupted): the data set is incomplete until the CSV is written."


# --- writing ------------------------------------------------------------------------------------------------

def _claim_folder(out_dir: Path) -> None:
    """Refuse a folder that looks like real NIH data; clear an earlier synthetic data set; mark the folder ours."""
    marker = out_dir / SYNTHETIC_MARKER
    csvs = [out_dir / f"{name}{suffix}" for name in CSV_NAMES for suffix in ("", ".gz")]
    if not marker.is_file() and any(path.is_file() for path in csvs):
        raise DataError(f"{out_dir}: holds a Data_Entry CSV but no {SYNTHETIC_MARKER}; refusing to overwrite what "
                        f"looks like a real NIH data set; choose an empty folder")
    if marker.is_file():
        for path in (*csvs, out_dir / TRAIN_VAL_LIST, out_dir / TEST_LIST):
            path.unlink(missing_ok=True)      # the CSV first: the folder must never look complete while mixed
        for folder in (out_dir / "images", *out_dir.glob("images_*")):
            shutil.rmtree(folder, ignore_errors=True)
    write_text_atomically(marker, MARKER_TEXT.format(details=IN_PROGRESS))


def _split_lists(rng: np.random.Generator, table: pd.DataFrame) -> dict[str, str]:
    """Patient-wise official-style lists: about 20% of patients in the test list."""
    patients = table["patient_id"].unique()
    test_count = min(max(1, round(TEST_PATIENT_RATE * len(patients))), len(patients) - 1)
    in_test = table["patient_id"].isin(rng.permutation(patients)[:test_count])
    as_text = lambda names: "".join(f"{name}\n" for name in sorted(names))  # noqa: E731
    return {TRAIN_VAL_LIST: as_text(table["image"][~in_test]), TEST_LIST: as_text(table["image"][in_test])}


def _check_arguments(patients, image_size, layout, csv_variant, age_dependent_finding, png_modes,
                     female_noise_finding=None) -> None:
    checks = [
        (isinstance(patients, int) and patients >= 2, f"patients={patients!r} must be an integer >= 2"),
        (isinstance(image_size, int) and image_size >= 16, f"image_size={image_size!r} must be an integer >= 16"),
        (layout in LAYOUTS, f"layout={layout!r} is not one of: {', '.join(LAYOUTS)}"),
        (csv_variant in CSV_VARIANTS, f"csv_variant={csv_variant!r} is not one of: {', '.join(CSV_VARIANTS)}"),
        (age_dependent_finding is None or age_dependent_finding in FINDINGS,
         f"age_dependent_finding={age_dependent_finding!r} is not one of: {', '.join(FINDINGS)}"),
        (female_noise_finding is None or female_noise_finding in FINDINGS,
         f"female_noise_finding={female_noise_finding!r} is not one of: {', '.join(FINDINGS)}"),
        (len(png_modes) > 0 and all(mode in PNG_MODES for mode in png_modes),
         f"png_modes={tuple(png_modes)!r} must be a non-empty selection of: {', '.join(PNG_MODES)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"synthetic: {message}")


def generate(out_dir: str | Path, *, patients: int = 300, image_size: int = 128, seed: int = 0,
             layout: str = "nih", csv_variant: str = "v2020", age_dependent_finding: str | None = None,
             png_modes: Sequence[str] = ("L",), female_noise_finding: str | None = None) -> Path:
    """Write a synthetic NIH-layout data set into out_dir (deterministic for a seed); returns out_dir.

    `female_noise_finding`: that finding's label is flipped in the CSV for FEMALE_LABEL_NOISE of the female
    images (the pixels keep the true finding), so the labels of women are harder to predict: a planted subgroup
    gap (dashboards/subgroups.py)."""
    png_modes = (png_modes,) if isinstance(png_modes, str) else tuple(png_modes)
    _check_arguments(patients, image_size, layout, csv_variant, age_dependent_finding, png_modes,
                     female_noise_finding)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_folder(out_dir)
    rng = np.random.default_rng(seed)
    table, labels = draw_cohort(rng, patients, age_dependent_finding)
    table["image"] = [f"{pid:08d}_{follow:03d}.png" for pid, follow in zip(table["patient_id"], table["follow_up"])]
    render = renderer(image_size, age_dependent_finding)
    for index, (name, row) in enumerate(zip(table["image"], labels)):
        folder = out_dir / LAYOUTS[layout](index, len(table))
        folder.mkdir(parents=True, exist_ok=True)
        stored = PNG_MODES[png_modes[index % len(png_modes)]](render(rng, row))
        Image.fromarray(stored).save(folder / name, compress_level=1)
    for list_name, text in _split_lists(rng, table).items():
        write_text_atomically(out_dir / list_name, text)
    # The CSV and then the marker last: an interrupted run never leaves a folder that looks complete.
    variant = CSV_VARIANTS[csv_variant]
    if female_noise_finding is not None:
        flip = (table["sex"].to_numpy() == "F") & (rng.random(len(table)) < FEMALE_LABEL_NOISE)
        labels[flip, FINDINGS.index(female_noise_finding)] ^= 1
    entries = _entries_csv(table, labels, image_size, variant)
    write_atomically(out_dir / variant.file_name, lambda tmp: entries.to_csv(tmp, index=False))
    details = (f"patients={patients} images={len(table)} image_size={image_size} seed={seed} layout={layout} "
               f"csv_variant={csv_variant} age_dependent_finding={age_dependent_finding} "
               f"png_modes={','.join(png_modes)} female_noise_finding={female_noise_finding}")
    write_text_atomically(out_dir / SYNTHETIC_MARKER, MARKER_TEXT.format(details=f"Generated with: {details}"))
    return out_dir


# --- command line -------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainable.data.synthetic",
        description="Write a synthetic chest X-ray data set in the exact NIH ChestX-ray14 layout "
                    f"(PNGs, Data_Entry CSV, official split lists, and a {SYNTHETIC_MARKER} marker).")
    parser.add_argument("out_dir", help="folder to write into (created; an earlier synthetic data set there is "
                                        "replaced; a folder holding real NIH data is refused)")
    parser.add_argument("--patients", type=int, default=300, help="number of patients, 1-5 images each "
                                                                  "(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels, >= 16 "
                                                                    "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data "
                                                            "(default: %(default)s)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="nih",
                        help="nih: images/*.png; kaggle: images_001/images/*.png ... (default: %(default)s)")
    parser.add_argument("--csv-variant", choices=list(CSV_VARIANTS), default="v2020",
                        help="v2020: Data_Entry_2017_v2020.csv with integer ages; 2017: Data_Entry_2017.csv with "
                             "058Y ages and a trailing comma on every line (default: %(default)s)")
    parser.add_argument("--age-dependent-finding", choices=list(FINDINGS), default=None, metavar="FINDING",
                        help=f"make this finding positive iff age > {AGE_THRESHOLD} (with "
                             f"{AGE_LABEL_NOISE * 100:g}%% label noise) and invisible in the image, to test "
                             f"demographic inputs; one of {', '.join(FINDINGS)} (default: none)")
    parser.add_argument("--female-noise-finding", choices=list(FINDINGS), default=None, metavar="FINDING",
                        help=f"flip this finding's label for {FEMALE_LABEL_NOISE * 100:g}%% of female images (the "
                             f"pixels keep the truth): a planted subgroup gap (default: none)")
    parser.add_argument("--png-modes", default="L", type=lambda text: tuple(text.split(",")),
                        help=f"comma-separated PIL modes the images cycle through, of {', '.join(PNG_MODES)} "
                             "(default: L)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        out_dir = generate(args.out_dir, patients=args.patients, image_size=args.image_size, seed=args.seed,
                           layout=args.layout, csv_variant=args.csv_variant,
                           age_dependent_finding=args.age_dependent_finding, png_modes=args.png_modes,
                           female_noise_finding=args.female_noise_finding)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"synthetic NIH-layout data set written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
