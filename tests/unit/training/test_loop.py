"""The one training loop: exact resume, accumulation, refusal of another run's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capplug.training.loop import LOG_FILE, SUMMARY_FILE, Loop, Schedule, fingerprint, lr_factor

X = torch.linspace(-1, 1, 64).unsqueeze(1)
Y = 3 * X + 0.5


def make_loop(folder: Path, *, run: str = "a", accumulate: int = 1, batch: int = 8, **kw) -> Loop:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    params = dict(model.named_parameters())
    schedule = Schedule(
        steps=12, lr=0.05, warmup_steps=2, accumulate=accumulate, log_every=3, checkpoint_every=4
    )
    loop = Loop(
        folder,
        params,
        schedule,
        run_id=fingerprint({"run": run}),
        device=torch.device("cpu"),
        progress=False,
        **kw,
    )
    loop.model = model  # type: ignore[attr-defined]
    loop.batch = batch  # type: ignore[attr-defined]
    return loop


def step_fn(loop: Loop):
    def step(step: int, micro: int) -> dict[str, torch.Tensor]:
        size = loop.batch  # type: ignore[attr-defined]
        start = ((step * loop.schedule.accumulate + micro) * size) % len(X)
        x, y = X[start : start + size], Y[start : start + size]
        return {"loss": torch.nn.functional.mse_loss(loop.model(x), y)}  # type: ignore[attr-defined]

    return step


def weights(loop: Loop) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loop.params.items()}


def test_an_interrupted_run_resumes_to_the_same_weights_and_log(tmp_path: Path) -> None:
    straight = make_loop(tmp_path / "straight")
    straight.start(seed=1)
    result = straight.run(step_fn(straight), models=(straight.model,))
    assert result.state["step"] == 12

    def stop_at_9(step: int, _entry: dict) -> None:
        if step == 9:
            raise KeyboardInterrupt

    first = make_loop(tmp_path / "resumed", on_step=stop_at_9)
    first.start(seed=1)
    with pytest.raises(KeyboardInterrupt):
        first.run(step_fn(first), models=(first.model,))
    second = make_loop(tmp_path / "resumed")
    assert second.start(seed=1) is True  # resumed from step 8, the last checkpoint
    assert second.state["step"] == 8
    second.run(step_fn(second), models=(second.model,))
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(second)[name], value, atol=0, rtol=0, msg=name)
    log = [json.loads(line) for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in log if "lr" in e][-2:] == [9, 12]
    assert all({"loss", "lr", "wall_seconds_per_step"} <= e.keys() for e in log)


def test_the_loss_goes_down_and_the_schedule_warms_up_then_decays(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.start(seed=1)
    lrs: list[float] = []
    loop.on_step = lambda step, entry: lrs.append(loop.optimizer.param_groups[0]["lr"])
    loop.run(step_fn(loop))
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert lrs[0] == pytest.approx(0.05 * lr_factor(0, warmup=2, total=12)) == 0.025
    assert max(lrs) == pytest.approx(0.05) and lrs[-1] < lrs[2]


def test_two_accumulated_micro_batches_make_the_step_of_one_batch_twice_their_size(
    tmp_path: Path,
) -> None:
    whole = make_loop(tmp_path / "whole", batch=16)
    halves = make_loop(tmp_path / "halves", batch=8, accumulate=2)
    for loop in (whole, halves):
        loop.model.eval()  # no dropout, so both see the same function
        loop.start(seed=1)
        loop.run(step_fn(loop))
    for name, value in weights(whole).items():
        torch.testing.assert_close(weights(halves)[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_an_evaluation_can_stop_the_run_early(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.schedule.eval_every = 2
    loop.start(seed=1)
    seen: list[int] = []

    def evaluate(state: dict) -> None:
        seen.append(state["step"])
        state["stopped"] = state["step"] >= 6

    result = loop.run(step_fn(loop), evaluate=evaluate)
    assert seen == [2, 4, 6] and result.state["step"] == 6


def test_a_checkpoint_of_another_run_is_refused_before_anything_changes(tmp_path: Path) -> None:
    def stop_at_5(step: int, _entry: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt

    first = make_loop(tmp_path, on_step=stop_at_5)
    first.start(seed=1)
    with pytest.raises(KeyboardInterrupt):
        first.run(step_fn(first))
    other = make_loop(tmp_path, run="b")
    before = weights(other)
    with pytest.raises(ValueError, match="belongs to a run with other settings"):
        other.start(seed=1)
    for name, value in before.items():
        assert torch.equal(other.params[name], value)


def test_a_finished_run_writes_its_summary_and_drops_its_checkpoint(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.start(seed=1)
    result = loop.run(step_fn(loop))
    assert (tmp_path / "checkpoint").is_dir()
    written = loop.finish(result, task="toy")
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary == written
    assert summary["run_id"] == fingerprint({"run": "a"}) and summary["task"] == "toy"
    assert summary["steps"] == 12 and summary["wall_seconds"] > 0
    assert summary["machine"]["description"]
    assert not (tmp_path / "checkpoint").exists()
