"""Teacher LoRA training on toy tasks with a tiny random Llama: learning, exact resume, refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capplug.adapters import LoraTrainConfig, read_adapter, train_all, train_task_lora
from capplug.adapters.examples import answer_logits, encode_example
from capplug.cli import main
from capplug.data.bigbench import Example, Task, task_names
from capplug.llms import LocalChatModel
from capplug.testing import save_tiny_llama
from capplug.training.teacher_lora import task_folder_name, train_task_names

WORDS = "the cat dog sat mat sky blue red one two three river city".split()


def toy_task(name: str, answer: Callable[[str], str], definition: str, *, count: int = 48) -> Task:
    """A task under a real train task's name, with made-up examples the tiny model can learn."""
    examples = []
    for i in range(count):
        text = f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} {WORDS[(7 * i + 2) % len(WORDS)]}"
        examples.append(
            Example(task=name, index=i, input=text, prompt=text, query=text, targets=[answer(text)])
        )
    return Task(name=name, description="toy", examples=examples, definition=definition)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-lora"))


@pytest.fixture(scope="module")
def chat(base_dir: Path) -> LocalChatModel:
    return LocalChatModel.from_pretrained(base_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def yes_task() -> Task:
    return toy_task(train_task_names()[0], lambda _: "yes", "Answer yes to everything.")


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
            definition=yes_task.definition,
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


def test_only_natural_instructions_train_tasks_are_accepted(chat, tmp_path):
    dev = task_names("dev", "instruction_to_adapter")[0]
    with pytest.raises(ValueError, match="is a dev task, kept for measurement"):
        train_task_lora(dev, tmp_path / "dev", chat=chat, config=FAST, progress=False)
    other_train = next(n for n in task_names("train") if not n.startswith("natural_instructions/"))
    with pytest.raises(ValueError, match="not a Natural-Instructions train task"):
        train_task_lora(other_train, tmp_path / "x", chat=chat, config=FAST, progress=False)
    disguised = toy_task(dev, lambda _: "yes", "Answer yes.")
    with pytest.raises(ValueError, match="dev task"):
        train_task_lora(disguised, tmp_path / "y", chat=chat, config=FAST, progress=False)
    undefined = toy_task(train_task_names()[1], lambda _: "yes", "")
    with pytest.raises(ValueError, match="no definition"):
        train_task_lora(undefined, tmp_path / "z", chat=chat, config=FAST, progress=False)
    assert not (tmp_path / "dev").exists()


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


def test_train_all_trains_each_task_once_and_resumes_the_job(
    base_dir, yes_task, tmp_path, monkeypatch
):
    import capplug.data.bigbench as bigbench

    second = toy_task(train_task_names()[1], lambda s: s.split()[0], "Repeat the first word.")
    toys = {yes_task.name: yes_task, second.name: second}
    monkeypatch.setattr(bigbench, "load_task", lambda name, archive=None: toys[name])
    config = LoraTrainConfig(**{**FAST.__dict__, "steps": 2, "eval_examples": 0})

    first = train_all(tmp_path, base=base_dir, tasks=list(toys), config=config, progress=False)
    again = train_all(tmp_path, base=base_dir, tasks=list(toys), config=config, progress=False)

    assert [r.skipped for r in first] == [False, False]
    assert [r.skipped for r in again] == [True, True]
    index = json.loads((tmp_path / "teachers.json").read_text())
    assert index["teachers"] == {name: task_folder_name(name) for name in toys}
    for name in toys:
        assert (tmp_path / task_folder_name(name) / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="dev task"):
        train_all(tmp_path, base=base_dir, tasks=[task_names("dev", "instruction_to_adapter")[0]])


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


def test_cli_train_lora_error_paths(capsys, tmp_path):
    assert main(["adapters", "train-lora", "--out", str(tmp_path)]) == 2
    assert "give either --task NAME" in capsys.readouterr().err

    dev = task_names("dev", "instruction_to_adapter")[0]
    assert main(["adapters", "train-lora", "--task", dev, "--out", str(tmp_path)]) == 2
    assert "is a dev task" in capsys.readouterr().err

    name = train_task_names()[0]
    assert main(["adapters", "train-lora", "--task", name, "--all", "--out", str(tmp_path)]) == 2
    assert "give either --task NAME" in capsys.readouterr().err

    assert main(["adapters", "train-lora", "--task", name, "--r", "0", "--out", str(tmp_path)]) == 2
    assert "r must be an integer >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written by any refused command


# ------------------------------------------------------------- the benchmark's per-task ceiling


def test_the_ceiling_switch_trains_a_dev_task_on_its_train_examples_only(
    chat, tmp_path, monkeypatch
):
    import capplug.training.lora_run as lora_run
    from capplug.data.bigbench import is_test_example

    dev = task_names("dev", "instruction_to_adapter")[0]
    task = toy_task(dev, lambda _: "yes", "Answer yes.")
    # An example labelled with another task's name, which is a test example under the dev
    # task's own name: the split is judged under the task trained on, whatever the label says.
    sneaky = next(
        Example(
            task=train_task_names()[0], index=900 + i, input=t, prompt=t, query=t, targets=["x"]
        )
        for i, t in enumerate(f"sneaky {n}" for n in range(100))
        if is_test_example(dev, t) and not is_test_example(train_task_names()[0], t)
    )
    task = Task(task.name, task.description, [*task.examples, sneaky], definition=task.definition)
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
    )

    train = [e for e in task.examples if not is_test_example(dev, e.input) and e.task == dev]
    assert seen and all(not is_test_example(dev, text) for text in seen)
    assert sneaky.input not in seen
    assert result.train_examples == len(train)
    assert result.eval_loss_before is None and result.eval_loss_after is None  # no test reads
    summary = json.loads((tmp_path / "ceiling" / "training_summary.json").read_text())
    assert summary["purpose"] == "benchmark-ceiling" and summary["eval_examples"] == 0
    assert read_adapter(tmp_path / "ceiling").metadata["capplug_purpose"] == "benchmark-ceiling"


def test_the_ceiling_switch_is_off_by_default_and_limited_to_the_benchmark_tasks(chat, tmp_path):
    dev = task_names("dev", "instruction_to_adapter")[0]
    with pytest.raises(ValueError, match="is a dev task, kept for measurement"):
        train_task_lora(toy_task(dev, lambda _: "yes", "Answer."), tmp_path / "a", chat=chat)
    other_dev = next(
        n for n in task_names("dev") if n not in task_names("dev", "instruction_to_adapter")
    )
    for name in (other_dev, train_task_names()[0]):
        with pytest.raises(ValueError, match=r"dev\.instruction_to_adapter only"):
            train_task_lora(
                toy_task(name, lambda _: "yes", "Answer."),
                tmp_path / "b",
                chat=chat,
                purpose="benchmark-ceiling",
            )
        with pytest.raises(ValueError, match=r"dev\.instruction_to_adapter only"):
            train_task_lora(name, tmp_path / "b", chat=chat, purpose="benchmark-ceiling")
    with pytest.raises(ValueError, match="purpose must be"):
        train_task_lora(train_task_names()[0], tmp_path / "c", chat=chat, purpose="anything")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ multi-task LoRA


@pytest.fixture(scope="module")
def two_tasks(yes_task) -> list[Task]:
    first_word = toy_task(train_task_names()[1], lambda s: s.split()[0], "Repeat the first word.")
    return [yes_task, first_word]


def test_multitask_training_mixes_the_tasks_and_lowers_the_loss(chat, two_tasks, tmp_path):
    from capplug.training.teacher_lora import MULTITASK, train_multitask_lora

    config = LoraTrainConfig(**{**FAST.__dict__, "steps": 12})
    result = train_multitask_lora(
        tmp_path / "mt", tasks=two_tasks, chat=chat, config=config, progress=False
    )
    losses = [entry["loss"] for entry in _log(tmp_path / "mt")]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0]
    assert result.eval_loss_after < result.eval_loss_before
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
    assert {d for d, _, _ in seen} == {yes.definition, first_word.definition}
    for definition, text, answer in seen:  # each example with its own task's definition
        assert answer == ("yes" if definition == yes.definition else text.split()[0])


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


def test_multitask_refusals_and_default_steps(chat, two_tasks, tmp_path):
    from capplug.training.teacher_lora import multitask_config, train_multitask_lora

    dev = task_names("dev", "instruction_to_adapter")[0]
    with pytest.raises(ValueError, match="dev task"):
        train_multitask_lora(tmp_path / "x", tasks=[two_tasks[0].name, dev], chat=chat)
    with pytest.raises(ValueError, match="dev task"):
        train_multitask_lora(
            tmp_path / "x", tasks=[two_tasks[0], toy_task(dev, str, "Echo.")], chat=chat
        )
    with pytest.raises(ValueError, match="a task twice"):
        train_multitask_lora(tmp_path / "x", tasks=[two_tasks[0], two_tasks[0]], chat=chat)
    with pytest.raises(ValueError, match="tasks is empty"):
        train_multitask_lora(tmp_path / "x", tasks=[], chat=chat)
    assert not (tmp_path / "x").exists()
    assert multitask_config(44).steps == 704
    assert multitask_config(44, steps=10).steps == 10
    assert multitask_config(2, LoraTrainConfig(steps=5)).steps == 5


def test_cli_train_lora_multitask(base_dir, two_tasks, tmp_path, monkeypatch, capsys):
    import capplug.data.bigbench as bigbench
    import capplug.training.teacher_lora as lora

    toys = {t.name: t for t in two_tasks}
    monkeypatch.setattr(lora, "train_task_names", lambda: list(toys))
    monkeypatch.setattr(bigbench, "load_task", lambda name, archive=None: toys[name])
    out = tmp_path / "mt"
    assert (
        main(
            [
                "adapters",
                "train-lora",
                "--multitask",
                "--task",
                two_tasks[0].name,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--multitask" in capsys.readouterr().err
    args = ["adapters", "train-lora", "--multitask", "--out", str(out), "--base", str(base_dir)]
    args += ["--steps", "2", "--max-length", "96", "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "multi-task adapter: 2 steps" in printed
    summary = json.loads((out / "training_summary.json").read_text())
    assert sorted(summary["tasks"]) == sorted(toys)
    assert main(args) == 0
    assert "already trained" in capsys.readouterr().out
