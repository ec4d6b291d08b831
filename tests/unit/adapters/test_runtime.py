"""AdapterRuntime and adapter folders on a tiny random Llama with GQA, built here, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capplug.adapters import (
    AdapterFileError,
    AdapterRuntime,
    WrongBaseModelError,
    canonical_model_name,
    read_adapter,
    write_peft_folder,
)
from capplug.llms import LocalChatModel
from capplug.models.adapter_folder import META_BASE_ARCHITECTURE, META_BASE_MODEL, peft_key
from capplug.testing import save_tiny_llama

PROMPTS = [
    "what is the capital of france",
    "is the sky blue",
    "the cat sat on the",
    "one two three",
    "where is the river",
]
SHAPES = {"q_proj": (32, 32), "v_proj": (32, 16)}  # save_tiny_llama: 4 query heads, 2 kv heads


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-adapters"))


@pytest.fixture
def runtime(base_dir: Path) -> AdapterRuntime:
    # float64 keeps round-off far from any greedy tie, so batch routes compare exactly.
    return AdapterRuntime.from_pretrained(base_dir, device="cpu", dtype="float64", max_loaded=2)


def _lora(
    folder: Path,
    base: str,
    *,
    seed: int,
    r: int = 4,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    layers: int = 2,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A random LoRA strong enough to change greedy answers."""
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in shapes.items():
            path = f"model.layers.{layer}.self_attn.{name}"
            state[peft_key(path, "A")] = torch.randn(r, fan_in, generator=generator)
            state[peft_key(path, "B")] = torch.randn(fan_out, r, generator=generator)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=sorted(shapes), base_model_name_or_path=base
    )
    return write_peft_folder(state, config, folder, metadata=metadata)


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = canonical_model_name(base_dir)
    return {
        name: _lora(root / name, base, seed=seed)
        for seed, name in enumerate(("alpha", "beta", "gamma"))
    }


# ----------------------------------------------------------------------------- routing


def test_mixed_adapter_batch_equals_one_adapter_at_a_time(runtime, adapters):
    runtime.add("alpha", adapters["alpha"])
    runtime.add("beta", adapters["beta"])
    choice = ["alpha", "beta", None, "alpha", "beta"]

    mixed = runtime.generate(PROMPTS, adapter=choice, max_new_tokens=6, batch_size=8)

    singles = {
        name: runtime.generate(PROMPTS, adapter=name, max_new_tokens=6)
        for name in ("alpha", "beta", None)
    }
    assert mixed == [singles[name][i] for i, name in enumerate(choice)]
    # The adapters really change the answers, so the comparison above can fail.
    assert singles["alpha"] != singles[None] and singles["beta"] != singles[None]
    assert singles["alpha"] != singles["beta"]


def test_one_adapter_per_prompt_across_several_batches(runtime, adapters):
    runtime.add("alpha", adapters["alpha"])
    runtime.add("beta", adapters["beta"])
    choice = ["beta", None, "alpha", "alpha", "beta"]
    small = runtime.generate(PROMPTS, adapter=choice, max_new_tokens=5, batch_size=2)
    whole = runtime.generate(PROMPTS, adapter=choice, max_new_tokens=5, batch_size=16)
    assert small == whole


def test_base_answers_match_the_plain_local_model(runtime, adapters, base_dir):
    plain = LocalChatModel.from_pretrained(base_dir, device="cpu", dtype="float64")
    expected = plain.generate(PROMPTS, max_new_tokens=6)
    assert runtime.generate(PROMPTS, max_new_tokens=6) == expected
    runtime.add("alpha", adapters["alpha"])
    # Attached adapters must not leak into prompts that ask for the bare model.
    assert runtime.generate(PROMPTS, adapter=None, max_new_tokens=6) == expected
    runtime.remove("alpha")
    assert runtime.loaded == []
    assert runtime.generate(PROMPTS, max_new_tokens=6) == expected


def test_sampling_is_repeatable_with_a_seed(runtime, adapters):
    runtime.add("alpha", adapters["alpha"])
    first = runtime.generate(PROMPTS, adapter="alpha", do_sample=True, seed=3, max_new_tokens=6)
    again = runtime.generate(PROMPTS, adapter="alpha", do_sample=True, seed=3, max_new_tokens=6)
    greedy = runtime.generate(PROMPTS, adapter="alpha", max_new_tokens=6)
    assert first == again
    assert first != greedy


def test_weights_in_memory_act_as_the_same_folder(runtime, adapters):
    files = read_adapter(adapters["gamma"])
    runtime.add("from_disk", adapters["gamma"])
    runtime.add_weights("in_memory", files.state_dict, files.config)
    on_disk = runtime.generate(PROMPTS, adapter="from_disk", max_new_tokens=6)
    assert runtime.generate(PROMPTS, adapter="in_memory", max_new_tokens=6) == on_disk


# --------------------------------------------------------------------------------- LRU


def test_least_recently_used_adapter_is_evicted(runtime, adapters):
    runtime.add("alpha", adapters["alpha"])
    runtime.add("beta", adapters["beta"])
    runtime.generate(PROMPTS[:1], adapter="alpha", max_new_tokens=2)  # alpha is now the freshest

    runtime.add("gamma", adapters["gamma"])

    assert runtime.loaded == ["alpha", "gamma"]
    assert "beta" not in runtime
    assert set(runtime._peft.peft_config) == {"alpha", "gamma"}  # really deleted from peft
    with pytest.raises(KeyError, match="no adapter named 'beta' is loaded"):
        runtime.generate(PROMPTS[:1], adapter="beta")


def test_evicted_adapter_answers_the_same_when_added_again(runtime, adapters):
    runtime.add("alpha", adapters["alpha"])
    before = runtime.generate(PROMPTS, adapter="alpha", max_new_tokens=6)
    runtime.add("beta", adapters["beta"])
    runtime.add("gamma", adapters["gamma"])
    assert "alpha" not in runtime
    runtime.add("alpha", adapters["alpha"])
    assert runtime.generate(PROMPTS, adapter="alpha", max_new_tokens=6) == before


def test_adding_a_loaded_name_replaces_its_adapter(runtime, adapters):
    runtime.add("slot", adapters["alpha"])
    alpha = runtime.generate(PROMPTS, adapter="slot", max_new_tokens=6)
    runtime.add("slot", adapters["beta"])
    assert runtime.loaded == ["slot"]
    beta = runtime.generate(PROMPTS, adapter="slot", max_new_tokens=6)
    runtime.add("beta", adapters["beta"])
    assert beta == runtime.generate(PROMPTS, adapter="beta", max_new_tokens=6)
    assert beta != alpha


# ------------------------------------------------------------------------- refusals


def test_adapter_for_another_base_model_is_refused_naming_both(runtime, tmp_path):
    folder = _lora(tmp_path / "other", "HuggingFaceTB/SmolLM2-360M-Instruct", seed=0)
    before = runtime.generate(PROMPTS, max_new_tokens=6)
    with pytest.raises(WrongBaseModelError) as err:
        runtime.add("other", folder)
    message = str(err.value)
    assert "HuggingFaceTB/SmolLM2-360M-Instruct" in message
    assert runtime.identity.name in message
    assert runtime.loaded == [] and runtime._peft is None
    assert runtime.generate(PROMPTS, max_new_tokens=6) == before


def test_capplug_metadata_architecture_must_match(runtime, tmp_path):
    folder = _lora(
        tmp_path / "arch",
        runtime.identity.name,
        seed=0,
        metadata={
            META_BASE_MODEL: runtime.identity.name,
            META_BASE_ARCHITECTURE: "llama layers=30 hidden=576 heads=9/3 vocab=49152",
        },
    )
    with pytest.raises(WrongBaseModelError, match="layers=30 hidden=576"):
        runtime.add("arch", folder)


def test_packaged_names_and_hub_folders_share_one_identity(tmp_path):
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert canonical_model_name("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert canonical_model_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert canonical_model_name(snapshot) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert canonical_model_name(tmp_path) == str(tmp_path.resolve())


def test_truncated_weights_are_refused_before_touching_the_model(runtime, adapters, tmp_path):
    import shutil

    folder = tmp_path / "truncated"
    shutil.copytree(adapters["alpha"], folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = runtime.generate(PROMPTS, max_new_tokens=6)

    with pytest.raises(AdapterFileError, match="truncated"):
        runtime.add("broken", folder)

    assert runtime._peft is None  # nothing was injected into the model
    assert runtime.loaded == []
    assert runtime.generate(PROMPTS, max_new_tokens=6) == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:5], "truncated"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "truncated|not a safetensors"),
        (lambda raw: raw[:8] + b"#" * 20 + raw[28:], "header is not valid JSON"),
    ],
    ids=["five-bytes", "huge-header-length", "garbled-header"],
)
def test_corrupt_weights_are_refused(runtime, adapters, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(adapters["alpha"], folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(AdapterFileError, match=message):
        runtime.add("broken", folder)
    assert runtime._peft is None


def test_shapes_that_do_not_fit_the_base_are_refused(runtime, tmp_path):
    # Same recorded name, but made for a wider model: the shapes give it away.
    folder = _lora(tmp_path / "wide", runtime.identity.name, seed=0, shapes={"q_proj": (48, 48)})
    with pytest.raises(AdapterFileError, match=r"32 -> 32 in .* factors are for 48 -> 48"):
        runtime.add("wide", folder)
    assert runtime._peft is None


def test_weights_for_missing_layers_are_refused(runtime, tmp_path):
    folder = _lora(tmp_path / "deep", runtime.identity.name, seed=0, layers=3)
    with pytest.raises(AdapterFileError, match=r"model\.layers\.2\.self_attn"):
        runtime.add("deep", folder)


def test_non_finite_weights_are_refused(runtime, adapters, tmp_path):
    files = read_adapter(adapters["alpha"])
    state = dict(files.state_dict)
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    write_peft_folder(state, files.config, tmp_path / "nan")
    with pytest.raises(AdapterFileError, match="NaN"):
        runtime.add("nan", tmp_path / "nan")


def test_pickled_adapter_is_refused(runtime, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterFileError, match="pickle"):
        runtime.add("pickled", folder)


def test_non_lora_and_broken_configs_are_refused(runtime, adapters, tmp_path):
    import shutil

    folder = tmp_path / "ia3"
    shutil.copytree(adapters["alpha"], folder)
    config = folder / "adapter_config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="IA3 adapter"):
        runtime.add("ia3", folder)
    config.write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        runtime.add("ia3", folder)
    with pytest.raises(AdapterFileError, match="does not exist"):
        runtime.add("nowhere", tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["", "__base__", "with.dot", " padded ", "ora"])
def test_bad_adapter_names_are_refused(runtime, adapters, name):
    with pytest.raises(ValueError, match="adapter name"):
        runtime.add(name, adapters["alpha"])


def test_generate_checks_its_adapter_argument(runtime, adapters):
    runtime.add("alpha", adapters["alpha"])
    with pytest.raises(ValueError, match="one adapter \\(or None\\) per prompt; got 1 names for 2"):
        runtime.generate(PROMPTS[:2], adapter=["alpha"])
    with pytest.raises(KeyError, match=r"runtime\.add"):
        runtime.generate(PROMPTS[:1], adapter="missing")
    with pytest.raises(TypeError, match="single string"):
        runtime.generate("one prompt", adapter="alpha")
    with pytest.raises(TypeError, match="adapter_names"):
        runtime.generate(PROMPTS[:1], adapter_names=["alpha"])


def test_write_peft_folder_needs_a_base_model_and_paired_factors(tmp_path):
    from peft import LoraConfig

    a = torch.zeros(2, 4)
    config = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        write_peft_folder({peft_key("m.q_proj", "A"): a}, config, tmp_path / "x")
    config.base_model_name_or_path = "some/model"
    with pytest.raises(ValueError, match="lora_A without lora_B"):
        write_peft_folder({peft_key("m.q_proj", "A"): a}, config, tmp_path / "x")
    with pytest.raises(ValueError, match="not a plain LoRA factor"):
        write_peft_folder({"m.q_proj.weight": a}, config, tmp_path / "x")
