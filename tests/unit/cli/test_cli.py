"""The capplug command: scoring, bulk JSONL, model commands, one-line errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from capplug import Scorer
from capplug.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_score_prints_a_ranked_table(
    tiny_bert_scorer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "score",
        "--model",
        str(tiny_bert_scorer),
        "--instruction",
        "capital of france ?",
        "--response",
        "paris",
        "--response",
        "lyon",
    )
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "#", "response"]
    assert len(lines) == 3
    scores = [float(line.split()[1]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)


def test_score_json_matches_the_api(
    tiny_bert_scorer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "score",
        "--json",
        "--model",
        str(tiny_bert_scorer),
        "--instruction",
        "capital ?",
        "--response",
        "paris",
        "--response",
        "lyon",
    )
    assert code == 0
    ranked = json.loads(out)
    expected = Scorer.from_pretrained(tiny_bert_scorer).rank("capital ?", ["paris", "lyon"])
    assert [r["index"] for r in ranked] == [r.index for r in expected]
    assert ranked[0]["score"] == pytest.approx(expected[0].score, abs=1e-6)


def test_bulk_jsonl_streams_rows_back_with_scores(
    tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"id": i, "instruction": "capital of france ?", "responses": ["paris", "lyon"]}
        for i in range(70)
    ] + [{"id": "chat", "instruction": [{"role": "user", "content": "hi"}], "response": "hello"}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    code, out, _ = run(capsys, "score", "--model", str(tiny_bert_scorer), "--input", str(source))
    assert code == 0
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert all(len(g["scores"]) == 2 for g in got[:-1])
    assert 0.0 <= got[-1]["score"] <= 1.0
    assert got[0]["scores"] == pytest.approx(got[69]["scores"], abs=1e-6)


def test_bulk_from_stdin_reports_the_bad_line_after_writing_the_good_ones(
    tiny_bert_scorer: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = [json.dumps({"instruction": "q", "response": "a"})] * 64
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join([*good, "{broken"]) + "\n"))
    code, out, err = run(capsys, "score", "--model", str(tiny_bert_scorer), "--input", "-")
    assert code == 2
    assert len(out.splitlines()) == 64  # the first full chunk was already written
    assert (
        err.strip()
        == "capplug: error: <stdin>:65: not valid JSON (Expecting property name enclosed in double quotes)"
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["score", "--instruction", "q"], "at least one --response"),
        (["score", "--input", "x.jsonl", "--instruction", "q"], "cannot be combined"),
        (["score", "--input", "/no/such/file.jsonl"], "cannot read"),
        (
            ["score", "--model", "/no/such/model", "--instruction", "q", "--response", "a"],
            "does not exist",
        ),
        (["models", "path", "no-such-model"], "unknown model"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("capplug: error:") and fragment in err


def test_bad_row_fields_are_reported_with_their_line(
    tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"instruction": "q", "responses": []}) + "\n")
    code, _, err = run(capsys, "score", "--model", str(tiny_bert_scorer), "--input", str(source))
    assert code == 2 and f"{source}:1:" in err and "non-empty list" in err


def test_models_list_shows_the_packaged_models(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0
    names = {row["name"] for row in json.loads(out)}
    assert {"minilm", "mpnet", "smollm2-135m-instruct"} <= names


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--help"],
        ["score", "--help"],
        ["models", "--help"],
        ["models", "fetch", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage: capplug" in capsys.readouterr().out


def test_adapt_trains_on_reference_rows_and_reports_before_and_after(
    tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = []
    for i in range(40):
        question = f"what is {i % 5} plus one ?"
        rows.append({"instruction": question, "response": "the answer is one", "label": 1.0})
        rows.append(
            {"instruction": question, "response": "cat dog", "reference": "the answer is one"}
        )
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_dir = tmp_path / "adapted"
    adapt = ("adapt", "--scorer", str(tiny_bert_scorer), "--data", str(data), "--out", str(out_dir))
    code, _, err = run(capsys, *adapt, "--rank-weight", "-1")
    assert code == 2 and "--rank-weight must be >= 0" in err and not out_dir.exists()
    code, out, _ = run(
        capsys,
        *adapt,
        "--epochs",
        "1",
        "--heldout",
        "0.3",
        "--rank-weight",
        "0.5",
        "--device",
        "cpu",
    )
    assert code == 0
    assert "held-out before training: loss" in out and "rank_loss" in out
    assert "guard: " in out  # the adapted scorer is compared with the starting one
    assert set(json.loads((out_dir / "guard.json").read_text())) >= {"use", "reason", "examples"}
    summary = json.loads((out_dir / "training_summary.json").read_text())
    assert summary["metrics_before"]["loss"] > 0 and summary["train_pairs"] > 0
    assert summary["config"]["rank_weight"] == 0.5
    assert Scorer.from_pretrained(out_dir).score("what is 1 plus one ?", ["the answer is one"])
    saved = (out_dir / "model.safetensors").read_bytes()
    # Other settings into the same folder are refused, and the finished model is untouched.
    code, _, err = run(capsys, *adapt, "--epochs", "2")
    assert code != 0 and "nothing was changed" in err
    assert (out_dir / "model.safetensors").read_bytes() == saved


def test_fit_selector_learns_that_agreement_tracks_quality_and_writes_the_weights(
    tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from capplug.selection import Reranker

    checkpoint = tmp_path / "mine"
    shutil.copytree(tiny_bert_scorer, checkpoint)
    rows = []
    for i in range(30):  # the majority answer is the right one; the odd ones out are wrong
        right, wrong = f"answer {i}", f"nonsense {i} {i + 1}"
        rows.append(
            {
                "instruction": f"question {i}",
                "candidates": [right, right, wrong, f"other {i}", right],
                "quality": [1.0, 1.0, 0.0, 0.0, 1.0],
                "group": f"task{i % 3}",
            }
        )
    data = tmp_path / "sets.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = run(
        capsys,
        "fit-selector",
        "--data",
        str(data),
        "--scorer",
        str(tiny_bert_scorer),
        "--into",
        str(checkpoint),
    )
    assert code == 0, err
    assert "wrote" in out and "fused 1.000" in out
    ranker = Reranker(str(checkpoint))
    weights = ranker.combiner.weights_for(["scorer", "agreement", "length"])
    assert weights["agreement"] > 0.5
    assert ranker.select("q", ["x", "y y", "y y"]).response == "y y"

    # Options judged by a local LM: the log-likelihood picks the right one here; --judged
    # fits the judged table and leaves the main one as it was.
    judged_rows = [
        {
            "instruction": f"question {i}",
            "candidates": [f"yes {i}", f"no {i}", f"maybe {i}"],
            "quality": [0.0, 1.0, 0.0],
            "logprobs": [-5.0 - i % 2, -1.0, -7.0],
            "group": f"task{i % 3}",
        }
        for i in range(30)
    ]
    data.write_text("\n".join(json.dumps(r) for r in judged_rows) + "\n")
    main_before = Reranker(str(checkpoint)).combiner.weights
    code, out, err = run(
        capsys,
        "fit-selector",
        "--data",
        str(data),
        "--scorer",
        str(tiny_bert_scorer),
        "--into",
        str(checkpoint),
        "--judged",
    )
    assert code == 0, err
    assert "(judged table)" in out
    after = Reranker(str(checkpoint)).combiner
    assert after.weights == main_before
    assert after.weights_for(["scorer", "logprob"], judged=True)["logprob"] > 0.5
    # and a later fit of the main table keeps the judged one
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = run(
        capsys,
        "fit-selector",
        "--data",
        str(data),
        "--scorer",
        str(tiny_bert_scorer),
        "--into",
        str(checkpoint),
    )
    assert code == 0, err
    assert Reranker(str(checkpoint)).combiner.judged == after.judged


def test_fit_selector_names_a_bad_line(tiny_bert_scorer: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "sets.jsonl"
    args = ("fit-selector", "--data", str(data), "--scorer", str(tiny_bert_scorer))
    data.write_text('{"instruction": "q", "candidates": ["a", "b"], "quality": [1, 0]}\n{oops\n')
    code, _, err = run(capsys, *args, "--into", str(tiny_bert_scorer))
    assert code == 2 and "line 2: not JSON" in err
    data.write_text('{"instruction": "q", "candidates": ["a", "b"], "quality": [1]}\n')
    code, _, err = run(capsys, *args, "--into", str(tiny_bert_scorer))
    assert code == 2 and "row 1: quality must have one value per candidate" in err


def test_the_command_starts_without_loading_torch() -> None:
    import subprocess
    import sys

    probe = "import sys, capplug.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["proxy", "--help"], ["serve", "proxy", "--help"]),
        (["adapters", "list", "--help"], ["store", "list", "--help"]),
    ],
)
def test_commands_answer_under_both_their_names(
    capsys: pytest.CaptureFixture[str], first: list[str], second: list[str]
) -> None:
    helps = []
    for argv in (first, second):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        helps.append(capsys.readouterr().out.split("\n\n", 1)[1])  # past the usage lines
    assert helps[0] == helps[1]


def test_store_commands_run_under_capplug_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "store", "list", "--store", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err and out == ""


def test_adapt_from_feedback_trains_on_judged_selections_and_guards_them(
    tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capplug.feedback import FeedbackStore

    db = tmp_path / "feedback.sqlite3"
    out_dir = tmp_path / "adapted"
    adapt = ("adapt", "--scorer", str(tiny_bert_scorer), "--from-feedback", "--out", str(out_dir))
    code, _, err = run(capsys, *adapt, "--db", str(db))
    assert code == 2 and "no feedback store" in err
    store = FeedbackStore(db)
    code, _, err = run(capsys, *adapt, "--db", str(db))
    assert code == 2 and "no judged selection yet" in err and not out_dir.exists()
    for i in range(30):
        sid = store.record(f"what is {i % 5} plus one ?", ["cat dog", "the answer is one"], 0)
        store.add(sid, preferred=1)
    code, out, _ = run(capsys, *adapt, "--db", str(db), "--epochs", "1", "--heldout", "0.3")
    assert code == 0 and "guard: " in out
    report = json.loads((out_dir / "guard.json").read_text())
    assert report["examples"] > 0 and isinstance(report["use"], bool)
    again = ("--out", str(tmp_path / "again"), "--epochs", "1", "--heldout", "0.3", "--json")
    code, out, _ = run(capsys, *adapt[:-2], "--db", str(db), *again)
    summary = json.loads(out)  # one JSON object, nothing else on standard output
    assert code == 0 and summary["steps"] > 0 and summary["guard"]["examples"] > 0
    code, _, err = run(capsys, "adapt", "--data", "x.jsonl", "--db", str(db), "--out", "o")
    assert code == 2 and "--db goes with --from-feedback" in err


def test_version_log_level_and_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import capplug

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # --quiet sets it; restored afterwards
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == (
        f"capplug {capplug.__version__}"
    )
    with pytest.raises(SystemExit):
        main(["--log-level", "loud", "models", "list"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    assert main(["--quiet", "models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
