"""What the driver's cache warm-up plans (sweeps/cache_warmup.py) and the network-file-system check; the warm-up
itself runs on a real two-node Ray in tests/test_sweeps_cluster.py."""
import pytest

from search_spaces import SearchParam
from sweeps.cache_warmup import cache_jobs, trial_image_sizes
from trainable.data.cache import TRIAL_SPLITS
from trainable.data.mounts import filesystem_type, network_filesystem
from trainable.data.nih import DataSpec, prepare_dataset
from trainable.tune import TrialContext

MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
server:/export/home /home nfs4 rw,relatime,vers=4.2 0 0
/dev/nvme1n1 /home/alice/scratch xfs rw 0 0
tmpfs /tmp tmpfs rw 0 0
//fs/share /mnt/my\\040share cifs rw 0 0
"""


@pytest.mark.parametrize("path, kind, network", [
    ("/home/alice/.cache/cxr-ablate", "nfs4", "nfs4"),      # $HOME on NFS: the default cache folder
    ("/home/alice/scratch/cache", "xfs", None),             # a local disk mounted below it wins
    ("/tmp/cache/not/made/yet", "tmpfs", None),             # a folder not created yet: its deepest parent
    ("/var/lib/cache", "ext4", None),
    ("/mnt/my share/cache", "cifs", "cifs"),                # octal escapes in /proc/mounts
])
def test_filesystem_of_a_folder_is_its_deepest_mount(path, kind, network):
    assert filesystem_type(path, MOUNTS) == kind
    assert network_filesystem(path, MOUNTS) == network


def test_this_machines_temp_folder_has_a_known_filesystem(tmp_path):
    assert filesystem_type(tmp_path) is not None            # read from /proc/self/mounts


@pytest.fixture(scope="module")
def prepared(synthetic_dir, tmp_path_factory):
    return prepare_dataset(DataSpec(data_dir=str(synthetic_dir)), tmp_path_factory.mktemp("split"))


def test_the_warmup_builds_what_the_trials_open(prepared):
    context = TrialContext(data=prepared, base_config={"image_size": 64},
                           arms={"baseline": {}, "fisher": {"image_size": 320}, "focal": {"loss": "focal"}})
    sizes = trial_image_sizes(context)
    assert sizes == [64, 320]
    space = type("Space", (), {"params": [SearchParam("image_size", choices=(128, 224)), SearchParam("lr", low=1e-4,
                                                                                                       high=1e-2)]})
    assert trial_image_sizes(TrialContext(data=prepared, base_config={}), space) == [128, 224]
    jobs = cache_jobs(prepared, sizes)
    assert [(job.key, job.image_size) for job in jobs] == [
        (f"{prepared.fingerprint}-{split}", size) for size in sizes for split in TRIAL_SPLITS]
    for job in jobs:     # the same rows in the same order as the trial's SplitArrays.load
        split = job.key.rsplit("-", 1)[1]
        assert list(job.paths) == prepared.subset(split)["path"].tolist()
