"""The notebooks and the explorer in a real browser: JupyterLab, driven in Debian's Chromium.

nbval runs the notebooks in a kernel but never draws them. Here JupyterLab serves a copy of
notebooks/ (running it never touches the repository), Chromium (`/usr/bin/chromium`, never a
downloaded browser) runs every cell, and the test checks what a person would see: the explorer's
tabs and figures, a submit, a head selection, the Routes tab, an error shown in the widget, and every plotly figure
of notebooks 00-08 drawn as SVG with no error output. Screenshots go to artifacts/browser/.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tracelib.widgets import TAB_TITLES

# Under xdist one worker runs the whole file (one JupyterLab, one Chromium), handed out first (tests/conftest.py).
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "browser"  # git-ignored: screenshots and timings to look at
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("0[0-8]_*.ipynb"))
EXPLORER = "09_explorer.ipynb"
RUN_TIMEOUT_MS = 180_000
# Click to prediction. The kernel traces in under a second, but every submit builds six plotly
# FigureWidgets, each sending plotly.js (5 MB, anywidget's `_esm`) to the browser: about 9 s on two
# busy cores. The bound catches a hang, not a slowdown; the measured time is saved and printed.
SUBMIT_LIMIT_MS = 5_000

# Settings a fresh user would have, except that every cell stays in the DOM (JupyterLab 4 windows
# notebooks by default, detaching cells scrolled out of view) and nothing is fetched from the network.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

# Run all cells of the notebook on show; window.__run says when the run is over.
RUN_ALL = """async () => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  await panel.context.ready;
  await panel.sessionContext.ready;
  const t0 = Date.now();  // the kernel started and idle, so no cell is sent before it can run
  while (!(panel.sessionContext.session && panel.sessionContext.session.kernel
           && panel.sessionContext.session.kernel.status === 'idle') && Date.now() - t0 < 60000) {
    await new Promise(r => setTimeout(r, 100));
  }
  window.__run = {done: false};
  app.commands.execute('notebook:run-all-cells').then(
    ok => { window.__run = {done: true, ok}; },
    err => { window.__run = {done: true, ok: false, err: String(err)}; });
}"""
# The run is over: its kernel is idle, and every code cell ran or one shows an error.
IDLE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const ran = cells.every(c => c.model.executionCount !== null);
  const failed = cells.some(c => [...Array(c.model.outputs.length).keys()]
    .some(j => c.model.outputs.get(j).type === 'error'));
  return window.__run && window.__run.done && kernel && kernel.status === 'idle' && (ran || failed);
}"""
# What the notebook model holds: error outputs, and code cells that never ran.
OUTCOME = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const errors = [], unrun = [];
  let plotly = 0;
  panel.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    if (cell.model.executionCount === null) unrun.push(i);
    const outputs = cell.model.outputs;
    for (let j = 0; j < outputs.length; j++) {
      const out = outputs.get(j).toJSON();
      if (out.output_type === 'error') errors.push(`cell ${i}: ${out.ename}: ${out.evalue}`);
      if (out.data && 'application/vnd.plotly.v1+json' in out.data) plotly += 1;
    }
  });
  return {errors, unrun, plotly, ok: window.__run.ok};
}"""
# Resolves once the page has painted twice more (requestAnimationFrame runs before the next paint).
NEXT_FRAME = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
# Every plotly figure drawn: each .js-plotly-plot holds an svg.main-svg with something plotted.
PLOTS = """() => [...document.querySelectorAll('.jp-Notebook .js-plotly-plot')].map(p => ({
  svg: !!p.querySelector('svg.main-svg'),
  marks: p.querySelectorAll('svg.main-svg .trace, svg.main-svg image').length,
}))"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """A running JupyterLab server: its base URL and token, and the kernels it was asked to shut down."""

    def __init__(self, base: str, token: str):
        self.base, self.token = base, token
        self._shutdowns: list[threading.Thread] = []
        self._failures: list[str] = []

    def shut_down_session(self, session_id: str) -> None:
        """Ask the server to end a notebook's session and kernel, without waiting for the kernel to exit.

        The kernel is idle by then: the next test opens its notebook while this one exits.
        """
        url = f"{self.base}/api/sessions/{session_id}?token={self.token}"

        def delete():
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=60).close()
            except OSError as exc:
                self._failures.append(f"session {session_id}: {exc}")

        thread = threading.Thread(target=delete, daemon=True)
        thread.start()
        self._shutdowns.append(thread)

    def wait_for_shutdowns(self) -> None:
        """Every requested shutdown finished, and none failed."""
        for thread in self._shutdowns:
            thread.join(timeout=60)
        assert not self._failures, f"JupyterLab did not shut these kernels down: {self._failures}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a temporary copy of notebooks/; yields a `Lab`."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    for name, values in SETTINGS.items():
        path = tmp / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_CONFIG_DIR=str(tmp / "config"))
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={tmp / 'settings'}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = (tmp / "lab.log").open("wb")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited with {server.returncode}:\n{(tmp / 'lab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in 60 s:\n{(tmp / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        running = Lab(base, token)
        try:
            yield running
        finally:
            running.wait_for_shutdowns()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium):
    """One browser context for the module: every test opens its own page in it, and the pages share the
    context's HTTP cache (JupyterLab's scripts are fetched once)."""
    context = chromium.new_context(viewport={"width": 1280, "height": 1000})
    yield context
    context.close()


def _open_and_run(browser, lab, name):
    """Open a notebook in JupyterLab, run all its cells, wait for the kernel; returns (page, errors, plotly outputs)."""
    base, token = lab.base, lab.token
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # A workspace of its own, reset: JupyterLab would otherwise reopen the notebooks of earlier pages.
    workspace = name.removesuffix(".ipynb")
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{name}?reset&token={token}", wait_until="domcontentloaded")
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext",
        timeout=60_000,
    )
    page.evaluate(RUN_ALL)
    page.wait_for_function(IDLE, timeout=RUN_TIMEOUT_MS, polling=250)
    outcome = page.evaluate(OUTCOME)
    assert outcome["ok"] and not outcome["errors"] and not outcome["unrun"], f"{name}: {outcome}"
    return page, errors, outcome["plotly"]


def _close(page, lab):
    """Shut the notebook's kernel down (later notebooks get the CPU and the memory), then close the page."""
    try:
        session = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session?.id ?? null")
        if session:
            lab.shut_down_session(session)
    finally:
        page.close()


def _screenshot(page, name):
    """The whole notebook, from its top: a tall viewport (capped), then one shot per screenful.

    The notebook scrolls inside its own panel (left at the end by Run All), so a page screenshot
    alone shows only the last screen: scroll that panel to the top, then down a screen at a time.
    Files: NAME.png, then NAME-2.png, ... when the notebook is taller than the cap.
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob(f"{name}-*.png"):
        old.unlink()
    scroller = (
        "(document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer')"
        " || document.querySelector('.jp-WindowedPanel-outer') || document.querySelector('.jp-Notebook'))"
    )
    height = page.evaluate(
        f"() => {{ const o = {scroller}; return o.scrollHeight + o.getBoundingClientRect().top + 60; }}"
    )
    page.set_viewport_size({"width": 1280, "height": min(max(int(height), 1000), 6_000)})
    page.wait_for_timeout(300)
    for shot in range(1, 11):
        more = page.evaluate(
            f"""(shot) => {{ const o = {scroller};
                 o.scrollTop = (shot - 1) * o.clientHeight;
                 return (shot - 1) * o.clientHeight < o.scrollHeight; }}""",
            shot,
        )
        if not more:
            break
        page.evaluate(NEXT_FRAME)  # the scrolled panel painted (no layout changes on a scroll)
        page.screenshot(path=str(ARTIFACTS / (f"{name}.png" if shot == 1 else f"{name}-{shot}.png")))


def _no_widget_errors(page, name):
    outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
    texts = outputs.all_inner_texts()
    bad = [t[:200] for t in texts if "Error displaying widget" in t or t.lstrip().startswith(("VBox(", "Explorer("))]
    assert not bad, f"{name}: a widget did not render: {bad}"


def _submit(page, app, prompt, answer, expected):
    """Type the inputs, click Submit, wait for the prediction; returns (latency in ms measured in the page, status).

    `expected` is the predicted token's repr with whitespace dropped: the label shows "' 5'" or "'5'".
    """
    app.locator('input[placeholder="what is 1 + 1"]').fill(prompt)
    app.locator("input[placeholder^='\" 2\"']").fill(answer)
    app.locator('input[placeholder^="comma-separated"]').press("Tab")
    button = app.locator("button", has_text="Submit")
    return page.evaluate(
        r"""async ([button, expected]) => {
          const box = button.closest('.widget-vbox');
          const label = () => [...box.querySelectorAll(':scope > .widget-hbox')]
            .find(h => h.textContent.startsWith('Prediction:'));
          const status = button.parentElement;
          const t0 = performance.now();
          button.click();
          while (performance.now() - t0 < 60000) {
            const text = label().textContent, done = /(traced|from cache) in|failed/.test(status.textContent);
            if (done && text.replace(/\s/g, '').endsWith(expected)) {
              return [performance.now() - t0, status.textContent.replace(/^Submit/, '')];
            }
            await new Promise(r => setTimeout(r, 20));
          }
          return [`timed out: ${label().textContent} | ${status.textContent}`, ''];
        }""",
        [button.element_handle(), expected],
    )


def test_explorer_renders_and_answers_in_the_browser(browser, lab):
    page, errors, _ = _open_and_run(browser, lab, EXPLORER)
    try:
        tab_bar = page.locator(".jp-Notebook .widget-tab .lm-TabBar-tab")
        tab_bar.first.wait_for(timeout=30_000)
        _no_widget_errors(page, EXPLORER)
        assert tab_bar.all_inner_texts() == list(TAB_TITLES)
        app = page.locator(".jp-Notebook .widget-vbox", has=page.locator(".widget-tab")).first
        # The Margin tab on show: its figure drawn by plotly, with something plotted.
        app.locator(".js-plotly-plot svg.main-svg").first.wait_for(timeout=30_000)
        assert app.locator(".js-plotly-plot svg.main-svg .trace").count() >= 1

        # An empty prompt: the library's message, in red, inside the widget.
        app.locator('input[placeholder="what is 1 + 1"]').fill("")
        app.locator("button", has_text="Submit").click()
        error = app.locator(".widget-html span[style*='color']", has_text="EmptyInputError")
        error.wait_for(timeout=10_000)
        assert "EmptyInputError" in error.inner_text()

        # A prompt not seen yet (traced), then the notebook's (from cache): the prediction follows.
        latency, status = {}, {}
        latency["traced"], status["traced"] = _submit(page, app, "what is 1 + 1", " 2", "'2'")
        latency["cached"], status["cached"] = _submit(page, app, "what is 2 + 3", " 5", "'5'")
        print(f"\nexplorer submit latency (click to prediction, ms): {latency}; status: {status}")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "submit_latency.json").write_text(json.dumps({"latency_ms": latency, "status": status}, indent=1))
        assert all(isinstance(ms, (int, float)) and 0 <= ms < SUBMIT_LIMIT_MS for ms in latency.values()), latency
        # The notebook traced "what is 2 + 3" and never "what is 1 + 1": the status says which ran a trace.
        assert status["traced"].strip().startswith("traced in "), status
        assert status["cached"].strip().startswith("from cache in "), status
        assert app.locator(".widget-html span[style*='color']").count() == 0  # the error went away
        _screenshot(page, "09_explorer-submit")

        # The Heads tab: pick another head; its source figure and attention pattern are replaced.
        tab_bar.filter(has_text="Heads").click()
        heads = app.locator(".widget-tab-contents > .widget-vbox:visible")
        source, pattern = heads.locator(".js-plotly-plot"), heads.locator("iframe")
        source.first.wait_for(timeout=10_000)
        pattern.first.wait_for(timeout=10_000)
        page.evaluate(
            "els => els.forEach(e => e.dataset.old = '1')", source.element_handles() + pattern.element_handles()
        )
        head = heads.locator(".widget-dropdown", has_text="Head").locator("select")
        options = head.locator("option").all_inner_texts()
        assert len(options) > 1, options
        new = next(o for o in options if o != head.input_value())
        head.select_option(label=new)
        heads.locator(".js-plotly-plot:not([data-old]) svg.main-svg .trace").first.wait_for(timeout=15_000)
        # The new figure is the chosen head's: its title reads "L<layer>H<head> by source position".
        heads.locator(".js-plotly-plot:not([data-old]) .gtitle", has_text=f"H{new} by source position").wait_for(
            timeout=5_000
        )
        fresh = heads.locator("iframe:not([data-old])")
        fresh.wait_for(timeout=15_000)
        assert heads.locator("iframe[data-old]").count() == 0
        # circuitsvis draws into the iframe: its document has content beyond the script.
        frame = fresh.element_handle().content_frame()
        frame.wait_for_function("() => document.body && document.body.innerText.trim().length > 0", timeout=15_000)
        _screenshot(page, "09_explorer-head")

        # The Routes tab: opening it computes the route (kernel side) and draws its verdict, figure and edges.
        tab_bar.filter(has_text="Routes").click()
        routes = app.locator(".widget-tab-contents > .widget-vbox:visible")
        routes.locator(".js-plotly-plot svg.main-svg").first.wait_for(timeout=15_000)
        # Attached, not "visible": a vertical edge (a position's own column) has a box zero pixels wide.
        routes.locator(".js-plotly-plot svg.main-svg .trace").first.wait_for(state="attached", timeout=15_000)
        verdict = routes.locator(".widget-html", has_text="Verdict:").first
        verdict.wait_for(timeout=5_000)
        assert re.match(r"Verdict: (copied|computed in place|assembled)\. ", verdict.inner_text()), verdict.inner_text()
        assert routes.locator("table td").count() > 0  # the route's strongest edges
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        routes.screenshot(path=str(ARTIFACTS / "09_explorer-routes-tab.png"))
        _no_widget_errors(page, EXPLORER)
        assert not errors, errors
    finally:
        _close(page, lab)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws_in_the_browser(browser, lab, name):
    page, errors, n_plotly = _open_and_run(browser, lab, name)
    try:
        page.wait_for_function(f"() => ({PLOTS})().every(p => p.svg && p.marks > 0)", timeout=30_000, polling=250)
        plots = page.evaluate(PLOTS)
        stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        tracebacks = [t[:300] for t in stderr.all_inner_texts() if "Traceback" in t]
        _no_widget_errors(page, name)
        _screenshot(page, name.removesuffix(".ipynb"))
        print(f"\n{name}: {len(plots)} plotly figure(s) drawn, {n_plotly} plotly output(s)")
        # Every plotly output the kernel sent is drawn by JupyterLab's plotly renderer, not shown as text.
        assert len(plots) >= n_plotly, (len(plots), n_plotly)
        assert not tracebacks, tracebacks
        assert not errors, errors
    finally:
        _close(page, lab)
