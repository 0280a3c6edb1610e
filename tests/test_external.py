"""External test sets (trainable.data.external) on generated folders in each layout: the labels equal what
torchxrayvision's own dataset classes read from the same files, frontal images only, the uncertain policies,
JPEG and 16-bit PNG decoding through the image cache, and one-line errors for bad input."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torchxrayvision as xrv
from PIL import Image

from trainable.data.cache import decode_image, open_cache
from trainable.data.external import (CHEXPERT_TO_NIH, PADCHEST_CSV_NAME, load_external, padchest_finding,
                                     parse_external)
from trainable.data.external_synthetic import generate_external
from trainable.errors import UserError
from trainable.findings import FINDINGS

SIZE = 32
CHEXPERT_SHARED = list(CHEXPERT_TO_NIH.values())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("external")
    return {layout: generate_external(root / layout, layout, patients=30, image_size=SIZE, seed=4)
            for layout in ("chexpert", "mimic", "padchest")}


def _xrv_labels(dataset, ids: pd.Series, findings: list[str]) -> pd.DataFrame:
    names = [str(name) for name in dataset.pathologies]
    return pd.DataFrame(dataset.labels[:, [names.index(f) for f in findings]], index=ids.to_numpy(), columns=findings)


def test_chexpert_labels_are_torchxrayvisions_with_blank_as_negative(folders):
    folder = folders["chexpert"]
    ours = load_external("chexpert", folder, uncertain="ignore").frame.set_index("image")
    raw = pd.concat([pd.read_csv(folder / name, dtype=str, keep_default_na=False)
                     for name in ("train.csv", "valid.csv")]).set_index("Path")
    frontal = raw.index[raw["Frontal/Lateral"] == "Frontal"]
    assert sorted(ours.index) == sorted(frontal) and (raw["Frontal/Lateral"] == "Lateral").any()
    for name in ("train.csv", "valid.csv"):
        theirs = xrv.datasets.CheX_Dataset(imgpath=str(folder), csvpath=str(folder / name), views=["PA", "AP"],
                                           unique_patients=False)
        expected = _xrv_labels(theirs, theirs.csv["Path"], CHEXPERT_SHARED)
        got = ours.loc[expected.index, CHEXPERT_SHARED]
        finite = np.isfinite(expected.to_numpy())
        np.testing.assert_array_equal(got.to_numpy()[finite], expected.to_numpy()[finite])
        # where torchxrayvision has NaN: uncertain (-1) stays NaN under `ignore`, blank is a negative
        cells = raw.loc[expected.index, list(CHEXPERT_TO_NIH)].to_numpy()[~finite]
        assert set(cells) == {"-1.0", ""}
        np.testing.assert_array_equal(got.to_numpy()[~finite], np.where(cells == "", 0.0, np.nan))
    assert ours[[f for f in FINDINGS if f not in CHEXPERT_SHARED]].isna().all().all()   # Lung Lesion is no Mass
    assert set(ours["sex"]) == {"M", "F"} and set(ours["view"]) <= {"PA", "AP"}


@pytest.mark.parametrize("policy, value", [("zeros", 0.0), ("ones", 1.0), ("ignore", np.nan)])
def test_uncertain_policy(folders, policy, value):
    folder = folders["mimic"]
    ours = load_external("mimic", folder, uncertain=policy).frame
    labels = pd.read_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    meta = pd.read_csv(folder / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    per_image = meta.merge(labels, on=["subject_id", "study_id"]).set_index("dicom_id").loc[ours["image"]]
    for column, finding in CHEXPERT_TO_NIH.items():
        uncertain = (per_image[column] == "-1.0").to_numpy()
        assert uncertain.any()
        np.testing.assert_array_equal(ours[finding].to_numpy()[uncertain], np.full(uncertain.sum(), value))
        assert np.isin(ours[finding].to_numpy()[~uncertain], [0.0, 1.0]).all()


def test_mimic_labels_are_torchxrayvisions_and_frontal_only(folders):
    folder = folders["mimic"]
    ours = load_external("mimic", folder, uncertain="ignore").frame.set_index("image")
    theirs = xrv.datasets.MIMIC_Dataset(imgpath=str(folder / "files"),
                                        csvpath=str(folder / "mimic-cxr-2.0.0-chexpert.csv.gz"),
                                        metacsvpath=str(folder / "mimic-cxr-2.0.0-metadata.csv.gz"),
                                        views=["PA", "AP"], unique_patients=False)
    expected = _xrv_labels(theirs, theirs.csv["dicom_id"], CHEXPERT_SHARED)
    assert sorted(ours.index) == sorted(expected.index)          # the LATERAL images are left out, as there
    got = ours.loc[expected.index, CHEXPERT_SHARED].to_numpy()
    finite = np.isfinite(expected.to_numpy())
    np.testing.assert_array_equal(got[finite], expected.to_numpy()[finite])
    assert all(Path(p).is_file() and Path(p).suffix == ".jpg" for p in ours["path"])
    patients = pd.read_csv(folder / "patients.csv.gz").set_index("subject_id")
    first = ours.iloc[0]
    assert first["sex"] == patients.loc[int(first["patient_id"]), "gender"]


def test_padchest_labels_are_torchxrayvisions_except_look_alikes(folders):
    folder = folders["padchest"]
    ours = load_external("padchest", folder).frame.set_index("image")
    csv = folder / PADCHEST_CSV_NAME
    theirs = xrv.datasets.PC_Dataset(imgpath=str(folder), csvpath=str(csv), views=["PA", "AP", "AP Supine"],
                                     unique_patients=False)
    expected = _xrv_labels(theirs, theirs.csv["ImageID"], list(FINDINGS))
    got = ours.loc[expected.index, list(FINDINGS)]
    pseudo = theirs.csv["Labels"].str.contains("pseudonodule").to_numpy()
    assert pseudo.any()
    differs = got.to_numpy() != expected.to_numpy()
    assert not differs[:, [f != "Nodule" for f in FINDINGS]].any()
    # a pseudonodule (nipple shadow) alone is a Nodule to torchxrayvision's substring match, not to ours
    assert (differs[:, FINDINGS.index("Nodule")] <= pseudo).all() and differs.any()
    assert not padchest_finding(["pseudonodule"], "Nodule") and padchest_finding(["multiple nodules"], "Nodule")
    raw = pd.read_csv(csv)
    assert len(ours) == raw["Projection"].isin(["PA", "AP", "AP_horizontal"]).sum() < len(raw)


def test_jpeg_and_16_bit_pngs_decode_through_the_cache(folders, tmp_path):
    pixels = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8), (SIZE, 1))
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    for bits in (12, 16):
        Image.fromarray((pixels.astype(np.uint32) * (2 ** bits - 1) // 255).astype(np.uint16)).save(
            tmp_path / f"b{bits}.png")
        # 12-bit data is scaled by 4095, not 65535 (which would leave it 16 grey levels)
        assert np.abs(decode_image(tmp_path / f"b{bits}.png", SIZE).astype(int) - pixels).max() <= 1
    assert np.abs(decode_image(tmp_path / "a.jpg", SIZE).astype(int) - pixels).max() <= 3
    for layout in ("mimic", "padchest"):
        data = load_external(layout, folders[layout])
        cached = open_cache(data.frame["path"].tolist(), image_size=SIZE, cache_dir=tmp_path / "cache",
                            key=data.cache_key, progress=False)
        assert cached.shape == (len(data.frame), SIZE, SIZE) and cached.std() > 20     # not a dark 16-level image
        np.testing.assert_array_equal(cached[3], decode_image(data.frame["path"][3], SIZE))


def _edit_csv(path: Path, column: str, row: int, value: str) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)


@pytest.mark.parametrize("layout, edit, message", [
    ("chexpert", lambda d: _edit_csv(d / "train.csv", "Pleural Effusion", 0, "2"),
     "train.csv: column 'Pleural Effusion' has 1 bad row(s), first at CheXpert-v1.0-small/train/patient"),
    ("chexpert", lambda d: _edit_csv(d / "valid.csv", "Sex", 1, "X"), "valid.csv: column 'Sex'"),
    ("padchest", lambda d: _edit_csv(d / PADCHEST_CSV_NAME, "Labels", 0, "pleural effusion"),
     "column 'Labels' has 1 bad row(s)"),
    ("mimic", lambda d: (d / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink(), "no MIMIC-CXR-JPG CheXpert labels"),
    ("chexpert", lambda d: next(d.glob("train/*/*/view1_frontal.jpg")).unlink(), "(--skip-missing evaluates"),
])
def test_bad_input_is_one_line_naming_file_column_value(folders, tmp_path, layout, edit, message):
    import shutil
    folder = shutil.copytree(folders[layout], tmp_path / layout)
    edit(folder)
    with pytest.raises(UserError) as error:
        load_external(layout, folder)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value, message", [
    ("nih=/x", "unknown data set 'nih'; expected one of: chexpert, mimic, padchest"),
    ("chexpert", "expected NAME=DIR"),
    ("chexpert=/no/such/folder", "is not a folder"),
])
def test_train_best_rejects_a_bad_external_before_ray_starts(tmp_path, value, message):
    from sweeps.final.cli import main
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"backbone": "test_resnet", "pretrained": "none"}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--config", str(config), "--data", str(tmp_path), "--external", value,
                     "--out", str(tmp_path / "out"), "--mlflow-uri", f"sqlite:///{tmp_path / 'db'}"])
    assert code == 2 and err.getvalue().startswith("error: ") and message in err.getvalue()
    assert err.getvalue().count("\n") == 1 and not (tmp_path / "out" / "split.csv").exists()
    with pytest.raises(UserError, match="given twice"):
        parse_external([f"mimic={tmp_path}", f"mimic={tmp_path}"])
