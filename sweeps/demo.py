"""The embedded demo: what `python sweeps/run_ablation.py` (no arguments) runs on a laptop (README: measured time).

Generated NIH-layout data (made once into OUT/demo_data), a tiny timm ResNet at 64 px without pretrained
weights, a local Ray and the local MLflow store. Any option given after --demo still wins over these.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DATA_DIR = "demo_data"
DEMO_PATIENTS = 300
DEMO_IMAGE_SIZE = 128          # generated PNGs; trials decode them once to their own image_size

# The trial settings every demo sweep fixes: small enough for 2 CPU cores.
DEMO_SETTINGS = ["backbone=test_resnet", "pretrained=none", "image_size=64", "batch_size=32"]

# A fifth of the images for validation (~125) so that the demo's Δs are not all noise.
DEMO_DATA_OPTIONS = {"val_fraction": 0.2}
ABLATION_DEMO = {"arms": "baseline,focal,weighted_bce,adamw,color_jitter,oversample_rare", "seeds": 2,
                 "epochs": 5, "set": DEMO_SETTINGS, **DEMO_DATA_OPTIONS}
SEARCH_DEMO = {"num_samples": 12, "epochs": 5, "set": DEMO_SETTINGS, **DEMO_DATA_OPTIONS}


def demo_data(out: Path) -> Path:
    """OUT/demo_data, generated now unless a complete generated data set is already there."""
    from trainable.data.nih import SYNTHETIC_MARKER
    from trainable.data.synthetic import IN_PROGRESS, generate

    folder = out / DEMO_DATA_DIR
    marker = folder / SYNTHETIC_MARKER
    if marker.is_file() and IN_PROGRESS not in marker.read_text():
        return folder
    print(f"generating the demo data set ({DEMO_PATIENTS} patients, {DEMO_IMAGE_SIZE} px) into {folder} ...",
          flush=True)
    return generate(folder, patients=DEMO_PATIENTS, image_size=DEMO_IMAGE_SIZE, seed=0)
