"""capplug's scorer as a LangChain cross-encoder, and a parser that picks the best generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.cross_encoders import BaseCrossEncoder
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import BaseGenerationOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from langchain_capplug._selection import SURFACE, load_reranker, load_scorer, select

__all__ = ["BestGenerationParser", "CappyCrossEncoder", "CappyReranker"]


class CappyCrossEncoder(BaseCrossEncoder):
    """Scores (query, document) pairs with capplug's scorer, in [0, 1].

    Drops into LangChain's ``CrossEncoderReranker``:

    .. code-block:: python

        from langchain_classic.retrievers.document_compressors import CrossEncoderReranker

        reranker = CrossEncoderReranker(model=CappyCrossEncoder(), top_n=3)
    """

    def __init__(self, scorer: Any = None) -> None:
        self.scorer = load_scorer(scorer)

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        if not text_pairs:
            return []
        pairs = []
        for i, pair in enumerate(text_pairs):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"text_pairs[{i}] must be a (query, text) pair; got {pair!r}")
            pairs.append((pair[0], pair[1]))
        return [float(s) for s in self.scorer.score_pairs(pairs)]


class CappyReranker(BaseDocumentCompressor):
    """Reorders retrieved documents by capplug's scorer and keeps the ``top_n`` best, each with
    its score in ``metadata["relevance_score"]`` (as LangChain's Cohere and Jina rerankers do,
    which ``CrossEncoderReranker`` does not). A drop-in for ``ContextualCompressionRetriever``:

    .. code-block:: python

        retriever = ContextualCompressionRetriever(
            base_compressor=CappyReranker(top_n=3), base_retriever=base
        )

    Documents are ranked through capplug's selection path: by the scorer alone, unless
    ``scorer`` is a capplug ``Reranker`` (its weights and signals then rank them); repeated
    documents (equal up to whitespace) are scored once and come after the distinct ones.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    scorer: Any = None
    top_n: int = Field(default=3, ge=1, description="How many documents to keep.")

    _reranker: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load(self) -> CappyReranker:
        self._reranker = load_reranker(self.scorer, documents=True)
        self.scorer = self._reranker.scorer
        return self

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        if not documents:
            return []
        path = self._reranker.selector(surface=SURFACE, score_single=True)
        chosen = path.select(query, [d.page_content for d in documents])
        return [
            Document(
                page_content=documents[i].page_content,
                metadata={**documents[i].metadata, "relevance_score": _relevance(chosen, i)},
                id=documents[i].id,
            )
            for i in chosen.order()[: self.top_n]
        ]


def _relevance(chosen: Any, i: int) -> float:
    """A document's relevance score: the scorer's score, else (no scorer signal) the fused one."""
    candidate = chosen.candidates[i]
    return float(candidate.signals.get("scorer", candidate.score))


class BestGenerationParser(BaseGenerationOutputParser[str]):
    """Parse several generations for one prompt into the text of the best one, chosen by
    capplug's selection core (the scorer, agreement among the generations, and their
    log-probabilities when every one carries them). ``scorer``: a capplug ``Scorer``, a
    ``Reranker``, a reference, or ``None`` for the default.

    The instruction the generations answer is given at construction (or with
    :meth:`for_instruction`), since a generation parser sees only the generations.

    .. code-block:: python

        result = llm.generate([[HumanMessage(question)]], n=8)
        best = BestGenerationParser(instruction=question).parse_result(result.generations[0])
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    instruction: Any = Field(description="The prompt the generations answer (text or chat).")
    scorer: Any = None

    _reranker: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load(self) -> BestGenerationParser:
        self._reranker = load_reranker(self.scorer)
        return self

    def for_instruction(self, instruction: Any) -> BestGenerationParser:
        """The same parser for another instruction (the scorer is shared, not reloaded)."""
        return self.model_copy(update={"instruction": instruction})

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> str:
        if not result:
            raise OutputParserException("no generations to choose from")
        messages = [
            g.message if isinstance(g, ChatGeneration) else AIMessage(content=g.text)
            for g in result
        ]
        chosen = select(self._reranker, self.instruction, messages, score_tool_calls=True)
        return chosen.response

    @property
    def _type(self) -> str:
        return "capplug_best_generation"
