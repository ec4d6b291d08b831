"""The adapter service's judged fallback, in-process, with a deliberately bad adapter on a tiny
random Llama: the first request for its instruction checks it, the verdict is kept and used,
a pin outweighs it, "best of both" picks per request, and every bad value is a 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from selector_fakes import PickingSelector
from store_fakes import (  # noqa: F401 - the autouse fixture guards these tests too
    WordHashEmbedding,
    no_chroma_default_embedding,
)

from capplug.adapters.fallback import AdapterJudge, with_definition
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import AdapterRecord, AdapterStore
from capplug.serve import create_adapter_app
from capplug.serve._http import APIError
from capplug.testing import save_random_lora, save_tiny_llama

TRANSLATE = "Translate the sentence into French."
MESSAGES = [{"role": "user", "content": "the cat sat on the mat"}]
BASE_NAME = "tiny"
CAP = 6  # the judge's answers: at most this many tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-fallback-service"))


@pytest.fixture(scope="module")
def bad_adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_lora(tmp_path_factory.mktemp("bad-lora"), tiny_dir, seed=3)


@pytest.fixture(scope="module")
def runtime(tiny_dir: Path) -> AdapterRuntime:
    # float64: a batch of two and a single prompt give the same greedy tokens.
    return AdapterRuntime.from_pretrained(tiny_dir, max_loaded=2, device="cpu", dtype="float64")


def Judge(prefer: str = "base") -> PickingSelector:
    """A judge that picks ``prefer`` ("adapter" or "base"), scoring it 0.9."""
    return PickingSelector(0 if prefer == "adapter" else 1, score=0.9, name="test-judge")


@pytest.fixture
def store(tmp_path: Path, tiny_dir: Path) -> Iterator[AdapterStore]:
    # No generator: the bad adapter is the only one, and every request for TRANSLATE hits it.
    with AdapterStore(
        tmp_path / "store", base_model=str(tiny_dir), embedding_function=WordHashEmbedding()
    ) as opened:
        yield opened


@pytest.fixture
def bad(store: AdapterStore, bad_adapter: Path) -> AdapterRecord:
    return store.import_folder(bad_adapter, TRANSLATE)


@pytest.fixture
def judge(runtime: AdapterRuntime) -> PickingSelector:
    return Judge("base")


def _app(store: AdapterStore, runtime: AdapterRuntime, judge: PickingSelector | None) -> Any:
    return create_adapter_app(
        store,
        runtime,
        model_name=BASE_NAME,
        max_tokens_cap=12,
        judge=None if judge is None else AdapterJudge(runtime, judge, max_new_tokens=CAP),
    )


@pytest.fixture
def client(
    store: AdapterStore, runtime: AdapterRuntime, judge: PickingSelector
) -> Iterator[TestClient]:
    with TestClient(_app(store, runtime, judge)) as test_client:
        yield test_client
    for name in runtime.loaded:  # the runtime is shared by the module's tests
        runtime.remove(name)


def _chat(client: TestClient, **body: Any) -> Any:
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response


def _answers(runtime: AdapterRuntime, adapter_id: str, tokens: int = CAP) -> dict[str, str]:
    """What each side says to MESSAGES, generated apart from the service."""
    assert adapter_id in runtime  # attached by the service
    adapter = runtime.generate([MESSAGES], adapter=adapter_id, max_new_tokens=tokens)[0]
    base_prompt = with_definition(MESSAGES, TRANSLATE)
    base = runtime.generate([base_prompt], adapter=None, max_new_tokens=tokens)[0]
    assert adapter != base  # the adapter really is bad: what follows can fail
    return {"adapter": adapter, "base": base}


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_a_bad_adapter_is_checked_on_its_first_request_and_the_base_model_answers_after(
    client: TestClient, runtime: AdapterRuntime, store: AdapterStore, bad: AdapterRecord, judge
) -> None:
    first = _chat(client, instruction=TRANSLATE)
    reply = first.json()
    answers = _answers(runtime, bad.id)
    # Judged on this request: base model and instruction against the adapter, the base won.
    assert judge.calls == [
        (with_definition(MESSAGES, TRANSLATE), [answers["adapter"], answers["base"]])
    ]
    assert reply["choices"][0]["message"]["content"] == answers["base"]
    assert reply["model"] == BASE_NAME and "X-Capplug-Adapter" not in first.headers
    info = reply["capplug"]
    assert info["adapter"] == bad.id and info["hit"] is True
    assert info["fallback"] == {
        "mode": "auto",
        "used": "base",
        "reason": "checked now",
        "winner": "base",
        "scores": {"adapter": 0.1, "base": 0.9},
        "judged": "now",
        "pinned": None,
        "judge": "test-judge",
    }
    assert "judge" in info["timings"]
    # Kept with the adapter, which stays stored: the next request asks no judge.
    kept = store.get(bad.id)
    assert kept.check is not None and kept.check.winner == "base" and kept.falls_back
    assert kept.check.probe == MESSAGES[0]["content"]
    second = _chat(client, instruction=TRANSLATE).json()
    assert len(judge.calls) == 1
    assert second["choices"][0]["message"]["content"] == answers["base"]
    assert second["capplug"]["fallback"]["reason"] == "stored check"
    assert second["capplug"]["fallback"]["judged"] == kept.check.checked
    listed = client.get(f"/v1/adapters/{bad.id}").json()
    assert listed["falls_back"] is True and listed["check"]["winner"] == "base"


def test_an_adapter_that_wins_answers_and_longer_answers_are_generated_again(
    store: AdapterStore, runtime: AdapterRuntime, bad: AdapterRecord
) -> None:
    judge = Judge("adapter")
    with TestClient(_app(store, runtime, judge)) as client:
        reply = _chat(client, instruction=TRANSLATE, max_tokens=10).json()
        assert reply["model"] == f"{BASE_NAME}@{bad.id}"
        assert reply["capplug"]["fallback"]["used"] == "adapter"
        # Longer than the judge's answers: the adapter answered again, at full length.
        whole = runtime.generate([MESSAGES], adapter=bad.id, max_new_tokens=10)[0]
        assert reply["choices"][0]["message"]["content"] == whole
        assert not store.get(bad.id).falls_back
    for name in runtime.loaded:
        runtime.remove(name)


def test_a_pin_outweighs_the_check_over_http(
    client: TestClient, store: AdapterStore, bad: AdapterRecord, judge: PickingSelector
) -> None:
    _chat(client, instruction=TRANSLATE)  # checked: the base model won
    pinned = client.patch(f"/v1/adapters/{bad.id}", json={"pinned": "adapter"})
    assert pinned.status_code == 200 and pinned.json()["pinned"] == "adapter"
    assert pinned.json()["falls_back"] is False
    reply = _chat(client, instruction=TRANSLATE).json()
    assert reply["model"] == f"{BASE_NAME}@{bad.id}"
    fallback = reply["capplug"]["fallback"]
    assert fallback["used"] == "adapter" and fallback["reason"] == "pinned"
    assert fallback["winner"] == "base"  # the check it outweighs is shown beside
    assert client.patch(f"/v1/adapters/{bad.id}", json={"pinned": None}).json()["falls_back"]
    assert _chat(client, instruction=TRANSLATE).json()["capplug"]["fallback"]["used"] == "base"
    assert len(judge.calls) == 1
    _error(client.patch(f"/v1/adapters/{bad.id}", json={"pinned": "both"}), 400, "invalid_value")
    _error(client.patch(f"/v1/adapters/{bad.id}", json={}), 400, "missing_required_parameter")
    _error(client.patch("/v1/adapters/nope", json={"pinned": "base"}), 404, "adapter_not_found")
    assert store.get(bad.id).pinned is None  # the refused requests changed nothing


def test_best_of_both_judges_every_request_and_keeps_no_verdict(
    client: TestClient, runtime: AdapterRuntime, store: AdapterStore, bad: AdapterRecord, judge
) -> None:
    reply = _chat(client, instruction=TRANSLATE, fallback="best_of", max_tokens=CAP).json()
    assert reply["capplug"]["fallback"]["reason"] == "best of both"
    assert reply["choices"][0]["message"]["content"] == _answers(runtime, bad.id)["base"]
    # By id too: the adapter's own instruction goes to the base model.
    by_id = _chat(client, model=f"{BASE_NAME}@{bad.id}", fallback="best_of").json()
    assert by_id["capplug"]["fallback"]["used"] == "base" and len(judge.calls) == 2
    assert store.get(bad.id).check is None


def test_off_and_requests_by_id_use_the_adapter_without_judging(
    client: TestClient, runtime: AdapterRuntime, bad: AdapterRecord, judge: PickingSelector
) -> None:
    off = _chat(client, instruction=TRANSLATE, fallback="off", max_tokens=CAP).json()
    assert off["capplug"]["fallback"]["used"] == "adapter"
    assert off["choices"][0]["message"]["content"] == _answers(runtime, bad.id)["adapter"]
    by_id = _chat(client, model=bad.id).json()
    assert by_id["capplug"]["fallback"]["reason"] == "asked by id"
    base = _chat(client, model=BASE_NAME).json()
    assert base["capplug"]["fallback"] is None
    assert judge.calls == []


def test_streaming_an_unchecked_adapter_checks_it_first_then_streams_the_winner(
    client: TestClient, runtime: AdapterRuntime, bad: AdapterRecord
) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "instruction": TRANSLATE, "max_tokens": CAP, "stream": True},
    )
    assert response.status_code == 200
    blocks = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b.strip()]
    chunks = [json.loads(b) for b in blocks[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert text == _answers(runtime, bad.id)["base"]
    assert chunks[-1]["capplug"]["fallback"]["used"] == "base"
    assert chunks[-1]["model"] == BASE_NAME


def test_check_and_create_with_a_probe_keep_the_verdict(
    client: TestClient, store: AdapterStore, bad: AdapterRecord, runtime, monkeypatch
) -> None:
    checked = client.post(f"/v1/adapters/{bad.id}/check", json={"probe": "the dog ran"})
    assert checked.status_code == 200, checked.text
    assert checked.json()["check"]["probe"] == "the dog ran" and checked.json()["falls_back"]
    store.set_check(bad.id, None)
    created = client.post("/v1/adapters", json={"instruction": TRANSLATE, "probe": "a red car"})
    assert created.status_code == 200 and created.json()["check"]["probe"] == "a red car"
    # No probe: the base model writes one; when it writes nothing, a 422 says to give one.
    monkeypatch.setattr(runtime, "generate", lambda prompts, **kwargs: [""] * len(prompts))
    _error(client.post(f"/v1/adapters/{bad.id}/check"), 422, "no_probe")
    assert store.get(bad.id).check.probe == "a red car"  # nothing lost
    _error(client.post("/v1/adapters/nope/check", json={}), 404, "adapter_not_found")


def test_an_adapter_that_cannot_be_attached_is_answered_by_the_base_model(
    client: TestClient, runtime: AdapterRuntime, bad: AdapterRecord, monkeypatch
) -> None:
    service = client.app.state.adapter_service

    def broken(adapter_id: str) -> None:
        raise APIError(500, "adapter x cannot be attached", code="adapter_unloadable")

    monkeypatch.setattr(service, "attach", broken)
    reply = _chat(client, instruction=TRANSLATE, max_tokens=CAP).json()
    fallback = reply["capplug"]["fallback"]
    assert fallback["used"] == "base" and fallback["reason"] == "adapter unloadable"
    assert "cannot be attached" in fallback["error"]
    assert (
        reply["choices"][0]["message"]["content"]
        == (runtime.generate([with_definition(MESSAGES, TRANSLATE)], max_new_tokens=CAP)[0])
    )
    # Asked by id, the client hears why.
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "model": bad.id})
    _error(response, 500, "adapter_unloadable")


def test_bad_fallback_values_are_4xx_naming_the_field(
    client: TestClient, store: AdapterStore, runtime: AdapterRuntime, bad: AdapterRecord
) -> None:
    def refused(status: int, code: str, **body: Any) -> None:
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
        assert _error(response, status, code)["param"] == "fallback"

    refused(400, "invalid_value", instruction=TRANSLATE, fallback="always")
    refused(400, "invalid_value", instruction=TRANSLATE, fallback="x" * 100)
    refused(400, "unsupported_value", model=BASE_NAME, fallback="best_of")
    refused(400, "unsupported_value", instruction=TRANSLATE, fallback="best_of", n=2)
    refused(400, "unsupported_value", instruction=TRANSLATE, fallback="best_of", stream=True)
    with TestClient(_app(store, runtime, None)) as plain:
        response = plain.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "instruction": TRANSLATE, "fallback": "auto"},
        )
        _error(response, 400, "fallback_unavailable")
        _error(plain.post(f"/v1/adapters/{bad.id}/check", json={}), 400, "fallback_unavailable")
        created = plain.post("/v1/adapters", json={"instruction": TRANSLATE, "probe": "x"})
        _error(created, 400, "fallback_unavailable")
        # Without a judge the adapter answers, as before, and the reply says so.
        reply = _chat(plain, instruction=TRANSLATE).json()
        assert reply["capplug"]["fallback"]["mode"] == "off"
        assert plain.get("/healthz").json()["judge"] is None
    assert store.get(bad.id).check is None


def test_cli_serve_adapters_with_fallback_judges_with_the_scorer(
    tmp_path: Path,
    tiny_dir: Path,
    bad_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uvicorn

    from capplug.cli import main
    from capplug.testing import save_tiny_scorer

    scorer = save_tiny_scorer(tmp_path / "scorer")
    root = tmp_path / "store"
    with AdapterStore(root, base_model=str(tiny_dir)) as store:
        bad = store.import_folder(bad_adapter, TRANSLATE)
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        with TestClient(app) as client:
            seen["health"] = client.get("/healthz").json()
            body = {"messages": MESSAGES, "instruction": TRANSLATE, "max_tokens": 4}
            seen["reply"] = client.post("/v1/chat/completions", json=body).json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    argv = ["serve", "adapters", "--store", str(root), "--no-hypernet", "--model", str(tiny_dir)]
    assert main([*argv, "--fallback", "--scorer", str(scorer), "--device", "cpu"]) == 0
    assert "judged fallback by" in capsys.readouterr().err
    assert seen["health"]["judge"] == seen["reply"]["capplug"]["fallback"]["judge"]
    fallback = seen["reply"]["capplug"]["fallback"]
    assert fallback["reason"] == "checked now" and seen["reply"]["capplug"]["adapter"] == bad.id
    # A real selector's scores: the two answers' probabilities of being the better one.
    assert abs(sum(fallback["scores"].values()) - 1.0) < 1e-3
    with AdapterStore(root, base_model=str(tiny_dir)) as store:
        assert store.get(bad.id).check.winner == fallback["winner"]
    assert main([*argv, "--fallback", "--judge-tokens", "0"]) == 2


def test_messages_that_fit_alone_but_not_with_the_instruction_are_a_400_before_judging(
    client: TestClient, runtime: AdapterRuntime, store: AdapterStore, bad: AdapterRecord, judge
) -> None:
    chat_model = runtime.chat

    def tokens(chat: list[dict[str, str]]) -> int:
        return len(
            chat_model.tokenizer(chat_model.render(chat), add_special_tokens=False)["input_ids"]
        )

    limit, room = chat_model.max_positions, CAP
    for words in range(1, limit):
        messages = [{"role": "user", "content": " ".join(["cat"] * words)}]
        alone, with_it = tokens(messages), tokens(with_definition(messages, TRANSLATE))
        if alone + room <= limit < with_it + room:
            break
    else:  # pragma: no cover - the tiny model's context is what makes this case
        pytest.fail("no message length fits alone but not with the instruction")
    body = {"messages": messages, "instruction": TRANSLATE, "max_tokens": room}
    response = client.post("/v1/chat/completions", json=body)
    assert _error(response, 400, "context_length_exceeded")["param"] == "messages"
    assert judge.calls == [] and store.get(bad.id).check is None  # nothing judged, nothing kept
    off = client.post("/v1/chat/completions", json={**body, "fallback": "off"})
    assert off.status_code == 200  # the adapter alone reads only the messages


def test_a_request_that_waited_uses_a_check_made_meanwhile_instead_of_judging_again(
    client: TestClient, store: AdapterStore, bad: AdapterRecord, judge: PickingSelector, monkeypatch
) -> None:
    from capplug.adapters.store import AdapterCheck

    service = client.app.state.adapter_service
    real = service.get_or_create

    def looked_up_before_the_check(text: str, threshold: Any) -> Any:
        record, result = real(text, threshold)
        # Another request judges the adapter while this one waits for the model.
        store.set_check(bad.id, AdapterCheck("base", 0.2, 0.8, "x", "other", 1.0))
        return record, result

    monkeypatch.setattr(service, "get_or_create", looked_up_before_the_check)
    fallback = _chat(client, instruction=TRANSLATE).json()["capplug"]["fallback"]
    assert judge.calls == []
    assert fallback["reason"] == "stored check" and fallback["used"] == "base"
    assert fallback["scores"] == {"adapter": 0.2, "base": 0.8}
