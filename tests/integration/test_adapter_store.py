"""The adapter store with the packaged MiniLM, SmolLM2-shaped adapters, and a real `chroma run`."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
from capplug.adapters.store import AdapterStore, chroma_settings
from capplug.models.adapter_folder import read_adapter

pytestmark = pytest.mark.integration

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
LAYERS, HIDDEN, KV = 30, 576, 192  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64
RANK = 8

# Natural-Instructions-style definitions and a paraphrase of each a user might send instead.
DEFINITIONS = {
    "In this task, you are given a sentence in English. Your job is to translate it into "
    "French.": "Translate the given English sentence into French.",
    "Given a movie review, classify its sentiment as positive or negative.": "Decide whether "
    "the sentiment of this film review is positive or negative.",
    "You are given a math word problem. Answer the question with a single number.": "Solve the "
    "arithmetic word problem and reply with just the number.",
}
UNRELATED = "Write a short poem about autumn leaves."


def smollm2_lora(instruction: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter of exactly the shape capplug's hypernetwork writes for SmolLM2 (random values)."""
    seed = int(hashlib.sha256(instruction.encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        for module, out in (("q_proj", HIDDEN), ("v_proj", KV)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) * 0.01
            state[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.001
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": SMOLLM2,
        "inference_mode": True,
    }
    return state, config


def test_smollm2_adapters_found_by_paraphrase_with_the_packaged_minilm(tmp_path: Path) -> None:
    calls: list[str] = []

    def generator(instruction: str):
        calls.append(instruction)
        return smollm2_lora(instruction)

    with AdapterStore(tmp_path, base_model="smollm2-135m-instruct", generator=generator) as store:
        assert store.base_model == SMOLLM2
        assert isinstance(store.embedding_function, SentenceEncoderEmbeddingFunction)
        made = {d: store.get_or_create(d) for d in DEFINITIONS}
        assert not any(r.hit for r in made.values()) and len(calls) == 3
        for definition, paraphrase in DEFINITIONS.items():
            result = store.get_or_create(paraphrase, threshold=0.7)
            assert result.hit, (paraphrase, result.similarity)
            assert result.record.id == made[definition].record.id
            top = store.lookup(paraphrase, threshold=0.0, k=3)
            assert top[0].record.id == made[definition].record.id
            assert top[0].similarity > top[1].similarity + 0.2
        assert not store.get_or_create(UNRELATED, threshold=0.7).hit
        assert len(calls) == 4

        record = made[next(iter(DEFINITIONS))].record
        assert (record.rank, record.target_modules) == (RANK, ("q_proj", "v_proj"))
        files = read_adapter(store.files(record.id).folder)
        assert len(files.modules) == 2 * LAYERS and files.config.base_model_name_or_path == SMOLLM2
        assert 1_500_000 < record.size < 2_500_000

        started = time.perf_counter()
        for _ in range(20):
            store.lookup(next(iter(DEFINITIONS)))
        exact_ms = (time.perf_counter() - started) / 20 * 1000
        assert exact_ms < 50, f"an exact repeat took {exact_ms:.1f} ms"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[str]:
    chroma = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
    if chroma is None:
        pytest.skip("the chroma command (pip install chromadb) is not installed")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "chroma.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            chroma,
            "run",
            "--path",
            str(tmp_path / "server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"chroma run did not start: {(tmp_path / 'chroma.log').read_text()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_stores_sharing_a_chroma_server_make_one_adapter_per_instruction(
    tmp_path: Path, chroma_server: str
) -> None:
    import chromadb

    calls: list[str] = []

    def generator(instruction: str):
        calls.append(instruction)
        time.sleep(0.2)  # a slow generator keeps every caller inside the race
        return smollm2_lora(instruction)

    root = tmp_path / "shared"
    stores = [
        AdapterStore(root, base_model=SMOLLM2, chroma_url=chroma_server, generator=generator)
        for _ in range(2)
    ]
    definition = next(iter(DEFINITIONS))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: stores[i % 2].get_or_create(definition), range(8)))
    assert len({r.record.id for r in results}) == 1 and calls == [definition]
    assert sorted(r.hit for r in results) == [False] + [True] * 7
    assert not (root / "index").exists()  # the server holds the index

    # What one store adds, the other finds at once: the server is the one owner of the index.
    paraphrase = DEFINITIONS[definition]
    other = stores[1].get_or_create(UNRELATED)
    assert stores[0].lookup(UNRELATED)[0].record.id == other.record.id
    assert stores[0].get_or_create(paraphrase, threshold=0.7).record.id == results[0].record.id
    assert stores[0].verify().ok and stores[1].remove(other.record.id)
    assert stores[0].lookup(UNRELATED) == []

    client = chromadb.HttpClient(
        host="127.0.0.1", port=int(chroma_server.rsplit(":", 1)[1]), settings=chroma_settings()
    )
    persisted = client.get_collection(stores[0].name).configuration["embedding_function"]
    assert isinstance(persisted, SentenceEncoderEmbeddingFunction)


def test_store_folders_sharing_a_chroma_server_keep_their_own_indexes(
    tmp_path: Path, chroma_server: str
) -> None:
    def open_store(name: str) -> AdapterStore:
        return AdapterStore(
            tmp_path / name, base_model=SMOLLM2, chroma_url=chroma_server, generator=smollm2_lora
        )

    first, second = open_store("first"), open_store("second")
    assert first.name != second.name  # one collection per folder
    definition = next(iter(DEFINITIONS))
    made = first.get_or_create(definition).record
    assert second.lookup(definition) == []  # the other folder's adapter is not a hit here
    # Repairing one folder leaves the other's rows alone (its files are not in this folder).
    assert second.repair().ok
    assert first.lookup(definition)[0].record.id == made.id
    # A folder opened again (or by another process) finds its own collection.
    assert open_store("first").name == first.name
    assert open_store("first").lookup(definition)[0].record.id == made.id
