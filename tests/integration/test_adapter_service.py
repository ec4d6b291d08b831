"""The adapter service over the packaged SmolLM2 and MiniLM, on 127.0.0.1, asked by the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from capplug.adapters import AdapterRuntime, Hypernetwork
from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
from capplug.adapters.store import AdapterStore
from capplug.serve import create_adapter_app, serve_in_thread

pytestmark = pytest.mark.integration

INSTRUCTION = "In this task, you are given a sentence in English. Translate it into French."
SIMILAR = "Translate the given English sentence into French."
MESSAGES = [{"role": "user", "content": "The cat is sleeping on the sofa."}]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, AdapterStore]]:
    # Untrained, so its adapters barely change the answers; every part on the path is real.
    hypernet = Hypernetwork.from_base("smollm2-135m-instruct", encoder="minilm")
    root: Path = tmp_path_factory.mktemp("adapter-service-store")
    store = AdapterStore(
        root,
        base_model="smollm2-135m-instruct",
        embedding_function=SentenceEncoderEmbeddingFunction(),
        generator=hypernet.generate,
        threshold=0.75,
    )
    runtime = AdapterRuntime.from_pretrained("smollm2-135m-instruct", device="cpu", max_loaded=2)
    app = create_adapter_app(store, runtime, api_key="integration-key", max_tokens_cap=32)
    with serve_in_thread(app) as url:
        yield url, store
    store.close()


def _ask(client: openai.OpenAI, model: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0, extra_body=extra or None
    )


def test_instruction_misses_then_a_similar_one_hits(service: tuple[str, AdapterStore]) -> None:
    url, store = service
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="integration-key", max_retries=0)
    base = client.models.list().data[0].id
    assert base == "HuggingFaceTB/SmolLM2-135M-Instruct"

    started = time.perf_counter()
    miss = _ask(client, base, instruction=INSTRUCTION)
    hit = _ask(client, base, instruction=SIMILAR)
    elapsed = time.perf_counter() - started

    first, second = miss.model_extra["capplug"], hit.model_extra["capplug"]
    assert first["hit"] is False and first["loaded"] is True
    assert second["hit"] is True and second["adapter"] == first["adapter"]
    assert 0.75 <= second["similarity"] < 1.0
    assert second["loaded"] is False  # attached by the first request, still attached
    assert miss.model == f"{base}@{first['adapter']}"
    assert miss.choices[0].message.content.strip()
    assert len(store) == 1 and store.get(first["adapter"]).instruction == INSTRUCTION

    # The same adapter by id gives the same answer as the hit.
    by_id = _ask(client, f"{base}@{first['adapter']}")
    assert by_id.model_extra["capplug"]["source"] == "id"
    assert by_id.choices[0].message.content == hit.choices[0].message.content
    assert elapsed < 60

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CAPITAL = "Answer the question with the name of a city."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_judged_fallback_keeps_a_wrecking_adapter_from_answering(
    tmp_path: Path,
) -> None:
    """A deliberately bad adapter (large random weights: it answers in word salad) stored for an
    instruction: the packaged scorer judges its answer against the base model's, the base model
    answers, and the verdict is kept for the next request."""
    from capplug.adapters import AdapterJudge
    from capplug.models import resolve
    from capplug.selection import Reranker
    from capplug.testing import save_random_lora

    bad = save_random_lora(tmp_path / "bad", resolve("smollm2-135m-instruct"), scale=0.5, seed=1)
    store = AdapterStore(
        tmp_path / "store",
        base_model="smollm2-135m-instruct",
        embedding_function=SentenceEncoderEmbeddingFunction(),
    )
    record = store.import_folder(bad, CAPITAL)
    runtime = AdapterRuntime.from_pretrained("smollm2-135m-instruct", device="cpu", max_loaded=2)
    judge = AdapterJudge(runtime, Reranker(), max_new_tokens=32)
    app = create_adapter_app(store, runtime, max_tokens_cap=32, judge=judge)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model=BASE,
            messages=QUESTION,
            max_tokens=32,
            extra_body={"instruction": CAPITAL},
        )
        fallback = reply.model_extra["capplug"]["fallback"]
        assert fallback["used"] == "base" and fallback["reason"] == "checked now"
        assert fallback["scores"]["base"] > fallback["scores"]["adapter"]
        assert "Paris" in reply.choices[0].message.content
        assert reply.model == BASE
        again = client.chat.completions.create(
            model="smollm2-135m-instruct",  # the packaged name names the base model too
            messages=QUESTION,
            max_tokens=32,
            extra_body={"instruction": CAPITAL},
        )
        assert again.model_extra["capplug"]["fallback"]["reason"] == "stored check"
        assert again.choices[0].message.content == reply.choices[0].message.content
        # Asked for by id, the adapter still answers: it is flagged, not removed.
        by_id = client.chat.completions.create(
            model=record.id, messages=QUESTION, max_tokens=8, temperature=0
        )
        assert "Paris" not in by_id.choices[0].message.content
    assert store.get(record.id).falls_back
    store.close()
