"""CappyRerank with capplug's bundled scorer inside a real LlamaIndex query engine."""

from __future__ import annotations

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.postprocessor.capplug import CappyRerank

from capplug import Scorer

pytestmark = pytest.mark.integration

QUESTION = "Which city is the capital of Australia?"
DOCUMENTS = [
    "Bananas are rich in potassium and grow in tropical climates.",
    "The Great Barrier Reef lies off the coast of Queensland.",
    "Canberra is the capital city of Australia, chosen as a compromise between Sydney and "
    "Melbourne.",
    "Paris is the capital of France.",
    "A good sourdough needs a lively starter and a long, cool rise.",
]


def test_a_query_engine_answers_from_the_nodes_the_scorer_ranks_first() -> None:
    scorer = Scorer()
    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in DOCUMENTS], embed_model=MockEmbedding(embed_dim=8)
    )
    engine = index.as_query_engine(
        llm=MockLLM(),
        similarity_top_k=len(DOCUMENTS),  # the retriever returns everything; the scorer chooses
        node_postprocessors=[CappyRerank(top_n=2, scorer=scorer)],
    )
    response = engine.query(QUESTION)
    kept = [n.node.get_content() for n in response.source_nodes]
    # The engine answers from the two documents the scorer rates highest, best first, each with
    # its score (up to bfloat16's rounding, which moves with the batch a pair lands in).
    scores = dict(zip(DOCUMENTS, scorer.score(QUESTION, DOCUMENTS), strict=True))
    assert kept == sorted(DOCUMENTS, key=lambda d: -scores[d])[:2]
    assert [n.score for n in response.source_nodes] == pytest.approx(
        [scores[d] for d in kept], abs=1e-3
    )


def test_the_default_scorer_loads_by_reference_and_names_itself() -> None:
    rerank = CappyRerank(scorer="capplug-default")
    assert rerank.model.startswith("capplug:capplug-default")
    assert isinstance(rerank.scorer, Scorer)
