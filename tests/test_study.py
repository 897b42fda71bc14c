"""tl.study: robustness studies over prompt sets, streamed to Parquet, resumable, split across processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tracelib as tl
import tracelib.studies.store as store
from tracelib.studies.result import wilson_interval

REPO = Path(__file__).resolve().parents[1]
ITEMS = [
    ("what is 1 + 1", " 2"),
    ("what is 3 + 4", " 7"),
    ("what is 2 + 2", " 4"),
    ("what is 9 - 5", " 4"),
    ("what is 6 + 3", " 9"),
]
INJECTIONS = ["junk:after:2", "random:before:1", "typo:between:1"]
SPEC = dict(injections=INJECTIONS, seeds=(0, 1), shard_size=2, batch_size=8)


@pytest.fixture(scope="module")
def done(tiny, tmp_path_factory):
    """One uninterrupted study: the rows every other run must reproduce."""
    return tl.study(tiny, ITEMS, out=tmp_path_factory.mktemp("study") / "s", **SPEC)


def frame_without_folder(study) -> pd.DataFrame:
    return study.frame.reset_index(drop=True)


# --- items and specs -------------------------------------------------------------------------


def test_arithmetic_items_are_the_seed_task():
    items = tl.arithmetic_items()
    # 100 sums, and the 55 differences that are not negative (the bundled model never saw one).
    assert len(items) == 100 + 55
    assert (items[0].prompt, items[0].answer) == ("what is 0 + 0", " 0")
    assert {(i.prompt, i.answer) for i in items} >= {("what is 1 + 1", " 2"), ("what is 9 - 5", " 4")}
    for item in items:
        a, op, b = item.prompt.removeprefix("what is ").split()
        assert int(item.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    assert len(tl.arithmetic_items(phrasings=[0, "{a} {w} {b} is"], operands=range(3), ops="+")) == 18
    assert any(i.prompt == "2 plus 1 is" for i in tl.arithmetic_items(phrasings=["{a} {w} {b} is"], ops="+"))
    with pytest.raises(tl.StudySpecError, match=r"only \+ and - are known"):
        tl.arithmetic_items(ops="*")


def test_items_come_from_pairs_jsonl_csv_and_datasets(tmp_path):
    pairs = [("what is 1 + 1", " 2"), ("what is 3 + 4", " 7")]
    expected = tl.read_items(pairs)
    assert [(i.prompt, i.answer) for i in expected] == pairs
    assert tl.read_items([{"prompt": p, "answer": a} for p, a in pairs]) == expected
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in pairs) + "\n\n")
    assert tl.read_items(jsonl) == expected
    csv_file = tmp_path / "items.csv"
    pd.DataFrame(pairs, columns=["prompt", "answer"]).to_csv(csv_file, index=False)
    assert tl.read_items(str(csv_file)) == expected  # the answer's leading space survives the CSV
    datasets = pytest.importorskip("datasets")
    assert (
        tl.read_items(datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "answer": [a for _, a in pairs]}))
        == expected
    )


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('{"prompt": "what is 1 + 1", "answer": " 2"}\nnot json\n', ".jsonl", r"line 2: not JSON"),
        ('{"prompt": "what is 1 + 1", "answer": 2}\n', ".jsonl", r"line 1: answer must be a non-empty string, got 2"),
        ("question,answer\nwhat is 1 + 1, 2\n", ".csv", r"no prompt column"),
        ("", ".csv", r"no prompt or answer column"),
        ("prompt,answer\n", ".csv", r"the study has no items"),
        ("prompt\tanswer\n", ".tsv", r"a \.jsonl or \.csv file"),
    ],
)
def test_a_bad_items_file_is_named(tmp_path, content, suffix, message):
    path = tmp_path / f"items{suffix}"
    path.write_text(content)
    with pytest.raises(tl.StudySpecError, match=message):
        tl.read_items(path)


def test_bad_items_and_missing_files(tmp_path):
    with pytest.raises(tl.StudySpecError, match="does not exist"):
        tl.read_items(tmp_path / "nope.jsonl")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(tl.StudySpecError, match="FIFO"):
        tl.read_items(fifo)  # refused from fstat, never blocks
    with pytest.raises(tl.StudySpecError, match=r"item 1: expected a \(prompt, answer\) pair"):
        tl.read_items([("a", " 1"), "b"])
    with pytest.raises(tl.StudySpecError, match="pass \\(prompt, answer\\) pairs"):
        tl.read_items(3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("junk", "write it as kind:where:n"),
        ("noise:after:2", "unknown kind 'noise'"),
        ("junk:inside:2", "unknown place 'inside'"),
        ("junk:after:0", "n must be a positive integer"),
        ("junk:after:two", "n must be a positive integer"),
        (3, "an injection is a string"),
    ],
)
def test_a_bad_injection_spec_says_what_to_write(spec, message):
    with pytest.raises(tl.StudySpecError, match=message):
        tl.parse_injection(spec)


def test_injection_specs_read_as_inject_takes_them():
    s = tl.parse_injection("junk:after:2")
    assert (s.kind, s.where, s.n, str(s)) == ("junk", "after", 2, "junk:after:2")
    assert str(tl.parse_injection("repeat:before_final")) == "repeat:before_final:1"


# --- what a study computes ---------------------------------------------------------------------


def test_one_row_per_item_injection_and_seed(done):
    frame = done.frame
    assert len(frame) == len(ITEMS) * len(INJECTIONS) * 2 and done.complete
    assert list(zip(frame["item"], frame["injection"], frame["seed"])) == [
        (i, inj, seed) for i in range(len(ITEMS)) for inj in INJECTIONS for seed in (0, 1)
    ]
    assert frame["shard"].tolist() == [i // 2 for i in frame["item"]]
    for column in ("prompt", "answer", "injection", "seed", "clean_metric", "corrupted_metric", "readable_clean",
                   "readable_corrupted"):  # fmt: skip
        assert column in frame.columns
    assert done.features and all(c in frame.columns for c in (store.FEATURE + f for f in done.features))
    # "between" needs a word between the operands: these prompts have only "+", so typo rows say why.
    typo = frame[frame["injection"] == "typo:between:1"]
    assert typo["error"].str.startswith("inject: ").all() and typo["clean_metric"].isna().all()
    assert frame.loc[frame["injection"] != "typo:between:1", "error"].isna().all()


def test_rows_match_the_single_prompt_tools(tiny, done):
    # Every row is what trace + inject + damage_report give for that one prompt by hand.
    frame = done.frame[done.frame["error"].isna()]
    for _, row in frame.iloc[[0, 3, 5, len(frame) - 1]].iterrows():
        clean = tl.trace(tiny, row["prompt"], row["answer"])
        kind, where, n = row["injection"].split(":")
        inj = tl.inject(tiny, row["prompt"], kind, where, int(n), int(row["seed"]), answer=row["answer"])
        assert inj.prompt == row["corrupted_prompt"]
        corrupted = tl.trace(tiny, inj.prompt, row["answer"], distractors=clean.rows[0].distractors)
        report = tl.damage_report(clean, corrupted)
        scale = 1e-5 * max(1.0, abs(float(clean.margin.logit_diff[0])))
        assert row["clean_metric"] == pytest.approx(float(clean.margin.logit_diff[0]), abs=scale)
        assert row["corrupted_metric"] == pytest.approx(float(corrupted.margin.logit_diff[0]), abs=scale)
        assert row["clean_rank"] == int(clean.margin.rank[0]) and row["corrupted_rank"] == int(corrupted.margin.rank[0])
        assert row["readable_corrupted"] == bool(corrupted.margin.prob[0] > 0.5)
        labels = {f: row[store.FEATURE + f] for f in done.features if row[store.FEATURE + f] is not None}
        assert labels == dict(zip(report.features, report.statuses))
        assert (row["survives"], row["damaged"], row["unreadable"]) == tuple(
            report.counts()[s] for s in ("survives", "damaged", "unreadable")
        )


def test_survival_counts_the_frame(done):
    table = done.survival()
    ok = done.frame[done.frame["error"].isna()]
    for _, r in table.iterrows():
        labels = ok.loc[ok["injection"] == r["injection"], store.FEATURE + r["feature"]].dropna()
        assert r["n"] == len(labels) and r["survives"] == (labels == "survives").sum()
        assert r["survives"] + r["damaged"] + r["unreadable"] == r["n"]
        assert r["low"] <= r["rate"] <= r["high"] and r["rate"] == pytest.approx(r["survives"] / r["n"])
    assert set(table["injection"]) == {"junk:after:2", "random:before:1"}  # typo never applied


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I: 81/263 and 15/148, 95% Wilson intervals.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_summary_plot_and_repr(done):
    text = done.summary()
    assert f"{len(ITEMS)} items x 3 injections x 2 seed(s) = {len(done.frame)} rows" in text
    assert "typo:between:1: no item has a place for it" in text
    fig = done.plot()
    heat = fig.data[0]
    table = done.survival()
    assert list(heat.x) == INJECTIONS and len(heat.y) == len(done.features)
    first = table.iloc[0]
    y = list(heat.y).index(tl.plotting.component_label(first["feature"]))
    assert heat.z[y][INJECTIONS.index(first["injection"])] == pytest.approx(first["rate"])
    assert "Wilson" in fig.layout.title.text and "Study(tiny-arith" in repr(done)


# --- on disk: resumable, refused when it does not match, checked on load ------------------------


def test_a_rerun_skips_completed_shards(tiny, done, monkeypatch):
    import tracelib.studies.run as run

    def never(*args, **kwargs):
        raise AssertionError("a completed shard ran again")

    monkeypatch.setattr(run, "run_shard", never)
    again = tl.study(tiny, ITEMS, out=done.folder, **SPEC)
    pd.testing.assert_frame_equal(again.frame, done.frame)


def test_an_interrupted_study_completes_with_the_same_rows(tiny, done, tmp_path, monkeypatch):
    import tracelib.studies.run as run

    out = tmp_path / "s"
    real = store.write_shard
    written = []

    def dies_after_two(folder, shard, rows, patching):
        if len(written) == 2:  # killed while writing the third shard: its temporary file is left behind
            (folder / f".rows-{shard:05d}.parquet.tmp-dead").write_bytes(b"PAR1 half")
            raise KeyboardInterrupt
        real(folder, shard, rows, patching)
        written.append(shard)

    monkeypatch.setattr(run.store, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        tl.study(tiny, ITEMS, out=out, **SPEC)
    partial = tl.load_study(out)
    assert partial.missing_shards == (2,) and len(partial.frame) == 4 * 6  # the half-written shard is not read
    monkeypatch.setattr(run.store, "write_shard", real)
    resumed = tl.study(tiny, ITEMS, out=out, **SPEC)
    pd.testing.assert_frame_equal(resumed.frame, done.frame)


def test_a_killed_process_resumes_to_the_same_rows(tiny, done, tmp_path):
    # A real SIGKILL at some moment of the run (after the first shard is on disk), then a rerun.
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in ITEMS))
    out = tmp_path / "s"
    args = [sys.executable, "-m", "tracelib", "study", "--prompts", str(items), "--out", str(out), "--seeds", "0,1",
            "--shard-size", "2", "--batch-size", "8"] + [a for i in INJECTIONS for a in ("--inject", i)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "rows-00000.parquet").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (out / "manifest.json").exists()
    assert proc.returncode != 0, "the study ended before it could be killed"
    # The command line's spec is SPEC, so the rerun (here in this process) resumes the same study.
    pd.testing.assert_frame_equal(tl.study(tiny, ITEMS, out=out, **SPEC).frame, done.frame)


def test_another_spec_or_model_is_refused_by_name(tiny, other, done, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(done.folder, out)
    with pytest.raises(tl.StudyMismatchError, match=r"spec\.seeds: \[0, 1\] in the folder, \[0\] now"):
        tl.study(tiny, ITEMS, out=out, **{**SPEC, "seeds": (0,)})
    with pytest.raises(tl.StudyMismatchError, match=r"spec\.items_sha256.*spec\.n_items: 5 in the folder, 4 now"):
        tl.study(tiny, ITEMS[:4], out=out, **SPEC)
    with pytest.raises(tl.StudyMismatchError, match=r"model\.weights_fingerprint: '[0-9a-f]+' in the folder"):
        tl.study(other, ITEMS, out=out, **SPEC)
    assert tl.load_study(out).frame.equals(done.frame)  # nothing was touched
    fresh = tl.study(tiny, ITEMS[:1], out=out, **{**SPEC, "seeds": (0,)}, overwrite=True)
    assert len(fresh.frame) == 3 and sorted(p.name for p in out.iterdir()) == ["manifest.json", "rows-00000.parquet"]


def test_a_folder_with_the_users_files_is_never_used_or_emptied(tiny, done, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    with pytest.raises(tl.StudyFolderError, match="holds notes.md, but no study manifest"):
        tl.study(tiny, ITEMS, out=mine, **SPEC)
    study_dir = tmp_path / "s"
    shutil.copytree(done.folder, study_dir)
    (study_dir / "notes.md").write_text("mine")
    with pytest.raises(tl.StudyFolderError, match="also holds notes.md, which tracelib did not write"):
        tl.study(tiny, ITEMS, out=study_dir, **SPEC, overwrite=True)
    assert (mine / "notes.md").read_text() == (study_dir / "notes.md").read_text() == "mine"
    assert len(tl.load_study(study_dir).frame) == len(done.frame)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(tl.StudyFolderError, match="is a file"):
        tl.study(tiny, ITEMS, out=file, **SPEC)


def _rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b"not parquet"), "not a readable Parquet file"),
        (
            lambda p: _rewrite(
                p,
                lambda t: t.set_column(
                    t.schema.get_field_index("clean_metric"),
                    "clean_metric",
                    pa.array([str(x) for x in t["clean_metric"].to_pylist()]),
                ),
            ),
            "column 'clean_metric' should be double, found string",
        ),  # fmt: skip
        (lambda p: _rewrite(p, lambda t: t.append_column("evil", pa.array([1] * len(t)))), "'evil' is not part"),
        (lambda p: _rewrite(p, lambda t: t.drop(["seed"])), "column 'seed' should be int64, found nothing"),
        (lambda p: _rewrite(p, lambda t: t.set_column(1, "item", pa.array([4] * len(t), pa.int64()))), "another shard"),
        (lambda p: (p.unlink(), p.symlink_to("/etc/passwd")), "symbolic link"),
    ],
)
def test_a_damaged_shard_is_refused_on_load(done, tmp_path, damage, message):
    out = tmp_path / "s"
    shutil.copytree(done.folder, out)
    damage(out / "rows-00000.parquet")
    with pytest.raises(tl.StudyFolderError, match=message):
        tl.load_study(out)


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("not json", "is not JSON"),
        ('{"kind": "something-else"}', "not a tracelib study manifest"),
        ('{"kind": "tracelib-study", "format": 99}', "study format 99"),
        ('{"kind": "tracelib-study", "format": 1, "spec": []}', "field 'spec'"),
    ],
)
def test_a_damaged_manifest_is_refused(done, tmp_path, manifest, message):
    out = tmp_path / "s"
    shutil.copytree(done.folder, out)
    (out / "manifest.json").write_text(manifest)
    with pytest.raises(tl.StudyFolderError, match=message):
        tl.load_study(out)
    with pytest.raises(tl.StudyFolderError, match="has no manifest.json"):
        tl.load_study(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(injections=[]), "give at least one"),
        (dict(injections=["junk:after:2", "junk:after:2"]), "distinct"),
        (dict(injections=["junk:after:2"], seeds=(0, 0)), "seeds must be distinct"),
        (dict(injections=["junk:after:2"], seeds=("0",)), "seeds must be ints"),
        (dict(injections=["junk:after:2"], patch="everything"), "patch: "),
        (dict(injections=["junk:after:2"], shard_size=0), "shard_size must be a positive int"),
    ],
)
def test_a_bad_spec_fails_before_anything_is_written(tiny, tmp_path, kwargs, message):
    with pytest.raises(tl.StudySpecError, match=message):
        tl.study(tiny, ITEMS, out=tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def test_an_item_whose_answer_is_not_a_token_is_named_up_front(tiny, tmp_path):
    named = r"item 1 \('what is 3 \+ 4' -> ' 😀'\): The answer ' 😀' splits into tokens"
    with pytest.raises(tl.StudySpecError, match=named):
        tl.study(tiny, [ITEMS[0], ("what is 3 + 4", " 😀")], injections=["junk:after:2"], out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


# --- patching ------------------------------------------------------------------------------------


def test_patching_summaries_match_the_sweep(tiny, tmp_path):
    # junk:after:3 moves these two answers by several logits (strong); junk:after:2 barely moves "1 + 1" (weak).
    pairs = [("what is 2 - 2", " 0"), ("what is 1 + 1", " 2")]
    spec = dict(injections=["junk:after:3", "junk:after:2"], patch="resid_pre", patch_grid=True)
    s = tl.study(tiny, pairs, out=tmp_path / "s", **spec)
    p = s.patching
    assert len(p) == 2 * 2 * tiny.cfg.n_layers
    for item, injection in [(i, j) for i in range(2) for j in spec["injections"]]:
        prompt, answer = pairs[item]
        kind, where, n = injection.split(":")
        inj = tl.inject(tiny, prompt, kind, where, int(n), 0, answer=answer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tl.WeakCorruptionWarning)  # the study records it as weak_effect
            sweep = tl.patch(tiny, inj.clean_prompt, inj.prompt, answer, alignment=inj)
        rows = p[(p["item"] == item) & (p["injection"] == injection)].sort_values("layer")
        for layer, (_, row) in enumerate(rows.iterrows()):
            values = sweep.values[layer].double()
            first = min(inj.injected)
            assert (values[:first].nan_to_num(0.0) == 0).all()  # before the injection both runs are the same
            best = first + int(values[first:].nan_to_num(-math.inf).argmax())
            assert row["max_recovery"] == pytest.approx(float(values[best]), abs=1e-5)
            assert row["max_position"] == best and row["max_token"] == sweep.str_tokens[best]
            assert row["final_recovery"] == pytest.approx(float(values[-1]), abs=1e-5)
            assert row["weak_effect"] == sweep.weak_effect
            torch.testing.assert_close(torch.tensor(row["grid"]), values, equal_nan=True, atol=1e-5, rtol=1e-5)
            where = "final" if best == len(values) - 1 else "after_injection"
            assert row["max_at"] == ("none" if values[best] < 1e-3 else where)
    local = s.localisation()
    strong = p[~p["weak_effect"]]
    assert len(strong) and local["sweeps"].sum() == len(strong) and local["weak_sweeps"].sum() == p["weak_effect"].sum()
    for _, cell in local[local["sweeps"] > 0].iterrows():
        mine = strong[(strong["injection"] == cell["injection"]) & (strong["layer"] == cell["layer"])]
        assert cell["mean_max_recovery"] == pytest.approx(mine["max_recovery"].mean())
        assert cell["final"] == pytest.approx((mine["max_at"] == "final").mean())
        assert cell["final"] + cell["after_injection"] + cell["none"] == pytest.approx(1.0)
    assert local.loc[local["sweeps"] == 0, ["final", "after_injection", "none"]].isna().all().all()


# --- command line and processes ------------------------------------------------------------------


def test_cli_bad_spec_and_file_are_one_line(tmp_path, capsys):
    from tracelib.__main__ import main

    assert main(["study", "--prompts", "arithmetic", "--inject", "junk:inside:2", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "tracelib: error: injection 'junk:inside:2': unknown place 'inside'; "
        "choose one of before, between, after, before_final"
    )
    assert (
        main(
            ["study", "--prompts", str(tmp_path / "none.csv"), "--inject", "junk:after:2", "--out", str(tmp_path / "s")]
        )
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["study", "--prompts", "arithmetic", "--inject", "junk:after:2", "--seeds", "0,x", "--out", "s"]) == 2
    assert "--seeds: write integers" in capsys.readouterr().err


def test_accelerate_two_processes_give_the_single_process_frame(done, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in ITEMS))
    out = tmp_path / "s"
    # accelerate 1.16's `--cpu` launcher starts one process unless MPI is set up; `--multi_gpu` goes
    # through torchrun, and without CUDA the processes meet over gloo on the CPU (MULTI_CPU).
    launch = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    study = ["-m", "tracelib", "study", "--prompts", str(items), "--out", str(out), "--seeds", "0,1"]
    study += ["--shard-size", "2", "--batch-size", "8"] + [a for i in INJECTIONS for a in ("--inject", i)]
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(accelerate), *launch, "--dynamo_backend", "no", *study]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran on 2 processes (MULTI_CPU)" in result.stdout
    assert result.stdout.count("Study of tiny-arith") == 1  # the main process alone prints the summary
    pd.testing.assert_frame_equal(tl.load_study(out).frame, done.frame)
