"""Every node's decode-once image cache built from the driver before Tuner.fit, so that trials only map it.

Without this, the first trial on a node decoded the training and validation splits under the cache's file lock
while the node's other trials (and their GPUs) waited, each inside its trial's time and retries; a bad PNG
then failed every trial in turn. Here the driver starts one Ray task per alive node (node affinity, as
sweeps/cluster.py's storage probe), each building the caches of the splits trials read (train, val) at every
image size the sweep's trials use, with as many decoding threads as the node has CPUs, into the folder trials
on that node use (--cache-dir, else that node's $CXR_CACHE_DIR or ~/.cache/cxr-ablate). One progress bar
counts the images of all nodes; a line per node says what was built or found, and a warning names any node
whose cache folder is on a network file system. A cache already valid (a resumed sweep, an earlier sweep on the
same data) is left as it is; trials still take the cache's lock and would build what is missing (an image size
only a search suggests, a node that joined later), so nothing depends on the warm-up having run.

The node tasks stream their progress back (a Ray streaming generator: no extra actor), and this module
imports neither torch nor Ray Tune at the top, so that a node's task starts in the time a Ray worker takes.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from trainable.data.cache import TRIAL_SPLITS, build_cache, default_cache_dir, read_manifest, split_cache_key
from trainable.data.mounts import network_filesystem
from trainable.errors import DataError, UserError

from .cluster import alive_nodes

if TYPE_CHECKING:
    from trainable.data.nih import PreparedData
    from trainable.tune import TrialContext

PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class CacheJob:
    """One cache every node needs: a split's image paths at one image size."""
    key: str
    image_size: int
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.key.rsplit('-', 1)[-1]} {self.image_size} px"


@dataclass
class NodeCaches:
    """What one node's warm-up task did."""
    address: str
    node_id: str
    cache_dir: str
    built: list[str] = field(default_factory=list)       # CacheJob names built now
    found: list[str] = field(default_factory=list)       # already valid, left as they were
    build_ids: dict[str, str] = field(default_factory=dict)   # job key-size -> manifest build_id
    seconds: float = 0.0
    network_filesystem: str | None = None


def trial_image_sizes(context: "TrialContext", search_space: Any = None) -> list[int]:
    """The image sizes the sweep's trials will use: the base config's, each arm's, and the choices of an
    `image_size` search param (a numeric range cannot be known before the trials; they build their own)."""
    from trainable.tune import ARM_KEY, resolve_config
    arms = list(context.arms) or [None]
    sizes = {resolve_config({ARM_KEY: arm} if arm is not None else {}, context).image_size for arm in arms}
    for param in getattr(search_space, "params", ()):
        if param.name == "image_size" and param.choices:
            sizes.update(int(choice) for choice in param.choices)
    return sorted(sizes)


def cache_jobs(data: "PreparedData", image_sizes: Iterable[int]) -> list[CacheJob]:
    """The caches a trial opens (trainable.train.SplitArrays.load), empty splits left out."""
    jobs = []
    for size in image_sizes:
        for split in TRIAL_SPLITS:
            paths = tuple(data.subset(split)["path"].tolist())
            if paths:
                jobs.append(CacheJob(split_cache_key(data.fingerprint, split), size, paths))
    return jobs


def _build_jobs(jobs: list[CacheJob], folder: Path, workers: int, decoded: Callable[[int], None]) -> dict:
    started = time.perf_counter()
    report: dict = {"cache_dir": str(folder), "built": [], "found": [], "build_ids": {},
                    "network_filesystem": network_filesystem(folder)}
    for job in jobs:
        built = build_cache(job.paths, image_size=job.image_size, cache_dir=folder, key=job.key, workers=workers,
                            progress=False, on_progress=decoded)
        if not built:
            decoded(len(job.paths))
        report["built" if built else "found"].append(job.name)
        manifest = read_manifest(folder, job.key, job.image_size) or {}
        report["build_ids"][f"{job.key}-{job.image_size}"] = manifest.get("build_id", "")
    report["seconds"] = time.perf_counter() - started
    return report


# max_calls=1: the worker exits when its task ends; killed later as an idle worker, it sometimes crashed in
# Ray's metrics thread at exit (a SIGSEGV trace in the sweep's output, 1 run in 5 here; none in 6 with this).
@ray.remote(num_cpus=0, num_returns="streaming", max_calls=1)
def _warm_node(jobs: list[CacheJob], cache_dir: str | None, workers: int) -> Iterator[int | dict]:
    """Runs on one node: builds whatever of `jobs` its cache folder lacks; yields the count of images done every
    PROGRESS_EVERY_S, then its report (a dict)."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    counts: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["report"] = _build_jobs(jobs, folder, workers, counts.put)
        except BaseException as error:  # noqa: BLE001 - re-raised in the task below, so ray.get raises it
            outcome["error"] = error

    worker = threading.Thread(target=work, name="cache-warmup", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(PROGRESS_EVERY_S)
        done = _drain(counts)
        if done:
            yield done
    done = _drain(counts)
    if done:
        yield done
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["report"]


def _drain(counts: queue.SimpleQueue) -> int:
    total = 0
    while not counts.empty():
        total += counts.get()
    return total


def warm_node_caches(data: "PreparedData", image_sizes: Iterable[int], cache_dir: str | None, *,
                     progress: bool = True) -> list[NodeCaches]:
    """Build the trials' caches on every alive node of the connected Ray cluster; print what each node did.

    A bad image (corrupt or truncated PNG) or an unusable cache folder is a UserError naming the node, raised
    before any trial starts. A node lost during its task is reported and skipped: its trials build their own.
    """
    jobs = cache_jobs(data, image_sizes)
    nodes = alive_nodes()
    if not jobs or not nodes:
        return []
    shared_jobs = ray.put(jobs)
    streams = {}
    for node in nodes:
        workers = max(1, int(node["Resources"].get("CPU", 1)))
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        streams[_warm_node.options(scheduling_strategy=strategy).remote(shared_jobs, cache_dir, workers)] = node
    total = len(nodes) * sum(len(job.paths) for job in jobs)
    sizes = ", ".join(f"{size} px" for size in sorted({job.image_size for job in jobs}))
    print(f"image cache: building {' + '.join(dict.fromkeys(job.name.split()[0] for job in jobs))} at {sizes} "
          f"on {len(nodes)} node(s) before the trials start", flush=True)
    results: list[NodeCaches] = []
    with tqdm(total=total, unit="img", desc="image cache", disable=not progress, mininterval=1.0) as bar:
        while streams:
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=PROGRESS_EVERY_S)
            for stream in ready:
                try:
                    item = _next_item(stream, streams[stream])
                except StopIteration:
                    del streams[stream]
                    continue
                if isinstance(item, NodeCaches):
                    results.append(item)
                elif item is None:                    # the node was lost
                    del streams[stream]
                else:
                    bar.update(item)
    for result in results:
        _print_node(result)
    return results


def _next_item(stream: Any, node: dict) -> int | NodeCaches | None:
    """The next thing a node's task yielded: images done, its report, or None when the node was lost."""
    address = node["NodeManagerAddress"]
    try:
        item = ray.get(next(stream))
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, UserError):
            raise type(cause)(f"{cause} (building the image cache on node {address})") from None
        if isinstance(cause, OSError):
            raise DataError(f"image cache on node {address}: {cause} (set --cache-dir or CXR_CACHE_DIR to a "
                            f"writable local folder with room for the cache)") from None
        raise
    except (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.RayActorError) as err:
        print(f"warning: node {address} was lost while building its image cache ({type(err).__name__}); "
              f"its trials build their own", flush=True)
        return None
    return NodeCaches(address=address, node_id=node["NodeID"], **item) if isinstance(item, dict) else item


def _print_node(result: NodeCaches) -> None:
    what = []
    if result.built:
        what.append(f"built {', '.join(result.built)} in {result.seconds:.1f} s")
    if result.found:
        what.append(f"already there: {', '.join(result.found)}")
    print(f"image cache on node {result.address} ({result.node_id[:8]}): {'; '.join(what)} ({result.cache_dir})",
          flush=True)
    if result.network_filesystem:
        print(f"warning: the image cache folder {result.cache_dir} on node {result.address} is on "
              f"{result.network_filesystem}, a network file system: every trial reads its images from it each "
              f"epoch, over the network. Point --cache-dir or CXR_CACHE_DIR at a local disk of each node (a local "
              f"SSD, or /tmp)", flush=True)
