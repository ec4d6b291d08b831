"""The hypernetwork and its training on a tiny random Llama with GQA and a tiny BERT encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_teacher_lora import BARE, DESCRIBED, DEV, FIRST_WORD, YES, write_toy_pool

from capplug.adapters import (
    AdapterRuntime,
    Hypernetwork,
    WrongBaseModelError,
    read_adapter,
    write_peft_folder,
)
from capplug.adapters.examples import LoraInjection, answer_logits, encode_example
from capplug.cli import main
from capplug.data import load_task
from capplug.errors import CheckpointError, ModelNotFoundError
from capplug.llms import LocalChatModel
from capplug.models.adapter_folder import peft_key
from capplug.scoring import TruncationWarning
from capplug.testing import save_tiny_llama
from capplug.training import (
    HypernetTrainConfig,
    LoraTrainConfig,
    train_hypernetwork,
    train_task_lora,
)
from capplug.training.hypernetwork import relative_weight_error
from capplug.training.teacher_lora import task_folder_name

INSTRUCTION = "Answer the question with yes or no."


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-hyper"))


@pytest.fixture(scope="module")
def chat(base_dir: Path) -> LocalChatModel:
    return LocalChatModel.from_pretrained(base_dir, device="cpu", dtype="float32")


@pytest.fixture
def hypernet(base_dir: Path, tiny_bert_backbone: Path) -> Hypernetwork:
    return Hypernetwork.from_base(base_dir, encoder=str(tiny_bert_backbone), r=4, hidden_dim=32)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_pool(tmp_path_factory.mktemp("toy-pool"))


@pytest.fixture(scope="module")
def toys(pool_dir):
    return {name: load_task(name, data=pool_dir) for name in (YES, FIRST_WORD)}


@pytest.fixture(scope="module")
def teachers(chat, toys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teachers")
    config = LoraTrainConfig(
        r=4, alpha=8, steps=6, lr=1e-2, max_length=48, max_answer_tokens=8, eval_examples=0
    )
    for name, task in toys.items():
        train_task_lora(
            task, root / task_folder_name(name), chat=chat, config=config, progress=False
        )
    return root


# ------------------------------------------------------------------------ architecture


def test_heads_are_sized_from_the_base_models_modules(hypernet, base_dir):
    config = hypernet.config
    assert config.module_shapes == {"q_proj": [32, 32], "v_proj": [32, 16]}  # GQA: v is narrower
    assert config.module_paths["v_proj"] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert config.base_model == str(base_dir.resolve())
    state, lora = hypernet.generate(INSTRUCTION)
    assert len(state) == 2 * 2 * 2
    assert state[peft_key("model.layers.1.self_attn.q_proj", "A")].shape == (4, 32)
    assert state[peft_key("model.layers.1.self_attn.v_proj", "B")].shape == (16, 4)
    assert lora.r == 4 and lora.base_model_name_or_path == config.base_model


def test_different_instructions_give_different_adapters(hypernet):
    with torch.no_grad():
        for head in hypernet.heads_b.values():
            head.weight.normal_(0.0, 0.1)
    first, _ = hypernet.generate(INSTRUCTION)
    second, _ = hypernet.generate("Repeat the first word of the sentence.")
    assert all(first[k].shape == second[k].shape for k in first)
    assert any(not torch.allclose(first[k], second[k]) for k in first)
    again, _ = hypernet.generate(INSTRUCTION)
    assert all(torch.equal(first[k], again[k]) for k in first)  # dropout is off when generating


def test_unknown_target_module_is_refused_naming_the_real_ones(base_dir, tiny_bert_backbone):
    with pytest.raises(ValueError, match=r"no linear layer called 'c_attn'.*'q_proj'"):
        Hypernetwork.from_base(base_dir, encoder=str(tiny_bert_backbone), target_modules=["c_attn"])


def test_base_model_encoder_reads_the_base_models_states(base_dir):
    hypernet = Hypernetwork.from_base(base_dir, encoder="base", r=2, hidden_dim=16)
    assert hypernet.config.embedding_dim == 32  # the tiny Llama's width
    embeddings = hypernet.embed([INSTRUCTION, "Repeat the first word."])
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(embeddings[0], embeddings[1])


# --------------------------------------------------------------------- peft round trip


def _logits(model: torch.nn.Module, chat: LocalChatModel, text: str) -> torch.Tensor:
    ids = chat.tokenizer(chat.render(text), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits[0]


def test_generated_folder_loads_in_peft_and_acts_as_in_training(hypernet, chat, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_logits = _logits(chat.model, chat, "is the sky blue")

    # Fresh: B is all but zero, so the adapter leaves the model as it was (LoRA's start).
    fresh = hypernet.write_adapter(INSTRUCTION, tmp_path / "fresh")
    state, _ = hypernet.generate(INSTRUCTION)
    assert max(v.abs().max().item() for k, v in state.items() if "lora_B" in k) < 1e-3
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), fresh).eval()
    assert torch.allclose(_logits(model, chat, "is the sky blue"), base_logits, atol=1e-3)

    # Once B is not zero the loaded adapter changes the outputs ...
    with torch.no_grad():
        for head in hypernet.heads_b.values():
            head.bias.fill_(0.5)
    folder = hypernet.write_adapter(INSTRUCTION, tmp_path / "trained")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    peft_logits = _logits(model, chat, "is the sky blue")
    assert (peft_logits - base_logits).abs().max() > 0.1

    # ... exactly as the training-time hooks apply the same weights.
    state, lora = hypernet.generate(INSTRUCTION)
    paths = [p for ps in hypernet.config.module_paths.values() for p in ps]
    injection = LoraInjection(chat.model, paths)
    factors = {p: (state[peft_key(p, "A")], state[peft_key(p, "B")]) for p in paths}
    with injection.apply(factors, lora.lora_alpha / lora.r):
        hooked = _logits(chat.model, chat, "is the sky blue")
    injection.remove()
    assert torch.allclose(hooked, peft_logits, atol=1e-5)
    assert torch.allclose(_logits(chat.model, chat, "is the sky blue"), base_logits)


def test_generated_folder_is_a_complete_standard_adapter(hypernet, chat, tmp_path):
    folder = hypernet.write_adapter(INSTRUCTION, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == hypernet.config.base_model
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    files = read_adapter(folder)
    assert files.metadata["capplug_instruction"] == INSTRUCTION
    assert files.metadata["capplug_base_architecture"] == hypernet.config.base_architecture
    runtime = AdapterRuntime(chat, max_loaded=1)
    runtime.add("generated", folder)  # passes the runtime's base-model and shape checks
    assert runtime.loaded == ["generated"]
    runtime.remove("generated")


def test_adapter_of_a_hypernetwork_for_another_base_is_refused(chat, tmp_path, tiny_bert_backbone):
    other = save_tiny_llama(tmp_path / "other-llama", seed=1)
    hypernet = Hypernetwork.from_base(other, encoder=str(tiny_bert_backbone), r=4, hidden_dim=16)
    folder = hypernet.write_adapter(INSTRUCTION, tmp_path / "other-adapter")
    runtime = AdapterRuntime(chat, max_loaded=1)
    with pytest.raises(WrongBaseModelError) as err:
        runtime.add("other", folder)
    assert str(other.resolve()) in str(err.value) and runtime.identity.name in str(err.value)


def test_save_and_load_round_trip(hypernet, tmp_path):
    with torch.no_grad():
        for head in hypernet.heads_b.values():
            head.weight.normal_(0.0, 0.1)
    hypernet.save_pretrained(tmp_path / "hn")
    loaded = Hypernetwork.from_pretrained(tmp_path / "hn", device="cpu")
    assert loaded.config == hypernet.config
    first, _ = hypernet.generate(INSTRUCTION)
    second, _ = loaded.generate(INSTRUCTION)
    assert all(torch.equal(first[k], second[k]) for k in first)

    half = Hypernetwork.from_pretrained(
        hypernet.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    )
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "hn" / "model.safetensors"
    ).stat().st_size
    assert half.generate(INSTRUCTION)[0].keys() == first.keys()


def test_loading_refuses_missing_and_broken_hypernetworks(hypernet, tmp_path, monkeypatch):
    import capplug.adapters.hypernetwork as hypernetwork_module

    monkeypatch.setattr(hypernetwork_module, "BUNDLED_DIR", tmp_path / "no-bundle")
    with pytest.raises(ModelNotFoundError, match="is not bundled with this install"):
        Hypernetwork.from_pretrained()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Hypernetwork.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"holds no hypernetwork\.json"):
        Hypernetwork.from_pretrained(tmp_path / "empty")
    folder = hypernet.save_pretrained(tmp_path / "broken")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="corrupt"):
        Hypernetwork.from_pretrained(folder)


# ------------------------------------------------------------------------ instructions


def test_empty_instruction_is_refused(hypernet):
    for nothing_to_read in ("   ", "\u200b\ufeff", "\u202e\x00"):
        with pytest.raises(ValueError, match="instruction is empty"):
            hypernet.generate(nothing_to_read)
    with pytest.raises(TypeError, match="instruction must be a string"):
        hypernet.generate(None)  # type: ignore[arg-type]


def test_oversized_instruction_is_cut_and_said_so(hypernet):
    long = " ".join(["answer the question with yes or no"] * 60)
    with pytest.warns(TruncationWarning, match=r"cut to its first 128 tokens"):
        state, _ = hypernet.generate(long)
    # Only the first 128 tokens count: a longer tail changes nothing.
    with pytest.warns(TruncationWarning):
        same, _ = hypernet.generate(long + " cat dog sky")
    assert all(torch.equal(state[k], same[k]) for k in state)


# ---------------------------------------------------------------------------- losses


def test_weight_error_ignores_how_the_update_is_factored():
    torch.manual_seed(0)
    a, b = torch.randn(3, 2, 4, 10), torch.randn(3, 2, 6, 4)
    mix = torch.randn(4, 4) + 4 * torch.eye(4)
    same_update = {"q": (mix @ a, b @ torch.linalg.inv(mix))}
    teacher = {"q": (a, b)}
    assert relative_weight_error(same_update, teacher, scaling=2.0, teacher_scaling=2.0) < 1e-4
    nothing = {"q": (a, torch.zeros_like(b))}
    error = relative_weight_error(nothing, teacher, scaling=2.0, teacher_scaling=2.0)
    assert error.item() == pytest.approx(1.0, abs=1e-5)
    # A rank-2 student against a rank-4 teacher: still a number, no shapes to match.
    small = {"q": (torch.randn(3, 2, 2, 10), torch.randn(3, 2, 6, 2))}
    assert relative_weight_error(small, teacher, scaling=1.0, teacher_scaling=2.0) > 0


def test_gradients_reach_the_hypernetwork_through_every_loss(hypernet, chat, teachers, toys):
    names = sorted(toys)
    files = [read_adapter(teachers / task_folder_name(n)) for n in names]
    hconf = hypernet.config
    teacher = {
        m: (
            torch.stack([torch.stack([f.factors(p)[0] for p in paths]) for f in files]),
            torch.stack([torch.stack([f.factors(p)[1] for p in paths]) for f in files]),
        )
        for m, paths in hconf.module_paths.items()
    }
    examples = [toys[n].examples[0] for n in names]
    student_batch = [
        encode_example(
            chat,
            input=e.input,
            answer=e.targets[0],
            definition=None,
            max_length=48,
            max_answer_tokens=8,
        )
        for e in examples
    ]
    teacher_batch = [
        encode_example(
            chat,
            input=e.input,
            answer=e.targets[0],
            definition=toys[n].definition,
            max_length=48,
            max_answer_tokens=8,
        )
        for n, e in zip(names, examples, strict=True)
    ]
    paths = [p for ps in hconf.module_paths.values() for p in ps]
    injection = LoraInjection(chat.model, paths)
    embeddings = hypernet.embed([toys[n].definition for n in names])

    def per_row(factors):
        return {
            p: (factors[m][0][:, layer], factors[m][1][:, layer])
            for m, ps in hconf.module_paths.items()
            for layer, p in enumerate(ps)
        }

    def losses():
        generated = hypernet(embeddings)
        with injection.apply(per_row(generated), hconf.scaling):
            student = answer_logits(chat, chat.model, student_batch)
        with torch.no_grad(), injection.apply(per_row(teacher), files[0].scaling):
            taught = answer_logits(chat, chat.model, teacher_batch)
        return {
            "pred": student.cross_entropy(),
            "kl": student.kl_from(taught),
            "weights": relative_weight_error(
                generated, teacher, scaling=hconf.scaling, teacher_scaling=files[0].scaling
            ),
        }

    hypernet.eval()  # no dropout, so every term sees the same weights
    for name in ("pred", "kl", "weights"):
        hypernet.zero_grad(set_to_none=True)
        loss = losses()[name]
        assert loss.item() > 0
        loss.backward()
        for param_name, param in hypernet.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (name, param_name)
    injection.remove()
    assert not any(p.requires_grad and p.grad is not None for p in chat.model.parameters())


# --------------------------------------------------------------------------- training

TRAIN = HypernetTrainConfig(
    steps=8,
    reconstruction_steps=3,
    tasks_per_step=2,
    examples_per_task=2,
    lr=1e-3,
    warmup_steps=0,
    max_length=48,
    max_answer_tokens=8,
    checkpoint_every=2,
    log_every=1,
    eval_every=3,
)


def _train(teachers, toys, chat, out, tiny_bert_backbone, **kwargs):
    return train_hypernetwork(
        teachers,
        out,
        chat=chat,
        tasks=toys,
        encoder=str(tiny_bert_backbone),
        hidden_dim=32,
        config=TRAIN,
        progress=False,
        **kwargs,
    )


def test_training_runs_the_objective_and_resumes_exactly(
    teachers, toys, chat, tmp_path, tiny_bert_backbone
):
    straight = _train(teachers, toys, chat, tmp_path / "straight", tiny_bert_backbone)

    log = [
        json.loads(line)
        for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()
    ]
    steps = [e for e in log if "phase" in e]
    assert [e["phase"] for e in steps] == ["reconstruction"] * 3 + ["full"] * 5
    assert all(set(e) >= {"pred", "kl", "weights", "loss"} for e in steps[3:])
    assert steps[2]["weights"] < steps[0]["weights"]  # the warm start moves toward the teachers
    evals = [e for e in log if "eval_pred" in e]
    assert [e["step"] for e in evals] == [6, 8]
    assert straight.best_eval is not None
    assert straight.tasks == sorted(toys)
    loaded = Hypernetwork.from_pretrained(tmp_path / "straight")
    assert loaded.generate(toys[straight.tasks[0]].definition)[0]

    def stop(step: int, _entry: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(teachers, toys, chat, tmp_path / "resumed", tiny_bert_backbone, on_step=stop)
    seen: list[int] = []
    _train(
        teachers,
        toys,
        chat,
        tmp_path / "resumed",
        tiny_bert_backbone,
        on_step=lambda step, _: seen.append(step),
    )
    assert seen == [5, 6, 7, 8]  # resumed from the checkpoint at step 4
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = _train(teachers, toys, chat, tmp_path / "straight", tiny_bert_backbone)
    assert again.steps == 8  # finished: nothing is trained twice


def test_training_refuses_teachers_for_another_base(toys, chat, tmp_path, tiny_bert_backbone):
    other = save_tiny_llama(tmp_path / "other-llama", seed=2)
    other_chat = LocalChatModel.from_pretrained(other, device="cpu")
    config = LoraTrainConfig(r=4, steps=1, max_length=48, max_answer_tokens=8, eval_examples=0)
    name = sorted(toys)[0]
    train_task_lora(
        toys[name], tmp_path / "t" / "x", chat=other_chat, config=config, progress=False
    )
    with pytest.raises(WrongBaseModelError, match=str(other.resolve())):
        _train(tmp_path / "t", toys, chat, tmp_path / "out", tiny_bert_backbone)


def test_training_refuses_teachers_that_disagree(
    teachers, toys, chat, tmp_path, tiny_bert_backbone
):
    import shutil

    names = sorted(toys)
    mixed = tmp_path / "mixed"
    shutil.copytree(teachers / task_folder_name(names[0]), mixed / "a")
    config = LoraTrainConfig(r=2, steps=1, max_length=48, max_answer_tokens=8, eval_examples=0)
    train_task_lora(toys[names[1]], mixed / "b", chat=chat, config=config, progress=False)
    with pytest.raises(ValueError, match="train all teachers with the same settings"):
        _train(mixed, toys, chat, tmp_path / "out", tiny_bert_backbone)


def test_training_without_teachers_distils_the_definition(toys, chat, tmp_path, tiny_bert_backbone):
    from dataclasses import replace

    with pytest.raises(ValueError, match="reconstruction_steps=0"):
        _train(None, toys, chat, tmp_path / "refused", tiny_bert_backbone)
    assert not (tmp_path / "refused").exists()  # refused before anything is written

    config = replace(TRAIN, reconstruction_steps=0, steps=4, eval_every=2)
    result = train_hypernetwork(
        None,
        tmp_path / "free",
        chat=chat,
        tasks=toys,
        encoder=str(tiny_bert_backbone),
        hidden_dim=32,
        r=2,
        alpha=4,
        target_modules=["v_proj"],
        config=config,
        progress=False,
    )
    assert result.tasks == sorted(toys)
    steps = [
        json.loads(line)
        for line in (tmp_path / "free" / "train_log.jsonl").read_text().splitlines()
        if "phase" in line
    ]
    assert [e["phase"] for e in steps] == ["full"] * 4
    assert all({"pred", "kl"} <= set(e) and "weights" not in e for e in steps)
    assert all(e["kl"] > 0 for e in steps)  # the base model reading the definition teaches
    summary = json.loads((tmp_path / "free" / "training_summary.json").read_text())
    assert summary["teachers"] == []
    loaded = Hypernetwork.from_pretrained(tmp_path / "free")
    assert (loaded.config.r, loaded.config.alpha, loaded.config.module_types) == (2, 4, ["v_proj"])


def test_students_can_read_the_definition_on_a_share_of_rows(
    toys, chat, tmp_path, tiny_bert_backbone, monkeypatch
):
    from dataclasses import replace

    import capplug.training.hypernet_run as module

    seen: list[bool] = []
    encode = module.encode_example

    def spy(chat_model, *, definition=None, **kwargs):
        seen.append(definition is not None)
        return encode(chat_model, definition=definition, **kwargs)

    monkeypatch.setattr(module, "encode_example", spy)
    config = replace(
        TRAIN, reconstruction_steps=0, steps=6, lambda_kl=0.0, student_definition_rate=0.5
    )
    train_hypernetwork(
        None,
        tmp_path / "mixed",
        chat=chat,
        tasks=toys,
        encoder=str(tiny_bert_backbone),
        hidden_dim=32,
        config=config,
        progress=False,
    )
    # Without the KL term only students are encoded: some with the definition, some without.
    assert any(seen) and not all(seen)
    with pytest.raises(ValueError, match="student_definition_rate"):
        replace(TRAIN, student_definition_rate=1.5)


def test_training_goes_on_from_a_trained_hypernetwork(toys, chat, tmp_path, tiny_bert_backbone):
    from dataclasses import replace

    first = replace(TRAIN, reconstruction_steps=0, steps=2, eval_every=2)
    kwargs = dict(chat=chat, tasks=toys, encoder=str(tiny_bert_backbone), hidden_dim=32, r=2)
    train_hypernetwork(None, tmp_path / "v1", config=first, progress=False, **kwargs)
    start = load_file(tmp_path / "v1" / "model.safetensors")

    more = replace(first, steps=4, student_definition_rate=0.5)
    result = train_hypernetwork(
        None, tmp_path / "v2", init_from=tmp_path / "v1", config=more, progress=False, **kwargs
    )
    log = [
        json.loads(line) for line in (tmp_path / "v2" / "train_log.jsonl").read_text().splitlines()
    ]
    evals = [e for e in log if "eval_pred" in e]
    # The starting point is measured first, and with students reading the definition the
    # held-out loss is also taken with it; "best" is picked on the mean of both.
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all("eval_pred_definition" in e for e in evals)
    assert all(
        e["eval_select"] == pytest.approx((e["eval_pred"] + e["eval_pred_definition"]) / 2)
        for e in evals
    )
    assert result.best_eval["eval_select"] == min(e["eval_select"] for e in evals)
    # It starts from the v1 weights: step 0 measures exactly what v1 measured last.
    v1 = json.loads((tmp_path / "v1" / "training_summary.json").read_text())
    v2 = json.loads((tmp_path / "v2" / "training_summary.json").read_text())
    assert v2["init_from"]["from"] == str(tmp_path / "v1") and len(v2["init_from"]["sha256"]) == 64
    assert evals[0]["eval_pred"] == pytest.approx(v1["best_eval"]["eval_pred"], rel=1e-5)
    after = load_file(tmp_path / "v2" / "model.safetensors")
    assert result.best_eval["step"] == 0 or any(not torch.equal(after[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="hypernetwork or init_from"):
        train_hypernetwork(
            None,
            tmp_path / "both",
            init_from=tmp_path / "v1",
            hypernetwork=Hypernetwork.from_pretrained(tmp_path / "v1"),
            config=more,
            progress=False,
            **kwargs,
        )


def test_training_mixes_tasks_with_and_without_teachers(
    teachers, toys, chat, tmp_path, tiny_bert_backbone
):
    import shutil

    names = sorted(toys)
    partial = tmp_path / "partial"
    shutil.copytree(teachers / task_folder_name(names[0]), partial / "a")
    result = _train(partial, toys, chat, tmp_path / "out", tiny_bert_backbone, task_names=names)
    assert result.tasks == names
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["teachers"] == [names[0]]
    steps = [
        json.loads(line)
        for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
        if "phase" in line
    ]
    # The warm start and the weight term see the one task that has a teacher.
    assert all(e["weights"] > 0 for e in steps if e["phase"] == "reconstruction")
    assert steps[2]["weights"] < steps[0]["weights"]


def test_without_teachers_every_train_task_with_an_instruction_is_read_from_the_pool(
    chat, pool_dir, tmp_path, tiny_bert_backbone
):
    from dataclasses import replace

    config = replace(TRAIN, reconstruction_steps=0, steps=2, eval_every=2)
    result = train_hypernetwork(
        None,
        tmp_path / "pool",
        chat=chat,
        data=pool_dir,
        encoder=str(tiny_bert_backbone),
        hidden_dim=32,
        r=2,
        config=config,
        progress=False,
    )
    # the dev tasks and the task without an instruction are left out
    assert result.tasks == sorted([DESCRIBED, YES, FIRST_WORD])


def test_named_tasks_must_be_train_tasks_with_an_instruction(
    chat, pool_dir, tmp_path, tiny_bert_backbone
):
    from dataclasses import replace

    config = replace(TRAIN, reconstruction_steps=0)
    kw = dict(chat=chat, data=pool_dir, encoder=str(tiny_bert_backbone), config=config)
    refusals = {
        DEV: "is a dev task, kept for measurement",
        BARE: "has no instruction",
        "nope": "no task 'nope' in the pool",
    }
    for name, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            train_hypernetwork(None, tmp_path / "out", task_names=[YES, name], **kw)
    with pytest.raises(ValueError, match="dev task"):
        train_hypernetwork(None, tmp_path / "out", tasks={DEV: load_task(DEV, data=pool_dir)}, **kw)
    with pytest.raises(FileNotFoundError, match="no task data at"):
        train_hypernetwork(None, tmp_path / "out", data=tmp_path / "no-data", chat=chat)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- CLI


def test_cli_generate_and_answer(hypernet, tmp_path, capsys):
    folder = hypernet.save_pretrained(tmp_path / "hn")
    code = main(
        [
            "adapters",
            "generate",
            "--instruction",
            INSTRUCTION,
            "--out",
            str(tmp_path / "a"),
            "--hypernet",
            str(folder),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert read_adapter(tmp_path / "a").metadata["capplug_instruction"] == INSTRUCTION
    capsys.readouterr()
    code = main(
        [
            "adapters",
            "answer",
            "--instruction",
            INSTRUCTION,
            "--input",
            "is the sky blue",
            "--hypernet",
            str(folder),
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_cli_adapter_error_paths(hypernet, tmp_path, capsys, monkeypatch):
    import capplug.adapters.hypernetwork as hypernetwork_module

    folder = hypernet.save_pretrained(tmp_path / "hn")
    monkeypatch.setattr(hypernetwork_module, "BUNDLED_DIR", tmp_path / "no-bundle")
    out = str(tmp_path / "a")
    assert (
        main(
            ["adapters", "generate", "--instruction", "  ", "--out", out, "--hypernet", str(folder)]
        )
        == 2
    )
    assert "--instruction is empty" in capsys.readouterr().err
    assert main(["adapters", "generate", "--instruction", INSTRUCTION, "--out", out]) == 2
    assert "not bundled with this install" in capsys.readouterr().err
    assert (
        main(
            [
                "adapters",
                "generate",
                "--instruction",
                "x",
                "--out",
                out,
                "--hypernet",
                str(tmp_path / "nope"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["adapters", "answer", "--instruction", "x", "--input", "", "--hypernet", str(folder)])
        == 2
    )
    assert "--input is empty" in capsys.readouterr().err
    assert (
        main(["adapters", "train-hypernet", "--teachers", str(tmp_path / "none"), "--out", out])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "no-teachers").mkdir()
    assert (
        main(
            [
                "adapters",
                "train-hypernet",
                "--teachers",
                str(tmp_path / "no-teachers"),
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "no finished teacher adapters" in capsys.readouterr().err
    no_data = ["--data", str(tmp_path / "no-data")]
    assert main(["adapters", "train-hypernet", "--out", out, *no_data]) == 2
    assert "no task data at" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_write_peft_folder_is_reexported_here():
    from capplug.adapters import hypernetwork

    assert hypernetwork.write_peft_folder is write_peft_folder
