"""CappyBestOfN with scripted chat models: candidates, choice, failures, tool calls, composition."""

from __future__ import annotations

import asyncio
from unittest.mock import patch

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableBinding

from capplug.llms.retry import RetryPolicy, UpstreamHTTPError
from capplug.selection import METADATA_KEYS
from langchain_capplug import CappyBestOfN

from .fakes import (
    ChoicesChatModel,
    KeywordScorer,
    NamedChoicesChatModel,
    Script,
    SingleChatModel,
)

REPLIES = ["It is Lyon.", "London, I think.", "Paris.", "It is Lyon."]


def quick_retry(**overrides) -> tuple[RetryPolicy, list[float]]:
    sleeps: list[float] = []

    async def async_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    settings = {"max_attempts": 3, "initial_backoff": 0.1, "jitter": 0.0}
    settings.update(overrides)
    return RetryPolicy(sleep=sleeps.append, async_sleep=async_sleep, **settings), sleeps


def test_native_n_asks_once_and_returns_the_best_with_metadata():
    script = Script(REPLIES)
    scorer = KeywordScorer()
    best = CappyBestOfN(llm=ChoicesChatModel(script=script), scorer=scorer, n=4)
    reply = best.invoke("What is the capital of France?")
    assert isinstance(reply, AIMessage) and reply.content == "Paris."
    assert len(script.calls) == 1 and script.calls[0]["n"] == 4
    assert script.calls[0]["temperature"] == 0.8  # a model at temperature 0 is sampled warmer
    meta = reply.response_metadata["capplug"]
    assert meta["n_requested"] == 4 and meta["n_received"] == 4 and meta["failures"] == 0
    assert meta["candidates"] == REPLIES  # every candidate received; repeats count as agreement
    assert meta["candidates"][meta["chosen"]] == "Paris."
    assert meta["scores"][meta["chosen"]] == max(meta["scores"])
    assert set(meta) == set(METADATA_KEYS)  # the schema the proxy reports too
    assert set(meta["signals"]) >= {"scorer", "agreement"} and meta["weights"]
    # The scorer reads the conversation as text, as on every surface (capplug.flatten_chat).
    assert scorer.calls[0][0] == "What is the capital of France?"
    assert scorer.calls[0][1] == ["It is Lyon.", "London, I think.", "Paris."]  # repeat scored once


def test_models_without_n_get_concurrent_calls_and_the_users_model_is_untouched():
    script = Script(REPLIES)
    model = SingleChatModel(script=script, temperature=0.0)
    best = CappyBestOfN(llm=model, scorer=KeywordScorer(), n=4, temperature=0.7)
    reply = best.invoke("What is the capital of France?")
    assert reply.content == "Paris."
    assert len(script.calls) == 4
    assert all(c["temperature"] == 0.7 for c in script.calls)
    assert model.temperature == 0.0


def test_a_shortfall_of_native_choices_is_made_up_by_fan_out():
    script = Script(REPLIES)
    best = CappyBestOfN(
        llm=ChoicesChatModel(script=script, max_choices=2), scorer=KeywordScorer(), n=4
    )
    reply = best.invoke("What is the capital of France?")
    assert [c.get("n") for c in script.calls] == [4, None, None]
    assert reply.response_metadata["capplug"]["n_received"] == 4


def test_failed_candidates_are_counted_and_the_best_of_the_rest_returned():
    script = Script(["Paris.", "Lyon."], failures=[ValueError("bad gateway body")] * 2)
    best = CappyBestOfN(
        llm=SingleChatModel(script=script), scorer=KeywordScorer(), n=4, max_concurrency=1
    )
    reply = best.invoke("Capital of France?")
    meta = reply.response_metadata["capplug"]
    assert reply.content == "Paris."
    assert meta["n_received"] == 2 and meta["failures"] == 2
    assert "bad gateway body" in meta["errors"][0]


def test_too_few_candidates_raise_the_last_error():
    script = Script(["Paris."], failures=[ValueError("first"), ValueError("second")])
    best = CappyBestOfN(
        llm=SingleChatModel(script=script),
        scorer=KeywordScorer(),
        n=3,
        min_candidates=2,
        max_concurrency=1,
    )
    with pytest.raises(ValueError, match="second"):
        best.invoke("Capital of France?")


def test_transient_errors_are_retried_by_the_policy():
    retry, sleeps = quick_retry()
    script = Script(["Paris."], failures=[UpstreamHTTPError(503, "busy", retry_after=2.0)])
    best = CappyBestOfN(
        llm=SingleChatModel(script=script),
        scorer=KeywordScorer(),
        n=2,
        retry=retry,
        max_concurrency=1,
    )
    reply = best.invoke("Capital of France?")
    assert reply.response_metadata["capplug"]["failures"] == 0
    assert len(script.calls) == 3 and sleeps == [2.0]


def test_a_native_call_that_fails_after_retries_is_not_fanned_out():
    retry, _ = quick_retry(max_attempts=2)
    script = Script(["Paris."], failures=[UpstreamHTTPError(500, "down")] * 10)
    best = CappyBestOfN(
        llm=ChoicesChatModel(script=script), scorer=KeywordScorer(), n=4, retry=retry
    )
    with pytest.raises(UpstreamHTTPError):
        best.invoke("Capital of France?")
    assert len(script.calls) == 2  # bounded: the policy's attempts, no fan-out on top


def test_a_native_call_refused_outright_falls_back_to_fan_out():
    script = Script(["Paris.", "Lyon."], failures=[UpstreamHTTPError(400, "n is not supported")])
    best = CappyBestOfN(llm=ChoicesChatModel(script=script), scorer=KeywordScorer(), n=3)
    reply = best.invoke("Capital of France?")
    assert reply.content == "Paris."
    assert len(script.calls) == 4  # the refused native call, then three single calls
    meta = reply.response_metadata["capplug"]
    # A refused n is not a failed candidate: the same schema as the proxy reports.
    assert meta["failures"] == 0 and meta["native_n"] is False and meta["upstream_calls"] == 4


def test_tool_calls_pass_through_unscored_unless_asked():
    call = AIMessage(content="", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "1"}])
    scorer = KeywordScorer()
    best = CappyBestOfN(llm=ChoicesChatModel(script=Script(["Paris.", call])), scorer=scorer, n=2)
    reply = best.invoke("Capital of France?")
    assert reply.tool_calls and reply.response_metadata["capplug"]["scores"] is None
    assert scorer.calls == []

    scored = CappyBestOfN(
        llm=ChoicesChatModel(script=Script(["Lyon.", call])),
        scorer=KeywordScorer(good="search"),
        n=2,
        score_tool_calls=True,
    )
    reply = scored.invoke("Capital of France?")
    assert reply.tool_calls and reply.response_metadata["capplug"]["scores"] is not None


def test_bind_tools_reaches_the_inner_model():
    script = Script(["Paris."])
    best = CappyBestOfN(llm=ChoicesChatModel(script=script), scorer=KeywordScorer(), n=2)
    best.bind_tools(["search"]).invoke("Capital of France?")
    assert script.calls[0]["tools"] == ["search"]


def test_bind_tools_again_replaces_the_tools_and_keeps_other_bound_arguments():
    script = Script(["Paris."])
    inner = ChoicesChatModel(script=script).bind_tools(["old"]).bind(seed=7)
    best = CappyBestOfN(llm=inner, scorer=KeywordScorer(), n=2)
    tooled = best.bind_tools(["search"])
    assert isinstance(tooled, RunnableBinding)  # as a chat model's bind_tools returns
    tooled.invoke("Capital of France?")
    best.bind_tools(["a"]).bind_tools(["b"]).invoke("Capital of France?")
    assert [c["tools"] for c in script.calls] == [["search"], ["b"]]
    assert all(c["seed"] == 7 for c in script.calls)


def test_arguments_bound_to_the_inner_model_reach_it_and_its_traces():
    script = Script(["Paris."])
    model = NamedChoicesChatModel(script=script)
    best = CappyBestOfN(llm=model.bind(stop=["\n"]), scorer=KeywordScorer(), n=2)
    seen = []
    original = NamedChoicesChatModel._generate

    def spy(self, messages, stop=None, run_manager=None, **kwargs):
        seen.append(stop)
        return original(self, messages, stop, run_manager, **kwargs)

    with patch.object(NamedChoicesChatModel, "_generate", spy):
        best.invoke("Capital of France?")
        asyncio.run(best.ainvoke("Capital of France?"))
        best.invoke("Capital of France?", stop=["."])
    assert seen == [["\n"], ["\n"], ["."]]
    params = best._get_ls_params()
    assert params["ls_model_name"] == model.model and params["ls_stop"] == ["\n"]
    assert params["ls_temperature"] == 0.8  # the temperature the candidates are sampled at
    assert best._get_ls_params(model="other")["ls_model_name"] == "other"


def test_async_batch_stream_and_composition():
    scorer = KeywordScorer()
    best = CappyBestOfN(
        llm=SingleChatModel(script=Script(REPLIES)), scorer=scorer, n=4, max_concurrency=1
    )
    one_at_a_time = {"max_concurrency": 1}  # the script hands out replies in order
    assert asyncio.run(best.ainvoke("Capital of France?")).content == "Paris."
    assert [m.content for m in best.batch(["q1", "q2"], one_at_a_time)] == ["Paris.", "Paris."]
    replies = asyncio.run(best.abatch(["q1", "q2"], one_at_a_time))
    assert [m.content for m in replies] == ["Paris.", "Paris."]
    chunks = list(best.stream("Capital of France?"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content for c in chunks if c.content] == ["Paris."]  # one piece, once chosen
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content == "Paris." and "capplug" in merged.response_metadata
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")])
    assert (prompt | best | StrOutputParser()).invoke({"q": "Capital of France?"}) == "Paris."
    # The whole conversation, system prompt included, as the text the scorer reads.
    assert scorer.calls[-1][0] == "system: Be brief.\nuser: Capital of France?"


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(TypeError, match="chat model"):
        CappyBestOfN(llm=StrOutputParser(), scorer=KeywordScorer())
    with pytest.raises(ValueError, match="min_candidates"):
        CappyBestOfN(
            llm=SingleChatModel(script=Script(["x"])), scorer=KeywordScorer(), n=2, min_candidates=3
        )
    with pytest.raises(TypeError, match="scorer"):
        CappyBestOfN(llm=SingleChatModel(script=Script(["x"])), scorer=42)


def test_a_real_scorer_checkpoint_drives_the_choice(tiny_scorer):
    best = CappyBestOfN(llm=SingleChatModel(script=Script(REPLIES)), scorer=tiny_scorer, n=4)
    reply = best.invoke("What is the capital of France?")
    meta = reply.response_metadata["capplug"]
    expected = tiny_scorer.score("What is the capital of France?", meta["candidates"])
    assert meta["signals"]["scorer"] == pytest.approx(expected, abs=1e-6)
    assert sum(meta["scores"]) == pytest.approx(1.0, abs=1e-5)  # the fused choice's probabilities
    assert reply.content == meta["candidates"][meta["chosen"]]


def test_log_probabilities_sent_with_the_candidates_drive_the_choice():
    from capplug.selection import Combiner, Reranker
    from langchain_capplug._selection import select

    def reply(text: str, logprobs: list[float]) -> AIMessage:
        content = [{"token": t, "logprob": v} for t, v in zip(text.split(), logprobs, strict=True)]
        return AIMessage(content=text, response_metadata={"logprobs": {"content": content}})

    weights = Combiner({"logprob": {"logprob": 1.0}, "agreement": {"agreement": 1.0}})
    ranker = Reranker(KeywordScorer(), combiner=weights, signals=("logprob", "agreement"))
    question = [HumanMessage("What is the capital of France?")]
    sure = [reply("Paris.", [-0.1]), reply("Lyon.", [-3.0]), reply("Lyon.", [-3.0])]
    chosen = select(ranker, question, sure)
    assert chosen.index == 0 and chosen.metadata()["signals"]["logprob"] == [-0.1, -3.0, -3.0]
    # One candidate without log-probabilities: none are used, and agreement decides.
    unsure = [*sure[:2], AIMessage(content="Lyon.")]
    assert select(ranker, question, unsure).index == 1


class LogprobsChatModel(SingleChatModel):
    """A single-reply model with a `logprobs` setting, like ChatOpenAI; may refuse it."""

    logprobs: bool | None = None
    refuse: bool = False

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.script.calls.append({"logprobs": self.logprobs})
        if self.logprobs and self.refuse:
            error = ValueError("Error code: 400 - logprobs is not supported by this model")
            error.status_code = 400
            raise error
        (text,) = self.script.take(1)
        metadata = {}
        if self.logprobs:
            value = -0.1 if "Paris" in text else -3.0
            metadata = {"logprobs": {"content": [{"token": text, "logprob": value}]}}
        message = AIMessage(content=text, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_best_of_n_asks_for_logprobs_and_uses_them():
    from capplug.selection import Combiner, Reranker

    script = Script(REPLIES * 2)
    ranker = Reranker(KeywordScorer(), combiner=Combiner({"logprob": {"logprob": 1.0}}))
    best = CappyBestOfN(llm=LogprobsChatModel(script=script), scorer=ranker, n=4)
    meta = best.invoke("What is the capital of France?").response_metadata["capplug"]
    assert all(call["logprobs"] is True for call in script.calls)
    assert meta["signals"]["logprob"] == [-3.0, -3.0, -0.1, -3.0]


def test_an_endpoint_that_refuses_logprobs_is_asked_again_without_and_remembered():
    script = Script(REPLIES * 3)
    model = LogprobsChatModel(script=script, refuse=True)
    best = CappyBestOfN(llm=model, scorer=KeywordScorer(), n=2, retry=None)
    assert best.invoke("What is the capital of France?").content
    assert [c["logprobs"] for c in script.calls] == [True, True, None, None]
    script.calls.clear()
    assert best.invoke("What is the capital of France?").content
    assert [c["logprobs"] for c in script.calls] == [None, None]  # not asked again
    # A model the user set up without logprobs is left alone.
    plain = CappyBestOfN(llm=model, scorer=KeywordScorer(), n=2, request_logprobs=False)
    script.calls.clear()
    plain.invoke("What is the capital of France?")
    assert [c["logprobs"] for c in script.calls] == [None, None]


def test_single_calls_get_their_own_seeds_so_a_bound_seed_still_gives_different_candidates():
    script = Script(["Paris.", "Lyon.", "Nice."])
    inner = SingleChatModel(script=script).bind(seed=7)
    CappyBestOfN(llm=inner, scorer=KeywordScorer(), n=3, max_concurrency=1).invoke("Capital?")
    assert sorted(c["seed"] for c in script.calls) == [7, 8, 9]


def test_a_reranker_with_a_feedback_store_gives_each_answer_a_selection_id(tmp_path):
    from capplug.feedback import FeedbackStore
    from capplug.selection import Reranker

    store = FeedbackStore(tmp_path / "feedback.sqlite3")
    ranker = Reranker(KeywordScorer(), feedback=store)
    best = CappyBestOfN(llm=ChoicesChatModel(script=Script(REPLIES)), scorer=ranker, n=4)
    meta = best.invoke("What is the capital of France?").response_metadata["capplug"]
    recorded = store.selection(meta["selection_id"])
    assert recorded["candidates"] == meta["candidates"] and recorded["chosen"] == meta["chosen"]
    store.add(meta["selection_id"], label=1.0)  # the user liked the answer
    assert store.stats()["judged_selections"] == 1


def test_with_fallbacks_hands_over_at_the_first_error_instead_of_retrying():
    retry, sleeps = quick_retry(max_attempts=5)
    failing = Script(["never"], failures=[UpstreamHTTPError(503, "busy")] * 50)
    best = CappyBestOfN(
        llm=SingleChatModel(script=failing), scorer=KeywordScorer(), n=2, retry=retry
    )
    backup = SingleChatModel(script=Script(["Paris."]))
    reply = best.with_fallbacks([backup]).invoke("Capital of France?")
    assert reply.content == "Paris."
    assert len(failing.calls) == 2 and sleeps == []  # one attempt per candidate, no backoff
    assert best.retry.max_attempts == 5  # the model itself keeps its policy
    # Without the wrapper the same model retries as before.
    with pytest.raises(UpstreamHTTPError):
        best.invoke("Capital of France?")
    assert len(failing.calls) == 2 + 2 * 5 and len(sleeps) == 2 * 4


def test_each_choice_is_a_child_run_with_searchable_metadata():
    from langchain_core.callbacks import BaseCallbackHandler

    class Recorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.starts: list[dict] = []
            self.ends: list[dict] = []

        def on_chain_start(self, serialized, inputs, **kwargs):
            self.starts.append({"inputs": inputs, **kwargs})

        def on_chain_end(self, outputs, **kwargs):
            self.ends.append(outputs)

    recorder = Recorder()
    best = CappyBestOfN(llm=ChoicesChatModel(script=Script(REPLIES)), scorer=KeywordScorer(), n=4)
    reply = best.invoke("What is the capital of France?", config={"callbacks": [recorder]})
    meta = reply.response_metadata["capplug"]
    (start,) = [s for s in recorder.starts if s.get("name") == "capplug_selection"]
    assert start["inputs"] == {"candidates": meta["candidates"]}
    assert "capplug-selection" in start["tags"]
    assert start["metadata"]["capplug_chosen"] == meta["chosen"]
    assert start["metadata"]["capplug_score"] == meta["scores"][meta["chosen"]]
    assert start["metadata"]["capplug_n_received"] == 4
    assert start["parent_run_id"] is not None  # nested under the best-of-n run
    (end,) = [e for e in recorder.ends if "scores" in e]
    assert end["chosen"] == meta["chosen"] and end["scores"] == meta["scores"]


async def test_the_async_path_records_the_choice_too():
    from langchain_core.callbacks import AsyncCallbackHandler

    names: list[str] = []

    class Recorder(AsyncCallbackHandler):
        async def on_chain_start(self, serialized, inputs, **kwargs):
            names.append(kwargs.get("name"))

    best = CappyBestOfN(llm=ChoicesChatModel(script=Script(REPLIES)), scorer=KeywordScorer(), n=4)
    await best.ainvoke("What is the capital of France?", config={"callbacks": [Recorder()]})
    assert "capplug_selection" in names


def test_a_task_scorer_added_while_running_scores_the_next_call():
    from capplug.adapters.task_scorers import TaskScorerChoice
    from capplug.selection import Combiner, Reranker

    class Store:  # what TaskScorers.find answers, with the store empty, then holding one
        def __init__(self) -> None:
            self.scorer = None

        def find(self, instruction):
            if self.scorer is None:
                return TaskScorerChoice(None, {"used": False, "reason": "no task scorer"})
            return TaskScorerChoice(self.scorer, {"used": True, "id": "t1", "guard": {"use": True}})

    store = Store()
    reranker = Reranker(
        KeywordScorer("Paris"), combiner=Combiner({"scorer": {"scorer": 1.0}}), task_scorers=store
    )
    best = CappyBestOfN(llm=ChoicesChatModel(script=Script(REPLIES * 2)), scorer=reranker, n=4)
    first = best.invoke("What is the capital of France?")
    assert first.content == "Paris."
    assert first.response_metadata["capplug"]["task_scorer"]["used"] is False
    store.scorer = KeywordScorer("Lyon")  # the task's own scorer arrives
    second = best.invoke("What is the capital of France?")
    assert second.content == "It is Lyon."
    assert second.response_metadata["capplug"]["task_scorer"] == {
        "used": True,
        "id": "t1",
        "guard": {"use": True},
    }
