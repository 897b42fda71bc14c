"""The command line and its offline HTML report."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from tracelib.__main__ import main, write_atomically
from tracelib.models import WEIGHTS_DIR
from tracelib.trace import Trace

ONE_PLUS_ONE = ["--prompt", "what is 1 + 1", "--answer", " 2"]
REPORT = '<!DOCTYPE html><html><head><meta charset="utf-8"><meta name="generator" content="tracelib">'


def error_line(err: str) -> str:
    """The one line an error may print on stderr."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def no_temp_files(*folders) -> bool:
    return not any(list(folder.glob(".*.tmp")) for folder in folders)


@pytest.fixture
def model_copy(tmp_path):
    """A writable copy of the bundled model's folder, to damage."""
    return shutil.copytree(WEIGHTS_DIR / "tiny-arith", tmp_path / "model")


def test_trace_text_report(capsys):
    assert main(["trace", *ONE_PLUS_ONE]) == 0
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
    assert main(["trace", *ONE_PLUS_ONE, "--json", "--metric", "logit_diff", "--distractors", " 3"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = data["rows"][0]
    assert row["dla"]["metric"] == "logit_diff" and row["distractors"] == ["3"]
    assert abs(row["reconstruction"]["residual"]) < 1e-4
    assert data["notes"] == []


def test_trace_needs_prompt_and_answer(capfd):
    # Without the requirement this explained ' 2', the demo's answer, for a question about 3 + 4.
    with pytest.raises(SystemExit) as exit_info:
        main(["trace", "--prompt", "what is 3 + 4"])
    assert exit_info.value.code == 2
    assert "--answer" in error_line(capfd.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main(["trace", "--answer", " 7"])
    assert exit_info.value.code == 2
    assert "--prompt" in error_line(capfd.readouterr().err)


def test_demo_keeps_its_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    assert "prediction  '2'" in capsys.readouterr().out
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_json_is_strict(monkeypatch, capsys):
    to_dict = Trace.to_dict

    def with_non_finite(self, k=5):
        data = to_dict(self, k)
        data["rows"][0]["margin"]["prob"] = float("nan")
        data["rows"][0]["lens"]["standard_logit_diff"][1] = float("-inf")
        return data

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    monkeypatch.setattr(Trace, "to_dict", with_non_finite)
    assert main(["trace", *ONE_PLUS_ONE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=reject)
    row = data["rows"][0]
    assert row["margin"]["prob"] is None and row["lens"]["standard_logit_diff"][1] is None
    assert isinstance(row["margin"]["logit"], float)
    assert data["notes"] == [
        "rows[0].margin.prob was NaN; written as null",
        "rows[0].lens.standard_logit_diff[1] was -Infinity; written as null",
    ]


def test_html_report_is_standalone(tmp_path, capsys):
    path = tmp_path / "sub" / "report.html"
    path.parent.mkdir()
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(path)]) == 0
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in html
    # Opens offline: plotly.js is inlined (megabytes of it), nothing is fetched from a script src.
    assert "<script src=" not in html and len(html) > 1_000_000
    assert '<meta name="generator" content="tracelib">' in html[:4096]  # how a rerun knows it may overwrite
    assert no_temp_files(path.parent)  # written atomically, nothing left behind


def test_chat_flag_uses_the_template(capsys):
    assert main(["trace", "--model", "tiny-arith-chat", "--chat", "--prompt", "what is 1 + 1?", "--answer", " 2"]) == 0
    assert "<|im_start|>" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trace", "--model", "no such model", *ONE_PLUS_ONE], "not a model name"),
        (["trace", "--prompt", "", "--answer", " 2"], "empty"),
        (["trace", "--prompt", "what is 9 + 3", "--answer", " 12", "--distractors", " 12"], "tokens"),
    ],
)
def test_errors_are_reported_not_raised(capfd, argv, message):
    assert main(argv) == 2
    assert message in error_line(capfd.readouterr().err)


def corrupt_config(folder):
    (folder / "config.json").write_text("{not json")
    return "config.json"


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return str(folder)


def remove_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    return "tokenizer"


@pytest.mark.parametrize("damage", [corrupt_config, truncate_weights, remove_tokenizer])
def test_load_failures_are_one_line(model_copy, capfd, damage):
    phrase = damage(model_copy)
    assert main(["trace", "--model", str(model_copy), *ONE_PLUS_ONE]) == 2
    line = error_line(capfd.readouterr().err)
    assert line.startswith("tracelib: error: ") and phrase in line


def test_debug_prints_the_traceback(model_copy, capfd):
    corrupt_config(model_copy)
    assert main(["trace", "--model", str(model_copy), *ONE_PLUS_ONE, "--debug"]) == 2
    err = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("tracelib: error: ") and "config.json" in err.splitlines()[-1]


def test_hub_model_without_network_is_one_line(capfd):
    # conftest sets HF_HUB_OFFLINE, so load_model refuses at once instead of retrying for 20 s.
    assert main(["trace", "--model", "gpt2", *ONE_PLUS_ONE]) == 2
    assert "'gpt2'" in error_line(capfd.readouterr().err)


@pytest.mark.parametrize(
    "error, expected",
    [
        (RuntimeError("could not load 'm'\nline one\nline two"), "could not load 'm' line one line two"),
        (OSError("first\n  second"), "first second"),
        (KeyError("rows"), "KeyError: 'rows'"),  # a bare key means nothing without its class
    ],
)
def test_any_exception_becomes_one_line(monkeypatch, capfd, error, expected):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("tracelib.load_model", fail)
    assert main(["trace", *ONE_PLUS_ONE]) == 2
    assert error_line(capfd.readouterr().err) == f"tracelib: error: {expected}"


def test_html_refuses_a_missing_folder(tmp_path, capfd):
    path = tmp_path / "no" / "such" / "report.html"
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(path)]) == 2
    line = error_line(capfd.readouterr().err)
    assert "does not exist" in line and str(path.parent) in line
    assert not (tmp_path / "no").exists()


def test_html_refuses_a_foreign_file_without_force(tmp_path, capfd):
    path = tmp_path / "notes.html"
    path.write_text("hello")
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(path)]) == 2
    assert "--force" in error_line(capfd.readouterr().err)
    assert path.read_text() == "hello"
    assert main(["trace", *ONE_PLUS_ONE, "--html", str(path), "--force"]) == 0
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_html_overwrites_its_own_report_and_keeps_the_mode(tmp_path, mode):
    path = tmp_path / "report.html"
    path.write_text(REPORT + "old")
    path.chmod(mode)
    write_atomically(path, REPORT + "new")
    assert path.read_text() == REPORT + "new" and mode_of(path) == mode
    assert no_temp_files(tmp_path)


def test_html_new_file_follows_the_umask(tmp_path):
    umask = os.umask(0o027)
    try:
        write_atomically(tmp_path / "report.html", REPORT)
    finally:
        os.umask(umask)
    assert mode_of(tmp_path / "report.html") == 0o640  # 0o666 & ~umask, not mkstemp's 0o600


def test_html_writes_through_a_symlink(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "reports" / "report.html"
    target.write_text(REPORT + "old")
    link = tmp_path / "links" / "latest.html"
    link.symlink_to(os.path.relpath(target, link.parent))
    write_atomically(link, REPORT + "new")
    assert link.is_symlink() and target.read_text() == REPORT + "new"
    assert no_temp_files(tmp_path / "reports", tmp_path / "links")
