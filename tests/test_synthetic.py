"""The synthetic NIH-layout generator: files, formats, determinism, and labels a simple model can learn."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupShuffleSplit

from trainable.data import synthetic
from trainable.data.nih import SYNTHETIC_MARKER, TEST_LIST, TRAIN_VAL_LIST, load_metadata, read_split_lists
from trainable.errors import ConfigError, DataError
from trainable.findings import FINDINGS

ALL_MODES = tuple(synthetic.PNG_MODES)
V2020_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def as_gray_uint8(image: Image.Image) -> np.ndarray:
    """How a loader should read any of the generated modes back to the original 8-bit gray."""
    pixels = np.asarray(image)
    if image.mode == "I;16":
        return (pixels // 257).astype(np.uint8)
    return pixels[..., 0] if pixels.ndim == 3 else pixels


@pytest.fixture(scope="module")
def all_modes_dir(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("modes"), patients=20, image_size=32, seed=5,
                              png_modes=ALL_MODES)


def test_writes_the_nih_layout_with_marker_and_lists(all_modes_dir):
    files = sorted(path.name for path in all_modes_dir.iterdir())
    assert files == ["Data_Entry_2017_v2020.csv", SYNTHETIC_MARKER, "images", TEST_LIST, TRAIN_VAL_LIST]
    assert "generated" in (all_modes_dir / SYNTHETIC_MARKER).read_text()
    assert (all_modes_dir / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0] == V2020_HEADER
    meta = load_metadata(all_modes_dir)
    train_val, test = read_split_lists(all_modes_dir)
    assert train_val | test == set(meta["image"]) and not train_val & test
    in_test = meta["image"].isin(test)
    assert not set(meta["patient_id"][in_test]) & set(meta["patient_id"][~in_test])   # patient-wise
    assert meta["patient_id"][in_test].nunique() == 4                                   # 20% of 20 patients


def test_every_png_mode_is_readable_and_holds_the_same_gray_image(all_modes_dir):
    meta = load_metadata(all_modes_dir)
    modes = []
    for path in meta["path"]:
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.format == "PNG"
            modes.append(image.mode)
            pixels = np.asarray(image)
            if image.mode in ("RGB", "RGBA"):
                assert (pixels[..., 1] == pixels[..., 0]).all() and (pixels[..., 2] == pixels[..., 0]).all()
            if image.mode == "RGBA":
                assert (pixels[..., 3] == 255).all()
            if image.mode == "I;16":
                assert (pixels % 257 == 0).all() and pixels.max() > 255
            assert as_gray_uint8(image).std() > 10          # a picture, not a blank
    assert modes[:8] == list(ALL_MODES) * 2                 # images cycle through the modes


def test_2017_variant_and_kaggle_layout(tmp_path):
    folder = synthetic.generate(tmp_path, patients=40, image_size=16, seed=2, layout="kaggle", csv_variant="2017")
    lines = (folder / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == V2020_HEADER + "," and all(line.endswith(",") for line in lines)
    ages = [line.split(",")[4] for line in lines[1:]]
    assert all(age[:3].isdigit() and age[3] in "YM" and len(age) == 4 for age in ages)
    assert not (folder / "images").exists() and len(list(folder.glob("images_*/images/*.png"))) == len(lines) - 1
    assert len(list(folder.glob("images_*"))) == synthetic.KAGGLE_FOLDERS


def test_demographics_and_label_prevalence(tmp_path):
    meta = load_metadata(synthetic.generate(tmp_path, patients=300, image_size=16, seed=1))
    per_patient = meta.groupby("patient_id")
    assert per_patient.size().between(1, 5).all() and per_patient.size().max() == 5
    assert (per_patient["follow_up"].max() + 1 == per_patient.size()).all()
    assert per_patient["age"].apply(lambda ages: ages.is_monotonic_increasing).all()
    assert meta["age"].between(1, 90).all() and set(meta["sex"]) == {"M", "F"} and set(meta["view"]) == {"PA", "AP"}
    prevalence = meta[list(FINDINGS)].mean()
    assert prevalence.min() > 0.05 and prevalence["Infiltration"] > prevalence["Hernia"]
    no_finding = (meta[list(FINDINGS)].sum(axis=1) == 0).mean()
    assert no_finding == pytest.approx(synthetic.NO_FINDING_RATE, abs=0.06)
    assert (meta[list(FINDINGS)].sum(axis=1) > 1).any()                 # several findings per image happen


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first, again, other = (synthetic.generate(tmp_path / name, patients=8, image_size=16, seed=seed)
                           for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    csv = "Data_Entry_2017_v2020.csv"
    assert (first / csv).read_bytes() == (again / csv).read_bytes() != (other / csv).read_bytes()
    for path in (first / "images").iterdir():
        assert path.read_bytes() == (again / "images" / path.name).read_bytes()


def test_age_dependent_finding_follows_age_and_is_invisible(tmp_path):
    meta = load_metadata(synthetic.generate(tmp_path, patients=150, image_size=16, seed=3,
                                            age_dependent_finding="Edema"))
    agreement = ((meta["age"] > synthetic.AGE_THRESHOLD) == meta["Edema"].astype(bool)).mean()
    assert 0.9 <= agreement < 1.0
    _, signatures = synthetic._templates(16, FINDINGS.index("Edema"))
    assert not signatures[FINDINGS.index("Edema")].any() and signatures.any(axis=(1, 2)).sum() == 13


def test_labels_are_learnable_from_pixels(tmp_path):
    """A logistic regression on 16x16 pixels separates every finding on held-out patients."""
    meta = load_metadata(synthetic.generate(tmp_path, patients=120, image_size=64, seed=11))
    pixels = np.stack([np.asarray(Image.open(path).resize((16, 16), Image.BILINEAR), np.float32).ravel() / 255
                       for path in meta["path"]])
    labels = meta[list(FINDINGS)].to_numpy()
    train, held_out = next(GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=0)
                           .split(pixels, groups=meta["patient_id"]))
    aucs = {}
    for index, name in enumerate(FINDINGS):
        if 0 < labels[held_out, index].sum() < len(held_out):
            model = LogisticRegression(solver="liblinear").fit(pixels[train], labels[train, index])
            aucs[name] = roc_auc_score(labels[held_out, index], model.predict_proba(pixels[held_out])[:, 1])
    assert len(aucs) >= 12 and np.mean(list(aucs.values())) > 0.75, aucs


def test_every_finding_has_a_distinct_signature():
    assert list(synthetic.SIGNATURES) == list(FINDINGS)
    _, signatures = synthetic._templates(64, None)
    flat = signatures.reshape(len(FINDINGS), -1)
    assert (np.abs(flat).max(axis=1) >= 0.25).all()               # strong
    correlation = np.corrcoef(flat)
    assert (np.abs(correlation[~np.eye(len(FINDINGS), dtype=bool)]) < 0.6).all()   # apart from one another


def test_interrupted_run_leaves_no_csv(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, "_split_lists", fail)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path, patients=4, image_size=16)
    assert not list(tmp_path.glob("Data_Entry*")) and "in progress" in (tmp_path / SYNTHETIC_MARKER).read_text()
    with pytest.raises(DataError, match="no metadata CSV"):
        load_metadata(tmp_path)


def test_regenerating_replaces_an_earlier_synthetic_set(tmp_path):
    synthetic.generate(tmp_path, patients=6, image_size=16, layout="kaggle", csv_variant="2017")
    synthetic.generate(tmp_path, patients=4, image_size=16, layout="nih")
    assert not list(tmp_path.glob("images_*")) and not (tmp_path / "Data_Entry_2017.csv").exists()
    assert load_metadata(tmp_path)["patient_id"].nunique() == 4


def test_refuses_a_folder_with_real_data(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text("real\n")
    with pytest.raises(DataError, match="refusing to overwrite"):
        synthetic.generate(tmp_path, patients=4, image_size=16)
    assert (tmp_path / "Data_Entry_2017.csv").read_text() == "real\n" and not (tmp_path / SYNTHETIC_MARKER).exists()


@pytest.mark.parametrize("arguments, message", [
    ({"patients": 1}, "patients"), ({"image_size": 8}, "image_size"), ({"layout": "flat"}, "nih, kaggle"),
    ({"csv_variant": "2019"}, "v2020, 2017"), ({"age_dependent_finding": "Flu"}, "Atelectasis"),
    ({"png_modes": ("CMYK",)}, "L, I;16, RGB, RGBA"),
])
def test_bad_arguments_are_config_errors(tmp_path, arguments, message):
    with pytest.raises(ConfigError, match=message):
        synthetic.generate(tmp_path, **arguments)
    assert not list(tmp_path.iterdir())


def test_command_line(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "cli"), "--patients", "5", "--image-size", "16", "--seed", "2",
                           "--layout", "kaggle", "--csv-variant", "2017", "--age-dependent-finding", "Hernia",
                           "--png-modes", "L,RGB"]) == 0
    meta = load_metadata(tmp_path / "cli")
    assert meta["patient_id"].nunique() == 5 and "written to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        synthetic.main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--patients", "--image-size", "--seed", "--layout", "--csv-variant", "--age-dependent-finding",
                   "--png-modes"):
        assert option in help_text
    with pytest.raises(SystemExit) as failed:
        synthetic.main([str(tmp_path / "bad"), "--png-modes", "CMYK"])
    assert failed.value.code == 2 and "png_modes" in capsys.readouterr().err

