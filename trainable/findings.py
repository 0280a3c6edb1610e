"""The 14 NIH ChestX-ray14 findings, in the canonical order used for every metric and array column."""

FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NUM_FINDINGS = len(FINDINGS)
NO_FINDING = "No Finding"
