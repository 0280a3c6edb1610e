"""Demographic inputs: encoding, and an unknown age imputed from the training split with a missing-age flag."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trainable.data.demographics import AGE_MEAN, AGE_SD, DEMOGRAPHICS, FEATURES, demographic_matrix


def frame(ages) -> pd.DataFrame:
    return pd.DataFrame({"age": ages, "sex": ["M", "F", "M", "F"][:len(ages)], "view": ["PA", "AP", "AP", "PA"][:len(ages)]})


def test_known_ages_are_centred_and_flagged_known():
    matrix = demographic_matrix(frame([46.6, 63.2, 30.0]), "age_sex_view")
    assert list(DEMOGRAPHICS["age_sex_view"]) == ["age", "age_missing", "sex", "view"]
    np.testing.assert_allclose(matrix[:, 0], (np.array([46.6, 63.2, 30.0]) - AGE_MEAN) / AGE_SD, rtol=1e-6)
    assert matrix[:, 1].tolist() == [0, 0, 0]
    assert matrix[:, 2].tolist() == [1, -1, 1] and matrix[:, 3].tolist() == [1, -1, -1]


def test_an_unknown_age_is_the_training_mean_with_the_flag_set():
    matrix = demographic_matrix(frame([70.0, np.nan, 20.0, np.nan]), "age_sex", age_fill=55.0)
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(matrix[[1, 3], 0], (55.0 - AGE_MEAN) / AGE_SD, rtol=1e-6)
    assert matrix[:, 1].tolist() == [0, 1, 0, 1]
    # without a usable training mean (no known age at all) the NIH mean stands in, still finite
    assert np.isfinite(demographic_matrix(frame([np.nan, np.nan]), "age_sex", age_fill=float("nan"))).all()


@pytest.mark.parametrize("setting", list(DEMOGRAPHICS))
def test_every_setting_names_only_known_features(setting):
    assert set(DEMOGRAPHICS[setting]) <= set(FEATURES)
    assert demographic_matrix(frame([40.0, 50.0]), setting).shape == (2, len(DEMOGRAPHICS[setting]))


def test_a_trial_on_a_csv_with_impossible_ages_trains_with_demographics(synthetic_dir, tmp_path, capsys):
    """The whole path: impossible ages in the CSV -> unknown -> imputed inputs; one epoch, finite metrics."""
    import json
    import shutil

    from trainable.__main__ import main

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    csv_path = data / "Data_Entry_2017_v2020.csv"
    entries = pd.read_csv(csv_path, dtype=str)
    entries.loc[::7, "Patient Age"] = "414"
    entries.to_csv(csv_path, index=False)
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--split", "patient",
            "--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
            "--set", "epochs=1", "--set", "demographics=age_sex"]
    assert main(args) == 0
    unknown = len(entries.index[::7])
    assert f"{unknown} image(s) with an age outside 0-120 years" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(metrics["val_loss"]) and np.isfinite(metrics["val_auc_mean"])
