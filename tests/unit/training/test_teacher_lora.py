"""Teacher LoRA training on toy tasks with a tiny random Llama: learning, exact resume, refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from capplug.adapters import read_adapter
from capplug.adapters.examples import answer_logits, encode_example
from capplug.cli import main
from capplug.data import Example, Task, is_test_example, load_task
from capplug.llms import LocalChatModel
from capplug.testing import save_tiny_llama
from capplug.training import LoraTrainConfig, train_all, train_task_lora
from capplug.training.teacher_lora import check_train_task, task_folder_name, train_task_names

WORDS = "the cat dog sat mat sky blue red one two three river city".split()

# The toy pool's tasks: two Natural Instructions train tasks (the default teachers), a
# BIG-bench train task with an instruction and one without, and two dev tasks, one of the
# instruction-to-adapter benchmark's list and one of another benchmark's.
YES = "natural_instructions_v1/subtask900_toy_answer_yes"
FIRST_WORD = "natural_instructions_v1/subtask901_toy_first_word"
DESCRIBED = "bigbench/toy_last_word"
BARE = "bigbench/toy_no_instruction"
DEV = "natural_instructions_v1/subtask043_essential_terms_answering_incomplete_questions"
OTHER_DEV = "bigbench/winowhy"


def toy_texts(count: int = 48) -> list[str]:
    """Made-up three-word inputs the tiny model can learn to answer."""
    n = len(WORDS)
    return [
        f"{WORDS[i % n]} {WORDS[(3 * i + 1) % n]} {WORDS[(7 * i + 2) % n]}" for i in range(count)
    ]


def _ni_task(definition: str, answer: Callable[[str], str]) -> dict[str, Any]:
    instances = [{"input": t, "output": [answer(t)]} for t in toy_texts()]
    return {"Title": "toy", "Definition": definition, "Instances": instances}


def _bigbench_task(description: str, answer: Callable[[str], str]) -> dict[str, Any]:
    examples = [{"input": t, "target": answer(t)} for t in toy_texts()]
    return {"name": "toy", "description": description, "examples": examples}


def write_toy_pool(root: Path) -> Path:
    """The toy pool above as task files (NI v1 JSON, BIG-bench ``task.json``) and a manifest."""
    files = {
        YES: _ni_task("Answer yes to everything.", lambda _: "yes"),
        FIRST_WORD: _ni_task("Repeat the first word.", lambda s: s.split()[0]),
        DESCRIBED: _bigbench_task("Repeat the last word.", lambda s: s.split()[-1]),
        BARE: _bigbench_task("", lambda _: "no"),
        DEV: _ni_task("Answer yes.", lambda _: "yes"),
        OTHER_DEV: _bigbench_task("Say whether it is so.", lambda _: "yes"),
    }
    rows = []
    for name, content in files.items():
        source, task = name.split("/")
        path = f"{name}.json" if source != "bigbench" else f"{name}/task.json"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(content), encoding="utf-8")
        split = "dev" if name in (DEV, OTHER_DEV) else "train"
        rows.append({"source": source, "task": task, "split": split, "path": path})
    (root / "manifest.json").write_text(json.dumps({"tasks": rows}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_pool(tmp_path_factory.mktemp("toy-pool"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-lora"))


@pytest.fixture(scope="module")
def chat(base_dir: Path) -> LocalChatModel:
    return LocalChatModel.from_pretrained(base_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def yes_task(pool_dir) -> Task:
    return load_task(YES, data=pool_dir)


FAST = LoraTrainConfig(
    r=4,
    alpha=8,
    steps=6,
    batch_size=4,
    lr=1e-2,
    warmup_steps=0,
    max_length=48,
    max_answer_tokens=8,
    checkpoint_every=2,
    log_every=1,
    eval_examples=6,
)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_peft_folder(chat, yes_task, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = LoraTrainConfig(**{**FAST.__dict__, "steps": 10})
    result = train_task_lora(yes_task, tmp_path / "yes", chat=chat, config=config, progress=False)

    losses = [entry["loss"] for entry in _log(tmp_path / "yes")]
    assert len(losses) == 10
    assert losses[-1] < 0.5 * losses[0]
    assert result.eval_loss_after < 0.5 * result.eval_loss_before
    assert result.train_examples == sum(not e.is_test for e in yes_task.examples)

    files = read_adapter(tmp_path / "yes")
    assert files.config.base_model_name_or_path == str(Path(chat.name).resolve())
    assert files.config.r == 4 and sorted(files.config.target_modules) == ["q_proj", "v_proj"]
    assert len(files.modules) == 4  # 2 layers x (q_proj, v_proj)
    assert files.metadata["capplug_task"] == yes_task.name
    assert not (tmp_path / "yes" / "checkpoint").exists()

    # The saved folder is a standard peft adapter: loaded by peft itself, it gives the held-out
    # examples the loss training measured with it.
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(chat.name), tmp_path / "yes"
    ).eval()
    heldout = [e for e in yes_task.examples if e.is_test][: config.eval_examples]
    batch = [
        encode_example(
            chat,
            input=e.input,
            answer=e.targets[0],
            definition=yes_task.instruction,
            max_length=config.max_length,
            max_answer_tokens=config.max_answer_tokens,
        )
        for e in heldout
    ]
    with torch.no_grad():
        loss = answer_logits(chat, model, batch).cross_entropy().item()
    assert loss == pytest.approx(result.eval_loss_after, rel=1e-4)
    # and the shared base model was handed back without adapter layers
    assert "lora" not in "".join(n for n, _ in chat.model.named_modules())


def test_resume_after_interruption_ends_with_the_same_weights(chat, yes_task, tmp_path):
    straight = train_task_lora(
        yes_task, tmp_path / "straight", chat=chat, config=FAST, progress=False
    )

    def stop_at_three(step: int, _entry: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_task_lora(
            yes_task,
            tmp_path / "resumed",
            chat=chat,
            config=FAST,
            progress=False,
            on_step=stop_at_three,
        )
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # the last checkpoint before the interruption
    steps_run = []
    resumed = train_task_lora(
        yes_task,
        tmp_path / "resumed",
        chat=chat,
        config=FAST,
        progress=False,
        on_step=lambda step, _: steps_run.append(step),
    )
    assert steps_run == [3, 4, 5, 6]
    assert resumed.eval_loss_before == straight.eval_loss_before
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_finished_adapter_is_not_trained_again(chat, yes_task, tmp_path):
    train_task_lora(yes_task, tmp_path / "once", chat=chat, config=FAST, progress=False)
    calls = []
    again = train_task_lora(
        yes_task, tmp_path / "once", chat=chat, config=FAST, progress=False, on_step=calls.append
    )
    assert again.skipped and calls == []
    other = LoraTrainConfig(**{**FAST.__dict__, "steps": 4})
    with pytest.raises(ValueError, match="trained with other settings"):
        train_task_lora(yes_task, tmp_path / "once", chat=chat, config=other, progress=False)
    restarted = train_task_lora(
        yes_task, tmp_path / "once", chat=chat, config=other, progress=False, resume=False
    )
    assert restarted.steps == 4 and not restarted.skipped


def test_keywords_override_the_config(chat, yes_task, tmp_path):
    result = train_task_lora(
        yes_task, tmp_path / "kw", chat=chat, config=FAST, steps=2, r=2, progress=False
    )
    assert result.steps == 2
    assert read_adapter(tmp_path / "kw").config.r == 2


def test_the_default_teachers_are_the_natural_instructions_train_tasks(pool_dir):
    assert train_task_names(pool_dir) == [YES, FIRST_WORD]
    assert task_folder_name(YES) == "natural_instructions_v1__subtask900_toy_answer_yes"
    # any train task can have a teacher, and a name without its source is enough
    assert check_train_task(DESCRIBED, data=pool_dir) == DESCRIBED
    assert check_train_task("subtask901_toy_first_word", data=pool_dir) == FIRST_WORD


def test_only_train_tasks_with_an_instruction_are_accepted(chat, pool_dir, tmp_path):
    kw = dict(chat=chat, config=FAST, progress=False, data=pool_dir)
    with pytest.raises(ValueError, match="is a dev task, kept for measurement"):
        train_task_lora(DEV, tmp_path / "dev", **kw)
    with pytest.raises(ValueError, match="no task 'nope' in the pool"):
        train_task_lora("nope", tmp_path / "x", **kw)
    loaded_dev = load_task(DEV, data=pool_dir)  # a loaded dev task is refused as well
    with pytest.raises(ValueError, match="dev task"):
        train_task_lora(loaded_dev, tmp_path / "y", chat=chat, config=FAST, progress=False)
    with pytest.raises(ValueError, match="has no instruction"):
        train_task_lora(BARE, tmp_path / "z", **kw)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a number > 0"),
        ({"max_answer_tokens": 300}, "must be below max_length"),
        ({"target_modules": ()}, "target_modules must name at least one"),
        ({"precision": "fp8"}, "precision must be"),
        ({"dropout": 1.0}, "dropout must be below 1"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LoraTrainConfig(**overrides)


def test_train_all_trains_each_task_once_and_resumes_the_job(base_dir, pool_dir, tmp_path):
    config = LoraTrainConfig(**{**FAST.__dict__, "steps": 2, "eval_examples": 0})
    kw = dict(base=base_dir, config=config, data=pool_dir, progress=False)

    first = train_all(tmp_path, **kw)  # the default tasks: the pool's NI train tasks
    again = train_all(tmp_path, tasks=["subtask900_toy_answer_yes", FIRST_WORD], **kw)

    assert [r.skipped for r in first] == [False, False]
    assert [r.skipped for r in again] == [True, True]
    index = json.loads((tmp_path / "teachers.json").read_text())
    assert index["teachers"] == {name: task_folder_name(name) for name in (YES, FIRST_WORD)}
    for name in (YES, FIRST_WORD):
        assert (tmp_path / task_folder_name(name) / "adapter_model.safetensors").is_file()
    # refused before any model loads or folder is made
    with pytest.raises(ValueError, match="dev task"):
        train_all(tmp_path / "dev", tasks=[DEV], **kw)
    with pytest.raises(ValueError, match="has no instruction"):
        train_all(tmp_path / "bare", tasks=[YES, BARE], **kw)
    with pytest.raises(ValueError, match="tasks is empty"):
        train_all(tmp_path / "none", tasks=[], **kw)
    assert not any((tmp_path / d).exists() for d in ("dev", "bare", "none"))


def test_long_definitions_are_cut_before_the_input(chat):
    definition = " ".join(["the cat sat on the mat"] * 40)
    encoded = encode_example(
        chat,
        input="where is the dog",
        answer="on the mat " * 20,
        definition=definition,
        max_length=64,
        max_answer_tokens=8,
    )
    assert encoded.truncated
    assert len(encoded.prompt_ids) + len(encoded.answer_ids) <= 64
    assert len(encoded.answer_ids) == 8 and chat.eos_token_ids[0] not in encoded.answer_ids
    text = chat.tokenizer.decode(list(encoded.prompt_ids))
    assert "where is the dog" in text and "..." in text
    assert text.startswith("<|im_start|>user")  # the template's start survives the cut

    short = encode_example(
        chat, input="is it", answer="yes", definition="Answer.", max_length=64, max_answer_tokens=8
    )
    assert not short.truncated and short.answer_ids[-1] == chat.eos_token_ids[0]


# -------------------------------------------------------------------------------- CLI


def test_cli_train_lora_error_paths(capsys, pool_dir, tmp_path):
    out = tmp_path / "out"
    lora = ["adapters", "train-lora", "--out", str(out), "--data", str(pool_dir)]
    assert main(lora) == 2
    assert "give either --task NAME" in capsys.readouterr().err

    assert main([*lora, "--task", DEV]) == 2
    assert "is a dev task" in capsys.readouterr().err

    assert main([*lora, "--task", "nope"]) == 2
    assert "no task 'nope' in the pool" in capsys.readouterr().err

    assert main([*lora, "--task", YES, "--all"]) == 2
    assert "give either --task NAME" in capsys.readouterr().err

    assert main([*lora, "--task", YES, "--r", "0"]) == 2
    assert "r must be an integer >= 1" in capsys.readouterr().err

    lora[-1] = str(tmp_path / "no-data")
    assert main([*lora, "--task", YES]) == 2
    assert "no task data at" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written by any refused command


# ------------------------------------------------------------- the benchmark's per-task ceiling


def test_the_ceiling_switch_trains_a_dev_task_on_its_train_examples_only(
    chat, pool_dir, tmp_path, monkeypatch
):
    import capplug.training.lora_run as lora_run

    dev = DEV
    task = load_task(dev, data=pool_dir)
    # An example labelled with another task's name, which is a test example under the dev
    # task's own name: the split is judged under the task trained on, whatever the label says.
    sneaky = next(
        Example(task=YES, index=900 + i, input=t, prompt=t, targets=["x"])
        for i, t in enumerate(f"sneaky {n}" for n in range(100))
        if is_test_example(dev, t) and not is_test_example(YES, t)
    )
    task = replace(task, examples=[*task.examples, sneaky])
    seen: list[str] = []
    real_encode = lora_run.encode_example

    def spy(chat_, **kw):
        seen.append(kw["input"])
        return real_encode(chat_, **kw)

    monkeypatch.setattr(lora_run, "encode_example", spy)
    result = train_task_lora(
        task,
        tmp_path / "ceiling",
        chat=chat,
        config=FAST,
        progress=False,
        purpose="benchmark-ceiling",
        data=pool_dir,
    )

    train = [e for e in task.examples if not is_test_example(dev, e.input) and e.task == dev]
    assert seen and all(not is_test_example(dev, text) for text in seen)
    assert sneaky.input not in seen
    assert result.train_examples == len(train)
    assert result.eval_loss_before is None and result.eval_loss_after is None  # no test reads
    summary = json.loads((tmp_path / "ceiling" / "training_summary.json").read_text())
    assert summary["purpose"] == "benchmark-ceiling" and summary["eval_examples"] == 0
    assert read_adapter(tmp_path / "ceiling").metadata["capplug_purpose"] == "benchmark-ceiling"


def test_the_ceiling_switch_is_off_by_default_and_limited_to_the_benchmark_tasks(
    chat, pool_dir, tmp_path
):
    with pytest.raises(ValueError, match="is a dev task, kept for measurement"):
        train_task_lora(load_task(DEV, data=pool_dir), tmp_path / "a", chat=chat)
    for name in (OTHER_DEV, YES):
        kw = dict(chat=chat, purpose="benchmark-ceiling", data=pool_dir)
        with pytest.raises(ValueError, match="on a task of its dev list only"):
            train_task_lora(load_task(name, data=pool_dir), tmp_path / "b", **kw)
        with pytest.raises(ValueError, match="on a task of its dev list only"):
            train_task_lora(name, tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="purpose must be"):
        train_task_lora(YES, tmp_path / "c", chat=chat, purpose="anything", data=pool_dir)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ multi-task LoRA


@pytest.fixture(scope="module")
def two_tasks(yes_task, pool_dir) -> list[Task]:
    return [yes_task, load_task(FIRST_WORD, data=pool_dir)]


def test_multitask_training_mixes_the_tasks_and_lowers_the_loss(chat, two_tasks, tmp_path):
    from capplug.training.teacher_lora import MULTITASK, train_multitask_lora

    config = LoraTrainConfig(**{**FAST.__dict__, "steps": 12})
    result = train_multitask_lora(
        tmp_path / "mt", tasks=two_tasks, chat=chat, config=config, progress=False
    )
    losses = [entry["loss"] for entry in _log(tmp_path / "mt")]
    assert len(losses) == 12
    # One step's loss depends on its batch's mix of the two tasks; the held-out loss, taken on
    # the same examples before and after, is the steady measure.
    assert result.eval_loss_after < 0.6 * result.eval_loss_before
    assert result.task == MULTITASK and result.steps == 12
    summary = json.loads((tmp_path / "mt" / "training_summary.json").read_text())
    share = -(-12 * 4 // 2)  # ceil(steps * batch / tasks): an equal share each
    train_counts = [sum(not e.is_test for e in t.examples) for t in two_tasks]
    assert summary["tasks"] == {
        t.name: min(share, n) for t, n in zip(two_tasks, train_counts, strict=True)
    }
    assert result.train_examples == sum(summary["tasks"].values())
    files = read_adapter(tmp_path / "mt")
    assert files.metadata["capplug_tasks"] == ",".join(t.name for t in two_tasks)
    assert "lora" not in "".join(n for n, _ in chat.model.named_modules())


def test_multitask_examples_keep_their_own_definitions(chat, two_tasks, tmp_path, monkeypatch):
    import capplug.training.lora_run as lora_run
    from capplug.training.teacher_lora import train_multitask_lora

    seen: list[tuple[str, str, str]] = []
    real_encode = lora_run.encode_example

    def spy(chat_, **kw):
        seen.append((kw["definition"], kw["input"], kw["answer"]))
        return real_encode(chat_, **kw)

    monkeypatch.setattr(lora_run, "encode_example", spy)
    config = LoraTrainConfig(**{**FAST.__dict__, "steps": 4, "eval_examples": 0})
    train_multitask_lora(tmp_path / "mt", tasks=two_tasks, chat=chat, config=config, progress=False)
    yes, first_word = two_tasks
    assert {d for d, _, _ in seen} == {yes.instruction, first_word.instruction}
    for definition, text, answer in seen:  # each example with its own task's instruction
        assert answer == ("yes" if definition == yes.instruction else text.split()[0])


def test_multitask_resume_ends_with_the_same_weights(chat, two_tasks, tmp_path):
    from capplug.training.teacher_lora import train_multitask_lora

    train_multitask_lora(
        tmp_path / "straight", tasks=two_tasks, chat=chat, config=FAST, progress=False
    )

    def stop_at_three(step: int, _entry: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_multitask_lora(
            tmp_path / "resumed",
            tasks=two_tasks,
            chat=chat,
            config=FAST,
            progress=False,
            on_step=stop_at_three,
        )
    steps_run: list[int] = []
    train_multitask_lora(
        tmp_path / "resumed",
        tasks=two_tasks,
        chat=chat,
        config=FAST,
        progress=False,
        on_step=lambda step, _: steps_run.append(step),
    )
    assert steps_run == [3, 4, 5, 6]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = train_multitask_lora(
        tmp_path / "resumed", tasks=two_tasks, chat=chat, config=FAST, progress=False
    )
    assert again.skipped


def test_multitask_refusals_and_default_steps(chat, two_tasks, pool_dir, tmp_path):
    from capplug.training.teacher_lora import multitask_config, train_multitask_lora

    kw = dict(chat=chat, data=pool_dir)
    with pytest.raises(ValueError, match="dev task"):
        train_multitask_lora(tmp_path / "x", tasks=[two_tasks[0].name, DEV], **kw)
    with pytest.raises(ValueError, match="dev task"):
        train_multitask_lora(tmp_path / "x", tasks=[two_tasks[0], load_task(DEV, data=pool_dir)])
    with pytest.raises(ValueError, match="a task twice"):
        train_multitask_lora(tmp_path / "x", tasks=[YES, "subtask900_toy_answer_yes"], **kw)
    with pytest.raises(ValueError, match="has no instruction"):
        train_multitask_lora(tmp_path / "x", tasks=[YES, BARE], **kw)
    with pytest.raises(ValueError, match="tasks is empty"):
        train_multitask_lora(tmp_path / "x", tasks=[], **kw)
    assert not (tmp_path / "x").exists()
    assert multitask_config(44).steps == 704
    assert multitask_config(44, steps=10).steps == 10
    assert multitask_config(2, LoraTrainConfig(steps=5)).steps == 5


def test_cli_train_lora_multitask(base_dir, pool_dir, tmp_path, capsys):
    out = tmp_path / "mt"
    args = ["adapters", "train-lora", "--multitask", "--out", str(out), "--data", str(pool_dir)]
    assert main([*args, "--task", YES]) == 2
    assert "--multitask" in capsys.readouterr().err
    args += ["--base", str(base_dir), "--steps", "2", "--max-length", "96", "--batch-size", "2"]
    args += ["--device", "cpu", "--strict"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "multi-task adapter: 2 steps" in printed
    summary = json.loads((out / "training_summary.json").read_text())
    assert sorted(summary["tasks"]) == [YES, FIRST_WORD]  # the pool's NI train tasks
    assert main(args) == 0
    assert "already trained" in capsys.readouterr().out
