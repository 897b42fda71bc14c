"""The HTML report a person reads: one section per workflow step, every figure drawn, nothing fetched.

The browser test renders the report in Debian's Chromium (`/usr/bin/chromium`, which `make test`
installs with apt-get); it never downloads a browser. A missing browser fails the test, it is not
skipped: a report nobody has seen drawn is not tested.
"""

from __future__ import annotations

import re
from pathlib import Path

import plotly.offline
import pytest

import tracelib as tl
from tracelib import plotting

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # git-ignored: screenshots to look at
STEPS = {"margin": 1, "lens": 2, "dla": 2, "heads": 2, "neurons": 1, "positions": 1}
LOCAL = ("file:", "data:", "blob:", "about:")


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    tr = tl.trace(tiny, "what is 1 + 1", " 2")
    html = plotting.report_html(tr)
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(html, encoding="utf-8")
    return tr, html, path


def test_report_is_a_page_with_one_section_per_step(report):
    tr, html, _ = report
    head = html[: html.index("</head>")]
    assert '<meta name="generator" content="tracelib">' in head and len(head.encode()) < 4096
    assert f"<dd>{tr.model_name}</dd>" in html and "Prompt" in html and "Prediction" in html
    for step, n_figures in STEPS.items():
        section = re.search(rf'<section id="{step}" class="step">(.*?)</section>', html, re.S)
        assert section, f"no section for {step}"
        body = section.group(1)
        assert "<h2>" in body and "<figcaption>" in body, step
        assert body.count('class="plotly-graph-div"') == n_figures, step
    for step in ("dla", "heads", "neurons", "positions"):  # colour means sign there: the caption says so
        caption = re.search(rf'<section id="{step}".*?<figcaption>(.*?)</figcaption>', html, re.S).group(1)
        assert plotting.SIGN_CAPTION in caption, step
    assert 'class="reconstruction"' in html and "residual" in html
    verdict, _ = tr.positions.verdict()
    assert f"Verdict: {verdict}" in html
    # The text summary is there, folded away rather than the page's body.
    assert "<details><summary>Text summary</summary><pre>" in html


def test_report_inlines_plotly_js_once_and_loads_nothing(report):
    _, html, _ = report
    assert "<script src=" not in html
    plotly_js = plotly.offline.get_plotlyjs()
    assert html.count(plotly_js[:2000]) == 1
    assert len(html) < len(plotly_js) + 1_000_000  # one copy, and figures that are small beside it


def test_report_draws_every_figure_in_chromium_offline(report):
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: this test renders the report in Debian's Chromium. Install it with "
            "`apt-get install chromium` (`make test` does so when run as root); never `playwright install`."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[dev]'` (or `make install`)")
    tr, _, path = report
    requests, external, errors = [], [], []

    def only_local(route):
        url = route.request.url
        if url.startswith(LOCAL):
            route.continue_()
        else:
            external.append(url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.route("**/*", only_local)
            page.goto(path.as_uri(), wait_until="load")
            n = sum(STEPS.values())
            page.wait_for_function(
                "n => { const divs = [...document.querySelectorAll('.plotly-graph-div')];"
                " return divs.length === n && divs.every(d => d.querySelector('svg.main-svg')); }",
                arg=n,
                timeout=15_000,
            )
            for step, n_figures in STEPS.items():
                drawn = page.locator(f"section#{step} .plotly-graph-div svg.main-svg")
                plots = page.locator(f"section#{step} .plotly-graph-div")
                assert plots.count() == n_figures, step
                for i in range(n_figures):
                    assert plots.nth(i).locator("svg.main-svg").count() >= 1, f"{step}: figure {i} not drawn"
                    # Something is plotted (bars, lines or a heatmap), not just empty axes.
                    assert plots.nth(i).locator("svg.main-svg .trace, svg.main-svg image").count() >= 1, (
                        f"{step}: figure {i} empty"
                    )
                assert drawn.count() >= n_figures
            heads = page.locator("section#heads .plotly-graph-div").first
            n_layers, n_heads = tr.dla.heads.shape[:2]
            assert heads.locator(".xtick text").all_text_contents() == [f"H{h}" for h in range(n_heads)]
            rows = {t.text_content(): t.bounding_box()["y"] for t in heads.locator(".ytick text").all()}
            assert set(rows) == {f"L{layer}" for layer in range(n_layers)}
            assert rows["L0"] < rows[f"L{n_layers - 1}"]  # layer 0 at the top, as read
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            page.locator("header").screenshot(path=str(ARTIFACTS / "report-header.png"))
            for step in STEPS:
                page.locator(f"section#{step}").screenshot(path=str(ARTIFACTS / f"report-{step}.png"))
        finally:
            browser.close()
    assert not external, f"the report tried to reach the network: {external[:5]}"
    assert all(url.startswith(LOCAL) for url in requests), requests
    assert not errors, errors


def test_each_section_says_how_to_read_its_colours_once(report):
    _, html, _ = report
    sections = dict(re.findall(r'<section id="(\w+)" class="step">(.*?)</section>', html, re.S))
    assert set(sections) == set(STEPS)
    for step, body in sections.items():
        # Counted over the whole section: its heading, text, figures (their titles are in the JSON) and caption.
        expected = 0 if step in ("margin", "lens") else 1
        assert body.count(plotting.SIGN_CAPTION) == expected, step
        caption = re.search(r"<figcaption>(.*?)</figcaption>", body, re.S).group(1)
        assert caption.count(plotting.SIGN_CAPTION) == expected, step
    assert sections["margin"].count(plotting.MARGIN_CAPTION) == 1
    assert f"{plotting.MARGIN_CAPTION} Top prediction" in sections["margin"]  # a sentence, capitalised
    # The page's header says it once more, for the whole report.
    assert html[: html.index("<section")].count(plotting.SIGN_CAPTION) == 1


def test_report_figures_keep_their_subtitles(report):
    tr, _, _ = report
    steps = {step["id"]: step for step in plotting.report_figures(tr)}
    for step in ("dla", "heads", "positions"):
        title = steps[step]["figures"][0].layout.title.text
        assert tr.dla.metric_label(0) in title and plotting.SIGN_CAPTION not in title, step
    # A figure drawn on its own still carries the sentence: only the report moves it to the caption.
    assert plotting.SIGN_CAPTION in tr.dla.plot().layout.title.text
