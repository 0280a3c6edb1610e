"""Fault injection on real sweeps: what is planned, finished, lost, duplicated, and left RUNNING in MLflow.

    .venv/bin/python benchmarks/chaos.py                  # ~10-15 minutes on 2 cores
    .venv/bin/python benchmarks/chaos.py --keep           # keep the work folder to look at the runs

Every sweep is a tiny ablation as users run it (`python sweeps/run_ablation.py` in a subprocess: test_resnet at
32 px, generated data, a local Ray, the embedded MLflow store that this script reads back):

  kill     baseline,focal x 2 seeds x 4 epochs, --max-failures 2. A trial's worker process is SIGKILLed once it
           has checkpointed epoch 2; later the driver and its whole Ray (the process group) are SIGKILLed, as a
           lost machine would be; then `--resume` runs the sweep to its end.
  disk     the cache folder on a small tmpfs (a private mount namespace, `unshare`; skipped with the reason
           where none can be made): (a) too small for the caches: the sweep must be refused before Ray starts;
           (b) roomy when the driver checks, then this script fills it before the trials build their caches:
           the trials fail with the cache's one-line error, and no `.partial` file is left on the tmpfs.
  corrupt  one PNG cut short after its header, which the driver's signature check passes and only the trial
           decoding it finds: the trials fail with the data error; the attempts each made are printed (whether a
           data error is retried is the trial-failure policy's business, see README "Retries").

Per step: trials planned; finished (FINISHED, every epoch logged once); failed (FAILED with an error tag); lost
(planned but neither: no run, or a run left in another state); duplicated (extra child runs of one trial plus
epochs logged twice); RUNNING (parent and child runs left RUNNING). Target: 0 lost, 0 duplicated, 0 RUNNING.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, print_header, work_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sweeps.trial_processes import trial_workers  # noqa: E402
TINY = ["--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "image_size=32",
        "--set", "batch_size=16", "--cpus-per-trial", "1", "--address", "local"]
KILL_ARMS, KILL_SEEDS, KILL_EPOCHS = ["baseline", "focal"], 2, 4
TIMEOUT_S = 900
TOO_SMALL, ROOMY = 64 * 1024, 4 * 1024 * 1024          # tmpfs sizes of the disk step


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "sweeps" / "run_ablation.py"), *args]


def environment(cache: Path) -> dict:
    keep = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**keep, "CXR_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def wait_for(predicate, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if process.poll() is not None:
            raise RuntimeError(f"the sweep ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


# --- reading the outcome back from MLflow -------------------------------------------------------------------

def tally(out: Path, name: str, planned: list[str], epochs: int) -> dict:
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    by_name: dict[str, list] = {}
    for run in children:
        by_name.setdefault(run.info.run_name, []).append(run)
    finished = failed = duplicated = 0
    attempts = {}
    for trial in planned:
        mine = by_name.get(trial, [])
        duplicated += max(0, len(mine) - 1)
        for run in mine[:1]:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc_mean")]
            duplicated += len(steps) - len(set(steps))
            finished += run.info.status == "FINISHED" and sorted(set(steps)) == list(range(1, epochs + 1))
            failed += run.info.status == "FAILED" and "error" in run.data.tags
            attempts[trial] = int(run.data.tags.get("retries", "0")) + 1
    errors = sorted({r.data.tags["error"] for r in children if "error" in r.data.tags})
    return {"planned": len(planned), "finished": finished, "failed": failed,
            "lost": len(planned) - finished - failed, "duplicated": duplicated,
            "running": sum(r.info.status == "RUNNING" for r in runs), "attempts": attempts, "errors": errors,
            "parents": len(runs) - len(children)}


# --- step 1: kill a worker, then the driver, then resume ---------------------------------------------------

def kill_step(work: Path, data: Path) -> dict:
    out, name = work / "kill", "chaos-kill"
    env = environment(work / "cache-kill")
    args = ["--data", str(data), "--out", str(out), "--name", name, "--arms", ",".join(KILL_ARMS), "--seeds",
            str(KILL_SEEDS), "--epochs", str(KILL_EPOCHS), "--max-failures", "2", *TINY]
    events = []
    with open(work / "kill.log", "w") as log:
        driver = subprocess.Popen(sweep_command(*args), cwd=REPO, env=env, stdout=log, stderr=log,
                                  start_new_session=True)
        try:
            def checkpointed(epochs: int) -> list[Path]:
                return list(out.glob(f"{name}/*/checkpoint_{epochs - 1:06d}"))
            wait_for(lambda: checkpointed(2), driver, "a trial checkpointed epoch 2")
            victim = checkpointed(2)[0].parent.name.rsplit("_", 2)[0]
            workers = trial_workers(driver.pid, victim)
            os.kill(workers[0], signal.SIGKILL)
            events.append(f"SIGKILLed the worker of {victim} (pid {workers[0]}) after its epoch-2 checkpoint")
            wait_for(lambda: len(checkpointed(3)) >= 1 and len(checkpointed(2)) >= 2, driver,
                     "more checkpoints after the worker kill")
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            events.append("SIGKILLed the driver and its Ray (process group) with trials mid-training")
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    before = tally(out, name, planned(KILL_ARMS, KILL_SEEDS), KILL_EPOCHS)
    events.append(f"before --resume: {before['finished']} finished, {before['running']} run(s) RUNNING")
    resumed = subprocess.run(sweep_command("--resume", name, "--out", str(out)), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    (work / "kill-resume.log").write_text(resumed.stdout + resumed.stderr)
    events.append(f"--resume exited {resumed.returncode}" + "".join(f"; {e}" for e in error_lines(resumed.stderr)))
    return {"tally": tally(out, name, planned(KILL_ARMS, KILL_SEEDS), KILL_EPOCHS), "events": events,
            "exit": resumed.returncode}


def planned(arms: list[str], seeds: int) -> list[str]:
    return [f"{arm}-s{seed}" for arm in arms for seed in range(seeds)]


# --- step 2: a full cache disk (inside a mount namespace) --------------------------------------------------

def namespace_prefix(mountpoint: Path, size: int) -> list[str] | None:
    mount = f"mount -t tmpfs -o size={size} tmpfs '{mountpoint}' && exec \"$@\""
    if shutil.which("unshare") is None:
        return None
    for unshare in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if subprocess.run([*unshare, "sh", "-c", mount, "sh", "true"], capture_output=True).returncode == 0:
            return [*unshare, "sh", "-c", mount, "sh"]
    return None


def inside_disk_step(mountpoint: Path, data: Path, out: Path, name: str, fill: bool) -> None:
    """Runs inside the namespace: the sweep with its cache on the tmpfs; with `fill`, the tmpfs is filled as soon
    as the driver has checked the space (it prints the sweep's header line right after)."""
    cache = mountpoint / "cache"
    cache.mkdir()
    args = ["--data", str(data), "--out", str(out), "--name", name, "--arms", "baseline", "--seeds", "2",
            "--epochs", "2", "--max-failures", "1", "--cache-dir", str(cache), *TINY]
    log_path = out.parent / f"{name}.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(sweep_command(*args), cwd=REPO, env=environment(cache), stdout=log, stderr=log)
        filled = 0
        if fill:
            wait_for(lambda: f"ablation '{name}':" in log_path.read_text(), driver, "the sweep's header")
            try:
                with open(mountpoint / "filler", "wb") as filler:
                    while True:
                        filled += filler.write(b"\0" * 4096)
                        filler.flush()
            except OSError:
                pass
        code = driver.wait(timeout=TIMEOUT_S)
    text = log_path.read_text()
    print(json.dumps({"exit": code, "errors": error_lines(text), "filled": filled,
                      "left": sorted(p.name for p in cache.iterdir()), "traceback": "Traceback" in text}))


def disk_step(work: Path, data: Path) -> dict:
    results = {}
    for label, size, fill in (("too small", TOO_SMALL, False), ("filled mid-sweep", ROOMY, True)):
        mountpoint = work / f"tmpfs-{label.replace(' ', '-')}"
        mountpoint.mkdir()
        prefix = namespace_prefix(mountpoint, size)
        if prefix is None:
            return {"skipped": "no mount namespace can be made here (unshare is missing or refused), so no small "
                               "tmpfs can be mounted"}
        name = f"chaos-disk-{'b' if fill else 'a'}"
        done = subprocess.run([*prefix, sys.executable, __file__, "--inside-disk-step", str(mountpoint), str(data),
                               str(work / name), name, "fill" if fill else "check"],
                              cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        report["tally"] = tally(work / name, name, planned(["baseline"], 2), 2) if fill else None
        if not fill:
            report["sweep_recorded"] = (work / name / name / "sweep.json").exists()
        results[label] = report
    return results


# --- step 3: a corrupt image --------------------------------------------------------------------------------

def corrupt_step(work: Path, data: Path) -> dict:
    broken = Path(shutil.copytree(data, work / "data-corrupt"))
    victim = sorted((broken / "images").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:120])            # the PNG signature survives, the pixels do not
    out, name = work / "corrupt", "chaos-corrupt"
    done = subprocess.run(sweep_command("--data", str(broken), "--out", str(out), "--name", name, "--arms",
                                        "baseline", "--seeds", "2", "--epochs", "2", "--max-failures", "2", *TINY),
                          cwd=REPO, env=environment(work / "cache-corrupt"), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    (work / "corrupt.log").write_text(done.stdout + done.stderr)
    return {"tally": tally(out, name, planned(["baseline"], 2), 2), "exit": done.returncode, "image": victim.name}


# --- report ---------------------------------------------------------------------------------------------------

def row(step: str, result: dict) -> str:
    t = result["tally"]
    return (f"{step:<24} {t['planned']:>7} {t['finished']:>8} {t['failed']:>6} {t['lost']:>4} {t['duplicated']:>10} "
            f"{t['running']:>7}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None, help="parent of the work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--patients", type=int, default=100, help="generated patients (default: %(default)s)")
    parser.add_argument("--inside-disk-step", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside_disk_step:
        mountpoint, data, out, name, mode = args.inside_disk_step
        inside_disk_step(Path(mountpoint), Path(data), Path(out), name, mode == "fill")
        return 0

    from trainable.data.synthetic import generate
    print_header("chaos: faults injected into real sweeps", machine_info(), command_line())
    started = time.monotonic()
    with work_folder(args.work_dir, keep=args.keep, prefix="cxr-chaos-") as work:
        data = generate(work / "data", patients=args.patients, image_size=32, seed=3)
        kill = kill_step(work, data)
        disk = disk_step(work, data)
        corrupt = corrupt_step(work, data)

    print(f"\n{'step':<24} {'planned':>7} {'finished':>8} {'failed':>6} {'lost':>4} {'duplicated':>10} "
          f"{'RUNNING':>7}")
    rows = [("kill worker+driver", kill)]
    if "skipped" not in disk:
        rows.append(("disk filled mid-sweep", disk["filled mid-sweep"]))
    rows.append(("corrupt image", corrupt))
    for step, result in rows:
        print(row(step, result))
    totals = {key: sum(result["tally"][key] for _, result in rows) for key in ("lost", "duplicated", "running")}

    print("\nkill:", *(f"  {event}" for event in kill["events"]), sep="\n")
    if "skipped" in disk:
        print(f"disk: skipped: {disk['skipped']}")
    else:
        small, filled = disk["too small"], disk["filled mid-sweep"]
        print(f"disk (a) tmpfs of {TOO_SMALL} bytes: exit {small['exit']}, sweep recorded: {small['sweep_recorded']}, "
              f"traceback: {small['traceback']}\n  {' | '.join(small['errors']) or '(no error line)'}")
        print(f"disk (b) tmpfs of {ROOMY} bytes filled ({filled['filled']} bytes) after the driver's check: exit "
              f"{filled['exit']}, left on the tmpfs: {filled['left']}, attempts per trial "
              f"{filled['tally']['attempts']}\n  trial error: {' | '.join(filled['tally']['errors'])[:400]}")
    print(f"corrupt ({corrupt['image']} cut to 120 bytes): exit {corrupt['exit']}, attempts per trial "
          f"{corrupt['tally']['attempts']}\n  trial error: {' | '.join(corrupt['tally']['errors'])[:400]}")
    met = totals == {"lost": 0, "duplicated": 0, "running": 0}
    print(f"\ntotal: {totals['lost']} lost, {totals['duplicated']} duplicated, {totals['running']} RUNNING "
          f"({'target met' if met else 'TARGET MISSED'}); {time.monotonic() - started:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
