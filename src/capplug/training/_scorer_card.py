"""What a finished scorer run leaves in its folder: the model (or task-scorer LoRA) and its card."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from capplug._cache import staging_dir
from capplug.scoring.lora import write_lora

if TYPE_CHECKING:
    from capplug.models.adapter_folder import BaseModelIdentity
    from capplug.scoring.model import Scorer
    from capplug.training.loop import Loop, LoopResult

__all__ = ["format_metrics", "write_final"]


def format_metrics(metrics: dict[str, float]) -> str:
    """``loss 0.4733, pearson 0.4348, ...`` (the pair count left out), or ``n/a``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "pairs") or "n/a"


def write_final(
    scorer: Scorer,
    loop: Loop,
    result: LoopResult,
    config: Any,
    metrics: dict[str, float],
    n_train: int,
    n_eval: int,
    data_description: str,
    loss_name: str,
    lora: tuple[dict[str, torch.Tensor], float, BaseModelIdentity] | None,
) -> None:
    out, state, wall = loop.folder, result.state, result.wall_seconds
    with staging_dir(out / ".final") as tmp:
        if lora is None:
            scorer.save_pretrained(tmp / "model")
        else:
            factors, alpha, base = lora
            write_lora(
                factors,
                tmp / "model",
                alpha=alpha,
                base_name=base.name,
                architecture=base.architecture,
            )
    for item in (out / ".final" / "model").iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(out / ".final", ignore_errors=True)
    card = loop.finish(
        result,
        data=data_description,
        train_pairs=n_train,
        eval_pairs=n_eval,
        epochs_completed=state["epochs_completed"],
        stopped_early=bool(state.get("stopped")),
        metrics=metrics,
        metrics_before=state.get("eval_before", {}),
        config=asdict(config),
    )
    what = "A cross-encoder that scores how well a response answers an instruction, in [0, 1]."
    if lora is not None:
        what = (
            f"A task scorer: a rank-{config.lora_rank} LoRA over the scorer {lora[2].name}, which "
            "loading merges in."
        )
    lines = [
        "# capplug scorer",
        "",
        what,
        "Load it with `capplug.Scorer.from_pretrained(<this folder>)`.",
        "",
        f"- data: {data_description or 'labelled pairs'} ({n_train} training pairs, {n_eval} held out)",
        f"- steps: {state['step']} (batch {config.batch_size} x {config.grad_accum}, lr {config.learning_rate}, loss {loss_name})",
        f"- wall time: {wall / 60:.1f} min on {card['machine']['description']}",
        f"- held-out metrics: {format_metrics(metrics)}",
    ]
    if card["metrics_before"]:
        lines.append(
            f"- held-out metrics before training: {format_metrics(card['metrics_before'])}"
        )
    lines.append("")
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
