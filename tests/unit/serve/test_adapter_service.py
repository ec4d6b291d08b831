"""The adapter service in-process (no sockets): a tiny random Llama, an untrained hypernetwork
on it, and a store whose instructions are embedded by a hashed bag of words.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from store_fakes import (  # noqa: F401 - the autouse fixture guards these tests too
    WordHashEmbedding,
    fake_indexed_store,
    no_chroma_default_embedding,
)

from capplug.adapters.fallback import AdapterJudge
from capplug.adapters.hypernetwork import Hypernetwork
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import AdapterStore, UnknownAdapterError
from capplug.cli import main
from capplug.serve import create_adapter_app
from capplug.testing import save_tiny_llama

TRANSLATE = "Translate the sentence into French."
TRANSLATE_AGAIN = "Please translate this sentence into French."
VOWELS = "Count the vowels in the word."
MESSAGES = [{"role": "user", "content": "the cat sat on the mat"}]
BASE_NAME = "tiny"


# ------------------------------------------------------------------------------- fixtures


class LongerAnswer:
    """A selector for the judged fallback that prefers the longer answer (the first of equals)."""

    def select(self, instruction: Any, candidates: list[str]) -> Any:
        from types import SimpleNamespace

        index = max(range(len(candidates)), key=lambda i: (len(candidates[i]), -i))
        return SimpleNamespace(
            index=index,
            candidates=[SimpleNamespace(score=float(i == index)) for i in range(len(candidates))],
        )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-adapter-service"))


@pytest.fixture(scope="module")
def hypernet(tiny_dir: Path) -> Hypernetwork:
    # Untrained: its adapters are near no-ops, but real peft adapters of the right shapes.
    return Hypernetwork.from_base(tiny_dir, encoder="base", r=4, hidden_dim=16)


@pytest.fixture(scope="module")
def runtime(tiny_dir: Path) -> AdapterRuntime:
    return AdapterRuntime.from_pretrained(tiny_dir, max_loaded=2, device="cpu", dtype="float32")


def _store(root: Path, tiny_dir: Path, generator: Any = None, **options: Any) -> AdapterStore:
    return AdapterStore(
        root,
        base_model=str(tiny_dir),
        embedding_function=WordHashEmbedding(),
        generator=generator,
        threshold=0.6,
        **options,
    )


@pytest.fixture
def store(tmp_path: Path, tiny_dir: Path, hypernet: Hypernetwork) -> Iterator[AdapterStore]:
    with _store(tmp_path / "store", tiny_dir, hypernet.generate) as opened:
        yield opened


@pytest.fixture
def client(store: AdapterStore, runtime: AdapterRuntime) -> Iterator[TestClient]:
    app = create_adapter_app(
        store,
        runtime,
        model_name=BASE_NAME,
        max_body_bytes=8192,
        max_instruction_chars=200,
        max_messages=8,
        max_tokens_cap=8,
        max_n=3,
    )
    with TestClient(app) as test_client:
        yield test_client
    for name in runtime.loaded:  # the runtime is shared by the module's tests
        runtime.remove(name)


def _error(response: httpx2.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _create(client: TestClient, instruction: str, status: int) -> dict[str, Any]:
    response = client.post("/v1/adapters", json={"instruction": instruction})
    assert response.status_code == status, response.text
    return response.json()


# ------------------------------------------------------------------------------- adapters


def test_create_misses_then_hits_and_lists_the_files(
    client: TestClient, store: AdapterStore
) -> None:
    made = _create(client, TRANSLATE, 201)
    assert made["hit"] is False and made["object"] == "adapter"
    assert made["instruction"] == TRANSLATE and made["source"] == "generated"
    names = [f["name"] for f in made["files"]]
    assert names == ["adapter_model.safetensors", "adapter_config.json"]
    record = store.get(made["id"])
    assert made["files"][0]["sha256"] == record.sha256
    assert made["files"][0]["bytes"] == (record.folder / names[0]).stat().st_size
    assert "folder" not in made  # the server's paths are not the client's business

    again = _create(client, TRANSLATE.upper(), 200)  # an exact repeat after normalising
    assert (again["id"], again["hit"], again["similarity"]) == (made["id"], True, 1.0)
    similar = _create(client, TRANSLATE_AGAIN, 200)
    assert similar["id"] == made["id"] and 0.6 <= similar["similarity"] < 1.0
    other = _create(client, VOWELS, 201)
    assert other["id"] != made["id"]

    shown = client.get(f"/v1/adapters/{made['id']}").json()
    assert {k: shown[k] for k in ("id", "instruction", "rank", "files")} == {
        k: made[k] for k in ("id", "instruction", "rank", "files")
    }
    listing = client.get("/v1/adapters").json()
    assert {a["id"] for a in listing["data"]} == {made["id"], other["id"]}
    assert len(client.get("/v1/adapters", params={"limit": 1}).json()["data"]) == 1
    _error(client.get("/v1/adapters", params={"limit": 0}), 400, "invalid_value")


def test_instructions_in_other_scripts_make_adapters_that_answer_and_hit_again(
    client: TestClient, store: AdapterStore
) -> None:
    for instruction in (
        "将句子翻译成法语。",
        "ترجم الجملة إلى الفرنسية.",
        "Переведите предложение на французский.",
        "🇫🇷 ➡️ 🔤",
    ):
        made = _create(client, instruction, 201)
        assert made["instruction"] == instruction
        assert _create(client, instruction, 200)["id"] == made["id"]
        answered = _chat(client, instruction=instruction)
        assert answered["capplug"]["adapter"] == made["id"] and answered["capplug"]["hit"]
    assert len(store) == 4
    # Nothing to read is empty, whatever the characters: zero-width spaces, a byte-order mark,
    # direction marks, control characters. Nothing is stored.
    for invisible in ("\u200b\u200b", "\ufeff", "\u200e\u202e", "\x00\x07 \t"):
        error = _error(client.post("/v1/adapters", json={"instruction": invisible}), 400)
        assert error["param"] == "instruction" and "empty" in error["message"]
        _error(post_chat(client, instruction=invisible), 400, "invalid_value")
    assert len(store) == 4


def post_chat(client: TestClient, **body: Any) -> httpx2.Response:
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})


def test_files_are_the_stored_bytes_and_nothing_else(
    client: TestClient, store: AdapterStore
) -> None:
    made = _create(client, TRANSLATE, 201)
    folder = store.get(made["id"]).folder
    weights = client.get(f"/v1/adapters/{made['id']}/files/adapter_model.safetensors")
    assert weights.status_code == 200
    assert weights.content == (folder / "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(weights.content).hexdigest() == made["files"][0]["sha256"]
    assert weights.headers["content-type"] == "application/octet-stream"
    config = client.get(made["files"][1]["url"])
    assert config.json()["r"] == 4 and config.headers["content-type"] == "application/json"

    secret = store.root / "secret.txt"
    secret.write_text("not for clients")
    base = f"/v1/adapters/{made['id']}/files"
    for path in (
        f"{base}/capplug-adapter.json",  # in the folder, but not one of the adapter's files
        f"{base}/.last-used",
        f"{base}/..%2Fsecret.txt",
        f"{base}/..%2F..%2F..%2Fetc%2Fpasswd",
        f"{base}/%2Fetc%2Fpasswd",
        f"{base}//etc/passwd",
        f"{base}/%2E%2E/secret.txt",
        "/v1/adapters/..%2Fsecret.txt/files/adapter_config.json",
        f"/v1/adapters/{made['id']}%2F..%2F..%2Fsecret.txt",
        "/v1/adapters/%2Fetc/files/passwd",
    ):
        response = client.get(path)
        # 404: no such file of the adapter; 400: a path that climbs, refused before routing
        assert response.status_code in (400, 404), (path, response.text)
        assert "not for clients" not in response.text and "root:" not in response.text


def test_files_reached_through_links_are_refused(
    client: TestClient, store: AdapterStore, tmp_path: Path
) -> None:
    made = _create(client, TRANSLATE, 201)
    folder = store.get(made["id"]).folder
    # A link to a copy with the very same bytes: it passes the sha256 check, and is refused anyway.
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "adapter_model.safetensors", outside)
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(outside, folder / "adapter_model.safetensors")
    url = f"/v1/adapters/{made['id']}/files/adapter_model.safetensors"
    _error(client.get(url), 403, "file_refused")

    other = _create(client, VOWELS, 201)
    moved = tmp_path / "moved-adapter"
    other_folder = store.get(other["id"]).folder
    shutil.move(other_folder, moved)
    os.symlink(moved, other_folder, target_is_directory=True)
    _error(client.get(f"/v1/adapters/{other['id']}/files/adapter_config.json"), 403)

    # Changed bytes in place: the index's sha256 catches them; nothing is sent.
    third = _create(client, "Name the capital city.", 201)
    config = store.get(third["id"]).folder / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 5'))
    error = _error(client.get(f"/v1/adapters/{third['id']}/files/adapter_config.json"), 503)
    assert error["code"] == "corrupt_adapter" and "verify --repair" in error["message"]


def test_a_corrupt_adapter_asked_for_by_id_is_made_again_from_its_instruction(
    client: TestClient, store: AdapterStore, runtime: AdapterRuntime
) -> None:
    made = _create(client, TRANSLATE, 201)
    weights = store.get(made["id"]).folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated on disk
    reply = _chat(client, model=f"{BASE_NAME}@{made['id']}", max_tokens=2)
    remade = client.get("/v1/adapters").json()["data"]
    assert [a["instruction"] for a in remade] == [TRANSLATE]
    assert reply["choices"][0]["message"]["content"] is not None


def test_a_corrupt_adapter_with_nothing_to_make_it_again_is_a_503(
    tmp_path: Path, tiny_dir: Path, hypernet: Hypernetwork, runtime: AdapterRuntime
) -> None:
    with _store(tmp_path / "s", tiny_dir, hypernet.generate) as making:
        made = making.get_or_create(TRANSLATE).record
    weights = made.folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with _store(tmp_path / "s", tiny_dir) as bare:  # a service without a hypernetwork
        app = create_adapter_app(bare, runtime, model_name=BASE_NAME, max_tokens_cap=8)
        with TestClient(app) as test_client:
            response = test_client.post(
                "/v1/chat/completions",
                json={"messages": MESSAGES, "model": f"{BASE_NAME}@{made.id}", "max_tokens": 2},
            )
    error = _error(response, 503, "corrupt_adapter")
    assert made.id in error["message"]


def test_delete_removes_the_adapter_and_detaches_it(
    client: TestClient, store: AdapterStore, runtime: AdapterRuntime
) -> None:
    made = _create(client, TRANSLATE, 201)
    _chat(client, model=f"{BASE_NAME}@{made['id']}", max_tokens=2)
    assert made["id"] in runtime
    # Only the id itself names the adapter: not with a newline or spaces around it.
    for near in (f"{made['id']}%0A", f"%20{made['id']}", f"{made['id']}%20", f"{made['id']}%09"):
        assert client.delete(f"/v1/adapters/{near}").status_code in (400, 404), near
        assert client.get(f"/v1/adapters/{near}").status_code in (400, 404), near
    with pytest.raises(UnknownAdapterError):
        store.get(made["id"] + "\n")
    assert len(store) == 1
    deleted = client.delete(f"/v1/adapters/{made['id']}")
    assert deleted.json() == {"id": made["id"], "object": "adapter", "deleted": True}
    assert made["id"] not in runtime and len(store) == 0
    _error(client.get(f"/v1/adapters/{made['id']}"), 404, "adapter_not_found")
    _error(client.delete(f"/v1/adapters/{made['id']}"), 404, "adapter_not_found")
    _error(client.delete("/v1/adapters/not-an-id"), 404, "adapter_not_found")
    error = _error(
        client.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "model": f"{BASE_NAME}@{made['id']}"},
        ),
        404,
        "model_not_found",
    )
    assert error["param"] == "model"


# ---------------------------------------------------------------------------- completions


def test_models_and_health(client: TestClient, store: AdapterStore) -> None:
    listing = client.get("/v1/models").json()
    assert [m["id"] for m in listing["data"]] == [BASE_NAME]
    assert client.get(f"/v1/models/{BASE_NAME}").json()["id"] == BASE_NAME
    made = _create(client, TRANSLATE, 201)
    card = client.get(f"/v1/models/{BASE_NAME}@{made['id']}").json()
    assert card["id"] == f"{BASE_NAME}@{made['id']}" and card["parent"] == BASE_NAME
    # Stored adapters are listed as vLLM lists LoRA adapters: their own id, the base as parent.
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [BASE_NAME, f"{BASE_NAME}@{made['id']}"]
    assert listed[0]["parent"] is None and listed[1]["parent"] == BASE_NAME
    _error(client.get("/v1/models/gpt-4o"), 404, "model_not_found")
    assert client.get("/healthz").json() == {
        "status": "ok",
        "model": BASE_NAME,
        "can_create": True,
        "judge": None,
    }
    assert client.get("/openapi.json").json()["paths"]["/v1/chat/completions"]


def test_chat_answers_with_the_named_adapter_or_the_base(
    client: TestClient, store: AdapterStore, runtime: AdapterRuntime, hypernet: Hypernetwork
) -> None:
    # A trained-looking adapter (large B) so that it visibly changes the answer.
    state, config = hypernet.generate(VOWELS)
    state = {k: v * 4000 if "lora_B" in k else v for k, v in state.items()}
    record = store.put(state, config, instruction=VOWELS)

    first = _chat(client, model=f"{BASE_NAME}@{record.id}", max_tokens=6)
    assert first["model"] == f"{BASE_NAME}@{record.id}"
    assert first["capplug"]["adapter"] == record.id and first["capplug"]["source"] == "id"
    assert first["capplug"]["loaded"] is True and "load" in first["capplug"]["timings"]
    again = _chat(client, model=f"{BASE_NAME}@{record.id}", max_tokens=6)
    assert again["capplug"]["loaded"] is False
    expected = runtime.generate([MESSAGES], adapter=record.id, max_new_tokens=6)[0]
    assert first["choices"][0]["message"]["content"] == expected

    plain = _chat(client, model=BASE_NAME, max_tokens=6)
    assert plain["capplug"]["adapter"] is None and plain["capplug"]["source"] == "base"
    assert plain["model"] == BASE_NAME
    base_answer = runtime.generate([MESSAGES], adapter=None, max_new_tokens=6)[0]
    assert plain["choices"][0]["message"]["content"] == base_answer
    assert base_answer != expected  # the adapter is really applied
    assert _chat(client)["capplug"]["source"] == "base"  # no model at all: the base
    usage = plain["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    sampled = _chat(client, model=BASE_NAME, n=3, temperature=1.0, seed=3, max_tokens=6)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    assert (
        _chat(client, model=BASE_NAME, n=3, temperature=1.0, seed=3, max_tokens=6)["choices"]
        == sampled["choices"]
    )


def test_one_choice_streams_token_by_token_with_the_adapter_in_the_last_chunk(
    client: TestClient,
) -> None:
    plain = _chat(client, instruction=TRANSLATE, max_tokens=6)
    response = client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "instruction": TRANSLATE, "max_tokens": 6, "stream": True},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b.strip()]
    assert blocks[-1] == "[DONE]"
    chunks = [json.loads(b) for b in blocks[:-1]]
    deltas = [c["choices"][0] for c in chunks]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(d["delta"].get("content", "") for d in deltas[1:])
    assert text == plain["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert deltas[-1]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert last["capplug"]["adapter"] == plain["capplug"]["adapter"] and last["usage"]
    assert last["model"] == plain["model"]


def test_openai_sdk_with_an_instruction_misses_then_hits(
    store: AdapterStore, runtime: AdapterRuntime
) -> None:
    app = create_adapter_app(store, runtime, model_name=BASE_NAME, max_tokens_cap=8)

    async def scenario() -> list[Any]:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
        async with openai.AsyncOpenAI(
            base_url="http://adapters.test/v1", api_key="none", http_client=http, max_retries=0
        ) as sdk:
            replies = []
            for instruction in (TRANSLATE, TRANSLATE_AGAIN):
                replies.append(
                    await sdk.chat.completions.create(
                        model=BASE_NAME,
                        messages=MESSAGES,
                        max_tokens=4,
                        extra_body={"instruction": instruction},
                    )
                )
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            return replies

    try:
        miss, hit = asyncio.run(scenario())
    finally:
        for name in runtime.loaded:
            runtime.remove(name)
    first, second = miss.model_extra["capplug"], hit.model_extra["capplug"]
    assert first["hit"] is False and first["source"] == "instruction"
    assert second["hit"] is True and second["adapter"] == first["adapter"]
    assert 0.6 <= second["similarity"] < 1.0
    assert miss.model == f"{BASE_NAME}@{first['adapter']}"
    assert isinstance(miss.choices[0].message.content, str)
    assert [r.instruction for r in store.list_adapters()] == [TRANSLATE]


def test_without_a_generator_stored_adapters_still_answer(
    tmp_path: Path, tiny_dir: Path, runtime: AdapterRuntime, hypernet: Hypernetwork
) -> None:
    with _store(tmp_path / "no-gen", tiny_dir) as store:
        state, config = hypernet.generate(TRANSLATE)
        record = store.put(state, config, instruction=TRANSLATE, source="imported")
        app = create_adapter_app(store, runtime, model_name=BASE_NAME, max_tokens_cap=4)
        with TestClient(app) as client:
            assert client.get("/healthz").json()["can_create"] is False
            hit = _chat(client, instruction=TRANSLATE_AGAIN)
            assert hit["capplug"]["adapter"] == record.id and hit["capplug"]["hit"] is True
            assert (
                _chat(client, model=f"{BASE_NAME}@{record.id}")["capplug"]["adapter"] == record.id
            )
            error = _error(
                client.post(
                    "/v1/chat/completions", json={"messages": MESSAGES, "instruction": VOWELS}
                ),
                503,
                "no_generator",
            )
            assert "--hypernet" in error["message"] and "by id" in error["message"]
            _error(client.post("/v1/adapters", json={"instruction": VOWELS}), 503, "no_generator")
            # Streamed, the same failure comes before any token: an ordinary error answer.
            streamed = {"messages": MESSAGES, "instruction": VOWELS, "stream": True}
            _error(client.post("/v1/chat/completions", json=streamed), 503, "no_generator")
        for name in runtime.loaded:
            runtime.remove(name)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_stored_adapter_is_made_again_not_a_500_on_every_request(
    client: TestClient, store: AdapterStore
) -> None:
    made = _create(client, TRANSLATE, 201)  # stored, not attached to the model yet
    _flip_last_byte(store.get(made["id"]).folder / "adapter_model.safetensors")
    first = _chat(client, instruction=TRANSLATE, max_tokens=2)["capplug"]
    assert first["hit"] is False and first["adapter"] != made["id"]
    again = _chat(client, instruction=TRANSLATE, max_tokens=2)["capplug"]
    assert again["hit"] is True and again["adapter"] == first["adapter"]
    assert _create(client, TRANSLATE, 200)["id"] == first["adapter"]
    fresh = client.get(f"/v1/adapters/{first['adapter']}/files/adapter_model.safetensors")
    assert fresh.status_code == 200
    _error(client.get(f"/v1/adapters/{made['id']}"), 404, "adapter_not_found")
    assert store.verify().ok


def test_a_corrupt_stored_adapter_without_a_generator_is_one_clear_503(
    tmp_path: Path, tiny_dir: Path, runtime: AdapterRuntime, hypernet: Hypernetwork
) -> None:
    with _store(tmp_path / "no-gen", tiny_dir) as store:
        state, config = hypernet.generate(TRANSLATE)
        record = store.put(state, config, instruction=TRANSLATE, source="imported")
        _flip_last_byte(record.folder / "adapter_model.safetensors")
        app = create_adapter_app(store, runtime, model_name=BASE_NAME, max_tokens_cap=4)
        body = {"messages": MESSAGES, "instruction": TRANSLATE}
        try:
            with TestClient(app) as client:
                error = _error(client.post("/v1/chat/completions", json=body), 503, "no_generator")
                assert record.id in error["message"] and "corrupt" in error["message"]
                assert "import" in error["message"] and "--hypernet" in error["message"]
                # Said once: the adapter is out of the index, so the next answer is the plain one.
                again = _error(client.post("/v1/chat/completions", json=body), 503, "no_generator")
                assert "corrupt" not in again["message"]
                _error(client.get(f"/v1/adapters/{record.id}"), 404, "adapter_not_found")
            assert store.verify().ok
        finally:
            for name in runtime.loaded:
                runtime.remove(name)


def test_bad_input_is_a_4xx_naming_the_field(client: TestClient) -> None:
    made = _create(client, TRANSLATE, 201)

    def post(body: Any, **kwargs: Any) -> httpx2.Response:
        return client.post("/v1/chat/completions", json=body, **kwargs)

    cases: list[tuple[Any, int, str | None, str | None]] = [
        ({"messages": MESSAGES, "instruction": "x" * 201}, 400, "invalid_value", "instruction"),
        ({"messages": MESSAGES, "instruction": "   "}, 400, "invalid_value", "instruction"),
        (
            {"messages": MESSAGES, "instruction": VOWELS, "model": f"{BASE_NAME}@{made['id']}"},
            400,
            "invalid_value",
            "instruction",
        ),
        ({"messages": MESSAGES * 9}, 400, "invalid_value", "messages"),
        ({"messages": []}, 400, "invalid_value", "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", None),
        ({"messages": MESSAGES, "max_tokens": 9}, 400, "invalid_value", "max_tokens"),
        ({"messages": MESSAGES, "n": 4}, 400, "invalid_value", "n"),
        ({"messages": MESSAGES, "stream": True, "n": 2}, 400, "unsupported_value", "stream"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, None, "tools"),
        ({"messages": MESSAGES, "model": "tiny@0123456789abcdef"}, 404, "model_not_found", "model"),
        ({"messages": MESSAGES, "model": "tiny@../../etc"}, 404, "model_not_found", "model"),
        ({"messages": MESSAGES, "model": "other"}, 404, "model_not_found", "model"),
        ({"messages": MESSAGES, "model": "x" * 600}, 400, "invalid_value", "model"),
        ({"messages": MESSAGES, "stop": ["a"] * 5}, 400, "invalid_value", "stop"),
        ({"messages": MESSAGES, "temperature": 3}, 400, "invalid_value", "temperature"),
        ([1, 2], 400, "invalid_body", None),
        ({"messages": "hi"}, 400, "invalid_value", "messages"),
    ]
    for body, status, code, param in cases:
        error = _error(post(body), status, code)
        if param is not None:
            assert error["param"] == param or error["param"].startswith(param), (body, error)
    not_json = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    _error(client.post("/v1/chat/completions", **not_json), 400, "invalid_json")
    # JSON may spell a lone surrogate that no tokenizer takes; and nest deeper than any walk
    raw_cases = [
        (b'{"messages":[{"role":"user","content":"hi \\ud800"}]}', "messages[0].content"),
        (b'{"messages":[{"role":"user","content":"hi"}],"model":"\\udfff"}', "model"),
        (b'{"messages":[{"role":"user","content":"hi"}],"user":' + b"[" * 5000, None),
        (b'{"instruction":"\\ud83d","messages":[{"role":"user","content":"hi"}]}', None),
    ]
    for raw, param in raw_cases:
        sent = {"content": raw, "headers": {"Content-Type": "application/json"}}
        error = _error(client.post("/v1/chat/completions", **sent), 400)
        assert param is None or error["param"] == param, (raw[:60], error)
    _error(post({"messages": [{"role": "user", "content": "x" * 9000}]}), 413, "request_too_large")
    _error(client.post("/v1/adapters", json={"instruction": "x" * 201}), 400, "invalid_value")
    _error(client.post("/v1/adapters", json={"instruction": ""}), 400, "invalid_value")
    _error(client.post("/v1/adapters", json={"instruction": TRANSLATE, "threshold": 2}), 400)
    _error(
        client.post("/v1/adapters", json={"instruction": TRANSLATE, "x": 1}),
        400,
        "unknown_parameter",
    )
    _error(client.put("/v1/adapters"), 405)
    _error(client.get("/v1/nowhere"), 404, "unknown_url")


def test_metrics_count_requests_lookups_and_generation(client: TestClient) -> None:
    _chat(client, instruction=TRANSLATE, max_tokens=4)
    _chat(client, instruction=TRANSLATE, max_tokens=4)
    client.get("/v1/adapters/0123456789abcdef")  # a 404, counted under its route template
    text = client.get("/metrics").text
    assert 'capplug_adapters_lookups_total{result="made"} 1.0' in text
    assert 'capplug_adapters_lookups_total{result="hit"} 1.0' in text
    assert 'capplug_adapters_requests_total{route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'capplug_adapters_requests_total{route="/v1/adapters/{id}",status="404"} 1.0' in text
    assert "capplug_adapters_generation_seconds_count 2.0" in text


def test_api_key_guards_every_v1_route(store: AdapterStore, runtime: AdapterRuntime) -> None:
    app = create_adapter_app(store, runtime, model_name=BASE_NAME, api_key="sekrit")
    with TestClient(app) as client:
        error = _error(client.get("/v1/models"), 401, "invalid_api_key")
        assert "Authorization: Bearer" in error["message"]
        _error(client.post("/v1/adapters", json={"instruction": TRANSLATE}), 401)
        _error(client.get("/v1/adapters/0123456789abcdef/files/adapter_config.json"), 401)
        wrong = {"Authorization": "Bearer nope"}
        _error(client.get("/v1/models", headers=wrong), 401)
        assert (
            client.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        )
        assert client.get("/healthz").status_code == 200
        _error(client.get("/metrics"), 401, "invalid_api_key")
        assert client.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert len(store) == 0  # the refused creation made nothing


def test_one_generation_at_a_time_off_the_event_loop(
    store: AdapterStore, runtime: AdapterRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    active = most = 0
    guard = threading.Lock()
    threads: set[str] = set()
    real = runtime.generate

    def slow(*args: Any, **kwargs: Any) -> list[str]:
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        threads.add(threading.current_thread().name)
        time.sleep(0.15)
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                active -= 1

    monkeypatch.setattr(runtime, "generate", slow)
    app = create_adapter_app(store, runtime, model_name=BASE_NAME, max_tokens_cap=2)

    async def scenario() -> tuple[list[int], float]:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http:
            bodies = [
                {"messages": MESSAGES, "instruction": text}
                for text in (TRANSLATE, VOWELS, TRANSLATE, "Name the capital city.")
            ]
            start = time.perf_counter()
            running = asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in bodies))
            await asyncio.sleep(0.05)
            health = await http.get("/healthz")
            health_at = time.perf_counter() - start
            responses = await running
            assert health.status_code == 200
            return [r.status_code for r in responses], health_at

    statuses, health_at = asyncio.run(scenario())
    for name in runtime.loaded:
        runtime.remove(name)
    assert statuses == [200] * 4
    assert most == 1  # never two generations at once, though four requests came together
    assert health_at < 0.15  # the event loop answered while a generation ran
    assert threading.main_thread().name not in threads
    assert len(store) == 3  # the repeat waited for the first and hit: three adapters made


def test_runtime_for_another_base_model_is_refused(tmp_path: Path, runtime: AdapterRuntime) -> None:
    from capplug.models.adapter_folder import WrongBaseModelError

    with (
        AdapterStore(
            tmp_path / "s", base_model="someone/other", embedding_function=WordHashEmbedding()
        ) as other,
        pytest.raises(WrongBaseModelError, match="someone/other"),
    ):
        create_adapter_app(other, runtime)


# ------------------------------------------------------------------------------- fuzzing


def _fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-fuzz"))
    hypernet = Hypernetwork.from_base(folder, encoder="base", r=2, hidden_dim=8)
    store = _store(tmp_path_factory.mktemp("fuzz-store"), folder, hypernet.generate, max_adapters=3)
    state, config = hypernet.generate(TRANSLATE)
    store.put(state, config, instruction=TRANSLATE)
    runtime = AdapterRuntime.from_pretrained(folder, max_loaded=2, device="cpu", dtype="float32")
    return create_adapter_app(
        store,
        runtime,
        model_name=BASE_NAME,
        max_body_bytes=4096,
        max_instruction_chars=100,
        max_messages=4,
        max_tokens_cap=2,
        max_n=2,
        api_key="fuzz-key",
        allow_load_from_path=True,  # fuzzed paths name nothing loadable: each is a 4xx
        judge=AdapterJudge(runtime, LongerAnswer(), max_new_tokens=2),
    )


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The served /openapi.json, loaded by schemathesis from the app in-process (no socket)."""
    return schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app(tmp_path_factory))


# Schemathesis' own pytest plugin does not run under pytest 9 (it reads a removed attribute of
# test items), so the operations are parametrized here and each is driven by hypothesis.
_OPERATIONS = [
    ("POST", "/v1/adapters"),
    ("GET", "/v1/adapters"),
    ("GET", "/v1/adapters/{adapter_id}"),
    ("DELETE", "/v1/adapters/{adapter_id}"),
    ("PATCH", "/v1/adapters/{adapter_id}"),
    ("POST", "/v1/adapters/{adapter_id}/check"),
    ("GET", "/v1/adapters/{adapter_id}/files/{name}"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/healthz"),
]


def test_every_operation_is_fuzzed(fuzz_schema: Any) -> None:
    served = {(op.ok().method.upper(), op.ok().path) for op in fuzz_schema.get_all_operations()}
    assert served == set(_OPERATIONS)


# Negative cases exist only where the schema constrains something (bodies, the integer limit);
# any string is a schema-valid path parameter.
_FUZZ_CASES = [(m, p, "positive") for m, p in _OPERATIONS] + [
    ("POST", "/v1/adapters", "negative"),
    ("GET", "/v1/adapters", "negative"),
    ("PATCH", "/v1/adapters/{adapter_id}", "negative"),
    ("POST", "/v1/adapters/{adapter_id}/check", "negative"),
    ("POST", "/v1/chat/completions", "negative"),
    ("POST", "/v1/load_lora_adapter", "negative"),
    ("POST", "/v1/unload_lora_adapter", "negative"),
]


@pytest.mark.parametrize(("method", "path", "mode"), _FUZZ_CASES, ids=lambda v: str(v).strip("/"))
def test_fuzzed_requests_never_fail_the_server(
    fuzz_schema: Any, method: str, path: str, mode: str
) -> None:
    """Schema-valid and invalid requests alike get a documented 2xx/4xx, never a 500."""
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    operation = fuzz_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=20 if method == "POST" else 12,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": "Bearer fuzz-key"}
        case.call_and_validate(
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ]
        )

    fuzz()


# ------------------------------------------------------------------------------------ CLI


def test_hit_check_refuses_a_weak_hit_and_shares_the_runtime_lock(
    tmp_path: Path, tiny_dir: Path, runtime: AdapterRuntime, hypernet: Hypernetwork
) -> None:
    from capplug import Scorer
    from capplug.adapters.hit_check import ScorerHitCheck
    from capplug.testing import save_tiny_scorer

    scorer = Scorer.from_pretrained(save_tiny_scorer(tmp_path / "scorer"), device="cpu")
    check = ScorerHitCheck(runtime, scorer, bar=1.0, max_new_tokens=2)
    try:
        with _store(tmp_path / "checked", tiny_dir, hypernet.generate, verify_hit=check) as store:
            app = create_adapter_app(store, runtime, model_name=BASE_NAME, max_tokens_cap=8)
            # The check generates with the service's runtime: both hold one lock.
            assert app.state.adapter_service.lock is check.lock
            with TestClient(app) as client:
                first = client.post("/v1/adapters", json={"instruction": TRANSLATE})
                second = client.post("/v1/adapters", json={"instruction": TRANSLATE_AGAIN})
            assert first.status_code == 201 and second.status_code == 201, second.text
            made = second.json()
            assert made["hit"] is False and made["id"] != first.json()["id"]
            (refused,) = check.history
            assert refused.adapter_id == first.json()["id"] and not refused.accepted
            assert len(store) == 2
    finally:
        for name in runtime.loaded:
            runtime.remove(name)


def test_cli_serve_adapters_checks_its_hit_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "adapters", "--no-hypernet", "--check-hits", "1.5"]) == 2
    assert "--check-hits must be between 0 and 1" in capsys.readouterr().err
    assert main(["serve", "adapters", "--no-hypernet", "--hit-probe", "a cat"]) == 2
    assert "--hit-probe applies with --check-hits" in capsys.readouterr().err


def test_cli_serve_adapters_refuses_to_listen_beyond_loopback_without_a_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "adapters", "--host", "0.0.0.0", "--no-hypernet"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_cli_serve_adapters_without_a_hypernetwork_says_what_still_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import capplug.adapters.hypernetwork as hypernetwork_module

    monkeypatch.setattr(hypernetwork_module, "BUNDLED_DIR", tmp_path / "no-bundle")
    assert main(["serve", "adapters", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--hypernet DIR" in err and "--no-hypernet" in err and "by id" in err
    assert main(["serve", "adapters", "--hypernet", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_cli_serve_adapters_runs_uvicorn_with_the_service(
    tmp_path: Path,
    tiny_dir: Path,
    hypernet: Hypernetwork,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        with TestClient(app) as client:
            seen["health"] = client.get("/healthz").json()
            seen["models"] = client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    folder = hypernet.save_pretrained(tmp_path / "hypernet")
    root = tmp_path / "store"
    fake_indexed_store(root, hypernet.config.base_model)
    argv = ["serve", "adapters", "--store", str(root), "--hypernet", str(folder)]
    assert main([*argv, "--device", "cpu", "--port", "9999", "--api-key", "k"]) == 0
    assert seen["port"] == 9999 and seen["host"] == "127.0.0.1"
    assert seen["health"]["can_create"] is True
    assert seen["models"]["data"][0]["id"] == hypernet.config.base_model
    assert "making new adapters" in capsys.readouterr().err
    assert main([*argv, "--model", "someone/other-model"]) == 2
    assert "someone/other-model" in capsys.readouterr().err
    assert json.dumps(seen)  # what the server answered is plain JSON


def test_the_reply_names_the_adapter_as_the_request_did(
    client: TestClient, store: AdapterStore
) -> None:
    made = _create(client, TRANSLATE, 201)
    by_id = _chat(client, model=f"{BASE_NAME}@{made['id']}", max_tokens=2)
    assert by_id["model"] == f"{BASE_NAME}@{made['id']}"
    store.rename(made["id"], "french")
    by_name = _chat(client, model="french", max_tokens=2)
    assert by_name["model"] == "french" and by_name["capplug"]["adapter"] == made["id"]
    found = _chat(client, instruction=TRANSLATE, max_tokens=2)
    assert found["model"] == f"{BASE_NAME}@{made['id']}"  # found by instruction: its id
