"""CappyRerank with a fake scorer: order, top_n, scores, retrieval scores, events, bad input."""

from __future__ import annotations

import pytest
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.postprocessor.capplug import CappyRerank

QUERY = "capital of australia"


class OverlapScorer:
    """Scores a text by the share of the query's words it contains."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def score(self, instruction: str, responses: list[str]) -> list[float]:
        self.calls.append((instruction, list(responses)))
        words = set(instruction.split())
        return [len(words & set(r.lower().strip(".").split())) / len(words) for r in responses]


def nodes(*texts: str) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=1.0 - i / 10)
        for i, t in enumerate(texts)
    ]


TEXTS = (
    "Sydney is the largest city.",
    "The capital of Australia is Canberra.",
    "Kangaroos live in Australia.",
    "Paris is in France.",
)


def test_nodes_come_back_best_first_with_the_scorers_scores() -> None:
    scorer = OverlapScorer()
    rerank = CappyRerank(top_n=2, scorer=scorer)
    kept = rerank.postprocess_nodes(nodes(*TEXTS), query_str=QUERY)
    assert [n.node.node_id for n in kept] == ["n1", "n2"]
    assert [n.score for n in kept] == pytest.approx([1.0, 1 / 3])
    assert scorer.calls == [(QUERY, list(TEXTS))]  # one call for all nodes
    assert isinstance(rerank, BaseNodePostprocessor)


def test_retrieval_scores_are_kept_on_request_and_the_input_is_untouched() -> None:
    given = nodes(*TEXTS)
    kept = CappyRerank(
        top_n=4, scorer=OverlapScorer(), keep_retrieval_score=True
    ).postprocess_nodes(given, query_str=QUERY)
    assert kept[0].node.metadata["retrieval_score"] == pytest.approx(0.9)
    assert all("retrieval_score" not in n.node.metadata for n in given)
    assert [n.score for n in given] == pytest.approx([1.0, 0.9, 0.8, 0.7])


def test_ties_keep_the_retrievers_order() -> None:
    kept = CappyRerank(top_n=4, scorer=OverlapScorer()).postprocess_nodes(
        nodes("nothing here", "none either", "capital"), query_str=QUERY
    )
    assert [n.node.node_id for n in kept] == ["n2", "n0", "n1"]


def test_metadata_meant_for_embedding_is_scored_with_the_text() -> None:
    node = TextNode(text="It is Canberra.", metadata={"topic": "capital of australia"})
    scorer = OverlapScorer()
    CappyRerank(scorer=scorer).postprocess_nodes([NodeWithScore(node=node)], query_str=QUERY)
    assert "capital of australia" in scorer.calls[0][1][0]


def test_no_nodes_and_no_query() -> None:
    rerank = CappyRerank(scorer=OverlapScorer())
    assert rerank.postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(ValueError, match="needs the query"):
        rerank.postprocess_nodes(nodes("a"))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CappyRerank(top_n=0, scorer=OverlapScorer())
    with pytest.raises(TypeError, match="score"):
        CappyRerank(scorer=object())


def test_a_scorer_that_loses_nodes_is_an_error() -> None:
    class Short:
        def score(self, instruction: str, responses: list[str]) -> list[float]:
            return [0.5]

    with pytest.raises(ValueError, match="1 scores for 2 candidates"):
        CappyRerank(scorer=Short()).postprocess_nodes(nodes("a", "b"), query_str=QUERY)


def test_rerank_events_reach_the_instrumentation_dispatcher() -> None:
    seen: list[str] = []

    class Handler(BaseEventHandler):
        def handle(self, event: object, **kwargs: object) -> None:
            seen.append(type(event).__name__)

    root = get_dispatcher()
    handler = Handler()
    root.add_event_handler(handler)
    try:
        CappyRerank(scorer=OverlapScorer()).postprocess_nodes(nodes(*TEXTS), query_str=QUERY)
    finally:
        root.event_handlers.remove(handler)
    assert seen.count("ReRankStartEvent") == 1 and seen.count("ReRankEndEvent") == 1


@pytest.mark.asyncio  # also when run from the repository root, whose settings are not auto
async def test_the_async_path_gives_the_same_nodes() -> None:
    rerank = CappyRerank(top_n=2, scorer=OverlapScorer())
    kept = await rerank.apostprocess_nodes(nodes(*TEXTS), query_bundle=QueryBundle(QUERY))
    assert [n.node.node_id for n in kept] == ["n1", "n2"]
