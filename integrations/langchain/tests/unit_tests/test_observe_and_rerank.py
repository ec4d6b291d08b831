"""The callback handlers (observe-only), the cross-encoder in CrossEncoderReranker, the parser."""

from __future__ import annotations

import asyncio
import logging

import pytest
from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
from langchain_core.documents import Document
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, Generation

from capplug.errors import FeedbackError
from langchain_capplug import (
    AsyncCappyScoreCallbackHandler,
    BestGenerationParser,
    CappyCrossEncoder,
    CappyReranker,
    CappyScoreCallbackHandler,
    ScoreRecord,
)

from .fakes import BrokenScorer, ChoicesChatModel, KeywordScorer, Script


def test_every_generation_is_scored_and_the_result_is_untouched():
    records: list[ScoreRecord] = []
    handler = CappyScoreCallbackHandler(scorer=KeywordScorer(), sink=records)
    model = ChoicesChatModel(script=Script(["Lyon.", "Paris.", "London."]))
    result = model.generate(
        [[HumanMessage("Capital of France?")], [HumanMessage("Capital of England?")]],
        n=3,
        callbacks=[handler],
    )
    assert [g.text for g in result.generations[0]] == ["Lyon.", "Paris.", "London."]
    # generate() makes one run per prompt: one record each, with that run's id
    assert len(records) == 2 and records[0].run_id != records[1].run_id
    first = next(r for r in records if r.instruction == "Capital of France?")
    assert first.responses == [g.text for g in result.generations[0]]
    assert first.responses[first.best] == "Paris."
    assert first.scores[first.best] == max(first.scores)
    assert first.fused[first.best] == max(first.fused)  # the selection core's choice


def test_invoke_with_the_handler_in_config_scores_once_per_run():
    records = []
    model = ChoicesChatModel(script=Script(["Paris."]))
    reply = model.invoke(
        "Capital of France?",
        config={"callbacks": [CappyScoreCallbackHandler(scorer=KeywordScorer(), sink=records)]},
    )
    assert reply.content == "Paris." and len(records) == 1 and records[0].scores == [0.9]


def test_a_failing_scorer_never_breaks_the_call(caplog):
    model = ChoicesChatModel(script=Script(["Paris."]))
    handler = CappyScoreCallbackHandler(scorer=BrokenScorer(), sink=[])
    with caplog.at_level(logging.ERROR, logger="langchain_capplug.callbacks"):
        reply = model.invoke("Capital of France?", config={"callbacks": [handler]})
    assert reply.content == "Paris."
    assert "could not score" in caplog.text


def test_logger_and_function_sinks(caplog):
    seen = []
    model = ChoicesChatModel(script=Script(["Paris."]))
    handler = CappyScoreCallbackHandler(scorer=KeywordScorer(), sink=seen.append)
    model.invoke("Capital of France?", config={"callbacks": [handler]})
    assert isinstance(seen[0], ScoreRecord)
    log = logging.getLogger("test.scores")
    with caplog.at_level(logging.INFO, logger="test.scores"):
        model.invoke(
            "Capital of France?",
            config={"callbacks": [CappyScoreCallbackHandler(scorer=KeywordScorer(), sink=log)]},
        )
    assert '"scores": [0.9]' in caplog.text
    with pytest.raises(TypeError, match="sink"):
        CappyScoreCallbackHandler(scorer=KeywordScorer(), sink=42)


def test_async_handler_scores_in_async_runs():
    records = []
    handler = AsyncCappyScoreCallbackHandler(scorer=KeywordScorer(), sink=records)
    model = ChoicesChatModel(script=Script(["Lyon.", "Paris."]))

    async def run():
        return await model.ainvoke("Capital of France?", config={"callbacks": [handler]}, n=2)

    reply = asyncio.run(run())
    assert reply.content == "Lyon."  # invoke keeps the first choice; the handler only watches
    assert records[0].responses == ["Lyon.", "Paris."] and records[0].best == 1


def test_the_reranker_keeps_the_best_documents_with_their_relevance_scores():
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.retrievers import BaseRetriever

    docs = [
        Document(page_content="Lyon is a large city.", metadata={"source": "a"}),
        Document(page_content="Paris is the capital of France.", metadata={"source": "b"}),
        Document(page_content="A short one.", metadata={"source": "c"}),
    ]

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return docs

    reranker = CappyReranker(scorer=KeywordScorer(), top_n=2)
    retriever = ContextualCompressionRetriever(base_compressor=reranker, base_retriever=Fixed())
    kept = retriever.invoke("Capital of France?")
    assert [d.metadata["source"] for d in kept] == ["b", "a"]
    assert kept[0].metadata["relevance_score"] > kept[1].metadata["relevance_score"]
    assert "relevance_score" not in docs[1].metadata  # the retrieved documents are not changed
    assert reranker.compress_documents([], "q") == []
    with pytest.raises(ValueError):
        CappyReranker(scorer=KeywordScorer(), top_n=0)


def test_cross_encoder_orders_documents_in_cross_encoder_reranker():
    reranker = CrossEncoderReranker(model=CappyCrossEncoder(scorer=KeywordScorer()), top_n=2)
    docs = [
        Document(page_content="Lyon is a large city."),
        Document(page_content="Paris is the capital of France."),
        Document(page_content="A short one."),
    ]
    kept = reranker.compress_documents(docs, "What is the capital of France?")
    assert [d.page_content for d in kept] == [
        "Paris is the capital of France.",
        "Lyon is a large city.",
    ]
    encoder = CappyCrossEncoder(scorer=KeywordScorer())
    assert encoder.score([]) == []
    with pytest.raises(TypeError, match="pair"):
        encoder.score([("only one",)])


def test_cross_encoder_with_a_real_checkpoint(tiny_scorer):
    encoder = CappyCrossEncoder(scorer=tiny_scorer)
    pairs = [("capital of france", "paris"), ("capital of france", "london")]
    scores = encoder.score(pairs)
    assert scores == pytest.approx(tiny_scorer.score_pairs(pairs))
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_best_generation_parser():
    parser = BestGenerationParser(instruction="Capital of France?", scorer=KeywordScorer())
    generations = [Generation(text="Lyon."), ChatGeneration(message=AIMessage(content="Paris."))]
    assert parser.parse_result(generations) == "Paris."
    assert parser.invoke(AIMessage(content="Lyon.")) == "Lyon."
    other = parser.for_instruction("Capital of England?")
    assert other.scorer is parser.scorer and other.instruction == "Capital of England?"
    with pytest.raises(OutputParserException):
        parser.parse_result([])


def test_the_parser_chooses_through_the_selection_core():
    from capplug.selection import Combiner, Reranker

    def generation(text: str, logprob: float) -> ChatGeneration:
        content = [{"token": text, "logprob": logprob}]
        metadata = {"logprobs": {"content": content}}
        return ChatGeneration(message=AIMessage(content=text, response_metadata=metadata))

    by_logprob = Reranker(
        KeywordScorer(), combiner=Combiner({"logprob": {"logprob": 1.0}}), signals=("logprob",)
    )
    parser = BestGenerationParser(instruction="Capital of France?", scorer=by_logprob)
    # The scorer prefers "Paris."; the generator's log-probabilities, the only signal, do not.
    generations = [generation("Paris.", -4.0), generation("Lyon.", -0.5)]
    assert parser.parse_result(generations) == "Lyon."


def test_a_chat_model_labels_scorer_training_data(tmp_path):
    import pyarrow.parquet as pq

    from capplug.data import parse_task
    from capplug.data.build import build_dataset
    from langchain_capplug.data import ChatModelCandidateSource

    task = "anachronisms"  # a train task; its examples here are made up
    examples = [{"input": f"q{i}", "target": f"answer {i}"} for i in range(3)]
    loaded = parse_task(task, {"name": "t", "description": "d", "examples": examples})
    script = Script(["answer 1", "something else"])
    source = ChatModelCandidateSource(ChoicesChatModel(script=script), n=2)
    build_dataset(
        tmp_path, source=source, tasks=[task], progress=False, task_loader=lambda n: loaded
    )
    rows = pq.read_table(tmp_path / "shards" / f"{task}.parquet").to_pylist()
    sampled = [r for r in rows if r["source"] == "sampled"]
    assert len(script.calls) == 3 and all(c["n"] == 2 for c in script.calls)
    assert {r["response"] for r in sampled} == {"answer 1", "something else"}
    assert all("temperature=0.9" in r["generator"] for r in sampled)
    hit = next(r for r in sampled if r["example_id"] == 1 and r["response"] == "answer 1")
    assert hit["label"] == 1.0


def test_observed_generations_are_recorded_judged_and_forwarded_to_langsmith(tmp_path):
    class LangSmith:  # what the handler calls on a langsmith.Client
        def __init__(self, fail: bool = False) -> None:
            self.calls, self.fail = [], fail

        def create_feedback(self, run_id, key, **fields):
            if self.fail:
                raise ConnectionError("LangSmith is down")
            self.calls.append((run_id, key, fields))

    records: list[ScoreRecord] = []
    client = LangSmith()
    handler = CappyScoreCallbackHandler(
        scorer=KeywordScorer(), sink=records, feedback=tmp_path / "f.sqlite3", langsmith=client
    )
    model = ChoicesChatModel(script=Script(["Lyon.", "Paris.", "London."]))
    model.generate([[HumanMessage("Capital of France?")]], n=3, callbacks=[handler])
    (record,) = records
    assert record.selection_id is not None
    stored = handler.feedback.selection(record.selection_id)
    assert stored["candidates"] == record.responses and stored["chosen"] == record.best
    handler.judge(record.selection_id, preferred=0, source="reviewer")
    (run_id, key, fields) = client.calls[0]
    assert run_id == record.run_id and key == "capplug"
    assert fields["score"] == float(record.best == 0) and fields["value"] == 0
    assert fields["extra"] == {"selection_id": record.selection_id, "kind": "preferred"}
    # LangSmith failing loses nothing: the judgement is stored all the same.
    handler._scoring.langsmith = LangSmith(fail=True)
    handler.judge(record.selection_id, reference="Paris.")
    kinds = [j["kind"] for j in handler.feedback.selection(record.selection_id)["judgements"]]
    assert kinds == ["preferred", "reference"]
    with pytest.raises(ValueError, match="feedback=True"):
        CappyScoreCallbackHandler(scorer=KeywordScorer()).judge("sel_x", label=1.0)
    with pytest.raises(TypeError, match=r"langsmith\.Client"):
        CappyScoreCallbackHandler(scorer=KeywordScorer(), langsmith=object())


def test_judging_through_the_handler_tells_its_auto_adapter(tmp_path):
    from capplug.feedback import FeedbackStore
    from capplug.training.auto_adapt import AutoAdapter

    class Watching(AutoAdapter):  # what the handler tells it, without training anything
        def notify(self, selection_id):
            self.told = [*getattr(self, "told", []), selection_id]

    records: list[ScoreRecord] = []
    feedback = FeedbackStore(tmp_path / "f.sqlite3")
    auto = Watching(feedback, task_scorers=None, out_root=tmp_path / "runs")
    handler = CappyScoreCallbackHandler(
        scorer=KeywordScorer(), sink=records, feedback=feedback, auto_adapt=auto
    )
    model = ChoicesChatModel(script=Script(["Lyon.", "Paris."]))
    model.generate([[HumanMessage("Capital of France?")]], n=2, callbacks=[handler])
    (record,) = records
    handler.judge(record.selection_id, preferred=1)
    assert auto.told == [record.selection_id]
    with pytest.raises(FeedbackError):  # a judgement refused is not passed on
        handler.judge(record.selection_id, preferred=7)
    assert auto.told == [record.selection_id]
    auto.close()
    with pytest.raises(TypeError, match=r"must be a capplug\.training\.auto_adapt\.AutoAdapter"):
        CappyScoreCallbackHandler(scorer=KeywordScorer(), feedback=feedback, auto_adapt=8)
    with pytest.raises(ValueError, match="record selections"):
        CappyScoreCallbackHandler(scorer=KeywordScorer(), auto_adapt=auto)
