"""The Chroma-indexed adapter store: lookup, creation, files, eviction, repair, processes, CLI.

Adapters are made directly with peft on a tiny random Llama (or by a fake generator with the
same shapes); instructions are embedded by a hashed bag of words except where the packaged
MiniLM itself is under test. Chroma runs as a PersistentClient in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import store_fakes
import torch
from chromadb.api.types import DefaultEmbeddingFunction
from chromadb.utils.embedding_functions import known_embedding_functions
from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2
from store_fakes import (  # noqa: F401 - the autouse fixture guards every test here
    RANK,
    TARGETS,
    FakeGenerator,
    WordHashEmbedding,
    fake_indexed_store,
    no_chroma_default_embedding,
    worker,
)

from capplug import TruncationWarning
from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
from capplug.adapters.store import (
    AdapterRecord,
    AdapterStore,
    AdapterStoreError,
    CorruptAdapterError,
    NoGeneratorError,
    RefusedAdapterFileError,
    UnknownAdapterError,
    UnknownAdapterFileError,
    chroma_settings,
    instruction_hash,
)
from capplug.cli.store import register
from capplug.errors import CapplugError
from capplug.models.adapter_folder import AdapterFileError, WrongBaseModelError

TRANSLATE = "Translate the sentence into French."
TRANSLATE_AGAIN = "Please translate this sentence into French."
VOWELS = "Count the vowels in the word."

# Worker processes import the fakes from here.
SUPPORT = str(Path(store_fakes.__file__).parent)


# ------------------------------------------------------------------------------- fixtures


def _save_tiny_llama(folder: Path) -> Path:
    try:
        from capplug.testing import save_tiny_llama
    except ImportError:  # older capplug.testing: the same model, without a tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        return folder
    return save_tiny_llama(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def peft_folder(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained by nobody but saved by peft itself, for the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False
    )
    model = get_peft_model(base, config)
    folder = tmp_path_factory.mktemp("peft-lora")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes(peft_folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors.torch import load_file

    return {
        k: tuple(v.shape) for k, v in load_file(peft_folder / "adapter_model.safetensors").items()
    }


@pytest.fixture
def generator(shapes: dict[str, tuple[int, ...]], tiny_llama: Path) -> FakeGenerator:
    return FakeGenerator(shapes, str(tiny_llama))


@pytest.fixture
def store(tmp_path: Path, tiny_llama: Path, generator: FakeGenerator):
    with AdapterStore(
        tmp_path / "store",
        base_model=str(tiny_llama),
        embedding_function=WordHashEmbedding(),
        generator=generator,
    ) as opened:
        yield opened


def _children(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


# ----------------------------------------------------------------------- embedding function


def test_embedding_function_implements_chromas_protocol_and_is_registered() -> None:
    ef = SentenceEncoderEmbeddingFunction(batch_size=8)
    assert known_embedding_functions[ef.name()] is SentenceEncoderEmbeddingFunction
    assert not ef.is_legacy()
    assert ef.default_space() == "cosine"
    assert "cosine" in ef.supported_spaces()
    assert ef.get_config() == {
        "model": "minilm",
        "device": "cpu",
        "batch_size": 8,
        "precision": "auto",
        "backend": "auto",
    }
    rebuilt = SentenceEncoderEmbeddingFunction.build_from_config(ef.get_config())
    assert rebuilt.get_config() == ef.get_config()
    assert ef._encoder is None, "the encoder must load on first use, not on construction"
    with pytest.raises(ValueError, match="batch_size"):
        SentenceEncoderEmbeddingFunction(batch_size=0)
    with pytest.raises(ValueError, match="model"):
        SentenceEncoderEmbeddingFunction.build_from_config({"model": ""})
    with pytest.raises(ValueError, match="precision"):
        SentenceEncoderEmbeddingFunction(precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown"):
        SentenceEncoderEmbeddingFunction.build_from_config({"model": "minilm", "pooling": "max"})
    with pytest.raises(ValueError, match="embedding space"):
        ef.validate_config_update(ef.get_config(), {"model": "mpnet"})


def test_guard_fails_a_test_that_makes_chromas_default_embedding_function() -> None:
    with pytest.raises(AssertionError, match="default embedding function"):
        DefaultEmbeddingFunction()
    with pytest.raises(AssertionError, match="default embedding function"):
        ONNXMiniLM_L6_V2()


def test_packaged_minilm_indexes_a_new_store_and_reopens_from_chromas_config(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    import chromadb

    with AdapterStore(tmp_path, base_model=str(tiny_llama), generator=generator) as store:
        assert isinstance(store.embedding_function, SentenceEncoderEmbeddingFunction)
        made = store.get_or_create(TRANSLATE)
        hit = store.get_or_create("Translate this sentence to French, please.")
        assert hit.hit and hit.record.id == made.record.id
        assert 0.8 <= hit.similarity < 1.0
        assert not store.get_or_create("What is the capital of the country?").hit
        vectors = store.embedding_function([TRANSLATE, VOWELS])
        assert len(vectors[0]) == 384
        assert all(abs(float((v**2).sum()) - 1.0) < 1e-4 for v in vectors)
        fp32 = SentenceEncoderEmbeddingFunction(precision="fp32", backend="torch")([TRANSLATE])[0]
        bf16 = SentenceEncoderEmbeddingFunction(precision="bf16", backend="torch")([TRANSLATE])[0]
        assert float(fp32 @ bf16) > 0.999  # the faster paths stay in the same embedding space
        onnx = SentenceEncoderEmbeddingFunction(backend="onnx")
        texts = [TRANSLATE, VOWELS, "x"]
        exported = onnx(texts)
        assert onnx.onnx_encoder() is not None
        reference = SentenceEncoderEmbeddingFunction(precision="fp32", backend="torch")(texts)
        assert all(float(a @ b) > 0.9999 for a, b in zip(exported, reference, strict=True))
        # Plain Chroma rebuilds the registered function from the persisted collection config.
        client = chromadb.PersistentClient(str(tmp_path / "index"), settings=chroma_settings())
        try:
            persisted = client.get_collection(store.name).configuration["embedding_function"]
            assert isinstance(persisted, SentenceEncoderEmbeddingFunction)
            assert persisted.get_config()["model"] == "minilm"
        finally:
            client.close()


# ------------------------------------------------------------------------ lookup and create


def test_miss_generates_then_exact_repeat_hits_without_embedding(
    store: AdapterStore, generator: FakeGenerator
) -> None:
    embedded = WordHashEmbedding.calls
    first = store.get_or_create(TRANSLATE)
    assert WordHashEmbedding.calls == embedded + 1, "a miss embeds its instruction once"
    assert not first.hit and first.similarity is None
    assert first.record.source == "generated" and generator.calls == [TRANSLATE]
    assert (first.record.rank, first.record.target_modules) == (RANK, tuple(TARGETS))
    embedded = WordHashEmbedding.calls
    again = store.get_or_create("  translate the SENTENCE   into french. ")
    assert again.hit and again.similarity == 1.0 and again.record.id == first.record.id
    assert [m.record.id for m in store.lookup(TRANSLATE.upper())] == [first.record.id]
    assert WordHashEmbedding.calls == embedded, "an exact repeat must not run the encoder"
    assert len(generator.calls) == 1 and len(store) == 1


def test_similar_instruction_hits_and_unrelated_one_makes_a_new_adapter(
    store: AdapterStore, generator: FakeGenerator
) -> None:
    first = store.get_or_create(TRANSLATE)
    similar = store.get_or_create(TRANSLATE_AGAIN, threshold=0.6)
    assert similar.hit and similar.record.id == first.record.id
    assert 0.6 <= similar.similarity < 1.0
    strict = store.get_or_create(TRANSLATE_AGAIN, threshold=0.95)
    assert not strict.hit and strict.similarity == pytest.approx(similar.similarity)
    other = store.get_or_create(VOWELS)
    assert not other.hit and other.record.id not in {first.record.id, strict.record.id}
    assert len(store) == 3 and len(generator.calls) == 3


def test_lookup_is_best_first_within_threshold_and_k(store: AdapterStore) -> None:
    ids = {
        text: store.get_or_create(text).record.id for text in (TRANSLATE, TRANSLATE_AGAIN, VOWELS)
    }
    matches = store.lookup("translate sentence french", threshold=0.0, k=3)
    assert [m.record.id for m in matches][:2] == [ids[TRANSLATE], ids[TRANSLATE_AGAIN]]
    assert [m.similarity for m in matches] == sorted((m.similarity for m in matches), reverse=True)
    assert all(0.0 <= m.similarity <= 1.0 for m in matches)
    assert len(store.lookup("translate sentence french", threshold=0.0, k=1)) == 1
    assert store.lookup("translate sentence french", threshold=0.99) == []
    assert store.lookup("entirely different words here") == []


def test_no_generator_is_a_clear_error(tmp_path: Path, tiny_llama: Path) -> None:
    with AdapterStore(
        tmp_path, base_model=str(tiny_llama), embedding_function=WordHashEmbedding()
    ) as store:
        with pytest.raises(NoGeneratorError, match="no generator"):
            store.get_or_create(TRANSLATE)
        assert len(store) == 0


def test_bad_input_gets_clear_errors(store: AdapterStore, tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="instruction is empty"):
        store.get_or_create("   ")
    with pytest.raises(TypeError, match="instruction must be a string"):
        store.lookup(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        store.lookup(TRANSLATE, threshold=1.5)
    with pytest.raises(ValueError, match="k must be"):
        store.lookup(TRANSLATE, k=0)
    with pytest.raises(UnknownAdapterError, match="no adapter '0123456789abcdef'"):
        store.get("0123456789abcdef")
    with pytest.raises(UnknownAdapterError, match="not an adapter id"):
        store.files("../../etc")
    with pytest.raises(ValueError, match="source"):
        store.put({}, {}, instruction=TRANSLATE, source="downloaded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict"):
        store.put({}, {"r": 4, "target_modules": TARGETS}, instruction=TRANSLATE)
    with pytest.raises(ValueError, match="base_model"):
        AdapterStore(tmp_path / "x", base_model="  ")
    with pytest.raises(ValueError, match="max_adapters"):
        AdapterStore(tmp_path / "x", base_model=str(tiny_llama), max_adapters=0)
    assert len(store) == 0


def test_oversized_instruction_is_capped_and_said_so(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    with AdapterStore(
        tmp_path,
        base_model=str(tiny_llama),
        embedding_function=WordHashEmbedding(),
        generator=generator,
        max_instruction_chars=40,
    ) as store:
        long = TRANSLATE + " Keep the names as they are." * 10
        with pytest.warns(TruncationWarning, match="keeps the first 40"):
            result = store.get_or_create(long)
        assert len(result.record.instruction) <= 40
        assert generator.calls == [result.record.instruction]


# -------------------------------------------------------------------------------- files


def test_stored_adapter_loads_in_peft_with_its_weights(
    store: AdapterStore, tiny_llama: Path, generator: FakeGenerator
) -> None:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    record = store.get_or_create(TRANSLATE).record
    paths = store.files(record.id)
    assert paths.folder == store.root / record.id
    config = json.loads(paths.config.read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama.resolve())
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), paths.folder)
    loaded = get_peft_model_state_dict(model)
    expected, _ = generator(TRANSLATE)  # seeded by the instruction: the same factors again
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor)


def test_files_are_checked_against_sha256_on_every_load(store: AdapterStore) -> None:
    record = store.get_or_create(TRANSLATE).record
    store.files(record.id)
    weights = record.folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapterError, match="sha256"):
        store.files(record.id)
    with pytest.raises(CorruptAdapterError):
        store.load(record.id)
    (record.folder / "adapter_config.json").unlink()
    weights.unlink()
    with pytest.raises(CorruptAdapterError, match="missing"):
        store.files(record.id)
    # A hit whose files are gone is not handed out: a fresh adapter is made instead.
    assert not store.get_or_create(TRANSLATE).hit


def test_read_file_returns_the_checked_bytes_of_the_two_files_only(
    store: AdapterStore, tmp_path: Path
) -> None:
    record = store.get_or_create(TRANSLATE).record
    weights = record.folder / "adapter_model.safetensors"
    os.utime(record.folder / ".last-used", (1.0, 1.0))
    assert store.read_file(record.id, "adapter_model.safetensors") == weights.read_bytes()
    assert store.get(record.id).last_used > 1.0  # reading marks it used
    config = store.read_file(record.id, "adapter_config.json")
    assert json.loads(config)["r"] == RANK

    for name in ("capplug-adapter.json", ".last-used", "../secret.txt", ""):
        with pytest.raises(UnknownAdapterFileError, match="two files"):
            store.read_file(record.id, name)
    with pytest.raises(UnknownAdapterFileError):  # the name is checked before the id
        store.read_file("0123456789abcdef", "passwd")
    with pytest.raises(UnknownAdapterError):
        store.read_file("0123456789abcdef", "adapter_config.json")

    # A link to a copy with the very same bytes passes the sha256 check, and is refused anyway.
    outside = tmp_path / "outside.safetensors"
    shutil.copy(weights, outside)
    weights.unlink()
    os.symlink(outside, weights)
    with pytest.raises(RefusedAdapterFileError, match="not a regular file"):
        store.read_file(record.id, "adapter_model.safetensors")
    # So is a folder moved out of the store with a link left in its place.
    other = store.get_or_create(VOWELS).record
    moved = tmp_path / "moved-adapter"
    shutil.move(other.folder, moved)
    os.symlink(moved, other.folder, target_is_directory=True)
    with pytest.raises(RefusedAdapterFileError):
        store.read_file(other.id, "adapter_config.json")


def test_read_file_refuses_changed_or_missing_bytes(store: AdapterStore) -> None:
    record = store.get_or_create(TRANSLATE).record
    config = record.folder / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 5'))
    with pytest.raises(CorruptAdapterError, match="sha256"):
        store.read_file(record.id, "adapter_config.json")
    (record.folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptAdapterError, match="missing"):
        store.read_file(record.id, "adapter_model.safetensors")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_hit_is_set_aside_and_made_again(
    store: AdapterStore, generator: FakeGenerator
) -> None:
    first = store.get_or_create(TRANSLATE).record
    _flip_last_byte(first.folder / "adapter_model.safetensors")
    again = store.get_or_create(TRANSLATE)
    assert not again.hit and again.record.id != first.id and again.set_aside == (first.id,)
    assert generator.calls == [TRANSLATE, TRANSLATE]
    store.files(again.record.id)  # the fresh adapter's files match their sha256
    hit = store.get_or_create(TRANSLATE)
    assert hit.hit and hit.record.id == again.record.id and hit.set_aside == ()
    with pytest.raises(UnknownAdapterError):
        store.get(first.id)
    # Set aside the way repair does it: nothing deleted that could still be looked at.
    (aside,) = (store.root / ".corrupt").iterdir()
    assert aside.name.startswith(first.id) and (aside / "adapter_model.safetensors").is_file()
    assert len(store) == 1 and store.verify().ok


def test_a_corrupt_hit_without_a_generator_is_set_aside_with_a_clear_error(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    with AdapterStore(
        tmp_path, base_model=str(tiny_llama), embedding_function=WordHashEmbedding()
    ) as store:
        state, config = generator(TRANSLATE)
        record = store.put(state, config, instruction=TRANSLATE, source="imported")
        _flip_last_byte(record.folder / "adapter_model.safetensors")
        with pytest.raises(NoGeneratorError) as first:
            store.get_or_create(TRANSLATE)
        message = str(first.value)
        assert first.value.set_aside == (record.id,)
        assert record.id in message and "corrupt" in message and ".corrupt" in message
        assert "import" in message and "generator=" in message  # the two ways out
        # Not handed out again, and not reported again: it is no longer in the index.
        with pytest.raises(NoGeneratorError) as second:
            store.get_or_create(TRANSLATE)
        assert second.value.set_aside == () and "corrupt" not in str(second.value)
        assert len(store) == 0 and store.verify().ok


def test_hits_hash_their_files_again_only_when_the_files_changed(
    store: AdapterStore, generator: FakeGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import capplug.adapters.store.records as store_module  # where checked_paths hashes

    record = store.get_or_create(TRANSLATE).record
    weights, config = (
        record.folder / n for n in ("adapter_model.safetensors", "adapter_config.json")
    )
    old = time.time() - 60  # files written a while ago: a later write would change their mtime
    for path in (weights, config):
        os.utime(path, (old, old))
    hashed: list[str] = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))

    assert store.get_or_create(TRANSLATE).hit
    assert sorted(hashed) == ["adapter_config.json", "adapter_model.safetensors"]
    hashed.clear()
    assert store.get_or_create(TRANSLATE).hit and hashed == []  # unchanged files: a stat each
    store.files(record.id)
    assert len(hashed) == 2  # a load always hashes what it hands out

    # Changed in place with the old mtime put back: the change time still gives it away.
    time.sleep(0.05)
    _flip_last_byte(weights)
    os.utime(weights, (old, old))
    again = store.get_or_create(TRANSLATE)
    assert not again.hit and again.set_aside == (record.id,)
    assert generator.calls == [TRANSLATE, TRANSLATE]


def test_import_peft_folder_and_put_a_state_dict(
    store: AdapterStore, peft_folder: Path, generator: FakeGenerator, tiny_llama: Path
) -> None:
    from peft import LoraConfig
    from safetensors.torch import load_file

    imported = store.import_folder(peft_folder, VOWELS)
    assert imported.source == "imported" and imported.rank == RANK
    assert imported.target_modules == tuple(sorted(TARGETS))
    original = load_file(peft_folder / "adapter_model.safetensors")
    for key, tensor in store.load(imported.id).state_dict.items():
        torch.testing.assert_close(tensor, original[key])
    state, _ = generator(TRANSLATE)
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS)  # no base named: the store's
    trained = store.put(state, config, instruction=TRANSLATE, source="trained")
    assert trained.source == "trained"
    assert store.lookup(VOWELS)[0].record.id == imported.id
    assert store.get_or_create(TRANSLATE).record.id == trained.id
    assert {r.id for r in store.list_adapters()} == {imported.id, trained.id}
    assert store.verify().ok


def test_add_in_place_indexes_folders_already_in_the_store(
    store: AdapterStore, peft_folder: Path, generator: FakeGenerator
) -> None:
    from capplug._cache import sha256_file

    weights_sha = sha256_file(peft_folder / "adapter_model.safetensors")
    config_sha = sha256_file(peft_folder / "adapter_config.json")
    size = sum(
        (peft_folder / n).stat().st_size
        for n in ("adapter_model.safetensors", "adapter_config.json")
    )

    def placed(adapter_id: str, instruction: str, used: float) -> AdapterRecord:
        folder = store.root / adapter_id
        folder.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copyfile(peft_folder / name, folder / name)
        return AdapterRecord(
            id=adapter_id,
            instruction=instruction,
            base_model=store.base_model,
            rank=RANK,
            target_modules=tuple(sorted(TARGETS)),
            sha256=weights_sha,
            config_sha256=config_sha,
            size=size,
            created=used,
            last_used=used,
            source="imported",
            instruction_hash=instruction_hash(instruction),
        )

    texts = [TRANSLATE, VOWELS, "Name the capital city."]
    records = [placed(f"{i:016x}", t, 1000.0 + i) for i, t in enumerate(texts)]
    vectors = WordHashEmbedding()(texts[:2])
    added = store.add_in_place(records[:2], embeddings=vectors, batch_size=1)
    added += store.add_in_place(records[2:])  # embedded by the store
    assert [r.folder for r in added] == [store.root / r.id for r in records]
    assert len(store) == 3 and store.verify().ok
    assert [store.get(r.id).last_used for r in added] == [1000.0, 1001.0, 1002.0]
    for record, text in zip(added, texts, strict=True):
        hit = store.get_or_create(text)
        assert hit.hit and hit.record.id == record.id and hit.similarity == 1.0
        assert store.lookup(text + " Please.", threshold=0.5)[0].record.id == record.id
        store.files(record.id)
    assert generator.calls == []

    again = placed("00000000000000ff", "Sort the list.", 1.0)
    with pytest.raises(ValueError, match="indexed already"):
        store.add_in_place([records[0]])
    with pytest.raises(ValueError, match="instruction_hash"):
        store.add_in_place([dataclasses.replace(again, instruction_hash="0" * 64)])
    with pytest.raises(ValueError, match="one vector per record"):
        store.add_in_place([again], embeddings=[])
    with pytest.raises(WrongBaseModelError):
        store.add_in_place([dataclasses.replace(again, base_model="someone/other-model")])
    (store.root / again.id / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        store.add_in_place([again])
    assert len(store) == 3
    with pytest.raises(UnknownAdapterError):
        store.get(again.id)


def test_adapter_for_another_base_is_refused_naming_both(
    store: AdapterStore, peft_folder: Path, generator: FakeGenerator, tmp_path: Path
) -> None:
    state, config = generator(TRANSLATE)
    with pytest.raises(WrongBaseModelError) as refused:
        store.put(
            state,
            {**config, "base_model_name_or_path": "someone/other-model"},
            instruction=TRANSLATE,
        )
    assert "someone/other-model" in str(refused.value) and store.base_model in str(refused.value)
    other = tmp_path / "other-base"
    other.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (other / name).write_bytes((peft_folder / name).read_bytes())
    raw = json.loads((other / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(WrongBaseModelError, match="SmolLM2-135M-Instruct.*" + store.base_model):
        store.import_folder(other, TRANSLATE)
    assert len(store) == 0


def test_truncated_or_corrupt_safetensors_are_refused_before_indexing(
    store: AdapterStore, peft_folder: Path, tmp_path: Path
) -> None:
    before = _children(store.root)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((peft_folder / "adapter_config.json").read_bytes())
    weights = (peft_folder / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(weights[: len(weights) - 100])
    with pytest.raises(AdapterFileError, match="truncated"):
        store.import_folder(broken, TRANSLATE)
    (broken / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}"
    )
    with pytest.raises(AdapterFileError, match="corrupt"):
        store.import_folder(broken, TRANSLATE)
    (broken / "adapter_model.safetensors").unlink()
    (broken / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFileError, match="pickle"):
        store.import_folder(broken, TRANSLATE)
    assert len(store) == 0 and _children(store.root) == before


# ------------------------------------------------------------------------------- upkeep


def test_eviction_by_count_is_least_recently_used_first(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    with AdapterStore(
        tmp_path,
        base_model=str(tiny_llama),
        embedding_function=WordHashEmbedding(),
        generator=generator,
        max_adapters=2,
    ) as store:
        a = store.get_or_create(TRANSLATE).record
        b = store.get_or_create(VOWELS).record
        time.sleep(0.01)
        assert store.get_or_create(TRANSLATE).hit  # a is now more recent than b
        c = store.get_or_create("Name the capital city of the country.").record
        assert {r.id for r in store.list_adapters()} == {a.id, c.id}
        assert not (tmp_path / b.id).exists()
        time.sleep(0.01)
        store.touch(a.id)
        d = store.get_or_create("Sort the numbers from smallest to largest.").record
        assert {r.id for r in store.list_adapters()} == {a.id, d.id}
        assert store.verify().ok


def test_gc_by_bytes_dry_run_and_last_used_synced_into_the_index(store: AdapterStore) -> None:
    records = [store.get_or_create(t).record for t in (TRANSLATE, VOWELS, "Sort the numbers.")]
    time.sleep(0.01)
    store.touch(records[0].id)
    planned = store.gc(max_bytes=records[0].size * 2, dry_run=True)
    assert [r.id for r in planned] == [records[1].id] and len(store) == 3
    evicted = store.gc(max_bytes=records[0].size * 2)
    assert [r.id for r in evicted] == [records[1].id]
    assert {r.id for r in store.list_adapters()} == {records[0].id, records[2].id}
    row = store.collection.get(ids=[records[0].id], include=["metadatas"])["metadatas"][0]
    assert row["last_used"] > records[0].created
    assert store.gc(max_adapters=5) == []


def test_remove_deletes_files_and_row(store: AdapterStore) -> None:
    record = store.get_or_create(TRANSLATE).record
    assert store.remove(record.id).id == record.id
    assert not record.folder.exists() and len(store) == 0
    with pytest.raises(UnknownAdapterError):
        store.remove(record.id)
    assert store.lookup(TRANSLATE) == []


def test_verify_and_repair_find_and_fix_every_kind_of_damage(store: AdapterStore) -> None:
    import shutil

    lost, orphan, corrupt, fine = (
        store.get_or_create(t).record
        for t in (TRANSLATE, VOWELS, "Sort the numbers.", "Name the capital city.")
    )
    shutil.rmtree(lost.folder)  # a row without files
    store.collection.delete(ids=[orphan.id])  # files without a row
    weights = corrupt.folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    stale = store.root / f".{fine.id}.leftover"  # an interrupted write, long ago
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    young = store.root / ".0123456789abcdef.inprogress"  # may be a write happening now
    young.mkdir()

    report = store.verify()
    assert not report.ok
    assert report.rows_without_files == [lost.id]
    assert report.files_without_rows == [orphan.id]
    assert report.corrupt == [corrupt.id]
    assert report.stale_staging == [stale.name]
    assert store.verify(check_hashes=False).corrupt == []

    repaired = store.repair()
    assert len(repaired.actions) == 4
    assert store.verify().ok and young.exists() and not stale.exists()
    assert {r.id for r in store.list_adapters()} == {orphan.id, fine.id}
    assert store.lookup("count the vowels in a word", threshold=0.5)[0].record.id == orphan.id
    assert any(p.name.startswith(corrupt.id) for p in (store.root / ".corrupt").iterdir())


_CRASH_WHILE_INDEXING = """
import json, os, sys
from chromadb.api.models.Collection import Collection
from store_fakes import FakeGenerator, WordHashEmbedding
from capplug.adapters.store import AdapterStore

root, base, shapes, instruction = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]

def killed(self, *args, **kwargs):
    os._exit(17)  # dies with the adapter folder in place and no index row

Collection.add = killed
generator = FakeGenerator({k: tuple(v) for k, v in shapes.items()}, base)
store = AdapterStore(root, base_model=base, embedding_function=WordHashEmbedding(),
                     generator=generator)
store.get_or_create(instruction)
sys.exit(0)
"""


def test_a_crash_between_moving_into_place_and_indexing_is_adopted_by_the_retry(
    store: AdapterStore,
    generator: FakeGenerator,
    tiny_llama: Path,
    shapes: dict[str, tuple[int, ...]],
) -> None:
    import re
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SUPPORT, os.environ.get("PYTHONPATH")]))
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            _CRASH_WHILE_INDEXING,
            str(store.root),
            str(tiny_llama),
            json.dumps(shapes),
            TRANSLATE,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == 17, crashed.stderr
    folders = [p.name for p in store.root.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)]
    assert len(folders) == 1 and len(store) == 0  # files in place, no index row

    retry = store.get_or_create(TRANSLATE)
    assert retry.hit and retry.record.id == folders[0] and retry.similarity == 1.0
    assert generator.calls == []  # nothing made twice
    store.files(retry.record.id)
    assert len(store) == 1 and store.verify().ok
    assert [p.name for p in store.root.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)] == [
        retry.record.id
    ]


_CRASH_AT_PHASE = """
import json, os, re, sys
from pathlib import Path
import capplug.adapters.store._adding as store_module
from chromadb.api.models.Collection import Collection
from store_fakes import FakeGenerator, WordHashEmbedding
from capplug.adapters.store import AdapterStore

root, base, shapes, instruction, phase = sys.argv[1:6]
shapes = json.loads(shapes)

def die(*args, **kwargs):
    os._exit(17)

if phase == "writing files":
    store_module.write_peft_folder = die
elif phase == "writing the record":
    store_module.write_json_atomic = die
elif phase == "renaming into place":
    replace = os.replace
    def replacing(src, dst, *args, **kwargs):
        if re.fullmatch(r"[0-9a-f]{16}", Path(dst).name) and Path(src).name.startswith("."):
            os._exit(17)
        return replace(src, dst, *args, **kwargs)
    os.replace = replacing
elif phase in ("indexing", "deleting"):
    setattr(Collection, "add" if phase == "indexing" else "delete", die)
generator = FakeGenerator({k: tuple(v) for k, v in shapes.items()}, base)
store = AdapterStore(root, base_model=base, embedding_function=WordHashEmbedding(),
                     generator=generator)
if phase == "deleting":
    store.remove(store.lookup(instruction)[0].record.id)
else:
    store.get_or_create(instruction)
sys.exit(0)
"""


@pytest.mark.parametrize(
    "phase",
    ["writing files", "writing the record", "renaming into place", "indexing", "deleting"],
)
def test_a_crash_at_any_write_phase_leaves_one_good_adapter_after_retry_and_repair(
    store: AdapterStore,
    tiny_llama: Path,
    shapes: dict[str, tuple[int, ...]],
    phase: str,
) -> None:
    import subprocess

    if phase == "deleting":
        store.get_or_create(TRANSLATE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SUPPORT, os.environ.get("PYTHONPATH")]))
    arguments = [str(store.root), str(tiny_llama), json.dumps(shapes), TRANSLATE, phase]
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASH_AT_PHASE, *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == 17, crashed.stderr  # killed in that phase, not before

    again = store.get_or_create(TRANSLATE)  # nothing corrupt or half-written is served
    store.files(again.record.id)
    store.repair()
    assert store.verify().ok
    kept = [r for r in store.list_adapters() if r.instruction == TRANSLATE]
    assert [r.id for r in kept] == [again.record.id]  # exactly one adapter for the instruction
    assert store.get_or_create(TRANSLATE).record.id == again.record.id


def test_repair_keeps_one_adapter_per_instruction_after_a_crash_and_retry(
    store: AdapterStore, generator: FakeGenerator
) -> None:
    crashed = store.get_or_create(TRANSLATE).record
    lost = store.get_or_create(VOWELS).record
    row = store.collection.get(ids=[crashed.id], include=["metadatas"])["metadatas"][0]
    # What a crash between moving the folder into place and indexing it left before creations
    # were journalled: the files, no row. The retry then made a second adapter.
    store.collection.delete(ids=[crashed.id, lost.id])
    retried = store.get_or_create(TRANSLATE).record
    remade = store.get_or_create(VOWELS).record
    assert {retried.id, remade.id}.isdisjoint({crashed.id, lost.id})

    report = store.verify()
    assert not report.ok
    assert report.duplicates == {crashed.id: retried.id, lost.id: remade.id}
    assert report.files_without_rows == []  # repair removes them rather than indexing them again

    # And what the old repair then did for one of them: index it again. Two rows, both 1.0.
    store.collection.add(
        ids=[crashed.id],
        embeddings=[store.embedding_function([TRANSLATE])[0]],
        documents=[TRANSLATE],
        metadatas=[row],
    )
    assert len(store.lookup(TRANSLATE)) == 2
    report = store.verify()
    assert not report.ok
    assert report.duplicates == {crashed.id: retried.id, lost.id: remade.id}

    repaired = store.repair()
    for dup, kept in ((crashed.id, retried.id), (lost.id, remade.id)):
        assert any(dup in action and kept in action for action in repaired.actions)
    assert store.verify().ok
    assert [m.record.id for m in store.lookup(TRANSLATE)] == [retried.id]
    assert [m.record.id for m in store.lookup(VOWELS)] == [remade.id]
    assert {r.id for r in store.list_adapters()} == {retried.id, remade.id}
    assert not crashed.folder.exists() and not lost.folder.exists()
    store.files(retried.id)
    assert store.get_or_create(TRANSLATE).record.id == retried.id
    assert generator.calls == [TRANSLATE, VOWELS, TRANSLATE, VOWELS]


def test_different_adapters_stored_for_one_instruction_are_not_duplicates(
    store: AdapterStore, generator: FakeGenerator, peft_folder: Path
) -> None:
    generated = store.get_or_create(TRANSLATE).record
    state, config = generator(VOWELS)  # other weights, put on purpose for the same instruction
    trained = store.put(state, config, instruction=TRANSLATE, source="trained")
    imported = store.import_folder(peft_folder, TRANSLATE)
    assert store.verify().ok and len(store.lookup(TRANSLATE)) == 3
    again = store.import_folder(peft_folder, TRANSLATE.upper())  # the very same files again
    report = store.verify()
    assert report.duplicates == {imported.id: again.id}
    store.repair()
    assert {r.id for r in store.list_adapters()} == {generated.id, trained.id, again.id}
    assert store.verify().ok


def test_reopened_store_uses_the_persisted_embedding_function_and_refuses_another(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    with AdapterStore(
        tmp_path,
        base_model=str(tiny_llama),
        embedding_function=WordHashEmbedding(dim=128),
        generator=generator,
    ) as store:
        made = store.get_or_create(TRANSLATE).record
    with AdapterStore(tmp_path, base_model=str(tiny_llama)) as reopened:
        assert isinstance(reopened.embedding_function, WordHashEmbedding)
        assert reopened.embedding_function.dim == 128
        assert reopened.lookup(TRANSLATE_AGAIN, threshold=0.5)[0].record.id == made.id
    with pytest.raises(AdapterStoreError, match="another embedding space"):
        AdapterStore(
            tmp_path, base_model=str(tiny_llama), embedding_function=WordHashEmbedding(dim=64)
        )
    with pytest.raises(AdapterStoreError, match="another embedding space"):
        AdapterStore(
            tmp_path,
            base_model=str(tiny_llama),
            embedding_function=SentenceEncoderEmbeddingFunction(),
        )


def test_another_base_model_gets_its_own_collection_in_the_same_root(
    store: AdapterStore, shapes: dict[str, tuple[int, ...]]
) -> None:
    store.get_or_create(TRANSLATE)
    other_gen = FakeGenerator(shapes, "someone/other-model")
    with AdapterStore(
        store.root,
        base_model="someone/other-model",
        embedding_function=WordHashEmbedding(),
        generator=other_gen,
    ) as other:
        assert other.name != store.name and len(other) == 0
        assert not other.get_or_create(TRANSLATE).hit
        assert (
            other.verify().ok and store.verify().ok
        )  # neither sees the other's folders as orphans


def test_verify_hit_refusal_makes_a_fresh_adapter(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    refused: set[str] = set()
    checked: list[tuple[str, str]] = []

    def verify_hit(record, instruction: str) -> bool:
        checked.append((record.id, instruction))
        return record.id not in refused

    with AdapterStore(
        tmp_path,
        base_model=str(tiny_llama),
        embedding_function=WordHashEmbedding(),
        generator=generator,
        verify_hit=verify_hit,
    ) as store:
        first = store.get_or_create(TRANSLATE).record
        assert checked == []  # nothing to check on a miss
        assert store.get_or_create(TRANSLATE).record.id == first.id
        assert checked == [(first.id, TRANSLATE)]
        refused.add(first.id)
        fresh = store.get_or_create(TRANSLATE)
        assert not fresh.hit and fresh.rejected == (first.id,) and fresh.record.id != first.id
        assert fresh.similarity == 1.0
        again = store.get_or_create(TRANSLATE)  # the newest exact match comes first now
        assert again.hit and again.record.id == fresh.record.id


def test_scorer_hit_check_answers_a_probe_and_keeps_or_refuses_the_hit(
    tmp_path: Path, tiny_llama: Path, generator: FakeGenerator
) -> None:
    from capplug import Scorer
    from capplug.adapters.hit_check import ScorerHitCheck
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.testing import save_tiny_scorer

    runtime = AdapterRuntime.from_pretrained(tiny_llama, device="cpu", max_loaded=4)
    scorer = Scorer.from_pretrained(save_tiny_scorer(tmp_path / "scorer"), device="cpu")
    check = ScorerHitCheck(runtime, scorer, bar=0.0, probe="the cat sat", max_new_tokens=3)
    with AdapterStore(
        tmp_path / "store",
        base_model=str(tiny_llama),
        embedding_function=WordHashEmbedding(),
        generator=generator,
        verify_hit=check,
    ) as store:
        first = store.get_or_create(TRANSLATE)
        assert not first.hit and not check.history  # a miss is never checked
        hit = store.get_or_create(TRANSLATE)
        assert hit.hit and hit.record.id == first.record.id
        (kept,) = check.history
        assert kept.accepted and kept.adapter_id == first.record.id
        assert kept.prompt == f"{TRANSLATE}\n\nthe cat sat"  # the instruction, then the probe
        assert kept.score == pytest.approx(scorer.score(kept.prompt, [kept.answer])[0])
        assert first.record.id in runtime  # the checked adapter stays attached for the answer

        check.bar = 1.0  # no answer scores 1.0 exactly: every hit is refused
        fresh = store.get_or_create(TRANSLATE)
        assert not fresh.hit and fresh.rejected == (first.record.id,)
        assert fresh.record.id != first.record.id and not check.history[-1].accepted

        # A hit whose file changed is set aside before anything reaches the check or the model;
        # the next exact match (the one refused above, accepted at this bar) is checked instead.
        check.bar = 0.0
        weights = fresh.record.folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8])
        after = store.get_or_create(TRANSLATE)
        assert after.set_aside == (fresh.record.id,)
        assert after.hit and after.record.id == first.record.id
        assert check.history[-1].adapter_id == first.record.id
        assert all(r.adapter_id != fresh.record.id for r in check.history if r.accepted)
        assert fresh.record.id not in runtime

    with pytest.raises(ValueError, match="bar"):
        ScorerHitCheck(runtime, scorer, bar=1.5)
    with pytest.raises(TypeError, match="probe"):
        ScorerHitCheck(runtime, scorer, probe=3)  # type: ignore[arg-type]
    callable_probe = ScorerHitCheck(runtime, scorer, probe=lambda text: None)
    assert callable_probe.prompt("  Say hi.  ") == "Say hi."


# -------------------------------------------------------------------------------- processes


def test_processes_sharing_a_store_make_each_adapter_once_and_lose_nothing(
    tmp_path: Path,
    tiny_llama: Path,
    shapes: dict[str, tuple[int, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, base, log = tmp_path / "store", str(tiny_llama), tmp_path / "generated.log"
    shared = "Answer the question about the passage with yes or no."
    # Four unrelated tasks: near-duplicates would hit one another's adapters in whichever
    # order the processes happen to run.
    own = [
        "Write a poem about the sea in four lines.",
        "Translate the sentence from English into German.",
        "List three prime numbers greater than one hundred.",
        "Summarize the customer review in one short sentence.",
    ]
    # This process opens the index first and keeps it open while the others write.
    parent = AdapterStore(root, base_model=base, embedding_function=WordHashEmbedding())
    assert len(parent.lookup(own[0], threshold=0.0)) == 0

    # Real processes, forked from a server that imported torch, peft and Chroma once (Python
    # 3.11's forkserver ignores sys.path for its preloads: PYTHONPATH reaches it).
    here = SUPPORT
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    )
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["store_fakes"])
    barrier, results = ctx.Barrier(len(own)), ctx.Queue()
    procs = [
        ctx.Process(
            target=worker,
            args=(str(root), base, shapes, str(log), [shared, mine], barrier, results),
        )
        for mine in own
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    rows = [row for _, out in outcomes for row in out]

    shared_rows = [(i, hit) for text, i, hit in rows if text == shared]
    assert len({i for i, _ in shared_rows}) == 1, "the same instruction made two adapters"
    assert sorted(hit for _, hit in shared_rows) == [False, True, True, True]
    own_ids = {text: i for text, i, hit in rows if text != shared and not hit}
    assert len(own_ids) == len(own) and len(set(own_ids.values())) == len(own)
    generated = log.read_text().splitlines()
    assert generated.count(shared) == 1 and sorted(generated) == sorted([shared, *own])

    # The long-lived parent sees every vector the others added (it reopens the index).
    for text, adapter_id in own_ids.items():
        best = parent.lookup(
            text.replace("in four lines", "in four short lines"), threshold=0.0, k=1
        )
        assert best[0].record.id == adapter_id
    assert len(parent) == len(own) + 1
    assert (
        len(parent.collection.get(where={"instruction_hash": instruction_hash(shared)})["ids"]) == 1
    )
    assert parent.verify().ok
    parent.close()


# ------------------------------------------------------------------------------------ CLI


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="capplug adapters")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CapplugError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"capplug: error: {exc}", file=sys.stderr)
        return 2


def test_cli_import_list_show_lookup_gc_rm_verify(
    tmp_path: Path, tiny_llama: Path, peft_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, base = tmp_path / "store", str(tiny_llama)
    fake_indexed_store(root, base)
    opts = ["--store", str(root), "--base", base]

    assert _main(["import", str(peft_folder), "--instruction", TRANSLATE, *opts, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["id"]
    assert (
        _main(["import", str(peft_folder), "--instruction", VOWELS, "--source", "trained", *opts])
        == 0
    )
    second = capsys.readouterr().out.split()[1]

    assert _main(["list", *opts]) == 0
    listing = capsys.readouterr().out
    assert (
        "2 adapters" in listing and first in listing and second in listing and "trained" in listing
    )

    assert _main(["show", first, *opts]) == 0
    shown = capsys.readouterr().out
    assert TRANSLATE in shown and "sha256 checked" in shown

    assert (
        _main(["lookup", "--instruction", TRANSLATE_AGAIN, "--threshold", "0.5", *opts, "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["id"] == first

    assert _main(["gc", "--max-adapters", "1", "--dry-run", *opts]) == 0
    assert "would evict 1" in capsys.readouterr().out
    assert _main(["gc", "--max-bytes", "1k", *opts, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["evicted"]) == 2

    assert _main(["import", str(peft_folder), "--instruction", TRANSLATE, *opts]) == 0
    third = capsys.readouterr().out.split()[1]
    (root / third / "adapter_model.safetensors").write_bytes(b"garbage")
    assert _main(["show", third, *opts]) == 1
    assert "BAD" in capsys.readouterr().out
    assert _main(["verify", *opts]) == 1
    assert "corrupt: " + third in capsys.readouterr().out
    assert _main(["verify", "--repair", *opts]) == 0
    assert _main(["verify", *opts]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")

    assert _main(["import", str(peft_folder), "--instruction", TRANSLATE, *opts]) == 0
    fourth = capsys.readouterr().out.split()[1]
    assert _main(["rm", fourth, *opts]) == 0
    assert f"removed {fourth}" in capsys.readouterr().out
    assert _main(["list", *opts, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_errors_are_one_line_with_the_fix(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(["list", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no adapter store at" in capsys.readouterr().err
    root = tmp_path / "store"
    fake_indexed_store(root, str(tiny_llama))
    opts = ["--store", str(root), "--base", str(tiny_llama)]
    assert _main(["show", "0123456789abcdef", *opts]) == 2
    assert "no adapter '0123456789abcdef'" in capsys.readouterr().err
    assert _main(["rm", "nope", *opts]) == 2
    assert "not an adapter id" in capsys.readouterr().err
    assert _main(["gc", *opts]) == 2
    assert "--max-adapters" in capsys.readouterr().err
    assert _main(["lookup", "--instruction", " ", *opts]) == 2
    assert "instruction is empty" in capsys.readouterr().err
    assert _main(["import", str(tmp_path / "missing"), "--instruction", TRANSLATE, *opts]) == 2
    assert "no adapter folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main(["gc", "--max-bytes", "lots", *opts])
    assert "not a size" in capsys.readouterr().err
    assert (
        _main(["create", "--instruction", TRANSLATE, "--hypernet", str(tmp_path / "none"), *opts])
        == 2
    )
    assert "hypernetwork" in capsys.readouterr().err.lower()


def test_cli_create_makes_then_hits_with_a_hypernetwork(
    tmp_path: Path, tiny_llama: Path, tiny_bert_backbone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capplug.adapters.hypernetwork import Hypernetwork

    hypernet = Hypernetwork.from_base(
        tiny_llama, encoder=str(tiny_bert_backbone), r=4, hidden_dim=16
    )
    folder = hypernet.save_pretrained(tmp_path / "hypernet")
    root = tmp_path / "store"
    fake_indexed_store(root, hypernet.config.base_model)
    opts = ["--store", str(root), "--hypernet", str(folder), "--device", "cpu", "--json"]
    assert _main(["create", "--instruction", TRANSLATE, *opts]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["hit"] is False and (Path(made["folder"]) / "adapter_model.safetensors").is_file()
    assert _main(["create", "--instruction", TRANSLATE.lower(), *opts]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["hit"] is True and hit["id"] == made["id"] and hit["similarity"] == 1.0
    with AdapterStore(root, base_model=hypernet.config.base_model) as store:
        record = store.get(made["id"])
        assert record.source == "generated" and record.hypernetwork_version.startswith(
            "capplug-hypernetwork/1@"
        )
    assert (
        _main(["create", "--instruction", TRANSLATE, *opts, "--base", "someone/other-model"]) == 2
    )
    assert "someone/other-model" in capsys.readouterr().err


def test_an_encoder_onnx_cannot_reproduce_stays_on_pytorch(monkeypatch) -> None:
    from capplug.adapters import _onnx_encoder

    def refuse(folder, **kwargs):
        raise _onnx_encoder.UnsupportedEncoder("the ONNX export differs from PyTorch")

    monkeypatch.setattr(_onnx_encoder, "OnnxSentenceEncoder", refuse)
    monkeypatch.setattr(SentenceEncoderEmbeddingFunction, "_onnx_encoders", {})
    auto = SentenceEncoderEmbeddingFunction()
    vectors = auto([TRANSLATE])
    assert auto.onnx_encoder() is None and len(vectors[0]) == 384
    with pytest.raises(_onnx_encoder.UnsupportedEncoder, match="differs"):
        monkeypatch.setattr(SentenceEncoderEmbeddingFunction, "_onnx_encoders", {})
        SentenceEncoderEmbeddingFunction(backend="onnx")([TRANSLATE])
    with pytest.raises(ValueError, match="backend"):
        SentenceEncoderEmbeddingFunction(backend="tpu")


def test_onnx_exports_are_shared_by_every_install_of_the_same_encoder(tmp_path) -> None:
    from capplug.adapters._onnx_encoder import _fingerprint

    def install(where: str, weights: bytes) -> Path:
        folder = tmp_path / where / "all-MiniLM-L6-v2"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "config.json").write_text('{"hidden_size": 384}')
        return folder

    first, second = install("venv-a", b"weights"), install("venv-b", b"weights")
    assert _fingerprint(first) == _fingerprint(second)  # one export, whatever the path
    assert _fingerprint(install("venv-c", b"other weights")) != _fingerprint(first)


def test_stored_files_follow_the_umask_so_another_user_can_read_them(
    store: AdapterStore,
) -> None:
    import stat

    from capplug._cache import process_umask

    record = store.get_or_create(TRANSLATE).record
    paths = store.files(record.id)
    folder = paths.folder
    umask = process_umask()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # 0755 under umask 022
    for path in (paths.weights, paths.config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # 0644, not mkstemp's 0600
