"""capplug's scorer as a LlamaIndex node postprocessor."""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from capplug.scoring import load_scorer

dispatcher = get_dispatcher(__name__)

SURFACE = "llamaindex"
"""What a feedback store records as the surface of the rankings made here."""


class CappyRerank(BaseNodePostprocessor):
    """Reorders retrieved nodes by capplug's scorer and keeps the ``top_n`` best.

    Each kept node's ``score`` becomes the scorer's score in [0, 1] (how well the node answers the
    query); with ``keep_retrieval_score=True`` the retriever's score moves to
    ``metadata["retrieval_score"]``, as ``SentenceTransformerRerank`` does. Nodes are read as
    their embedding text (``MetadataMode.EMBED``). Ties keep the retriever's order.

    Nodes are ranked through capplug's selection path, as every capplug surface chooses: by the
    scorer alone, unless ``scorer`` is a capplug ``Reranker`` (its weights, signals, task
    scorers and feedback store then apply). Repeated nodes (the same text up to whitespace) are
    scored once and come after the distinct ones. The ranking's ``capplug`` metadata is in the
    ``RERANKING`` callback event's end payload, under ``"capplug"``.

    .. code-block:: python

        from llama_index.postprocessor.capplug import CappyRerank

        query_engine = index.as_query_engine(
            similarity_top_k=10, node_postprocessors=[CappyRerank(top_n=3)]
        )

    Args:
        top_n: how many nodes to keep.
        scorer: a capplug ``Scorer``, a scorer reference (a folder, ``capplug-default``, a
            Hugging Face id), anything with ``.score(query, texts)``, a capplug ``Reranker``,
            or ``None`` for capplug's bundled default scorer, which works offline.
        keep_retrieval_score: keep the retriever's score in ``metadata["retrieval_score"]``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    top_n: int = Field(default=3, ge=1, description="How many nodes to keep.")
    keep_retrieval_score: bool = Field(
        default=False, description="Keep the retriever's score in metadata['retrieval_score']."
    )
    model: str = Field(default="", description="The scorer's name, for events and traces.")

    _reranker: Any = PrivateAttr()

    def __init__(
        self,
        top_n: int = 3,
        scorer: Any = None,
        keep_retrieval_score: bool = False,
        **kwargs: Any,
    ) -> None:
        from capplug.selection import SCORER_ONLY, Reranker

        if not isinstance(scorer, Reranker):  # documents: the scorer alone ranks them
            scorer = Reranker(load_scorer(scorer), combiner=SCORER_ONLY)
        name = kwargs.pop("model", None) or _scorer_name(scorer.scorer)
        super().__init__(
            top_n=top_n, keep_retrieval_score=keep_retrieval_score, model=name, **kwargs
        )
        self._reranker = scorer

    @classmethod
    def class_name(cls) -> str:
        return "CappyRerank"

    @property
    def scorer(self) -> Any:
        """The capplug scorer in use."""
        return self._reranker.scorer

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError(
                "CappyRerank needs the query: call postprocess_nodes(nodes, query_str=...) or "
                "use it in a query engine"
            )
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self.model
            )
        )
        if not nodes:
            dispatcher.event(ReRankEndEvent(nodes=[]))
            return []
        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.model,
                EventPayload.QUERY_STR: query_bundle.query_str,
                EventPayload.TOP_K: self.top_n,
            },
        ) as event:
            texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
            path = self._reranker.selector(surface=SURFACE, score_single=True)
            chosen = path.select(query_bundle.query_str, texts)
            kept = []
            for i in chosen.order()[: self.top_n]:
                node = nodes[i].node
                if self.keep_retrieval_score:
                    node = node.model_copy(
                        update={"metadata": {**node.metadata, "retrieval_score": nodes[i].score}}
                    )
                kept.append(NodeWithScore(node=node, score=_node_score(chosen.candidates[i])))
            event.on_end(payload={EventPayload.NODES: kept, "capplug": chosen.metadata()})
        dispatcher.event(ReRankEndEvent(nodes=kept))
        return kept


def _node_score(candidate: Any) -> float:
    """A kept node's score: the scorer's, else (a Reranker without the scorer) the fused one."""
    return float(candidate.signals.get("scorer", candidate.score))


def _scorer_name(scorer: Any) -> str:
    config = getattr(getattr(scorer, "model", None), "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return f"capplug:{name.rstrip('/').rsplit('/', 1)[-1]}" if name else "capplug"
