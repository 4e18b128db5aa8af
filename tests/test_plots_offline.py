"""`dvc plots show` draws its charts with the network off: the page's charting libraries are
inlined by the project's HTML template (.dvc/config plots.html_template), not loaded from a CDN.
Headless Chromium (Debian's `chromium`; .ci/run installs it) opens the page with every connection
refused and the test reads the SVG the charts drew."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.committed import REPO, committed_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No network at all: every host resolves nowhere, and a proxy that does not exist catches the rest.
OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--host-resolver-rules=MAP * ~NOTFOUND",
                 "--proxy-server=127.0.0.1:9", "--virtual-time-budget=15000"]


def chromium(args, tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")
    return subprocess.run([CHROMIUM, *OFFLINE_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    for name in ("dvc.yaml", ".dvc/config", "plots/offline_template.html"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(committed_text("params.yaml"))  # dvc.yaml interpolates from it
    live = root / "dvclive/train/plots/metrics"
    (live / "eval").mkdir(parents=True)
    (live / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{3 - s / 10}\n" for s in range(1, 11)))
    (live / "eval" / "loss.tsv").write_text("step\tloss\n5\t2.6\n10\t2.2\n")
    (root / "metrics").mkdir()
    (root / "metrics/accuracy_by_steps.csv").write_text("steps,questions,fine_tuned,base\n2,10,0.6,0.3\n3,8,0.5,0.25\n"
                                                        "4,5,0.4,0.2\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "plots", "show", "-o", "dvc_plots"]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "dvc_plots" / "index.html"


def test_the_page_loads_nothing_from_the_network(plots_page):
    html = plots_page.read_text()
    assert not re.search(r"<script[^>]+src=", html), "a script is loaded from elsewhere"
    assert "cdn.jsdelivr" not in html and "vega@5.20.2" in html


def test_the_charts_draw_offline(plots_page, tmp_path):
    proc = chromium(["--dump-dom", plots_page.as_uri()], tmp_path)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    # One SVG per chart, with drawn marks (lines and points) and the axis titles of both charts.
    assert dom.count('class="marks"') == 2, dom[:2000]
    assert len(re.findall(r'role="graphics-symbol"', dom)) >= 10
    assert "steps in the gold solution" in dom and "exact match (strict)" in dom and "loss" in dom
    assert "fine_tuned" in dom and "base" in dom  # the legend of the accuracy chart
    screenshot = tmp_path / "plots.png"
    chromium([f"--screenshot={screenshot}", "--window-size=1400,1000", plots_page.as_uri()], tmp_path)
    assert screenshot.stat().st_size > 20_000  # drawn charts, not a blank page
