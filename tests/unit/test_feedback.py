"""Feedback: recorded selections, judgements, rows for adapt, the proxy's routes, the command."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from fake_upstream import CHAT, LookupScorer, Upstream, completion, ok, post, proxy

from capplug.cli import main
from capplug.data.rows import read_labelled_pairs
from capplug.errors import DuplicateFeedbackError, FeedbackError, UnknownSelectionError
from capplug.feedback import FeedbackStore
from capplug.selection import Combiner, Reranker

QUESTION = "What is the capital of Australia?"
ANSWERS = ["Sydney.", "Canberra.", "Canberra.", "Melbourne."]


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "feedback.sqlite3")


def test_a_selection_is_recorded_and_read_back_with_its_judgements(store: FeedbackStore):
    sid = store.record(QUESTION, ANSWERS, 0, scores=[0.4, 0.3, 0.3, 0.1], model="m")
    assert sid.startswith("sel_") and len(sid) == 28
    judged = store.add(sid, preferred=1, source="tester")
    assert judged.kind == "preferred" and judged.candidate == 1
    found = store.selection(sid)
    assert found["candidates"] == ANSWERS and found["chosen"] == 0 and found["model"] == "m"
    assert [j["kind"] for j in found["judgements"]] == ["preferred"]
    assert store.stats()["judged_selections"] == 1


def test_a_preferred_candidate_becomes_one_row_per_distinct_candidate(store: FeedbackStore):
    sid = store.record(QUESTION, ANSWERS, 0)
    store.add(sid, preferred=0)
    store.add(sid, preferred=2)  # the latest preference wins; "Canberra." twice is one row
    rows = list(store.rows())
    assert [(r["response"], r["label"]) for r in rows] == [
        ("Sydney.", 0.0),
        ("Canberra.", 1.0),
        ("Melbourne.", 0.0),
    ]
    assert {r["group"] for r in rows} == {sid}


def test_labels_and_references_become_rows_adapt_reads(store: FeedbackStore, tmp_path: Path):
    first = store.record(QUESTION, ANSWERS, 0)
    store.add(first, label=0.0)  # the chosen candidate, judged wrong
    store.add(first, label=1.0, candidate=1)
    second = store.record("Capital of France?", ["Paris.", "Lyon."], 1)
    store.add(second, reference="Paris")
    out = tmp_path / "rows.jsonl"
    assert store.export(out) == 4
    pairs = read_labelled_pairs(out)
    labels = {(p.instruction, p.response): p.label for p in pairs}
    assert labels[(QUESTION, "Sydney.")] == 0.0 and labels[(QUESTION, "Canberra.")] == 1.0
    assert labels[("Capital of France?", "Paris.")] > labels[("Capital of France?", "Lyon.")]
    assert len({p.group for p in pairs}) == 2  # one group per selection


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "exactly one of"),
        ({"label": 0.5, "preferred": 1}, "exactly one of"),
        ({"label": 1.5}, "label must be a number in"),
        ({"label": math.nan}, "label must be a number in"),
        ({"label": True}, "label must be a number in"),
        ({"label": 0.5, "candidate": 9}, "candidate must be a candidate index"),
        ({"preferred": -1}, "preferred must be a candidate index"),
        ({"preferred": 1, "candidate": 2}, "'candidate' goes with 'label'"),
        ({"reference": 42}, "reference must be a string"),
    ],
)
def test_bad_judgements_are_refused_and_change_nothing(store: FeedbackStore, options, match):
    sid = store.record(QUESTION, ANSWERS, 0)
    with pytest.raises(FeedbackError, match=match):
        store.add(sid, **options)
    assert store.selection(sid)["judgements"] == []


def test_unknown_selections_and_duplicates_are_refused(store: FeedbackStore):
    with pytest.raises(UnknownSelectionError, match="sel_nope"):
        store.add("sel_nope", label=1.0)
    sid = store.record(QUESTION, ANSWERS, 0)
    store.add(sid, label=1.0)
    with pytest.raises(DuplicateFeedbackError):
        store.add(sid, label=1.0)
    store.add(sid, label=0.0)  # a changed mind is a new judgement, not a duplicate
    assert len(store.selection(sid)["judgements"]) == 2
    with pytest.raises(FeedbackError, match="chosen must be"):
        store.record(QUESTION, ANSWERS, 7)
    with pytest.raises(FeedbackError, match="candidates must hold"):
        store.record(QUESTION, [], 0)
    with pytest.raises(FeedbackError, match="not valid Unicode"):
        store.record(QUESTION, ["\ud800"], 0)


def test_concurrent_writers_lose_nothing(store: FeedbackStore):
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(10):
                sid = store.record(QUESTION, ANSWERS, 0)
                store.add(sid, preferred=1)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = store.stats()
    assert stats["selections"] == 320 and stats["judgements"]["preferred"] == 320


WRITER = """
import sys
from capplug.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1])
while True:
    sid = store.record("q", ["a", "b"], 0)
    store.add(sid, label=1.0)
    print(sid, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_writer_loses_no_committed_write(tmp_path: Path):
    path = tmp_path / "feedback.sqlite3"
    FeedbackStore(path)
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    seen = []
    assert child.stdout is not None
    while len(seen) < 50:
        seen.append(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    seen += [line.strip() for line in child.stdout if line.strip()]
    store = FeedbackStore(path)
    for sid in seen:  # every id the writer reported (after its commit) is there, judged
        assert store.selection(sid)["judgements"][0]["label"] == 1.0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_reranker_with_a_store_records_each_selection(tmp_path: Path):
    scorer = LookupScorer({"Canberra.": 0.9, "Sydney.": 0.2})
    ranker = Reranker(
        scorer, combiner=Combiner({"scorer": {"scorer": 1.0}}), feedback=tmp_path / "f.sqlite3"
    )
    chosen = ranker.select(QUESTION, ["Sydney.", "Canberra."])
    assert chosen.index == 1 and chosen.id is not None
    assert chosen.metadata()["selection_id"] == chosen.id
    assert ranker.feedback.selection(chosen.id)["candidates"] == ["Sydney.", "Canberra."]
    assert (
        Reranker(scorer, combiner=Combiner({"scorer": {"scorer": 1.0}}))
        .select(QUESTION, ["a", "b"])
        .id
        is None
    )


def test_the_proxy_records_answers_and_takes_judgements(store: FeedbackStore):
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Lyon", "Paris", "Nice"])))
    scorer = LookupScorer({"Lyon": 0.2, "Paris": 0.9, "Nice": 0.1})
    with proxy(upstream, scorer, n=3, feedback=store) as client:
        reply = ok(post(client))
        sid = reply["capplug"]["selection_id"]
        assert store.selection(sid)["candidates"] == ["Lyon", "Paris", "Nice"]

        made = client.post("/v1/feedback", json={"selection_id": sid, "preferred": 0})
        assert made.status_code == 201 and made.json()["candidate"] == 0
        again = client.post("/v1/feedback", json={"selection_id": sid, "preferred": 0})
        assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_feedback"
        missing = client.post("/v1/feedback", json={"selection_id": "sel_x", "label": 1})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "selection_not_found"
        bad = client.post("/v1/feedback", json={"selection_id": sid, "label": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "label"
        typo = client.post("/v1/feedback", json={"selection_id": sid, "lable": 1})
        assert typo.status_code == 400 and typo.json()["error"]["param"] == "lable"
        shown = client.get(f"/v1/feedback/{sid}")
        assert shown.status_code == 200 and len(shown.json()["judgements"]) == 1
    assert len(store.selection(sid)["judgements"]) == 1  # the refused ones changed nothing


def test_a_proxy_without_a_store_says_so():
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["a", "b"])))
    with proxy(upstream, n=2) as client:
        assert ok(post(client, CHAT))["capplug"]["selection_id"] is None
        refused = client.post("/v1/feedback", json={"selection_id": "sel_x", "label": 1})
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "feedback_disabled"


def test_the_feedback_command(store: FeedbackStore, tmp_path: Path, capsys):
    sid = store.record(QUESTION, ANSWERS, 0)
    db = str(store.path)
    assert main(["feedback", "add", sid, "--preferred", "1", "--db", db]) == 0
    assert main(["feedback", "add", sid, "--preferred", "1", "--db", db]) == 2  # duplicate
    assert "already stored" in capsys.readouterr().err
    assert main(["feedback", "stats", "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    out = tmp_path / "rows.jsonl"
    assert main(["feedback", "export", "--out", str(out), "--db", db]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["feedback", "stats", "--db", str(tmp_path / "none.sqlite3")]) == 2
    assert "no feedback store" in capsys.readouterr().err


def test_each_selection_keeps_its_task_to_group_feedback_by(store: FeedbackStore):
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi?"}]
    one = store.record(chat, ANSWERS, 0)
    two = store.record(QUESTION, ANSWERS, 0)
    assert store.selection(one)["task"] == "Answer briefly."  # a chat's system message
    assert store.selection(two)["task"] == QUESTION  # else the whole instruction
    store.add(one, preferred=1)
    store.add(two, preferred=1)
    assert {r["task"] for r in store.rows()} == {"Answer briefly.", QUESTION}
    tasks = {t["task"]: t["judged_selections"] for t in store.stats()["tasks"]}
    assert tasks == {"Answer briefly.": 1, QUESTION: 1}


def test_a_store_written_before_tasks_is_opened_and_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE selections (id TEXT PRIMARY KEY, created REAL NOT NULL, surface TEXT "
            "NOT NULL, model TEXT, instruction TEXT NOT NULL, candidates TEXT NOT NULL, chosen "
            "INTEGER NOT NULL, scores TEXT);"
            "INSERT INTO selections VALUES ('sel_old', 1.0, 'proxy', NULL, 'Old question?', "
            '\'["a", "b"]\', 0, NULL);'
        )
    store = FeedbackStore(path)
    assert store.selection("sel_old")["task"] == "Old question?"
    store.add("sel_old", preferred=1)
    assert [r["label"] for r in store.rows()] == [0.0, 1.0]


def test_the_proxy_records_the_system_message_as_the_task(store: FeedbackStore):
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(["Lyon", "Paris"])))
    with proxy(upstream, LookupScorer({"Paris": 0.9}), n=2, feedback=store) as client:
        sid = ok(post(client))["capplug"]["selection_id"]
    assert store.selection(sid)["task"] == CHAT["messages"][0]["content"]
