"""Every surface chooses through the one selection path: the same candidates with the same
signals get the same choice, scores and metadata through the Reranker, the proxy, CappyBestOfN,
the LangChain callback handler, LlamaIndex's CappyRerank and the MCP ``select`` tool."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
from fake_upstream import LookupScorer, Upstream, completion, ok, post, proxy

from capplug.adapters.task_scorers import TaskScorerChoice
from capplug.feedback import FeedbackStore
from capplug.llms.collect import Collected
from capplug.selection import Combiner, Reranker

QUESTION = "What is the capital of France?"
# "Paris. " repeats "Paris." up to whitespace: scored once, counted twice for agreement.
CANDIDATES = ["Paris.", "It is Lyon.", "Paris. ", "London, I think."]
DISTINCT = ["Paris.", "It is Lyon.", "London, I think."]
# Each candidate's token log-probabilities, as an OpenAI choice carries them.
TOKENS = [[-0.2, -0.1], [-0.9, -0.8, -1.5], [-0.2, -0.1], [-2.0, -0.5, -0.7, -1.0]]
WEIGHTS = Combiner(
    {
        "agreement+logprob+scorer": {"scorer": 1.0, "agreement": 0.5, "logprob": 0.8},
        "agreement+scorer": {"scorer": 1.0, "agreement": 0.5},
    }
)
TASK_INFO = {"used": True, "id": "task-1", "guard": {"use": True}}
# What each surface leaves in the feedback store as the surface that chose.
SURFACES = {
    "Reranker": "python",
    "proxy": "proxy",
    "CappyBestOfN": "langchain",
    "callback handler": "langchain",
    "CappyRerank": "llamaindex",
    "MCP select": "mcp",
}


class TaskStore:
    """What capplug.adapters.TaskScorers.find answers: one task scorer, allowed by its guard."""

    def __init__(self, scorer: LookupScorer) -> None:
        self.scorer = scorer
        self.asked: list[Any] = []

    def find(self, task: Any) -> TaskScorerChoice:
        self.asked.append(task)
        return TaskScorerChoice(self.scorer, dict(TASK_INFO))


class Setup:
    """A fresh scorer (its weights in its config, as a checkpoint keeps them), the task scorer
    that scores in its place, and a feedback store: what every surface is built from."""

    def __init__(self, tmp_path: Path) -> None:
        self.scorer = LookupScorer({"Paris.": 0.3, "It is Lyon.": 0.6})  # the default's view
        config = SimpleNamespace(capplug_selection=WEIGHTS.to_config())
        self.scorer.model = SimpleNamespace(config=config)
        self.task_scorer = LookupScorer(
            {"Paris.": 0.7, "It is Lyon.": 0.8, "London, I think.": 0.1}
        )
        self.tasks = TaskStore(self.task_scorer)
        self.feedback = FeedbackStore(tmp_path / "feedback.sqlite3")

    def reranker(self) -> Reranker:
        return Reranker(self.scorer, task_scorers=self.tasks, feedback=self.feedback)


def _logprobs(tokens: list[float]) -> dict[str, Any]:
    return {"content": [{"token": f"t{i}", "logprob": v} for i, v in enumerate(tokens)]}


def _reranker(setup: Setup, with_logprobs: bool) -> dict[str, Any]:
    sums = [sum(t) for t in TOKENS] if with_logprobs else None
    counts = [len(t) for t in TOKENS] if with_logprobs else None
    chosen = setup.reranker().select(QUESTION, CANDIDATES, logprobs=sums, token_counts=counts)
    return chosen.metadata()


def _proxy(setup: Setup, with_logprobs: bool) -> dict[str, Any]:
    def answer(request: httpx2.Request) -> httpx2.Response:
        reply = completion(CANDIDATES)
        for choice, tokens in zip(reply["choices"], TOKENS, strict=True):
            choice["logprobs"] = _logprobs(tokens) if with_logprobs else None
        return httpx2.Response(200, json=reply)

    options = {"n": 4, "task_scorers": setup.tasks, "feedback": setup.feedback}
    with proxy(Upstream(answer), setup.scorer, **options) as client:
        chat = {"model": "m", "messages": [{"role": "user", "content": QUESTION}]}
        return ok(post(client, chat))["capplug"]


def _chat_model(with_logprobs: bool) -> Any:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    class Candidates(BaseChatModel):
        """A chat model with an ``n`` setting that answers the candidates, in order."""

        n: int = 1

        @property
        def _llm_type(self) -> str:
            return "fake-candidates"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            replies = []
            for text, tokens in zip(CANDIDATES, TOKENS, strict=True):
                metadata = {"logprobs": _logprobs(tokens)} if with_logprobs else {}
                replies.append(AIMessage(content=text, response_metadata=metadata))
            return ChatResult(generations=[ChatGeneration(message=m) for m in replies])

    return Candidates()


def _best_of_n(setup: Setup, with_logprobs: bool) -> dict[str, Any]:
    from langchain_capplug import CappyBestOfN

    best = CappyBestOfN(llm=_chat_model(with_logprobs), scorer=setup.reranker(), n=4)
    return best.invoke(QUESTION).response_metadata["capplug"]


def _callback_handler(setup: Setup, with_logprobs: bool) -> dict[str, Any]:
    from langchain_core.messages import HumanMessage

    from langchain_capplug import CappyScoreCallbackHandler

    records: list[Any] = []
    handler = CappyScoreCallbackHandler(setup.reranker(), records, feedback=setup.feedback)
    _chat_model(with_logprobs).generate([[HumanMessage(QUESTION)]], callbacks=[handler])
    (record,) = records
    assert record.best == record.metadata["chosen"]
    assert record.scores == record.metadata["signals"]["scorer"]
    return record.metadata


def _cappy_rerank(setup: Setup, with_logprobs: bool) -> dict[str, Any]:
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.callbacks.base_handler import BaseCallbackHandler
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.capplug import CappyRerank

    ended: list[dict[str, Any]] = []

    class Events(BaseCallbackHandler):
        def __init__(self) -> None:
            super().__init__([], [])

        def on_event_start(self, event_type, payload=None, event_id="", parent_id="", **kw):
            return event_id

        def on_event_end(self, event_type, payload=None, event_id="", **kw):
            ended.append(payload or {})

        def start_trace(self, trace_id=None):
            pass

        def end_trace(self, trace_id=None, trace_map=None):
            pass

    rerank = CappyRerank(
        top_n=4, scorer=setup.reranker(), callback_manager=CallbackManager([Events()])
    )
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}")) for i, t in enumerate(CANDIDATES)]
    kept = rerank.postprocess_nodes(nodes, query_str=QUESTION)
    (meta,) = [p["capplug"] for p in ended if "capplug" in p]
    assert [n.node.node_id for n in kept] == [f"n{i}" for i in _order(meta)]
    assert [n.score for n in kept] == [meta["signals"]["scorer"][i] for i in _order(meta)]
    return meta


def _mcp_select(setup: Setup, with_logprobs: bool) -> dict[str, Any]:
    pytest.importorskip("mcp")
    from capplug.serve.mcp import create_mcp_server

    server = create_mcp_server(scorer=setup.reranker())
    arguments: dict[str, Any] = {"instruction": QUESTION, "candidates": CANDIDATES}
    if with_logprobs:  # the tool takes sums only, which is all these weights use
        arguments["logprobs"] = [sum(t) for t in TOKENS]
    result = asyncio.run(server.call_tool("select", arguments))
    # mcp 1.x answers (content, structured); 2.x a CallToolResult
    answer = result[1] if isinstance(result, tuple) else result.structured_content
    assert answer["index"] == answer["capplug"]["chosen"]
    assert answer["selection_id"] == answer["capplug"]["selection_id"]
    return answer["capplug"]


def _order(meta: dict[str, Any]) -> list[int]:
    """The order capplug hands candidates back in: the chosen one, the other distinct answers
    best first, then repeats (Selection.order)."""
    keys = [" ".join(t.split()) for t in CANDIDATES]
    repeat = [keys[i] in keys[:i] for i in range(len(keys))]
    others = (i for i in range(len(keys)) if i != meta["chosen"])
    return [meta["chosen"], *sorted(others, key=lambda i: (repeat[i], -meta["scores"][i]))]


RUN: dict[str, Callable[[Setup, bool], dict[str, Any]]] = {
    "Reranker": _reranker,
    "proxy": _proxy,
    "CappyBestOfN": _best_of_n,
    "callback handler": _callback_handler,
    "CappyRerank": _cappy_rerank,
    "MCP select": _mcp_select,
}
NEEDS = {  # the integration packages some surfaces live in (optional installs)
    "CappyBestOfN": "langchain_capplug",
    "callback handler": "langchain_capplug",
    "CappyRerank": "llama_index.postprocessor.capplug",
}
CASES = [(surface, False) for surface in RUN] + [
    (surface, True)
    for surface in RUN
    if surface != "CappyRerank"  # nodes carry no logprobs
]


@pytest.mark.parametrize(
    ("surface", "with_logprobs"),
    CASES,
    ids=[f"{s}-{'logprobs' if lp else 'no-logprobs'}" for s, lp in CASES],
)
def test_every_surface_gives_the_same_choice_scores_and_metadata(
    tmp_path: Path, surface: str, with_logprobs: bool
) -> None:
    if surface in NEEDS:
        pytest.importorskip(NEEDS[surface])
    expected = _reranker(Setup(tmp_path / "reference"), with_logprobs)
    setup = Setup(tmp_path / "surface")
    got = RUN[surface](setup, with_logprobs)

    # The choosing half of the metadata is the same everywhere (the proxy and the LangChain
    # models add the collecting half and their own keys); only the recorded id differs.
    choosing = {k: got[k] for k in expected if k != "selection_id"}
    assert choosing == {k: v for k, v in expected.items() if k != "selection_id"}
    assert not set(Collected().metadata(4)) & set(expected)
    assert ("logprob" in got["signals"]) is with_logprobs
    assert json.loads(json.dumps(got)) == got
    # One rule for repeats: the task scorer (found by the task, in place of the default) was
    # asked once, for the distinct texts, with the question as the text it reads.
    assert setup.tasks.asked == [QUESTION]
    assert setup.task_scorer.calls == [(QUESTION, DISTINCT)] and setup.scorer.calls == []
    assert got["task_scorer"] == TASK_INFO
    # Recorded once, from the typed selection, as the surface that chose.
    recorded = setup.feedback.selection(got["selection_id"])
    assert recorded["surface"] == SURFACES[surface]
    assert recorded["candidates"] == CANDIDATES and recorded["chosen"] == got["chosen"]
    assert recorded["scores"] == pytest.approx(got["scores"], abs=1e-6)
    assert setup.feedback.stats()["selections"] == 1
