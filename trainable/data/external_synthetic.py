"""Generated external test sets in the CheXpert, MIMIC-CXR-JPG and PadChest layouts (trainable.data.external).

The cohort and the images are drawn as trainable.data.synthetic draws them (each NIH finding its own signature in
the pixels), so a model trained on a generated NIH data set scores above chance here; the labels are then written
in the layout's own vocabulary (CheXpert observations with uncertain -1 and blank cells, PadChest label lists),
images as the layout stores them (JPEGs; 16-bit PNGs, half of them 12-bit data as PadChest's scanners write),
and a lateral image beside some frontal ones (left out when read).

    python -m trainable.data.external_synthetic OUT_DIR --layout chexpert|mimic|padchest [--patients 60] ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ConfigError, UserError
from ..findings import FINDINGS
from .external import (CHEXPERT_TO_NIH, MIMIC_LABELS, MIMIC_METADATA, MIMIC_PATIENTS, NO_FINDING_COLUMN,
                       PADCHEST_CSV_NAME, PADCHEST_TERMS)
from .nih import write_atomically, write_text_atomically
from .synthetic import draw_cohort, renderer

MARKER = "SYNTHETIC.md"
LATERAL_RATE = 0.2          # frontal images that get a lateral one of the same study
UNCERTAIN_RATE = 0.1        # shared-finding cells written as -1 (uncertain), whatever the truth
BLANK_RATE = 0.3            # negative cells left blank (not mentioned), as the CheXpert labeler does
JPEG_QUALITY = 95
PSEUDONODULE_RATE = 0.1
# CheXpert columns the generator fills beyond the mapped ones: how each follows from the NIH findings.
CHEXPERT_EXTRA: dict[str, Callable[[dict[str, bool]], bool]] = {
    "Lung Lesion": lambda has: has["Mass"] or has["Nodule"],
    "Lung Opacity": lambda has: has["Infiltration"],
}
CHEXPERT_OTHER = ("Enlarged Cardiomediastinum", "Pleural Other", "Fracture", "Support Devices")
# The label each NIH finding is written as in a PadChest list (the first of its terms).
PADCHEST_LABEL = {finding: terms[0] for finding, terms in PADCHEST_TERMS.items()}
PADCHEST_LABEL.update(Effusion="pleural effusion", Edema="pulmonary edema", Hernia="hiatal hernia",
                      Fibrosis="pulmonary fibrosis", Infiltration="infiltrates")


def _observation(rng: np.random.Generator, positive: bool) -> str:
    """A CheXpert-labeler cell: -1.0 (uncertain) at UNCERTAIN_RATE, else 1.0, or 0.0 / blank for a negative."""
    if rng.random() < UNCERTAIN_RATE:
        return "-1.0"
    if positive:
        return "1.0"
    return "" if rng.random() < BLANK_RATE else "0.0"


def _chexpert_cells(rng: np.random.Generator, row: np.ndarray) -> dict[str, str]:
    has = dict(zip(FINDINGS, map(bool, row)))
    cells = {column: _observation(rng, has[finding]) for column, finding in CHEXPERT_TO_NIH.items()}
    # the labeler writes No Finding only where nothing is mentioned, not even as uncertain
    cells[NO_FINDING_COLUMN] = "" if row.any() or "-1.0" in cells.values() else "1.0"
    cells.update({column: "1.0" if rule(has) else "" for column, rule in CHEXPERT_EXTRA.items()})
    cells.update({column: "" for column in CHEXPERT_OTHER})
    return cells


def _images(rng: np.random.Generator, table: pd.DataFrame) -> list[bool]:
    """Per image of the cohort: whether a lateral image of the same study is written too."""
    return list(rng.random(len(table)) < LATERAL_RATE)


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


def _write_chexpert(out: Path, rng: np.random.Generator, table: pd.DataFrame, labels: np.ndarray,
                    render: Callable) -> None:
    patients = table["patient_id"].unique()
    valid = set(rng.permutation(patients)[:max(1, len(patients) // 5)])
    rows = {"train": [], "valid": []}
    for (_, image), row, lateral in zip(table.iterrows(), labels, _images(rng, table)):
        split = "valid" if image["patient_id"] in valid else "train"
        study = f"{split}/patient{image['patient_id']:05d}/study{image['follow_up'] + 1}"
        cells = _chexpert_cells(rng, row)
        views = [("view1_frontal.jpg", "Frontal", image["view"])] + ([("view2_lateral.jpg", "Lateral", "")]
                                                                    if lateral else [])
        for name, kind, view in views:
            _save_jpeg(out / study / name, render(rng, row))
            rows[split].append({"Path": f"CheXpert-v1.0-small/{study}/{name}",
                                "Sex": {"M": "Male", "F": "Female"}[image["sex"]], "Age": int(image["age"]),
                                "Frontal/Lateral": kind, "AP/PA": view, **cells})
    for split, written in rows.items():
        frame = pd.DataFrame(written)
        write_atomically(out / f"{split}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{rng.integers(0, 2 ** 32):08x}" for _ in range(5))


def _write_mimic(out: Path, rng: np.random.Generator, table: pd.DataFrame, labels: np.ndarray,
                 render: Callable) -> None:
    anchor_year = 2150
    meta, studies, patients = [], [], {}
    for (_, image), row, lateral in zip(table.iterrows(), labels, _images(rng, table)):
        subject = 10_000_000 + int(image["patient_id"])
        study = 50_000_000 + 10 * int(image["patient_id"]) + int(image["follow_up"])
        if image["follow_up"] == 0:
            patients[subject] = {"subject_id": subject, "gender": image["sex"], "anchor_age": int(image["age"]),
                                 "anchor_year": anchor_year, "anchor_year_group": "2011 - 2013", "dod": ""}
        year = anchor_year + int(image["age"]) - patients[subject]["anchor_age"]
        cells = _chexpert_cells(rng, row)
        studies.append({"subject_id": subject, "study_id": study, **cells})
        for view in [image["view"]] + (["LATERAL"] if lateral else []):
            dicom = _dicom_id(rng)
            folder = out / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
            _save_jpeg(folder / f"{dicom}.jpg", render(rng, row))
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                         "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                         "Rows": 64, "Columns": 64, "StudyDate": f"{year}0101", "StudyTime": "120000.000"})
    for name, rows in ((MIMIC_METADATA, meta), (MIMIC_LABELS, studies), (MIMIC_PATIENTS, list(patients.values()))):
        frame = pd.DataFrame(rows)
        write_atomically(out / f"{name}.gz", lambda tmp, frame=frame: frame.to_csv(tmp, index=False,
                                                                                   compression="gzip"))


def _sixteen_bit(pixels: np.ndarray, bits: int) -> np.ndarray:
    return (pixels.astype(np.uint32) * (2 ** bits - 1) // 255).astype(np.uint16)


def _write_padchest(out: Path, rng: np.random.Generator, table: pd.DataFrame, labels: np.ndarray,
                    render: Callable) -> None:
    rows = []
    for index, ((_, image), row, lateral) in enumerate(zip(table.iterrows(), labels, _images(rng, table))):
        year = 2010 + int(image["follow_up"])
        found = [PADCHEST_LABEL[f] for f, present in zip(FINDINGS, row) if present]
        # a look-alike now and then: a nipple shadow is read as no nodule (PADCHEST_NOT_TERMS)
        text = repr((found or ["normal"]) + (["pseudonodule"] if rng.random() < PSEUDONODULE_RATE else []))
        projections = [("AP_horizontal" if rng.random() < 0.5 else "AP") if image["view"] == "AP" else "PA"]
        for projection in projections + (["L"] if lateral else []):
            name = f"2168401113669640{rng.integers(10 ** 12, 10 ** 13)}_{image['patient_id']:05d}-" \
                   f"{image['follow_up']:03d}-{projection[0]}.png"
            image_dir = str(int(image["patient_id"]) % 3)
            (out / image_dir).mkdir(parents=True, exist_ok=True)
            bits = 12 if index % 2 == 0 else 16
            Image.fromarray(_sixteen_bit(render(rng, row), bits)).save(out / image_dir / name, compress_level=1)
            rows.append({"ImageID": name, "ImageDir": image_dir, "StudyDate_DICOM": f"{year}0615",
                         "StudyID": f"st{image['patient_id']}-{image['follow_up']}",
                         "PatientID": f"pt{image['patient_id']:05d}", "PatientBirth": year - int(image["age"]),
                         "PatientSex_DICOM": image["sex"], "ViewPosition_DICOM": projection,
                         "Projection": projection, "MethodProjection": "Manual review of DICOM fields",
                         "Labels": text})
    frame = pd.DataFrame(rows)
    write_atomically(out / PADCHEST_CSV_NAME, lambda tmp: frame.to_csv(tmp, index=False))


WRITERS: dict[str, Callable[[Path, np.random.Generator, pd.DataFrame, np.ndarray, Callable], None]] = {
    "chexpert": _write_chexpert,
    "mimic": _write_mimic,
    "padchest": _write_padchest,
}


def generate_external(out_dir: str | Path, layout: str, *, patients: int = 60, image_size: int = 64,
                      seed: int = 0) -> Path:
    """Write a generated data set in `layout` into out_dir (deterministic for a seed); returns out_dir."""
    if layout not in WRITERS:
        raise ConfigError(f"external synthetic: layout={layout!r} is not one of: {', '.join(WRITERS)}")
    if not isinstance(patients, int) or patients < 2 or not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"external synthetic: patients={patients!r} must be an integer >= 2 and "
                          f"image_size={image_size!r} one >= 16")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"external synthetic: {out} is not empty and holds no {MARKER}; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table, labels = draw_cohort(rng, patients)
    WRITERS[layout](out, rng, table, labels, renderer(image_size))
    write_text_atomically(out / MARKER, f"# Synthetic data set\n\nGenerated by `python -m "
                                        f"trainable.data.external_synthetic` in the {layout} layout (patients="
                                        f"{patients} image_size={image_size} seed={seed}); NOT real X-rays.\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainable.data.external_synthetic",
                                     description="Write a generated external test set in a real data set's layout.")
    parser.add_argument("out_dir")
    parser.add_argument("--layout", choices=list(WRITERS), required=True)
    parser.add_argument("--patients", type=int, default=60, help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = generate_external(args.out_dir, args.layout, patients=args.patients, image_size=args.image_size,
                                seed=args.seed)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"synthetic {args.layout}-layout data set written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
