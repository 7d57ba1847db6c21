"""A real browser: JupyterLab on loopback, headless Chromium driven by Playwright.

The test copies ``01_identification.ipynb`` into a temporary root (smaller parameters: 6
scenes, no second model), starts JupyterLab on 127.0.0.1 with a random free port and a
random token, opens the notebook in Debian's Chromium, runs all cells, picks another image
in the neuron browser's dropdown and checks that the caption and the heatmap changed.
Screenshots go to ``test-artifacts/browser/`` (``$MMNEURONS_TEST_ARTIFACTS`` overrides).

Skipped, saying why, when Chromium (``apt-get install -y chromium``), Playwright
(``pip install playwright``, in the ``dev`` extra) or JupyterLab is missing. Playwright
drives the system Chromium (``executable_path``); it never downloads a browser.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_identification.ipynb"
ARTIFACTS = Path(os.environ.get("MMNEURONS_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
OVERRIDES = 'model = "tiny-llava"\nn_images = 6\ncompare_model = ""\noutput_dir = "outputs"\n'


def _chromium() -> str | None:
    for candidate in (os.environ.get("MMNEURONS_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _requirements() -> str | None:
    """Why the browser test cannot run here, or ``None``."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("Playwright is not installed (pip install playwright; python3 tasks.py test "
                "installs it with the dev extra)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "JupyterLab is not installed (the notebooks extra: pip install -e '.[notebooks]')"
    if _chromium() is None:
        return ("Chromium not found at /usr/bin/chromium or on PATH: install Debian's package "
                "(apt-get install -y chromium, as root; python3 tasks.py test does this when it "
                "runs as root) or set MMNEURONS_CHROMIUM")
    return None


pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(_requirements() is not None, reason=str(_requirements()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_copy(folder: Path) -> None:
    import nbformat

    nb = nbformat.read(str(ROOT / "notebooks" / NOTEBOOK), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if "parameters" in cell.metadata.get("tags", []):
            cell.source = cell.source.rstrip() + "\n# browser test: a quicker run\n" + OVERRIDES
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, str(folder / NOTEBOOK))


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """``(base_url, token)`` of a JupyterLab serving a temporary copy of the notebook."""
    root = tmp_path_factory.mktemp("lab-root")
    config = tmp_path_factory.mktemp("lab-config")
    _notebook_copy(root)
    # no news / update pop-ups over the notebook
    (config / "labconfig").mkdir()
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config),
           "JUPYTER_RUNTIME_DIR": str(config / "runtime"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(tmp_path_factory.mktemp("lab-log") / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={config / 'workspaces'}", "--LabApp.news_url=",
         "--ServerApp.allow_remote_access=False",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def stop():
        try:   # clean shutdown: kernels first, then the server
            request = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(request, timeout=5).close()
            server.wait(timeout=15)
        except Exception:
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()

    deadline = time.monotonic() + 60
    try:
        while True:
            if server.poll() is not None:
                log.flush()
                tail = Path(log.name).read_text()[-2000:]
                raise RuntimeError(f"JupyterLab exited with {server.returncode}; log {log.name}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer within 60 s; log: {log.name}")
            time.sleep(0.3)
        yield base, token
    finally:
        stop()


def test_neuron_browser_in_jupyterlab(jupyterlab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True,
                                    args=CHROMIUM_FLAGS, chromium_sandbox=False)
        page = browser.new_page(viewport={"width": 1300, "height": 1100})
        page.set_default_timeout(int(os.environ.get("MMNEURONS_BROWSER_TIMEOUT_MS", 60_000)))
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?reset&token={token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", state="visible")
            # JupyterLab may ask which kernel to start: take the preferred one (the venv's python3)
            dialog = page.locator(".jp-Dialog .jp-mod-accept")
            try:
                dialog.wait_for(state="visible", timeout=5_000)
                dialog.click()
            except PlaywrightTimeout:
                pass
            # the kernel is up when the toolbar's status says idle
            page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator"
                                   "[data-status='idle']", state="attached")
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            status = page.locator(".mmn-status")
            status.wait_for(state="visible")
            page.wait_for_function("() => (document.querySelector('.mmn-status') || {})"
                                   ".textContent?.includes('updated in')")
            heatmap = page.locator("img.mmn-heatmap")
            heatmap.scroll_into_view_if_needed()
            caption = page.locator(".mmn-caption").first
            # let the remaining cells finish so the kernel answers the widget at once
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-InputArea-prompt')]"
                ".every(p => !p.textContent.includes('*'))", timeout=120_000)
            before_caption, before_src = caption.inner_text(), heatmap.get_attribute("src")
            before_png = heatmap.screenshot(path=str(ARTIFACTS / "heatmap_before.png"))
            page.screenshot(path=str(ARTIFACTS / "browser_before.png"))

            dropdown = page.locator(".mmn-image select")
            options = dropdown.locator("option").all_inner_texts()
            current = dropdown.evaluate("s => s.selectedIndex")
            target = next(i for i, text in enumerate(options)   # a scene with another caption
                          if text.split(": ", 1)[-1] != options[current].split(": ", 1)[-1])
            dropdown.select_option(index=target)
            page.wait_for_function(
                "([before]) => { const c = document.querySelector('.mmn-caption');"
                " return c && c.innerText !== before; }", arg=[before_caption])
            page.wait_for_function(
                "([before]) => { const i = document.querySelector('img.mmn-heatmap');"
                " return i && i.getAttribute('src') !== before; }", arg=[before_src])
            page.wait_for_timeout(300)   # let the new image paint
            after_caption = caption.inner_text()
            after_png = heatmap.screenshot(path=str(ARTIFACTS / "heatmap_after.png"))
            page.screenshot(path=str(ARTIFACTS / "browser_after.png"))
            (ARTIFACTS / "result.json").write_text(json.dumps({
                "before": before_caption, "after": after_caption, "picked": options[target],
                "status": status.inner_text()}, indent=1))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"))
            raise
        finally:
            browser.close()

    assert before_caption.startswith("caption:") and after_caption.startswith("caption:")
    assert after_caption != before_caption
    assert after_png != before_png, "the heatmap image did not change"


# --- the atlas page (a static file: no JupyterLab needed, same browser) ---------------------

_ATLAS_REPORT = """() => {
  const cards = [...document.querySelectorAll('.mmn-card')];
  const imgs = [...document.querySelectorAll('img')];
  return {
    cards: cards.map(c => ({name: (c.querySelector('.mmn-name') || {}).textContent || '',
                            thumbs: c.querySelectorAll('img.mmn-thumb').length})),
    images: imgs.length,
    thumbs: document.querySelectorAll('img.mmn-thumb').length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    sizes: [...new Set(imgs.map(i => i.naturalWidth + 'x' + i.naturalHeight))],
    nouns: document.querySelectorAll('h2.mmn-noun').length,
  };
}"""


def _open_report(browser, path: Path, screenshot: Path | None = None) -> dict:
    """Load ``path`` (file://) in a new page, wait for its images, return the page's report."""
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    page.set_default_timeout(int(os.environ.get("MMNEURONS_BROWSER_TIMEOUT_MS", 60_000)))
    try:
        page.goto(path.resolve().as_uri(), wait_until="load")   # "load": every img settled
        report = page.evaluate(_ATLAS_REPORT)
        if screenshot is not None:
            page.screenshot(path=str(screenshot))
        return report
    finally:
        page.close()


def test_atlas_page_in_chromium(tmp_path, cli):
    """``mmneurons atlas`` on 24 scenes, its ``index.html`` opened from disk in Chromium: the
    unit cards render with their ``L3.479 (+)`` titles and every thumbnail decodes; a copy of
    the page with one corrupted data URI is caught (the check can fail)."""
    import re

    from playwright.sync_api import sync_playwright

    from mmneurons_utils.atlas.build import read_atlas

    out = tmp_path / "atlas"
    code, stdout, err = cli("atlas", "--model", "tiny-llava", "--scenes", "24", "--seed", "0",
                            "--top-k", "5", "--examples", "4", "--out", str(out), "--json")
    assert code == 0, err[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    table, _ = read_atlas(out / "atlas.parquet")
    expected_cards = int(table.groupby("noun").size().clip(upper=3).sum())   # cards_per_noun=3
    html = (out / "index.html").read_text()
    first = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]{40})", html)
    assert first, "no thumbnail in the page"
    broken_copy = tmp_path / "broken.html"   # one thumbnail's PNG bytes garbled, same length
    broken_copy.write_text(html.replace(first.group(1), "A" * 40, 1))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True,
                                    args=CHROMIUM_FLAGS, chromium_sandbox=False)
        try:
            report = _open_report(browser, out / "index.html", ARTIFACTS / "atlas.png")
            control = _open_report(browser, broken_copy)
        finally:
            browser.close()
    (ARTIFACTS / "atlas.json").write_text(json.dumps(
        {"cli": result, "report": {k: v for k, v in report.items() if k != "cards"},
         "cards": report["cards"][:10], "n_cards": len(report["cards"])}, indent=1))

    cards = report["cards"]
    assert len(cards) >= 1 and len(cards) == expected_cards
    assert report["nouns"] == result["n_nouns"]
    for card in cards:
        assert re.fullmatch(r"L\d+\.\d+ \([+−]\)", card["name"].strip()), card["name"]
        assert card["thumbs"] >= 1, card
    assert report["thumbs"] == report["images"] >= len(cards)
    assert report["broken"] == [], f"thumbnails that did not decode: {report['broken'][:5]}"
    assert report["sizes"] == ["64x64"]
    # the control: the same check on a page with one bad data URI fails
    assert len(control["broken"]) == 1 and len(control["cards"]) == len(cards)
