"""Task scorers in the store: found by task, used only where the guard allowed, reloaded live."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from capplug import Reranker, Scorer
from capplug.adapters.task_scorers import TaskScorers
from capplug.data.rows import LabelledPair
from capplug.errors import AdapterFileError
from capplug.feedback import FeedbackStore
from capplug.models.adapter_folder import ADAPTER_WEIGHTS
from capplug.scoring.guard import GuardReport
from capplug.training.scorer import TrainConfig, train_scorer
from capplug.training.task_scorers import adapt_task_scorers

TASK = "Answer in the house style."
ANSWERS = ["yes the answer is three", "no cat dog sat"]
CHAT = [{"role": "system", "content": TASK}, {"role": "user", "content": "what is two plus one ?"}]
USE = GuardReport(0.2, 0.9, 1.0, 5, True, "the adapted scorer picks better: use it")
REFUSE = GuardReport(
    0.5, 0.4, 1.0, 5, False, "the adapted scorer picks worse: keep the starting one"
)


@pytest.fixture(scope="module")
def base(tiny_bert_scorer: Path) -> Scorer:
    return Scorer.from_pretrained(tiny_bert_scorer)


@pytest.fixture(scope="module")
def flipped(base: Scorer, tiny_bert_scorer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task scorer trained to prefer the answer the base scorer ranks last."""
    scores = base.score(CHAT, ANSWERS)
    wanted = ANSWERS[int(scores[1] < scores[0])]
    pairs = [
        LabelledPair(
            f"system: {TASK}\nuser: what is {i} plus one ?", text, float(text == wanted), f"g{i}"
        )
        for i in range(12)
        for text in ANSWERS
    ]
    out = tmp_path_factory.mktemp("flipped") / "run"
    config = TrainConfig(lora_rank=4, learning_rate=2e-2, batch_size=8, epochs=8, rank_weight=1.0)
    train_scorer(
        Scorer.from_pretrained(tiny_bert_scorer), pairs, out, config=config, progress=False
    )
    return out


def pick(scorer: Scorer) -> str:
    scores = scorer.score(CHAT, ANSWERS)
    return ANSWERS[int(scores[1] > scores[0])]


def test_a_guarded_task_scorer_scores_its_task_and_the_default_scores_the_rest(
    base: Scorer, flipped: Path, tmp_path: Path
) -> None:
    store = TaskScorers(tmp_path, scorer=base)
    store.add(flipped, TASK, guard=USE)
    found = store.find(CHAT)
    assert found.scorer is not None and found.info["used"] is True
    assert found.info["similarity"] == 1.0 and found.info["guard"]["use"] is True
    assert pick(found.scorer) != pick(base)
    other = store.find([{"role": "system", "content": "Translate to German."}, CHAT[1]])
    assert other.scorer is None and "no task scorer within" in other.info["reason"]


def test_the_pick_follows_the_task_scorer_and_the_metadata_says_why(
    base: Scorer, flipped: Path, tmp_path: Path
) -> None:
    store = TaskScorers(tmp_path, scorer=base)
    store.add(flipped, TASK, guard=USE)
    plain = Reranker(base, signals=["scorer"]).select(CHAT, ANSWERS)
    tasked = Reranker(base, signals=["scorer"], task_scorers=store).select(CHAT, ANSWERS)
    assert tasked.index != plain.index
    meta = tasked.metadata()
    assert meta["task_scorer"]["used"] is True
    assert meta["task_scorer"]["guard"]["adapted"] == 0.9
    assert plain.metadata()["task_scorer"] is None


def test_a_task_scorer_the_guard_refused_is_stored_but_not_used(
    base: Scorer, flipped: Path, tmp_path: Path
) -> None:
    store = TaskScorers(tmp_path, scorer=base)
    store.add(flipped, TASK, guard=REFUSE)
    found = store.find(CHAT)
    assert found.scorer is None and found.info["used"] is False
    assert "picks worse" in found.info["reason"]
    assert [entry["guard"]["use"] for entry in store.list()] == [False]
    # A refused one never displaces one in use; a used one replaces the older ones.
    store.add(flipped, TASK, guard=USE)
    store.add(flipped, TASK, guard=REFUSE)
    assert store.find(CHAT).info["used"] is True
    assert sorted(e["guard"]["use"] for e in store.list()) == [False, True]
    store.add(flipped, TASK, guard=USE)
    assert [e["guard"]["use"] for e in store.list()] == [True]


def test_task_scorers_stored_by_another_process_are_used_without_a_restart(
    base: Scorer, flipped: Path, tmp_path: Path
) -> None:
    serving = TaskScorers(tmp_path, scorer=base)
    assert serving.find(CHAT).scorer is None
    TaskScorers(tmp_path, scorer=base).add(flipped, TASK, guard=USE)  # another writer
    assert serving.find(CHAT).scorer is not None


def test_broken_or_foreign_adapters_never_score(
    base: Scorer, flipped: Path, tmp_path: Path
) -> None:
    store = TaskScorers(tmp_path / "store", scorer=base)
    record = store.add(flipped, TASK, guard=USE)
    weights = record.folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-64])
    found = store.find(CHAT)  # the default scores; nothing crashes
    assert found.scorer is None and found.info["used"] is False
    # An LLM adapter (no capplug_kind) is not a task scorer.
    foreign = tmp_path / "foreign"
    shutil.copytree(flipped, foreign)
    from safetensors.torch import load_file, save_file

    save_file(
        load_file(foreign / ADAPTER_WEIGHTS), foreign / ADAPTER_WEIGHTS, metadata={"format": "pt"}
    )
    with pytest.raises(AdapterFileError, match="not a task scorer"):
        store.add(foreign, TASK, guard=USE)


def test_feedback_grouped_by_task_becomes_a_guarded_task_scorer(
    base: Scorer, tiny_bert_scorer: Path, tmp_path: Path
) -> None:
    feedback = FeedbackStore(tmp_path / "feedback.sqlite3")
    wanted = pick(base)
    wanted = ANSWERS[1 - ANSWERS.index(wanted)]  # the house style is what the base ranks last
    for i in range(12):
        chat = [
            {"role": "system", "content": TASK},
            {"role": "user", "content": f"what is {i} plus one ?"},
        ]
        selection = feedback.record(chat, ANSWERS, 0)
        feedback.add(selection, preferred=ANSWERS.index(wanted))
    for _ in range(3):  # another task, too little feedback
        selection = feedback.record([{"role": "system", "content": "Other."}, CHAT[1]], ANSWERS, 0)
        feedback.add(selection, preferred=0)
    store = TaskScorers(tmp_path / "scorers", scorer=base)
    config = TrainConfig(lora_rank=4, learning_rate=2e-2, batch_size=8, epochs=8, rank_weight=1.0)
    results = adapt_task_scorers(
        feedback.rows(), store, tmp_path / "runs", config=config, progress=False, log=lambda _: None
    )
    by_task = {r.task: r for r in results}
    assert by_task["Other."].skipped and "at least 8" in by_task["Other."].skipped
    made = by_task[TASK]
    assert made.guard is not None and made.guard.examples == 3  # 25% of 12 held out
    assert made.used == made.guard.use
    if made.used:
        assert pick(store.find(CHAT).scorer) == wanted


def test_the_proxy_scores_a_task_with_its_task_scorer_and_reports_it(
    base: Scorer, flipped: Path, tmp_path: Path
) -> None:
    import httpx2
    from fake_upstream import Upstream, completion, ok, proxy

    store = TaskScorers(tmp_path, scorer=base)
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(ANSWERS)))
    with proxy(upstream, base, n=2, task_scorers=store) as client:
        before = ok(client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT}))
        assert before["capplug"]["task_scorer"]["used"] is False
        store.add(flipped, TASK, guard=USE)  # stored while the proxy runs
        after = ok(client.post("/v1/chat/completions", json={"model": "m", "messages": CHAT}))
    meta = after["capplug"]
    assert meta["task_scorer"]["used"] is True and meta["task_scorer"]["guard"]["use"] is True
    assert after["choices"][0]["message"]["content"] == pick(store.find(CHAT).scorer)
    assert before["choices"][0]["message"]["content"] == pick(base)


def test_the_scoring_queue_never_mixes_scorers_in_one_call() -> None:
    import asyncio

    from capplug.serve._scoring_queue import ScoringQueue

    class Constant:
        def __init__(self, value: float) -> None:
            self.value, self.calls = value, []

        def score_pairs(self, pairs: list[tuple[str, str]]) -> list[float]:
            self.calls.append(len(pairs))
            return [self.value] * len(pairs)

        def score(self, instruction: str, responses: list[str]) -> list[float]:
            return self.score_pairs([(instruction, r) for r in responses])

    default, task = Constant(0.1), Constant(0.9)
    queue = ScoringQueue(default)

    async def both() -> list[list[float]]:
        return await asyncio.gather(
            queue.score("q", ["a", "b"]),
            queue.score("q", ["c"], scorer=task),
            queue.score("q", ["d"]),
        )

    first, second, third = asyncio.run(both())
    assert first == [0.1, 0.1] and third == [0.1] and second == [0.9]
    assert sum(task.calls) == 1 and sum(default.calls) == 3


def test_the_adapt_and_stats_commands_make_and_show_task_scorers(
    base: Scorer, tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from capplug.cli import main

    db = tmp_path / "feedback.sqlite3"
    feedback = FeedbackStore(db)
    for i in range(10):
        chat = [{"role": "system", "content": TASK}, {"role": "user", "content": f"q {i}"}]
        feedback.add(feedback.record(chat, ANSWERS, 0), preferred=1)
    common = ["--from-feedback", "--db", str(db), "--scorer", str(tiny_bert_scorer)]
    folder = str(tmp_path / "scorers")
    assert main(["adapt", *common, "--instruction-like", TASK]) == 2  # needs --task-scorers
    assert "goes with --task-scorers" in capsys.readouterr().err
    assert main(["adapt", "--data", "x.jsonl", "--task-scorers", folder]) == 2
    assert "--from-feedback" in capsys.readouterr().err
    assert main(["adapt", "--from-feedback", "--db", str(db), "--scorer", "x"]) == 2
    assert "--out" in capsys.readouterr().err
    made = ["adapt", *common, "--task-scorers", folder, "--lora-rank", "4", "--lr", "2e-2"]
    assert main([*made, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (task,) = result["tasks"]
    assert task["task"] == TASK and task["selections"] == 10 and task["guard"]["examples"] == 3
    stats = ["feedback", "stats", "--db", str(db), "--task-scorers", folder]
    assert main([*stats, "--scorer", str(tiny_bert_scorer)]) == 0
    out = capsys.readouterr().out
    assert f"task scorer {task['task_scorer']}" in out
    assert "adapted on 10 judged selections; guard:" in out


def test_proxy_traffic_and_feedback_then_one_command_and_the_next_picks_use_the_task_scorer(
    base: Scorer, tiny_bert_scorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx2
    from fake_upstream import Upstream, completion, ok, proxy

    from capplug.cli import main

    db, folder = tmp_path / "feedback.sqlite3", tmp_path / "scorers"
    store = TaskScorers(folder, scorer=base)
    wanted = ANSWERS[1 - ANSWERS.index(pick(base))]  # the house style: what the base ranks last
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(ANSWERS)))
    with proxy(upstream, base, n=2, feedback=db, task_scorers=store) as client:

        def ask(i: int) -> dict:
            chat = [{"role": "system", "content": TASK}, {"role": "user", "content": f"q {i}"}]
            return ok(client.post("/v1/chat/completions", json={"model": "m", "messages": chat}))

        for i in range(12):
            meta = ask(i)["capplug"]
            judged = {"selection_id": meta["selection_id"], "preferred": ANSWERS.index(wanted)}
            assert client.post("/v1/feedback", json=judged).status_code == 201
        command = ["adapt", "--from-feedback", "--db", str(db), "--scorer", str(tiny_bert_scorer)]
        command += ["--task-scorers", str(folder), "--lora-rank", "4", "--lr", "2e-2"]
        assert main(command) == 0  # the one command, while the proxy runs
        capsys.readouterr()
        after = ask(99)
    meta = after["capplug"]["task_scorer"]
    assert meta["guard"]["examples"] == 3 and "reason" in meta["guard"]
    if meta["used"]:
        assert after["choices"][0]["message"]["content"] == wanted
    else:  # the guard kept the bundled scorer, and says why
        assert meta["reason"].startswith("default scorer:")


TINY_RECIPE = TrainConfig(lora_rank=4, learning_rate=2e-2, batch_size=8, epochs=8, rank_weight=1.0)


def test_with_auto_adapt_the_proxy_adapts_as_feedback_arrives_with_no_command(
    base: Scorer, tmp_path: Path
) -> None:
    import httpx2
    from fake_upstream import Upstream, completion, ok, proxy

    from capplug.training.auto_adapt import AutoAdapter

    feedback, store = (
        FeedbackStore(tmp_path / "feedback.sqlite3"),
        TaskScorers(tmp_path, scorer=base),
    )
    auto = AutoAdapter(feedback, store, every=4, min_selections=8, config=TINY_RECIPE)
    wanted = ANSWERS[1 - ANSWERS.index(pick(base))]
    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(ANSWERS)))
    with proxy(
        upstream, base, n=2, feedback=feedback, task_scorers=store, auto_adapt=auto
    ) as client:

        def ask(i: int) -> dict:
            chat = [{"role": "system", "content": TASK}, {"role": "user", "content": f"q {i}"}]
            return ok(client.post("/v1/chat/completions", json={"model": "m", "messages": chat}))

        def judge(i: int) -> None:
            meta = ask(i)["capplug"]
            judged = {"selection_id": meta["selection_id"], "preferred": ANSWERS.index(wanted)}
            assert client.post("/v1/feedback", json=judged).status_code == 201

        for i in range(7):
            judge(i)
        assert auto.wait() == [] and len(store.store) == 0  # 7 judged: not yet
        judge(7)
        (first,) = auto.wait(timeout=120)  # the 8th started a run in the background
        assert first.selections == 8 and first.record is not None and not auto.errors
        for i in range(8, 11):
            judge(i)
        assert len(auto.wait()) == 1  # 3 more: not yet
        judge(11)
        second = auto.wait(timeout=120)[-1]
        assert second.selections == 12 and len(auto.results) == 2
        after = ask(99)["capplug"]["task_scorer"]
    # A run's guard holds out a quarter of its task's selections: 2 of 8, then 3 of 12 (a
    # refused newer run never displaces an older one in use).
    assert after["guard"]["examples"] in (2, 3)
    if after["used"]:
        assert after["similarity"] == 1.0
    else:
        assert after["reason"].startswith("default scorer:")


def test_with_auto_adapt_a_reranker_adapts_as_it_is_judged(base: Scorer, tmp_path: Path) -> None:
    from capplug.training.auto_adapt import AutoAdapter

    feedback, store = (
        FeedbackStore(tmp_path / "feedback.sqlite3"),
        TaskScorers(tmp_path, scorer=base),
    )
    auto = AutoAdapter(feedback, store, every=4, min_selections=8, config=TINY_RECIPE)
    reranker = Reranker(
        base, signals=["scorer"], feedback=feedback, task_scorers=store, auto_adapt=auto
    )
    assert reranker.auto_adapter is auto
    wanted = ANSWERS.index(ANSWERS[1 - ANSWERS.index(pick(base))])

    def chat(i: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": TASK}, {"role": "user", "content": f"q {i}"}]

    for i in range(8):
        chosen = reranker.select(chat(i), ANSWERS)
        assert chosen.task_scorer is not None and chosen.task_scorer["used"] is False
        stored = reranker.judge(chosen.id, preferred=wanted)
        assert stored.kind == "preferred" and stored.candidate == wanted
    (run,) = auto.wait(timeout=120)  # the 8th judgement started a run in the background
    assert run.selections == 8 and run.record is not None and not auto.errors
    after = reranker.select(chat(99), ANSWERS).task_scorer
    assert after is not None and after["guard"]["examples"] == 2  # a quarter held out
    assert after["used"] is run.used and after["guard"]["selections"] == 8
    auto.close()
    assert store.adapted_on(TASK) == 8 and store.adapted_on("Another task.") is None
    # A restart does not adapt again at once: the store says what the last run saw.
    restarted = AutoAdapter(feedback, store, every=4, min_selections=8, config=TINY_RECIPE)
    reranker.auto_adapter = restarted
    assert restarted.notify(chosen.id) is None
    for i in range(8, 12):
        reranker.judge(reranker.select(chat(i), ANSWERS).id, preferred=wanted)
    (again,) = restarted.wait(timeout=120)  # the 4th new judgement
    assert again.selections == 12 and store.adapted_on(TASK) == 12
    restarted.close()
    with pytest.raises(ValueError, match="records no selections"):
        Reranker(base).judge("sel_x", label=1.0)
    with pytest.raises(TypeError, match="AutoAdapter or None"):
        Reranker(base, feedback=feedback, auto_adapt=8)
    with pytest.raises(ValueError, match="needs the Reranker to record selections"):
        Reranker(base, auto_adapt=auto)


def test_auto_adapt_needs_both_stores_and_a_count(base: Scorer, tmp_path: Path) -> None:
    import httpx2
    from fake_upstream import Upstream, completion, proxy

    from capplug.cli import main
    from capplug.training.auto_adapt import AutoAdapter

    upstream = Upstream(lambda r: httpx2.Response(200, json=completion(ANSWERS)))
    with pytest.raises(ValueError, match="needs the proxy to record selections"):
        proxy(upstream, base, auto_adapt=4)
    with pytest.raises(ValueError, match="give the proxy task_scorers"):
        proxy(upstream, base, feedback=tmp_path / "f.sqlite3", auto_adapt=4)
    elsewhere = AutoAdapter(
        FeedbackStore(tmp_path / "other.sqlite3"), TaskScorers(tmp_path, scorer=base)
    )
    with pytest.raises(ValueError, match="must watch the feedback store the proxy records in"):
        proxy(upstream, base, feedback=tmp_path / "f.sqlite3", auto_adapt=elsewhere)
    elsewhere.close()
    with pytest.raises(TypeError, match="a count"):
        proxy(
            upstream, base, feedback=tmp_path / "f.sqlite3", task_scorers=tmp_path, auto_adapt="4"
        )
    with pytest.raises(ValueError, match="min_selections"):
        AutoAdapter(
            FeedbackStore(tmp_path / "f.sqlite3"),
            TaskScorers(tmp_path, scorer=base),
            min_selections=1,
        )
    assert main(["serve", "proxy", "--upstream", "http://127.0.0.1:9/v1", "--auto-adapt", "4"]) == 2
    # An unknown selection id is logged, never raised: the judgement was stored already.
    auto = AutoAdapter(FeedbackStore(tmp_path / "f.sqlite3"), TaskScorers(tmp_path, scorer=base))
    assert auto.notify("sel_nope") is None
    auto.close()
