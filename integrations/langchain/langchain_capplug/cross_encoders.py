"""capplug's scorer as a LangChain cross-encoder, and a parser that picks the best generation."""

from __future__ import annotations

from typing import Any

from langchain_core.cross_encoders import BaseCrossEncoder
from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import BaseGenerationOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from langchain_capplug._sampling import candidate_text
from langchain_capplug._selection import load_reranker, load_scorer, message_logprobs

__all__ = ["BestGenerationParser", "CappyCrossEncoder"]


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
        texts = [
            candidate_text(g.message) if isinstance(g, ChatGeneration) else g.text for g in result
        ]
        found = [
            message_logprobs(g.message) if isinstance(g, ChatGeneration) else None for g in result
        ]
        have = all(f is not None for f in found)
        chosen = self._reranker.select(
            self.instruction,
            texts,
            logprobs=[f[0] for f in found] if have else None,  # type: ignore[index]
            token_counts=[f[1] for f in found] if have else None,  # type: ignore[index]
        )
        return texts[chosen.index]

    @property
    def _type(self) -> str:
        return "capplug_best_generation"
