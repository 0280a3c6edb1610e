"""Check, in a real headless browser, that the MLflow UI shows a sweep: its parent run, its child runs, and
per-finding metric charts. Saves screenshots of what it checked.

    python dashboards/check_mlflow_ui.py --backend-store-uri sqlite:///runs/mlflow.db --experiment abl \\
        --screenshot reports/mlflow-ui.png

Starts the UI as the README does (`mlflow ui --backend-store-uri URI --host 127.0.0.1 --port PORT`, on a free
port), waits until it answers, then loads three pages in Debian's chromium (`apt-get install chromium`), each
with a fresh profile, and checks the rendered DOM:
  1. the experiment's runs sorted by name (MLflow folds child runs under their parent only when sorted by start
     time; sorted otherwise it lists every run): the parent and its child runs are there -> SCREENSHOT
  2. the first child run's page: it names the parent run                          -> SCREENSHOT-child-run.png
  3. that run's model-metrics page: a chart per finding for val_auc_<Finding> and val_f1_<Finding>
                                                                                   -> SCREENSHOT-metrics.png
Prints one line per check; exit status 0 when all pass, 1 when one fails, 2 on bad input.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

if __name__ == "__main__":
    # Run as `python dashboards/check_mlflow_ui.py`, installed or not: import the project from the repo root.
    HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

from trainable.errors import UserError  # noqa: E402
from trainable.findings import FINDINGS  # noqa: E402

from dashboards.commands import mlflow_ui_words  # noqa: E402

BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # MLflow draws a chart only once it is on screen: produce real frames before the DOM is dumped
                 "--run-all-compositor-stages-before-draw")
BROWSERS = ("chromium", "chromium-browser")
WIDTH, HEIGHT = 1600, 1000
ROW_PX, CHART_ROW_PX, CHARTS_PER_ROW = 40, 400, 3
MAX_LISTED_CHILDREN = 50           # the runs table shows its first page only; check at most this many names
# Virtual-time budgets (ms) the page gets to render; a busy machine may need the second.
BUDGETS_MS = (15_000, 45_000)
UI_START_TIMEOUT_S = 120
PROBE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


# --- the UI server ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ui_command(backend_store_uri: str, port: int) -> list[str]:
    """The README's `mlflow ui` command, with this interpreter's mlflow."""
    return mlflow_ui_words(backend_store_uri, port)


class MlflowUi:
    """`mlflow ui` in its own process group (it starts workers), stopped with everything it started."""

    def __init__(self, backend_store_uri: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = ui_command(backend_store_uri, self.port)
        self.log = log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "MlflowUi":
        with open(self.log, "wb") as log:
            # without MLflow's GenAI job runners (processes of their own), which no page checked here uses
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-1500:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"`{' '.join(self.command)}` did not answer on {self.url}:\n{tail}")
            time.sleep(PROBE_INTERVAL_S)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)     # the group this process leads: the UI and its workers
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)


# --- the browser ------------------------------------------------------------------------------------------------

class _TextOf(HTMLParser):
    """The visible text of a DOM dump (script and style contents left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in ("script", "style"):
            self._skipping += 1

    def handle_endtag(self, tag) -> None:
        if tag in ("script", "style") and self._skipping:
            self._skipping -= 1

    def handle_data(self, data) -> None:
        if not self._skipping and data.strip():
            self.parts.append(data.strip())


def page_text(html: str) -> str:
    parser = _TextOf()
    parser.feed(html)
    return "\n".join(parser.parts)


def find_browser(given: str | None) -> str:
    for name in ([given] if given else BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    raise UserError(f"no chromium browser found ({given or ' or '.join(BROWSERS)}); on Debian: "
                    f"apt-get install -y chromium")


def load_page(browser: str, url: str, screenshot: Path, *, height: int, budget_ms: int) -> str:
    """Render `url` in a fresh headless profile; save a screenshot and return the rendered DOM."""
    with tempfile.TemporaryDirectory(prefix="check-mlflow-ui-") as profile:
        done = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}",
                               f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=budget_ms / 1000 + 120)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(browser).name} exited with {done.returncode} on {url}: {done.stderr[-800:]}")
    return done.stdout


def check_page(browser: str, url: str, screenshot: Path, height: int, expected: list[str], name: str,
               *, min_charts: int = 0) -> Check:
    """Load the page until every expected text (and chart count) is there, with growing render budgets."""
    for budget in BUDGETS_MS:
        html = load_page(browser, url, screenshot, height=height, budget_ms=budget)
        text = page_text(html)
        missing = [item for item in expected if item not in text]
        charts = html.count("js-plotly-plot")
        if not missing and charts >= min_charts:
            shown = f", {charts} charts" if min_charts else ""
            return Check(name, True, f"{len(expected)} expected texts found{shown} (screenshot {screenshot})")
    detail = f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}" if missing else \
        f"{charts} charts rendered, expected {min_charts}"
    return Check(name, False, f"{detail} on {url} (screenshot {screenshot})".replace("\n", " "))


# --- the checks -------------------------------------------------------------------------------------------------

def per_finding_metrics(client, run_id: str) -> tuple[list[str], list[str]]:
    """(val_auc_/val_f1_<Finding> metrics of a run with a finite value, those whose every value is NaN): MLflow
    draws no chart for the latter (a finding without positives in a small validation split has no AUC)."""
    charted, undefined = [], []
    for name in (f"val_{kind}_{finding}" for kind in ("auc", "f1") for finding in FINDINGS):
        values = [m.value for m in client.get_metric_history(run_id, name)]
        if any(math.isfinite(v) for v in values):
            charted.append(name)
        elif values:
            undefined.append(name)
    return charted, undefined


def check_ui(backend_store_uri: str, experiment: str, screenshot: Path, browser: str) -> list[Check]:
    from dashboards.mlflow_store import connect
    from dashboards.sweep_reader import open_sweep

    client = connect(backend_store_uri, create=False)
    sweep = open_sweep(client, experiment, backend_store_uri)
    experiment_id = client.get_experiment_by_name(sweep.experiment_name).experiment_id
    children = sorted(trial.name for trial in sweep.trials)
    if not children:
        raise UserError(f"--experiment {experiment!r}: its parent run {sweep.parent_run_id} has no child runs")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    stem = screenshot.with_suffix("")
    listed = children[:MAX_LISTED_CHILDREN]
    by_name = quote("tags.`mlflow.runName`")
    child = next(trial for trial in sweep.trials if trial.name == children[0])
    metrics, undefined = per_finding_metrics(client, child.run_id)
    if not metrics:
        raise UserError(f"--experiment {experiment!r}: child run {child.name} has no per-finding metric with a value")
    chart_rows = math.ceil(len(client.get_run(child.run_id).data.metrics) / CHARTS_PER_ROW)   # one chart per metric
    note = f"; not charted by MLflow, all NaN (undefined on this validation split): {', '.join(undefined)}" \
        if undefined else ""
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as scratch, \
            MlflowUi(backend_store_uri, Path(scratch) / "mlflow-ui.log") as ui:
        base = f"{ui.url}/#/experiments/{experiment_id}"
        checks = [
            check_page(browser, f"{base}/runs?orderByKey={by_name}&orderByAsc=true", screenshot,
                       max(HEIGHT, 400 + ROW_PX * (len(listed) + 1)), [sweep.name, *listed],
                       f"experiment {sweep.experiment_name!r} lists parent run {sweep.name!r} and "
                       f"{len(listed)} of {len(children)} child runs"),
            check_page(browser, f"{base}/runs/{child.run_id}", Path(f"{stem}-child-run.png"), HEIGHT,
                       # the label and the name as adjacent texts: the name alone is also the experiment's
                       [f"Parent run\n{sweep.name}"], f"child run {child.name!r} names its parent run"),
            check_page(browser, f"{base}/runs/{child.run_id}/model-metrics", Path(f"{stem}-metrics.png"),
                       400 + CHART_ROW_PX * chart_rows, metrics,
                       f"child run {child.name!r} charts its {len(metrics)} per-finding metrics{note}",
                       min_charts=len(metrics)),
        ]
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python dashboards/check_mlflow_ui.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", required=True, help="the MLflow store, e.g. sqlite:///runs/mlflow.db")
    parser.add_argument("--experiment", required=True, help="the sweep: experiment name (or its parent run id)")
    parser.add_argument("--screenshot", required=True, help="PNG of the runs list; the other pages go beside it")
    parser.add_argument("--browser", default=None, help="chromium executable (default: chromium on the PATH)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checks = check_ui(args.backend_store_uri, args.experiment, Path(args.screenshot), find_browser(args.browser))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for check in checks:
        print(check.line(), flush=True)
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
