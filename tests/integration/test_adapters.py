"""Instruction to adapter on the packaged SmolLM2-135M-Instruct with the packaged MiniLM encoder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from capplug.adapters import AdapterRuntime, Hypernetwork, read_adapter
from capplug.models import resolve

pytestmark = pytest.mark.integration

INSTRUCTION = "Answer the question with one word."
QUESTION = "What is the capital of France?"


def test_untrained_hypernetwork_writes_an_adapter_peft_loads_and_answers_with(
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hypernet = Hypernetwork.from_base("smollm2-135m-instruct", encoder="minilm")
    assert hypernet.config.module_shapes == {"q_proj": [576, 576], "v_proj": [576, 192]}
    hypernet.generate(INSTRUCTION)  # loads the encoder once, outside the timing
    started = time.perf_counter()
    folder = hypernet.write_adapter(INSTRUCTION, tmp_path / "adapter")
    seconds = time.perf_counter() - started
    assert seconds < 5.0

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(read_adapter(folder).modules) == 60  # 30 layers x (q_proj, v_proj)

    # A standard peft folder: peft loads it onto the model by itself.
    base_dir = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), folder
    ).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    peft_answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in peft_answer  # a fresh adapter is all but the identity: the base still knows

    # The runtime answers the same with it, and the same as the bare model.
    runtime = AdapterRuntime.from_pretrained("smollm2-135m-instruct", device="cpu")
    runtime.add("one-word", folder)
    with_adapter, bare = runtime.generate(
        [QUESTION, QUESTION], adapter=["one-word", None], max_new_tokens=8
    )
    assert with_adapter.strip() == peft_answer.strip()
    assert with_adapter == bare


def test_bundled_hypernetwork_loads_offline_and_writes_instruction_specific_adapters() -> None:
    from capplug.adapters.hypernetwork import BUNDLED_DIR, DEFAULT_HYPERNETWORK, WEIGHTS_FILE

    weights = BUNDLED_DIR / DEFAULT_HYPERNETWORK / WEIGHTS_FILE
    assert weights.stat().st_size <= 20 * 1024 * 1024  # what the package may carry
    hypernet = Hypernetwork.from_pretrained()  # by default: the bundled one
    assert hypernet.config.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    sentiment, _ = hypernet.generate("Classify the movie review as positive or negative.")
    questions, config = hypernet.generate("Write a question about the paragraph.")
    assert config.r == 8 and sorted(config.target_modules) == ["q_proj", "v_proj"]
    # Trained, so the adapter depends on the instruction: not one adapter for everything.
    differences = [
        (sentiment[k] - questions[k]).norm() / sentiment[k].norm().clamp(min=1e-12)
        for k in sentiment
        if "lora_B" in k
    ]
    assert float(torch.stack(differences).mean()) > 0.01
    assert all(torch.isfinite(t).all() for t in sentiment.values())
