"""The judged fallback on a tiny random Llama with a deliberately bad adapter: both answers come
from one batch, the selector's pick decides, and the verdict and a person's pin are kept with
the adapter across reopening and repair."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selector_fakes import PickingSelector
from store_fakes import (  # noqa: F401 - the autouse fixture guards every test here
    WordHashEmbedding,
    no_chroma_default_embedding,
)

from capplug.adapters import (
    AdapterJudge,
    AdapterRuntime,
    ProbeError,
    with_definition,
)
from capplug.adapters.store import (
    RECORD_FILE,
    AdapterCheck,
    AdapterStore,
    UnknownAdapterError,
)
from capplug.testing import save_random_lora, save_tiny_llama

INSTRUCTION = "Answer with the capital city of the country."
PROBE = "what is the capital of france"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-fallback"))


@pytest.fixture(scope="module")
def bad_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA with large random weights: it rewrites every greedy answer."""
    return save_random_lora(tmp_path_factory.mktemp("bad-adapter"), tiny_llama, seed=7)


@pytest.fixture(scope="module")
def runtime(tiny_llama: Path) -> AdapterRuntime:
    return AdapterRuntime.from_pretrained(tiny_llama, device="cpu", dtype="float64")


def _open(root: Path, tiny_llama: Path) -> AdapterStore:
    return AdapterStore(root, base_model=str(tiny_llama), embedding_function=WordHashEmbedding())


@pytest.fixture
def store(tmp_path: Path, tiny_llama: Path) -> Iterator[AdapterStore]:
    with _open(tmp_path / "store", tiny_llama) as opened:
        yield opened


# ------------------------------------------------------------------------------- compare


@pytest.mark.parametrize(("pick", "winner"), [(0, "adapter"), (1, "base")])
def test_compare_answers_both_sides_in_one_batch_and_the_selector_decides(
    runtime: AdapterRuntime, bad_adapter: Path, pick: int, winner: str
) -> None:
    runtime.add("bad", bad_adapter)
    selector = PickingSelector(pick)
    judge = AdapterJudge(runtime, selector, max_new_tokens=6)
    base_prompt = with_definition(PROBE, INSTRUCTION)

    comparison = judge.compare("bad", PROBE, base_prompt)

    alone_adapter = runtime.generate([PROBE], adapter="bad", max_new_tokens=6)[0]
    alone_base = runtime.generate([base_prompt], adapter=None, max_new_tokens=6)[0]
    assert comparison.answers == {"adapter": alone_adapter, "base": alone_base}
    assert alone_adapter != alone_base  # the adapter really is bad: the test can fail
    # Judged against the base model's prompt (definition and input), adapter first.
    assert selector.calls == [(base_prompt, [alone_adapter, alone_base])]
    assert comparison.winner == winner and comparison.answer == comparison.answers[winner]
    assert comparison.scores[winner] == 0.8 and comparison.judge == "fake-judge"


def test_compare_of_an_adapter_that_is_not_loaded_is_a_key_error(runtime: AdapterRuntime) -> None:
    with pytest.raises(KeyError, match="no adapter named 'missing'"):
        AdapterJudge(runtime, PickingSelector(0)).compare("missing", PROBE, PROBE)


def test_a_judge_needs_a_selector_and_a_positive_length(runtime: AdapterRuntime) -> None:
    with pytest.raises(TypeError, match="select"):
        AdapterJudge(runtime, object())
    with pytest.raises(ValueError, match="max_new_tokens"):
        AdapterJudge(runtime, PickingSelector(0), max_new_tokens=0)


def test_with_definition_puts_the_definition_before_the_last_user_turn() -> None:
    assert with_definition("  Paris? ", INSTRUCTION) == f"{INSTRUCTION}\n\nParis?"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "France"},
    ]
    changed = with_definition(chat, INSTRUCTION)
    assert changed[-1] == {"role": "user", "content": f"{INSTRUCTION}\n\nFrance"}
    assert changed[:3] == chat[:3] and chat[-1]["content"] == "France"  # the caller's is kept
    # Already there (in the system turn, say): the prompt is left as it is.
    given = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "France"}]
    assert with_definition(given, INSTRUCTION) == given


# ------------------------------------------------------------------ the verdict, stored


def test_a_bad_adapter_that_loses_is_kept_but_flagged_across_reopening_and_repair(
    store: AdapterStore, runtime: AdapterRuntime, bad_adapter: Path, tiny_llama: Path
) -> None:
    record = store.import_folder(bad_adapter, INSTRUCTION)
    assert record.check is None and not record.falls_back

    checked, comparison = AdapterJudge(runtime, PickingSelector(1), max_new_tokens=6).check(
        store, record.id, probe=PROBE
    )

    assert comparison.winner == "base" and checked.falls_back
    assert checked.check == AdapterCheck(
        winner="base",
        adapter_score=0.2,
        base_score=0.8,
        probe=PROBE,
        judge="fake-judge",
        checked=checked.check.checked,
    )
    # Kept in the record file and the index row: another process sees it, and so does repair.
    on_disk = json.loads((record.folder / RECORD_FILE).read_text())
    assert on_disk["check"]["winner"] == "base"
    store.close()
    with _open(store.root, tiny_llama) as again:
        assert again.get(record.id).check == checked.check
        with again._index.writing() as collection:
            collection.delete(ids=[record.id])
        again.repair()
        repaired = again.get(record.id)
        assert repaired.check == checked.check and repaired.falls_back
        # The adapter is still there to load: flagged, not removed.
        assert again.files(record.id).weights.is_file()


def test_a_pin_outweighs_the_check_until_unpinned(
    store: AdapterStore, bad_adapter: Path, tiny_llama: Path
) -> None:
    record = store.import_folder(bad_adapter, INSTRUCTION)
    lost = AdapterCheck("base", 0.1, 0.9, PROBE, "fake-judge", 1.0)
    won = AdapterCheck("adapter", 0.9, 0.1, PROBE, "fake-judge", 1.0)
    assert store.set_check(record.id, lost).falls_back
    assert not store.pin(record.id, "adapter").falls_back
    assert store.set_check(record.id, lost).pinned == "adapter"  # a new check keeps the pin
    store.close()
    with _open(store.root, tiny_llama) as again:
        assert again.get(record.id).pinned == "adapter" and not again.get(record.id).falls_back
        assert again.pin(record.id, None).falls_back  # the check decides again
        assert (
            again.pin(record.id, "base").falls_back and again.set_check(record.id, won).falls_back
        )
        assert not again.pin(record.id, None).falls_back
        assert again.set_check(record.id, None).check is None  # forgotten: checked again


def test_bad_checks_and_pins_are_refused_and_change_nothing(
    store: AdapterStore, bad_adapter: Path
) -> None:
    record = store.import_folder(bad_adapter, INSTRUCTION)
    with pytest.raises(ValueError, match="'adapter', 'base' or None"):
        store.pin(record.id, "both")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AdapterCheck"):
        store.set_check(record.id, {"winner": "base"})  # type: ignore[arg-type]
    with pytest.raises(UnknownAdapterError):
        store.pin("0" * 32, "base")
    with pytest.raises(ValueError, match="winner"):
        AdapterCheck.from_dict({**AdapterCheck("base", 0, 1, "", "", 0).to_dict(), "winner": "x"})
    with pytest.raises(ValueError, match="not an adapter check"):
        AdapterCheck.from_dict({"winner": "base"})
    assert store.get(record.id).check is None and store.get(record.id).pinned is None


def test_an_unreadable_check_in_a_record_file_means_checked_again(
    store: AdapterStore, bad_adapter: Path
) -> None:
    record = store.import_folder(bad_adapter, INSTRUCTION)
    store.set_check(record.id, AdapterCheck("base", 0.1, 0.9, PROBE, "j", 1.0))
    data = json.loads((record.folder / RECORD_FILE).read_text())
    data["check"] = {"winner": "nobody"}
    (record.folder / RECORD_FILE).write_text(json.dumps(data))
    with store._index.writing() as collection:
        collection.delete(ids=[record.id])
    store.repair()
    assert store.get(record.id).check is None and not store.get(record.id).falls_back


def test_check_without_a_probe_asks_the_base_model_for_one(
    store: AdapterStore, runtime: AdapterRuntime, bad_adapter: Path, monkeypatch
) -> None:
    record = store.import_folder(bad_adapter, INSTRUCTION)
    judge = AdapterJudge(runtime, PickingSelector(0), max_new_tokens=6)
    asked: list[Any] = []
    real = runtime.generate

    def generate(prompts: list[Any], **kwargs: Any) -> list[str]:
        if kwargs.get("adapter") is None and len(prompts) == 1:
            asked.append(prompts[0])
            return ['  "France"  ']
        return real(prompts, **kwargs)

    monkeypatch.setattr(runtime, "generate", generate)
    checked, _ = judge.check(store, record.id)
    assert INSTRUCTION in asked[0] and checked.check.probe == "France"
    assert checked.check.winner == "adapter" and not checked.falls_back

    for nothing in ("  ", '"\u200b"'):  # a probe with nothing to read, quoted or not
        monkeypatch.setattr(
            runtime, "generate", lambda prompts, nothing=nothing, **kwargs: [nothing]
        )
        with pytest.raises(ProbeError, match="give a probe"):
            judge.check(store, record.id)
    with pytest.raises(ValueError, match="probe is empty"):
        judge.check(store, record.id, probe=" ")
    assert store.get(record.id).check == checked.check  # a failed check loses nothing


# ---------------------------------------------------------------------------------- CLI


@pytest.fixture
def judged_by(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CLI's Reranker replaced by a Selector picking the side given (0 adapter, 1 base)."""
    import capplug.selection

    def use(pick: int) -> None:
        monkeypatch.setattr(capplug.selection, "Reranker", lambda scorer: PickingSelector(pick))

    return use


def test_cli_check_pin_show_and_list(
    tmp_path: Path, tiny_llama: Path, bad_adapter: Path, capsys, judged_by
) -> None:
    from store_fakes import fake_indexed_store

    from capplug.cli import main

    root, base = tmp_path / "store", str(tiny_llama)
    fake_indexed_store(root, base)
    opts = ["--store", str(root), "--base", base]
    assert main(["store", "import", str(bad_adapter), "--instruction", INSTRUCTION, *opts]) == 0
    capsys.readouterr()
    with _open(root, tiny_llama) as store:
        adapter_id = store.list_adapters()[0].id

    judged_by(1)
    check = ["store", "check", adapter_id, "--probe", PROBE, "--judge-tokens", "4", *opts]
    assert main([*check, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "base won (adapter 0.200, base 0.800; fake-judge" in out
    assert "answered by the base model" in out
    assert main(["store", "list", *opts]) == 0
    assert "(base answers)" in capsys.readouterr().out
    assert main(["store", "pin", adapter_id, "adapter", *opts]) == 0
    assert "answered by the adapter" in capsys.readouterr().out
    assert main(["store", "show", adapter_id, *opts]) == 0
    shown = capsys.readouterr().out
    assert "pinned: adapter" in shown and "answers: the adapter" in shown
    assert "check: base won" in shown
    assert main(["store", "pin", adapter_id, "none", *opts, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pinned"] is None
    with pytest.raises(SystemExit) as exited:
        main(["store", "pin", adapter_id, "both", *opts])
    assert exited.value.code == 2 and "invalid choice: 'both'" in capsys.readouterr().err
    assert main(["store", "check", adapter_id, "--probe", " ", *opts]) != 0
    assert "--probe is empty" in capsys.readouterr().err
    with _open(root, tiny_llama) as store:
        assert store.get(adapter_id).falls_back  # the refused commands changed nothing


@pytest.mark.parametrize(("pick", "side"), [(0, "adapter"), (1, "base")])
def test_cli_answer_with_judge_prints_the_better_answer(
    tmp_path: Path, tiny_llama: Path, capsys, judged_by, pick: int, side: str
) -> None:
    from capplug.adapters import Hypernetwork
    from capplug.cli import main

    folder = Hypernetwork.from_base(tiny_llama, encoder="base", r=4, hidden_dim=16).save_pretrained(
        tmp_path / "hypernet"
    )
    judged_by(pick)
    argv = ["adapters", "answer", "--instruction", INSTRUCTION, "--input", PROBE, "--judge"]
    assert main([*argv, "--hypernet", str(folder), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"the {side} answer is better (adapter " in captured.err
    assert len(captured.out.splitlines()) == 1


def test_check_with_the_instruction_asks_the_adapter_as_it_will_be_asked(
    store: AdapterStore, runtime: AdapterRuntime, bad_adapter: Path
) -> None:
    record = store.import_folder(bad_adapter, INSTRUCTION)
    selector = PickingSelector(0)
    judge = AdapterJudge(runtime, selector, max_new_tokens=6)
    judge.check(store, record.id, probe=PROBE, with_instruction=True)
    judge.check(store, record.id, probe=PROBE)
    base_prompt = with_definition(PROBE, INSTRUCTION)
    with_it, alone = (call[1][0] for call in selector.calls)
    assert with_it == runtime.generate([base_prompt], adapter=record.id, max_new_tokens=6)[0]
    assert alone == runtime.generate([PROBE], adapter=record.id, max_new_tokens=6)[0]
    assert with_it != alone  # the two prompts really differ for this adapter


def test_mcp_lookup_adapter_says_which_adapters_fall_back(
    tmp_path: Path, tiny_llama: Path, bad_adapter: Path
) -> None:
    import asyncio

    pytest.importorskip("mcp")
    from store_fakes import fake_indexed_store

    from capplug.serve.mcp import create_mcp_server
    from capplug.testing import save_tiny_scorer

    root, base = tmp_path / "store", str(tiny_llama)
    fake_indexed_store(root, base)
    with _open(root, tiny_llama) as store:
        record = store.import_folder(bad_adapter, INSTRUCTION)
        store.set_check(record.id, AdapterCheck("base", 0.1, 0.9, PROBE, "j", 1.0))
    server = create_mcp_server(
        scorer=save_tiny_scorer(tmp_path / "scorer"), store=root, base_model=base
    )
    result = asyncio.run(server.call_tool("lookup_adapter", {"instruction": INSTRUCTION}))
    # mcp 1.x answers (content, structured); 2.x a CallToolResult
    structured = result[1] if isinstance(result, tuple) else result.structured_content
    (found,) = structured["result"]
    assert found["id"] == record.id and found["falls_back"] is True
