"""The adapter service by name, as vLLM and LoRAX address LoRA adapters: ``model`` takes
``<base>@<name>`` or the name alone, ``/v1/models`` lists named adapters by name, and
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` add and remove them (loading a server path
only when the app allows it)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from store_fakes import (  # noqa: F401 - the autouse fixture guards these tests too
    WordHashEmbedding,
    fake_indexed_store,
    no_chroma_default_embedding,
)
from test_adapter_service import BASE_NAME, MESSAGES, _error

from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import AdapterStore
from capplug.cli import main
from capplug.serve import create_adapter_app
from capplug.testing import save_tiny_llama

TRANSLATE = "Translate the sentence into French."
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-names"))


@pytest.fixture(scope="module")
def runtime(tiny_dir: Path) -> AdapterRuntime:
    return AdapterRuntime.from_pretrained(tiny_dir, max_loaded=2, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def peft_folder(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA saved by peft itself, with weights large enough to change the answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 20.0)
    folder = tmp_path_factory.mktemp("peft-lora-service")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def store(tmp_path: Path, tiny_dir: Path) -> Iterator[AdapterStore]:
    with AdapterStore(
        tmp_path / "store",
        base_model=str(tiny_dir),
        embedding_function=WordHashEmbedding(),
        threshold=0.6,
    ) as opened:
        yield opened


def _client(store: AdapterStore, runtime: AdapterRuntime, **options: Any) -> TestClient:
    app = create_adapter_app(
        store, runtime, model_name=BASE_NAME, max_tokens_cap=8, max_body_bytes=8192, **options
    )
    return TestClient(app)


@pytest.fixture
def client(store: AdapterStore, runtime: AdapterRuntime) -> Iterator[TestClient]:
    with _client(store, runtime, allow_load_from_path=True) as test_client:
        yield test_client
    for name in runtime.loaded:
        runtime.remove(name)


def _answer(client: TestClient, model: str) -> dict[str, Any]:
    response = client.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "model": model, "max_tokens": 6}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_load_by_name_answer_by_name_and_unload(
    client: TestClient, store: AdapterStore, runtime: AdapterRuntime, peft_folder: Path
) -> None:
    loaded = client.post(
        LOAD, json={"lora_name": "fr-lora", "lora_path": str(peft_folder), "instruction": TRANSLATE}
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'fr-lora' added successfully."
    adapter_id = loaded.headers["X-Capplug-Adapter"]
    record = store.resolve("fr-lora")
    assert record.id == adapter_id and record.instruction == TRANSLATE
    assert record.source == "imported" and record.name == "fr-lora"

    # Every way of naming it answers with it, and differently from the base model.
    base = _answer(client, BASE_NAME)["choices"][0]["message"]["content"]
    answers = set()
    for model in ("fr-lora", f"{BASE_NAME}@fr-lora", adapter_id, f"{BASE_NAME}@{adapter_id}"):
        reply = _answer(client, model)
        assert reply["capplug"]["adapter"] == adapter_id and reply["capplug"]["source"] == "id"
        answers.add(reply["choices"][0]["message"]["content"])
    assert len(answers) == 1 and base not in answers
    expected = runtime.generate([MESSAGES], adapter=adapter_id, max_new_tokens=6)[0]
    assert answers == {expected}
    # Found by its instruction too.
    hit = client.post("/v1/adapters", json={"instruction": TRANSLATE}).json()
    assert hit["id"] == adapter_id and hit["hit"] is True and hit["name"] == "fr-lora"

    # /v1/models lists it by its name with the base as parent, as vLLM does.
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [(BASE_NAME, None), ("fr-lora", BASE_NAME)]
    for ref in ("fr-lora", f"{BASE_NAME}@fr-lora", adapter_id):
        card = client.get(f"/v1/models/{ref}").json()
        assert (card["id"], card["parent"], card["root"]) == ("fr-lora", BASE_NAME, adapter_id)

    unloaded = client.post(UNLOAD, json={"lora_name": "fr-lora"})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.text == "Success: LoRA adapter 'fr-lora' removed successfully."
    assert len(store) == 0 and adapter_id not in runtime
    _error(client.post(UNLOAD, json={"lora_name": "fr-lora"}), 404, "adapter_not_found")
    for model in ("fr-lora", f"{BASE_NAME}@fr-lora"):
        error = _error(
            client.post("/v1/chat/completions", json={"messages": MESSAGES, "model": model}),
            404,
            "model_not_found",
        )
        assert error["param"] == "model"


def test_models_lists_named_adapters_by_name_and_the_others_by_id(
    client: TestClient, store: AdapterStore, peft_folder: Path
) -> None:
    plain = store.import_folder(peft_folder, "Count the vowels in the word.")
    named = store.import_folder(peft_folder, TRANSLATE, name="v2.fr_lora")
    listed = client.get("/v1/models").json()["data"]
    assert listed[0]["id"] == BASE_NAME
    cards = {m["id"]: (m["root"], m["parent"]) for m in listed[1:]}
    assert cards == {
        f"{BASE_NAME}@{plain.id}": (plain.id, BASE_NAME),
        "v2.fr_lora": (named.id, BASE_NAME),
    }
    # Named afterwards: listed, and addressed, by the new name.
    store.rename(plain.id, "vowels")
    assert "vowels" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert _answer(client, "vowels")["capplug"]["adapter"] == plain.id
    assert client.get(f"/v1/adapters/{plain.id}").json()["name"] == "vowels"


def test_the_adapter_routes_take_a_name_where_they_take_an_id(
    client: TestClient, store: AdapterStore, peft_folder: Path
) -> None:
    named = store.import_folder(peft_folder, TRANSLATE, name="fr-lora")
    card = client.get("/v1/adapters/fr-lora").json()
    assert card["id"] == named.id and card["name"] == "fr-lora"
    by_name = client.get("/v1/adapters/fr-lora/files/adapter_config.json")
    by_id = client.get(f"/v1/adapters/{named.id}/files/adapter_config.json")
    assert by_name.status_code == 200 and by_name.content == by_id.content
    _error(client.get("/v1/adapters/no-such-lora"), 404, "adapter_not_found")
    _error(client.get("/v1/adapters/no-such-lora/files/adapter_config.json"), 404)
    deleted = client.delete("/v1/adapters/fr-lora")
    assert deleted.status_code == 200 and deleted.json()["id"] == named.id
    assert len(store) == 0
    _error(client.delete("/v1/adapters/fr-lora"), 404, "adapter_not_found")


def test_load_inplace_replaces_the_adapter_of_that_name(
    client: TestClient,
    store: AdapterStore,
    runtime: AdapterRuntime,
    peft_folder: Path,
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file, save_file

    first = client.post(LOAD, json={"lora_name": "fr-lora", "lora_path": str(peft_folder)})
    old_id = first.headers["X-Capplug-Adapter"]
    _answer(client, "fr-lora")  # loaded into the runtime
    # Retrained: the same adapter with other weights.
    retrained = tmp_path / "retrained"
    retrained.mkdir()
    (retrained / "adapter_config.json").write_bytes(
        (peft_folder / "adapter_config.json").read_bytes()
    )
    weights = load_file(peft_folder / "adapter_model.safetensors")
    save_file({k: -v for k, v in weights.items()}, retrained / "adapter_model.safetensors")

    body = {"lora_name": "fr-lora", "lora_path": str(retrained)}
    _error(client.post(LOAD, json=body), 409, "adapter_name_taken")  # not without asking
    replaced = client.post(LOAD, json={**body, "load_inplace": True})
    assert replaced.status_code == 200, replaced.text
    new_id = replaced.headers["X-Capplug-Adapter"]
    assert new_id != old_id and store.resolve("fr-lora").id == new_id
    assert len(store) == 1 and old_id not in runtime  # the old one is gone, detached
    assert _answer(client, "fr-lora")["capplug"]["adapter"] == new_id
    # The same files again: reloaded, still one adapter of that name.
    again = client.post(LOAD, json={**body, "load_inplace": True})
    assert (
        again.status_code == 200
        and store.resolve("fr-lora").id == again.headers["X-Capplug-Adapter"]
    )
    assert len(store) == 1 and new_id not in runtime
    # With no adapter of that name, load_inplace just loads.
    other = {"lora_name": "de-lora", "lora_path": str(peft_folder), "load_inplace": True}
    assert client.post(LOAD, json=other).status_code == 200
    assert store.resolve("de-lora").name == "de-lora" and len(store) == 2


def test_bad_loads_are_4xx_naming_the_field_and_store_nothing(
    client: TestClient, store: AdapterStore, peft_folder: Path, tmp_path: Path
) -> None:
    wrong_base = shutil.copytree(peft_folder, tmp_path / "wrong-base")
    config = json.loads((wrong_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    (wrong_base / "adapter_config.json").write_text(json.dumps(config))
    truncated = shutil.copytree(peft_folder, tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    no_config = shutil.copytree(peft_folder, tmp_path / "no-config")
    (no_config / "adapter_config.json").unlink()
    good = str(peft_folder)

    cases: list[tuple[dict[str, Any], int, str | None, str | None]] = [
        ({"lora_name": "a b", "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": "../x", "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": "x@y", "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": "-x", "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": "x" * 65, "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": "0123456789abcdef", "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": BASE_NAME.upper(), "lora_path": good}, 400, "invalid_value", "lora_name"),
        ({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, 400, None, "lora_path"),
        ({"lora_name": "x", "lora_path": str(tmp_path)}, 400, None, "lora_path"),
        ({"lora_name": "x", "lora_path": "a\x00b"}, 400, None, "lora_path"),
        ({"lora_name": "x", "lora_path": str(wrong_base)}, 400, "wrong_base_model", "lora_path"),
        ({"lora_name": "x", "lora_path": str(truncated)}, 400, None, "lora_path"),
        ({"lora_name": "x", "lora_path": str(no_config)}, 400, None, "lora_path"),
        ({"lora_name": "x"}, 400, "missing_required_parameter", "lora_path"),
        ({"lora_path": good}, 400, "missing_required_parameter", "lora_name"),
        ({"lora_name": "x", "lora_path": good, "extra": 1}, 400, "unknown_parameter", None),
        ({"lora_name": "x", "lora_path": good, "instruction": ""}, 400, None, "instruction"),
        ({"lora_name": "x", "lora_path": good, "instruction": "x" * 5000}, 400, None, None),
        ({"lora_name": 5, "lora_path": good}, 400, None, "lora_name"),
    ]
    for body, status, code, param in cases:
        error = _error(client.post(LOAD, json=body), status, code)
        if param is not None:
            assert error["param"] == param, (body, error)
    wrong = _error(client.post(LOAD, json={"lora_name": "x", "lora_path": str(wrong_base)}), 400)
    assert "someone/other-model" in wrong["message"]
    _error(client.post(LOAD, json={"lora_name": "x", "lora_path": "p" * 9000}), 413)
    _error(client.post(UNLOAD, json={"lora_name": "never-loaded"}), 404, "adapter_not_found")
    _error(client.post(UNLOAD, json={"lora_name": "bad name"}), 404, "adapter_not_found")
    _error(client.post(UNLOAD, json={}), 400, "missing_required_parameter")
    assert len(store) == 0
    assert not [p.name for p in store.root.iterdir() if p.name[0] != "." and p.name != "index"]

    # A name taken is a 409, before the folder is read; the first adapter stays as it was.
    assert client.post(LOAD, json={"lora_name": "taken", "lora_path": good}).status_code == 200
    first = store.resolve("taken")
    for path in (good, str(tmp_path / "nowhere")):
        error = _error(client.post(LOAD, json={"lora_name": "taken", "lora_path": path}), 409)
        assert error["code"] == "adapter_name_taken" and error["param"] == "lora_name"
        assert first.id in error["message"]
    assert len(store) == 1 and store.resolve("taken").id == first.id
    # Without an instruction, the name stands in for one.
    assert first.instruction == "taken"


def test_loading_from_a_path_needs_the_switch(
    store: AdapterStore, runtime: AdapterRuntime, peft_folder: Path
) -> None:
    with _client(store, runtime) as client:
        body = {"lora_name": "fr-lora", "lora_path": str(peft_folder)}
        error = _error(client.post(LOAD, json=body), 403, "lora_loading_disabled")
        assert "--allow-lora-loading" in error["message"]
        assert len(store) == 0
        # Unloading is a delete, as DELETE /v1/adapters/ID is: no path is read.
        store.import_folder(peft_folder, TRANSLATE, name="fr-lora")
        assert client.post(UNLOAD, json={"lora_name": "fr-lora"}).status_code == 200
        assert len(store) == 0
    with pytest.raises(TypeError, match="allow_load_from_path"):
        create_adapter_app(store, runtime, allow_load_from_path="yes")  # type: ignore[arg-type]
    keyed = create_adapter_app(store, runtime, api_key="k", allow_load_from_path=True)
    with TestClient(keyed) as client:
        _error(client.post(LOAD, json=body), 401, "invalid_api_key")
        _error(client.post(UNLOAD, json={"lora_name": "fr-lora"}), 401, "invalid_api_key")
        assert len(store) == 0
        ok = client.post(LOAD, json=body, headers={"Authorization": "Bearer k"})
        assert (
            ok.status_code == 200 and store.resolve("fr-lora").id == ok.headers["X-Capplug-Adapter"]
        )


def test_cli_allow_lora_loading_reaches_the_app(
    tmp_path: Path,
    tiny_dir: Path,
    peft_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    seen: dict[str, int] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        with TestClient(app) as client:
            body = {"lora_name": f"n{len(seen)}", "lora_path": str(peft_folder)}
            seen[f"run{len(seen)}"] = client.post(LOAD, json=body).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    root = tmp_path / "store"
    fake_indexed_store(root, str(tiny_dir))
    argv = ["serve", "adapters", "--store", str(root), "--no-hypernet", "--model", str(tiny_dir)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert main([*argv, "--device", "cpu", "--allow-lora-loading"]) == 0
    assert seen == {"run0": 403, "run1": 200}
