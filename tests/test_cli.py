"""The command line and its offline HTML report."""

from __future__ import annotations

import json

import pytest

from tracelib.__main__ import main


def test_trace_text_report(capsys):
    assert main(["trace", "--prompt", "what is 1 + 1", "--answer", " 2"]) == 0
    out = capsys.readouterr().out
    for part in (
        "tokens",
        "prediction  '2'",
        "rank 0",
        "readable",
        "top components",
        "top heads",
        "top neurons",
        "residual",
    ):
        assert part in out


def test_trace_json(capsys):
    assert main(["trace", "--json", "--metric", "logit_diff", "--distractors", " 3"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = data["rows"][0]
    assert row["dla"]["metric"] == "logit_diff" and row["distractors"] == ["3"]
    assert abs(row["reconstruction"]["residual"]) < 1e-4


def test_html_report_is_standalone(tmp_path, capsys):
    path = tmp_path / "sub" / "report.html"
    assert main(["trace", "--html", str(path)]) == 0
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in html
    # Opens offline: plotly.js is inlined (megabytes of it), nothing is fetched from a script src.
    assert "<script src=" not in html and len(html) > 1_000_000
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_chat_flag_uses_the_template(capsys):
    assert main(["trace", "--model", "tiny-arith-chat", "--chat", "--prompt", "what is 1 + 1?"]) == 0
    assert "<|im_start|>" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trace", "--model", "no such model"], "not a model name"),
        (["trace", "--prompt", ""], "empty"),
        (["trace", "--prompt", "what is 9 + 3", "--answer", " 12", "--distractors", " 12"], "tokens"),
    ],
)
def test_errors_are_reported_not_raised(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
