"""The HTML report a person reads: one section per workflow step, every figure drawn, nothing fetched.

The browser test renders the report in Debian's Chromium (`/usr/bin/chromium`, which `make test`
installs with apt-get); it never downloads a browser. A missing browser fails the test, it is not
skipped: a report nobody has seen drawn is not tested.
"""

from __future__ import annotations

import dataclasses
import html as html_module
import re
from pathlib import Path

import plotly.offline
import pytest

import tracelib as tl
from tracelib import plotting
from tracelib.__main__ import main
from tracelib.plotting.report import route_verdict_sentence

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


def test_report_draws_every_figure_in_chromium_offline(report, chromium):
    tr, _, path = report
    requests, external, errors = [], [], []

    def only_local(route):
        url = route.request.url
        if url.startswith(LOCAL):
            route.continue_()
        else:
            external.append(url)
            route.abort()

    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    try:
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
        page.close()
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


# --- issue 21: the Routes section ------------------------------------------------------------------

ROUTES_PROMPT, ROUTES_ANSWER = "what is 2 + 3", " 5"


@pytest.fixture(scope="module")
def routes_report(tiny, tmp_path_factory):
    tr = tl.trace(tiny, ROUTES_PROMPT, ROUTES_ANSWER)
    routes = tl.routes(tiny, ROUTES_PROMPT, ROUTES_ANSWER)
    html = plotting.report_html(tr, routes=routes)
    path = tmp_path_factory.mktemp("routes-report") / "report.html"
    path.write_text(html, encoding="utf-8")
    return tr, routes, html, path


def _section(html: str, step: str) -> str:
    found = re.search(rf'<section id="{step}" class="step">(.*?)</section>', html, re.S)
    assert found, f"no section for {step}"
    return found.group(1)


def test_routes_section_appears_only_when_routes_are_given(report, routes_report):
    _, html, _ = report
    assert 'id="routes"' not in html and "Routes:" not in html  # no routes given: the report is as before
    tr, routes, html, _ = routes_report
    ids = re.findall(r'<section id="(\w+)" class="step">', html)
    assert ids == [*STEPS, "routes"]  # after Positions, every other section unchanged
    body = _section(html, "routes")
    assert "<h2>7. Routes: how the answer travels to" in body
    assert body.count('class="plotly-graph-div"') == 1
    assert "How to read it" in body and "dark grey lines are attention heads" in body


def test_routes_caption_is_the_routes_verdict(routes_report):
    _, routes, html, _ = routes_report
    verdict, reason = routes.verdict()
    assert verdict == "assembled"  # the premise: L0 moves the operands, the answer is built at the last position
    caption = re.search(r"<figcaption>(.*?)</figcaption>", _section(html, "routes"), re.S).group(1)
    caption = html_module.unescape(caption)
    assert caption.startswith(f"Verdict: {verdict}. Attention heads bring") and f": {reason}." in caption
    assert caption == f"{route_verdict_sentence(routes)} {plotting.SIGN_CAPTION}"
    # The colours are said once, in the caption; the figure's title no longer repeats it.
    assert _section(html, "routes").count(plotting.SIGN_CAPTION) == 1
    # Another verdict reads differently: the sentence follows routes.verdict(), it is not fixed text.
    other = dataclasses.replace(routes, edges=routes.edges.assign(on_route=routes.edges["via"] != "head"))
    assert other.verdict()[0] == "computed in place"
    assert route_verdict_sentence(other).startswith("Verdict: computed in place. The route never reads")


def test_routes_section_draws_the_routes_edges(routes_report):
    tr, routes, _, _ = routes_report
    steps = {step["id"]: step for step in plotting.report_figures(tr, routes=routes)}
    (figure,) = steps["routes"]["figures"]
    lines = [t for t in figure.data if t.mode == "lines"]
    assert len(lines) == len(routes.route) > 0
    expected = {(tuple(t.x), tuple(t.y)) for t in routes.plot().data if t.mode == "lines"}
    assert {(tuple(t.x), tuple(t.y)) for t in lines} == expected
    assert plotting.SIGN_CAPTION not in figure.layout.title.text and routes.row_label in figure.layout.title.text


def test_routes_of_another_prompt_or_model_are_refused(tiny, other, routes_report):
    tr, _, _, _ = routes_report
    with pytest.raises(ValueError, match="the routes explain 'what is 1 \\+ 1 ' -> '2', but the report is about"):
        plotting.report_html(tr, routes=tl.routes(tiny, "what is 1 + 1", " 2"))
    with pytest.raises(tl.ModelMismatchError, match="the route comes from .* but the trace comes from"):
        plotting.report_html(tr, routes=tl.routes(other, ROUTES_PROMPT, ROUTES_ANSWER))


def test_the_cli_report_has_the_routes_section(tmp_path, capsys, tiny):
    path = tmp_path / "report.html"
    assert main(["trace", "--prompt", ROUTES_PROMPT, "--answer", ROUTES_ANSWER, "--html", str(path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {path}")
    verdict, reason = tl.routes(tiny, ROUTES_PROMPT, ROUTES_ANSWER).verdict()
    caption = html_module.unescape(_section(path.read_text(), "routes"))
    assert f"Verdict: {verdict}." in caption and reason in caption
    # A multi-token answer: routes explain one token, so the report goes without, and says why.
    assert main(["trace", "--prompt", "what is 5 + 7", "--answer", " 12", "--html", str(path)]) == 0
    assert "(no Routes section: routes explain one token, and ' 12' is 2)" in capsys.readouterr().out
    written = path.read_text()
    assert 'id="routes"' not in written and 'id="positions"' in written


def test_routes_section_is_drawn_in_chromium(routes_report, chromium):
    _, routes, _, path = routes_report
    errors = []
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(LOCAL) else route.abort())
        page.goto(path.as_uri(), wait_until="load")
        figure = page.locator("section#routes .plotly-graph-div")
        figure.locator("svg.main-svg").first.wait_for(timeout=15_000)
        # One line per edge on the route, and the token labels along the position axis.
        assert figure.locator(".scatterlayer .trace .js-line").count() == len(routes.route)
        ticks = figure.locator(".xtick text").all_text_contents()
        assert ticks == plotting.token_labels(routes.str_tokens)
        assert page.locator("section#routes figcaption").inner_text().startswith(f"Verdict: {routes.verdict()[0]}.")
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("section#routes").screenshot(path=str(ARTIFACTS / "report-routes.png"))
    finally:
        page.close()
    assert not errors, errors
