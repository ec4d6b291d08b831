"""Adapters by name: a unique name given at import, put or rename, kept across reopening and
repair, and found by :meth:`AdapterStore.resolve` beside the id."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from store_fakes import (  # noqa: F401 - the autouse fixture guards every test here
    RANK,
    TARGETS,
    FakeGenerator,
    WordHashEmbedding,
    fake_indexed_store,
    no_chroma_default_embedding,
)

from capplug.adapters.store import (
    RECORD_FILE,
    AdapterNameError,
    AdapterNameTakenError,
    AdapterStore,
    AdapterStoreError,
    UnknownAdapterError,
)
from capplug.cli import main
from capplug.testing import save_tiny_llama

TRANSLATE = "Translate the sentence into French."
VOWELS = "Count the vowels in the word."


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-names"))


@pytest.fixture(scope="module")
def peft_folder(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA saved by peft itself, for the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("peft-lora-names")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def _open(root: Path, tiny_llama: Path) -> AdapterStore:
    return AdapterStore(root, base_model=str(tiny_llama), embedding_function=WordHashEmbedding())


@pytest.fixture
def store(tmp_path: Path, tiny_llama: Path) -> Iterator[AdapterStore]:
    with _open(tmp_path / "store", tiny_llama) as opened:
        yield opened


def test_a_name_given_at_import_is_kept_across_reopening_and_resolves(
    store: AdapterStore, peft_folder: Path, tiny_llama: Path
) -> None:
    record = store.import_folder(peft_folder, TRANSLATE, name="french-lora")
    assert record.name == "french-lora"
    # Compared by id: timestamps read back from the index may differ in the last digits.
    assert store.resolve("french-lora").id == record.id == store.resolve(record.id).id
    assert store.get(record.id).name == "french-lora"
    assert json.loads((record.folder / RECORD_FILE).read_text())["name"] == "french-lora"
    unnamed = store.import_folder(peft_folder, VOWELS)
    assert unnamed.name is None and store.resolve(unnamed.id).id == unnamed.id
    store.close()
    with _open(store.root, tiny_llama) as again:
        assert again.resolve("french-lora").id == record.id
        assert {r.name for r in again.list_adapters()} == {"french-lora", None}
        assert again.verify().ok


def test_an_imported_named_folder_loads_unchanged_in_peft(
    store: AdapterStore, peft_folder: Path, tiny_llama: Path
) -> None:
    # The store's own peft test covers generated adapters; this one an imported, named folder.
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    record = store.import_folder(peft_folder, TRANSLATE, name="french-lora")
    folder = store.files(store.resolve("french-lora").id).folder
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), folder)
    loaded = get_peft_model_state_dict(model)
    original = load_file(peft_folder / "adapter_model.safetensors")
    assert loaded.keys() == original.keys() and record.rank == RANK
    for key, tensor in original.items():
        torch.testing.assert_close(loaded[key], tensor)


def test_put_rename_and_unname(store: AdapterStore, peft_folder: Path, tiny_llama: Path) -> None:
    shapes = {
        k: tuple(v.shape)
        for k, v in store.load(store.import_folder(peft_folder, VOWELS).id).state_dict.items()
    }
    state, config = FakeGenerator(shapes, str(tiny_llama))(TRANSLATE)
    put = store.put(state, config, instruction=TRANSLATE, name="v1.fr_lora")
    assert store.resolve("v1.fr_lora").id == put.id
    renamed = store.rename(put.id, "fr")
    assert renamed.name == "fr" and store.get(put.id).name == "fr"
    assert store.rename(put.id, "fr").name == "fr"  # its own name again: fine
    with pytest.raises(UnknownAdapterError):
        store.resolve("v1.fr_lora")  # the old name is free
    assert store.rename(put.id, None).name is None
    with pytest.raises(UnknownAdapterError):
        store.resolve("fr")
    assert json.loads((put.folder / RECORD_FILE).read_text())["name"] is None
    assert store.verify().ok


def test_a_taken_name_is_refused_and_nothing_is_stored(
    store: AdapterStore, peft_folder: Path
) -> None:
    first = store.import_folder(peft_folder, TRANSLATE, name="shared")
    children = {p.name for p in store.root.iterdir()}
    with pytest.raises(AdapterNameTakenError, match="'shared' is taken by adapter " + first.id):
        store.import_folder(peft_folder, VOWELS, name="shared")
    assert len(store) == 1 and {p.name for p in store.root.iterdir()} == children
    other = store.import_folder(peft_folder, VOWELS)
    with pytest.raises(AdapterNameTakenError):
        store.rename(other.id, "shared")
    assert store.get(other.id).name is None
    assert issubclass(AdapterNameTakenError, AdapterStoreError)
    # Freed by removal: the name may be used again.
    store.remove(first.id)
    assert store.rename(other.id, "shared").name == "shared"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "-lora",
        ".hidden",
        "a b",
        "a/b",
        "../x",
        "x@y",
        "a" * 65,
        "é",
        "x\n",
        "0123456789abcdef",
        "0123456789ABCDEF",
        7,
        None,
    ],
)
def test_bad_names_are_refused_before_any_work(
    store: AdapterStore, peft_folder: Path, bad: object
) -> None:
    if bad is None:
        assert store.import_folder(peft_folder, TRANSLATE, name=None).name is None
        return
    with pytest.raises(AdapterNameError) as caught:
        store.import_folder(peft_folder, TRANSLATE, name=bad)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError) and "name" in str(caught.value)
    assert len(store) == 0
    with pytest.raises(UnknownAdapterError):
        store.resolve(bad)  # type: ignore[arg-type]


def test_resolve_and_rename_of_unknown_adapters(store: AdapterStore) -> None:
    for unknown in ("nobody", "0123456789abcdef", "a" * 200, "x\n"):
        with pytest.raises(UnknownAdapterError):
            store.resolve(unknown)
    with pytest.raises(UnknownAdapterError):
        store.rename("0123456789abcdef", "fine")


def test_old_records_without_a_name_still_load_and_repair_keeps_names(
    store: AdapterStore, peft_folder: Path, tiny_llama: Path
) -> None:
    named = store.import_folder(peft_folder, TRANSLATE, name="kept")
    plain = store.import_folder(peft_folder, VOWELS)
    # A record file of before names: no "name" key at all.
    data = json.loads((plain.folder / RECORD_FILE).read_text())
    del data["name"]
    (plain.folder / RECORD_FILE).write_text(json.dumps(data))
    # Both rows lost: repair indexes the folders again from their record files.
    with store._index.writing() as collection:
        collection.delete(ids=[named.id, plain.id])
    assert len(store) == 0
    report = store.repair()
    assert sorted(report.files_without_rows) == sorted([named.id, plain.id])
    assert store.resolve("kept").id == named.id and store.get(plain.id).name is None


def test_add_in_place_keeps_names_and_refuses_taken_ones(
    store: AdapterStore, peft_folder: Path
) -> None:
    import dataclasses

    made = store.import_folder(peft_folder, TRANSLATE, name="in-place")
    copy = store.root / "00000000000000aa"
    shutil.copytree(made.folder, copy)
    record = dataclasses.replace(made, id=copy.name, folder=copy, name="in-place")
    with pytest.raises(AdapterNameTakenError):
        store.add_in_place([record])
    (added,) = store.add_in_place([dataclasses.replace(record, name="second")])
    assert store.resolve("second").id == added.id
    with pytest.raises(AdapterNameError):
        store.add_in_place([dataclasses.replace(record, id="00000000000000bb", name="a b")])


def test_cli_import_with_a_name(
    tmp_path: Path, tiny_llama: Path, peft_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, base = tmp_path / "store", str(tiny_llama)
    fake_indexed_store(root, base)
    opts = ["--store", str(root), "--base", base]
    argv = ["store", "import", str(peft_folder), "--instruction", TRANSLATE, *opts]
    assert main([*argv, "--name", "cli-lora", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["name"] == "cli-lora"
    assert main([*argv, "--name", "cli-lora"]) != 0
    assert "taken" in capsys.readouterr().err
    assert main([*argv, "--name", "bad name"]) != 0
    assert "not an adapter name" in capsys.readouterr().err
    assert main(["store", "show", "cli-lora", *opts]) == 0
    assert made["id"] in capsys.readouterr().out
    assert main(["store", "list", *opts]) == 0
    assert "cli-lora" in capsys.readouterr().out
