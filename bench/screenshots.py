"""Screenshots of what a user sees of a study in the MLflow UI, taken with headless Chromium.

    python bench/screenshots.py [--workdir DIR] [--out DIR]

Runs a small offline study in `--workdir` (3 trials x 3 epochs, PBMC fallback) unless it
already holds one, starts `mlflow server` on its tracking database, and saves four PNGs in
`--out` (default `screenshots/`, which must not exist yet): the runs list as `ui` opens it, the
compare view of three trials, a trial's page (its artifacts) and the parent run's study report.
Needs Debian's `chromium` (`apt-get install chromium`) and `websockets` (the `bench` extra), to
drive it over the DevTools protocol (the compare view shows an artifact only after a click). Look
at the pictures yourself: this script only says whether each page was saved.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow

from melvae import track

STUDY = "melanoma-vae-pbmc68k_reduced"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# After loading, what a user would do before looking: JavaScript steps (each followed by a
# pause) and the viewport height. The compare view loads its artifact list once scrolled to and
# shows a run's artifact only once a file of that list is clicked.
# The element holding a text node that reads exactly `text` (JavaScript, defined per step).
FIND_TEXT = """
var byText = (text) => {  // var: each step declares it again
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.nodeValue.trim() === text) return node.parentElement;
  }
  return null;
};
"""
SCROLL_TO_ARTIFACTS = (
    FIND_TEXT
    + """
(() => {
  const heading = byText('Artifacts');
  if (heading) { heading.scrollIntoView(); return 'scrolled to Artifacts'; }
  document.querySelectorAll('*').forEach((e) => {
    if (e.scrollHeight > e.clientHeight + 10) e.scrollTop = e.scrollHeight;
  });
  return 'scrolled to the bottom';
})()
"""
)
# The MLflow Assistant panel opens on every page of a fresh browser; a user closes it once.
CLOSE_ASSISTANT = (
    FIND_TEXT
    + """
(() => {
  let node = byText('MLflow Assistant');
  for (let up = 0; node && up < 5; up++, node = node.parentElement) {
    const buttons = node.querySelectorAll('button');
    if (buttons.length >= 2) { buttons[buttons.length - 1].click(); return 'closed the Assistant'; }
  }
  return 'no Assistant panel closed';
})()
"""
)
CLICK_TSNE = (
    FIND_TEXT
    + """
(() => {
  const node = byText('tsne.png');
  if (!node) return 'no tsne.png in the common artifacts';
  node.click();
  return 'clicked tsne.png';
})()
"""
)
ACTIONS = {
    "runs_list": ([CLOSE_ASSISTANT], 1000),
    "compare_three_trials": (
        [CLOSE_ASSISTANT, SCROLL_TO_ARTIFACTS, CLICK_TSNE, SCROLL_TO_ARTIFACTS],
        1400,
    ),
    "trial_page": ([CLOSE_ASSISTANT], 1000),
    "parent_report": ([], 3000),
}
# Text each page shows once it has fetched its runs and drawn them.
READY = {
    "runs_list": "matching runs",
    "compare_three_trials": "Run details",
    "trial_page": "tsne.png",
    "parent_report": "Champion",
}
SETTLE_SECONDS = 4
READY_SECONDS = 180  # a busy 2-core machine takes a while to draw the UI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_study(workdir: Path) -> None:
    """Run a 3-trial, 3-epoch study offline in `workdir` unless its tracking database exists."""
    if (workdir / "mlruns" / "mlflow.db").is_file():
        return
    env = os.environ | {
        "MELVAE_DATA_DIR": str(workdir / "cache"),
        "MELVAE_GEO_URL": f"http://127.0.0.1:{_free_port()}/geo/",  # offline: PBMC fallback
    }
    command = [sys.executable, "-m", "melvae.study", "run", "--n-trials", "3", "--epochs", "3"]
    subprocess.run([*command, "--quiet"], cwd=workdir, env=env, check=True)


def wait_until_up(url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def screenshot(
    chromium: str, url: str, path: Path, *, ready: str, steps: list[str], height: int
) -> str:
    """Open `url` in a fresh headless Chromium profile, wait until it shows the text `ready`,
    run the JavaScript `steps`, and save the viewport as `path`; returns what the steps said."""
    from websockets.sync.client import connect

    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--remote-debugging-port={port}", f"--window-size=1600,{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until_up(f"http://127.0.0.1:{port}/json/version", seconds=60)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                target = next(t for t in json.loads(response.read()) if t["type"] == "page")
            with connect(target["webSocketDebuggerUrl"], max_size=None) as cdp:
                ids = iter(range(1, 1_000_000))

                def call(method: str, **params: object) -> dict:
                    number = next(ids)
                    cdp.send(json.dumps({"id": number, "method": method, "params": params}))
                    while True:
                        message = json.loads(cdp.recv(timeout=120))
                        if message.get("id") == number:
                            return message.get("result", {})

                call("Emulation.setDeviceMetricsOverride", width=1600, height=height,
                     deviceScaleFactor=1, mobile=False)  # fmt: skip
                call("Page.navigate", url=url)
                shows = f"document.body && document.body.innerText.includes({json.dumps(ready)})"
                deadline = time.monotonic() + READY_SECONDS
                while time.monotonic() < deadline:
                    answer = call("Runtime.evaluate", expression=shows, returnByValue=True)
                    if answer.get("result", {}).get("value") is True:
                        break
                    time.sleep(2)
                time.sleep(SETTLE_SECONDS)
                said = []
                for step in steps:
                    result = call("Runtime.evaluate", expression=step, returnByValue=True)
                    said.append(str(result.get("result", {}).get("value", "")))
                    time.sleep(SETTLE_SECONDS)
                shot = call("Page.captureScreenshot", format="png")
                path.write_bytes(base64.b64decode(shot["data"]))
                return "; ".join(said)
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def pages(base: str, tracking_uri: str, folder: Path) -> dict[str, str]:
    """name -> URL of the four pages, read from the study's runs; the parent's report is
    downloaded into `folder` (the server sends artifacts as downloads, not pages)."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(STUDY)
    runs = mlflow.search_runs([experiment.experiment_id], output_format="pandas")
    trials = runs[runs[f"tags.{track.ROLE}"] == track.TRIAL_ROLE].sort_values("start_time")
    parent = runs[runs[f"tags.{track.ROLE}"] == track.PARENT_ROLE].iloc[0]
    trial = trials.iloc[0]
    run_page = f"{base}/#/experiments/{experiment.experiment_id}/runs"
    report = mlflow.artifacts.download_artifacts(
        run_id=parent["run_id"], artifact_path=track.REPORT_FILE, dst_path=str(folder)
    )
    return {
        "runs_list": track.experiment_url(base, experiment.experiment_id),
        "compare_three_trials": track.compare_url(
            base, experiment.experiment_id, list(trials["run_id"].iloc[:3])
        ),
        "trial_page": f"{run_page}/{trial['run_id']}/artifacts/{track.TSNE_FILE}"
        "?workflowType=machine_learning",
        "parent_report": Path(report).resolve().as_uri(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="folder with mlruns/ (default: a new one)")
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"{args.out} exists: pass another --out", file=sys.stderr)
        return 2
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="melvae-screens-"))).resolve()
    ensure_study(workdir)
    args.out.mkdir(parents=True)
    tracking_uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_up(f"{base}/health")
        urls = pages(base, tracking_uri, Path(tempfile.mkdtemp(prefix="melvae-report-")))
        (args.out / "urls.json").write_text(json.dumps(urls, indent=2))
        for name, url in urls.items():
            steps, height = ACTIONS.get(name, ([], 1000))
            said = screenshot(
                chromium,
                url,
                args.out / f"{name}.png",
                ready=READY[name],
                steps=steps,
                height=height,
            )
            print(f"{name:22s} saved {said}  {url}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
