"""Names of the metrics a trial reports that more than one module reads, importable without torch (the sweep
logger and the report readers need them).

Cost metrics say what an arm costs, not how well it does: the effect analysis never compares them (it reads the
saved validation predictions only); the ablation report shows them beside the effects (dashboards/cost.py).
"""

VAL_AUC_MEAN = "val_auc_mean"                # mean over findings of the validation AUC (trainable/metrics.py)
EPOCH_SECONDS = "epoch_seconds"              # training + validation of one epoch
TRAIN_IMAGES_PER_S = "train_images_per_s"    # training throughput of the epoch (augmentation, forward, backward)

PARAM_COUNT = "param_count"                  # trainable and frozen parameters of the whole model
FLOPS_PER_IMAGE = "flops_per_image"          # one forward at batch 1 at the trial's image size (FlopCounterMode)
TRAIN_FLOPS = "train_flops"                  # estimated training compute so far: 3 x forward FLOPs x images trained
WALL_SECONDS = "trial_wall_seconds"          # the trial's training wall time so far (all its epochs, resumes too)
DEVICE_HOURS = "trial_device_hours"          # WALL_SECONDS x the one device a trial trains on, in hours
PEAK_GPU_MEMORY_MB = "peak_gpu_memory_mb"    # torch.cuda.max_memory_allocated on a GPU (MiB)
PEAK_RSS_MB = "peak_rss_mb"                  # on the CPU instead: the trial process's peak resident set (MiB)

COST_METRICS = (PARAM_COUNT, FLOPS_PER_IMAGE, TRAIN_FLOPS, TRAIN_IMAGES_PER_S, WALL_SECONDS, DEVICE_HOURS,
                PEAK_GPU_MEMORY_MB, PEAK_RSS_MB)
# Metrics that measure the machine, not the model: they differ between two runs of the same trial.
TIMING_METRICS = (TRAIN_IMAGES_PER_S, EPOCH_SECONDS, WALL_SECONDS, DEVICE_HOURS, PEAK_GPU_MEMORY_MB, PEAK_RSS_MB)

# The final run's metrics of an external test set (sweeps/final/track.py writes them, tests read them), named as
# the internal test's test_<metric>_<Finding> / test_<metric>_mean with the set's name after the prefix.
EXTERNAL_PREFIX = "ext"


def external_metric(data_set: str, metric: str, finding: str | None = None) -> str:
    """`ext_<set>_<metric>_<finding>` (a finding, or `mean` over the set's shared findings), or
    `ext_<set>_<metric>` for the set as a whole (e.g. `ext_chexpert_images`)."""
    return "_".join(part for part in (EXTERNAL_PREFIX, data_set, metric, finding) if part)
