"""Training the scorer: continual pretraining on weak labels, and adaptation to a user's own data.

Only the scorer is trained; no gradient ever reaches an LLM. A run writes into one folder:

- ``checkpoint/``: the latest resumable state (trained weights, optimizer, RNG, data position),
  removed once the run has finished;
- ``best/``: the best model so far by held-out loss, loadable with ``Scorer.from_pretrained``;
- ``train_log.jsonl``: one JSON object per logged step and per evaluation;
- the final model (``config.json``, ``model.safetensors``, tokenizer) and ``README.md``, a model
  card with the data, steps, wall time, machine and metrics.

Stopping a run and starting it again with the same arguments resumes exactly where it stopped
(the loop is :mod:`capplug.training.loop`, shared with the adapters' training); a finished run is
never trained over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from capplug._runtime import seeded
from capplug.data.rows import LabelledPair
from capplug.models.adapter_folder import ADAPTER_CONFIG, read_adapter
from capplug.scoring.lora import (
    add_lora,
    lora_alpha,
    lora_factors,
    merge_lora,
    set_lora_factors,
    write_lora,
)
from capplug.scoring.model import EncodedPair, Scorer
from capplug.scoring.precision import prepare
from capplug.training._scorer_card import format_metrics, write_final
from capplug.training.loop import Loop, Precision, Schedule
from capplug.training.losses import ScorerObjective, ordered_pairs

__all__ = ["TrainConfig", "TrainResult", "format_metrics", "split_heldout", "train_scorer"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run; the defaults suit MiniLM on a CPU."""

    learning_rate: float = 3e-5
    """Peak AdamW learning rate, reached after warm-up and decayed linearly to zero."""
    batch_size: int = 32
    """Pairs per optimizer step (before gradient accumulation)."""
    grad_accum: int = 1
    """Batches whose gradients add up into one optimizer step."""
    epochs: float = 1.0
    """Passes over the training pairs (fractions allowed); ``max_steps`` wins if smaller."""
    max_steps: int | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    loss: Literal["bce", "mse"] = "bce"
    """``bce``: binary cross-entropy of the sigmoid against soft labels; ``mse`` on the score."""
    rank_weight: float = 0.0
    """Weight of a pairwise ranking loss added to the pointwise one. For two responses to the
    same example whose labels differ, it is a logistic loss on the gap between their logits,
    weighted by the gap between their labels: it asks the scorer to order an example's
    responses, which is what best-of-n selection and multiple choice use. Batches then hold
    whole examples so that their responses meet. 0 (the default) trains pointwise only."""
    listwise_weight: float = 0.0
    """Weight of a listwise loss added to the others: within each example whose responses' labels
    differ, the cross-entropy between the softmax of their logits and their labels normalised
    to sum to one. For multiple choice it is the right option's log-probability among the
    options, the decision multiple choice makes. Batches then hold whole examples."""
    max_length: int = 256
    """Token cap per pair during training (shorter trains faster; scoring may use more)."""
    eval_every: int = 200
    """Optimizer steps between evaluations on the held-out slice (and checkpoints)."""
    patience: int | None = 5
    """Stop after this many evaluations without a better held-out loss; ``None`` never stops."""
    log_every: int = 20
    seed: int = 0
    freeze_embeddings: bool = True
    """Keep the word-embedding matrix as it is: half of MiniLM's weights, so the checkpoint
    only needs what training changed, and training is faster."""
    max_eval_pairs: int = 2000
    lora_rank: int = 0
    """0 (the default) trains every weight. Above 0, a task scorer: the scorer's weights stay as
    they are and a LoRA of this rank on every linear layer learns instead; the run writes that
    LoRA (about 1.3 MB for MiniLM at rank 8) instead of a checkpoint, and the adapter store can
    keep it (:mod:`capplug.scoring.lora`)."""
    lora_alpha: float | None = None
    """LoRA's alpha (default ``2 * lora_rank``)."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    out_dir: Path
    steps: int
    best_eval_loss: float | None
    metrics: dict[str, float]
    wall_seconds: float
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics_before: dict[str, float] = field(default_factory=dict)
    """Held-out metrics of the scorer as it was given, before the first step."""


def split_heldout(
    pairs: Sequence[LabelledPair], *, fraction: float = 0.05, max_pairs: int = 2000, seed: int = 0
) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """Cut a held-out slice by group, so no example's pairs sit on both sides.

    A group is eligible when the hash of ``seed`` and its name falls below ``fraction``. When the
    eligible groups hold more than ``max_pairs`` pairs, whole groups are taken in hash order until
    the cap is reached, so the slice depends only on the groups present, never on the order of
    the rows (shuffled or re-sharded data gets the same slice).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    sizes = Counter(pair.group for pair in pairs)
    ranked = sorted((_group_hash(seed, group), group) for group in sizes)
    held_groups: set[str] = set()
    held = 0
    for value, group in ranked:
        if value >= fraction or held >= max_pairs:
            break
        held_groups.add(group)  # a group once held out stays whole, even past the cap
        held += sizes[group]
    train = [p for p in pairs if p.group not in held_groups]
    heldout = [p for p in pairs if p.group in held_groups]
    if not train:
        raise ValueError("no training pairs are left after cutting the held-out slice")
    return train, heldout


def _group_hash(seed: int, group: str) -> float:
    """A group's place in [0, 1], fixed by the seed and its name alone."""
    digest = hashlib.sha1(f"{seed}:{group}".encode()).hexdigest()[:8]
    return int(digest, 16) / 0xFFFFFFFF


def train_scorer(
    scorer: Scorer,
    train_pairs: Sequence[LabelledPair],
    out_dir: str | Path,
    *,
    eval_pairs: Sequence[LabelledPair] = (),
    config: TrainConfig | None = None,
    data_description: str = "",
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``scorer`` in place on labelled pairs, checkpointing into ``out_dir``.

    Stopped and started again with the same arguments, a run resumes where it stopped. A
    finished run is never trained over: ``out_dir`` then needs to be a new folder.

    Raises:
        ValueError: no training pairs, ``out_dir`` already holds a trained model, or its
            checkpoint belongs to a run with other data or settings (nothing is changed).
    """
    config = config or TrainConfig()
    out = _checked_run(train_pairs, out_dir, config)
    run = _ScorerRun(scorer, train_pairs, eval_pairs, out, config)
    loop = run.loop(progress=progress, on_step=on_step)
    if not loop.start(seed=config.seed):
        # The data order draws from its own generators; seed the global ones all the same.
        random.seed(config.seed)
        np.random.seed(config.seed)
        run.measure_start(loop)
    result = loop.run(
        run.step, evaluate=run.evaluate, describe=run.describe, models=(scorer.model,)
    )
    state = result.state
    finished_epoch = state["batch_in_epoch"] >= len(run.epoch_batches(state["epoch"]))
    state["epochs_completed"] = state["epoch"] + int(finished_epoch)
    factors = run.keep_best(state)
    metrics = run.heldout_metrics()
    write_final(
        scorer,
        loop,
        result,
        config,
        metrics,
        len(train_pairs),
        len(run.encoded_eval),
        data_description,
        run.objective.name,
        factors,
    )
    return TrainResult(
        out_dir=out,
        steps=state["step"],
        best_eval_loss=state["best_eval_loss"],
        metrics=metrics,
        wall_seconds=result.wall_seconds,
        stopped_early=bool(state.get("stopped")),
        history=state["history"],
        metrics_before=state.get("eval_before", {}),
    )


def _checked_run(
    train_pairs: Sequence[LabelledPair], out_dir: str | Path, config: TrainConfig
) -> Path:
    """The run folder, made; the settings checked before anything is."""
    if not train_pairs:
        raise ValueError("train_pairs is empty; there is nothing to train on")
    if config.rank_weight < 0:
        raise ValueError(f"rank_weight must be >= 0; got {config.rank_weight}")
    if config.listwise_weight < 0:
        raise ValueError(f"listwise_weight must be >= 0; got {config.listwise_weight}")
    if isinstance(config.lora_rank, bool) or config.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0; got {config.lora_rank}")
    out = Path(out_dir).expanduser().resolve()
    if (out / "config.json").is_file() or (out / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{out} already holds a trained model; give a new --out folder (nothing was changed)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


class _ScorerRun:
    """One scorer training run: the trained weights (all, or a LoRA), the encoded data and its
    batches, and the hooks :class:`Loop` calls."""

    def __init__(
        self,
        scorer: Scorer,
        train_pairs: Sequence[LabelledPair],
        eval_pairs: Sequence[LabelledPair],
        out: Path,
        config: TrainConfig,
    ) -> None:
        self.scorer, self.model, self.out, self.config = scorer, scorer.model, out, config
        self.eval_pairs = eval_pairs
        self.base = scorer.identity
        self.model.float()  # master weights in fp32; autocast gives the GPU its speed
        if config.lora_rank:
            with seeded(config.seed):
                add_lora(self.model, config.lora_rank, alpha=config.lora_alpha)
        elif config.freeze_embeddings:
            embeddings = self.model.get_input_embeddings()
            if embeddings is not None:
                embeddings.weight.requires_grad_(False)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.objective = _objective(config)
        self.run_id = _fingerprint(train_pairs, config)
        steps_per_epoch = max(
            1, math.ceil(len(train_pairs) / (config.batch_size * config.grad_accum))
        )
        self.total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.encoded_train = _encode_pairs(scorer, train_pairs, config.max_length)
        self.train_groups = _group_ids(train_pairs)
        self.encoded_eval = _encode_pairs(
            scorer, eval_pairs[: config.max_eval_pairs], config.max_length
        )
        self._batches: dict[int, list[list[int]]] = {}

    def loop(
        self, *, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None
    ) -> Loop:
        config = self.config
        loop = Loop(
            self.out,
            self.params,
            Schedule(
                steps=self.total_steps,
                lr=config.learning_rate,
                warmup_steps=int(self.total_steps * config.warmup_ratio),
                max_grad_norm=config.max_grad_norm,
                accumulate=config.grad_accum,
                log_every=config.log_every,
                checkpoint_every=config.eval_every,
                eval_every=config.eval_every,
                precision=_precision(self.scorer.device),
                weight_decay=config.weight_decay,
                decay_vectors=False,
            ),
            run_id=self.run_id,
            device=self.scorer.device,
            other_run="other data or settings; give a new --out folder, or the same data and "
            "settings to resume (nothing was changed)",
            state={
                "epoch": 0,
                "batch_in_epoch": 0,
                "best_eval_loss": None,
                "evals_without_improvement": 0,
                "history": [],
            },
            progress=progress,
            on_step=on_step,
        )
        self._loop = loop
        return loop

    def measure_start(self, loop: Loop) -> None:
        """The starting point measured too: adapting a trained scorer must beat it to count,
        and the card shows both figures."""
        if not self.encoded_eval:
            return
        before = _evaluate(self.scorer, self.encoded_eval, self.eval_pairs, self.config)
        loop.state["eval_before"] = before
        loop.state["best_eval_loss"] = before["loss"]
        loop.log({"step": 0, "eval": before})
        self.save_best()

    def save_best(self) -> None:
        if self.config.lora_rank:
            write_lora(
                lora_factors(self.model),
                self.out / "best",
                alpha=lora_alpha(self.model),
                base_name=self.base.name,
                architecture=self.base.architecture,
            )
        else:
            self.scorer.save_pretrained(self.out / "best")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            self._batches.clear()
            self._batches[epoch] = _epoch_batches(
                self.encoded_train, self.config, epoch, self.train_groups
            )
        return self._batches[epoch]

    def step(self, step: int, micro: int) -> dict[str, torch.Tensor] | None:
        state = self._loop.state
        if micro == 0 and state["batch_in_epoch"] >= len(self.epoch_batches(state["epoch"])):
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        current = self.epoch_batches(state["epoch"])
        if state["batch_in_epoch"] >= len(current):
            return None  # the epoch ended inside this step's accumulation
        batch = current[state["batch_in_epoch"]]
        state["batch_in_epoch"] += 1
        device = self.scorer.device
        inputs = self.scorer.collate([self.encoded_train[i][0] for i in batch])
        labels = torch.tensor([self.encoded_train[i][1] for i in batch], device=device)
        logits = self.model(**inputs).logits[:, 0].float()
        groups = None
        if self.objective.compares:
            groups = torch.tensor([self.train_groups[i] for i in batch], device=device)
        return {"loss": self.objective(logits, labels, groups)[0]}

    def describe(self, state: dict[str, Any]) -> dict[str, float]:
        done = state["batch_in_epoch"] / max(len(self.epoch_batches(state["epoch"])), 1)
        return {"epoch": state["epoch"] + done}

    def heldout_metrics(self) -> dict[str, float]:
        if not self.encoded_eval:
            return {}
        return _evaluate(self.scorer, self.encoded_eval, self.eval_pairs, self.config)

    def evaluate(self, state: dict[str, Any]) -> None:
        metrics = self.heldout_metrics()
        entry = {"step": state["step"], "eval": metrics}
        state["history"].append(entry)
        self._loop.log(entry)
        if not metrics:
            return
        if state["best_eval_loss"] is None or metrics["loss"] < state["best_eval_loss"]:
            state["best_eval_loss"] = metrics["loss"]
            state["evals_without_improvement"] = 0
            self.save_best()
            return
        state["evals_without_improvement"] += 1
        patience = self.config.patience
        if patience is not None and state["evals_without_improvement"] >= patience:
            state["stopped"] = True
            logger.warning(
                "capplug: early stop at step %d (no better held-out loss)", state["step"]
            )

    def keep_best(self, state: dict[str, Any]) -> Any:
        """The best evaluation's weights back in the scorer, at the precision it scores at;
        the LoRA factors where a LoRA trained (then merged into the scorer)."""
        before = state.get("eval_before")
        if before and state["best_eval_loss"] == before["loss"]:
            logger.warning(
                "capplug: no step beat the starting scorer on the held-out pairs; the output is"
                " the starting scorer unchanged"
            )
        model, device, factors = self.model, self.scorer.device, None
        if self.config.lora_rank:
            if (self.out / "best" / ADAPTER_CONFIG).is_file():
                set_lora_factors(model, read_adapter(self.out / "best").state_dict)
            factors = (lora_factors(model), lora_alpha(model), self.base)
            merge_lora(model)  # the scorer handed back scores with the LoRA folded in
        elif (self.out / "best" / "config.json").is_file():
            final = Scorer.from_pretrained(
                self.out / "best", device=device, max_length=self.scorer.max_length
            )
            model.load_state_dict(final.model.state_dict())
        # Back to the precision the scorer scores at (bfloat16 on a GPU), as it came in.
        self.scorer.model = prepare(model, device, self.scorer.dtype)
        return factors


def _precision(device: torch.device) -> Precision:
    """bfloat16 autocast on a GPU that has it, float16 on one that does not, none on a CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _encode_pairs(
    scorer: Scorer, pairs: Sequence[LabelledPair], max_length: int
) -> list[tuple[EncodedPair, float]]:
    if not pairs:
        return []
    encoded = scorer.encode(
        [p.instruction for p in pairs], [p.response for p in pairs], max_length=max_length
    )
    return [(e, p.label) for e, p in zip(encoded, pairs, strict=True)]


def _group_ids(pairs: Sequence[LabelledPair]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(p.group, len(ids)) for p in pairs]


def _epoch_batches(
    encoded: list[tuple[EncodedPair, float]], config: TrainConfig, epoch: int, groups: Sequence[int]
) -> list[list[int]]:
    """Shuffled batches; the same for a given seed and epoch, so resume is exact.

    Pointwise training batches pairs of similar lengths. With a ranking loss a batch holds whole
    examples instead (an example larger than a batch is cut into batch-sized pieces), so the
    responses of one example meet.
    """
    rng = random.Random(config.seed * 1_000_003 + epoch)
    if _objective(config).compares:
        members: dict[int, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            members[group].append(i)
        units = list(members.values())
        rng.shuffle(units)
        batches, current = [], []
        for unit in units:
            rng.shuffle(unit)
            for start in range(0, len(unit), config.batch_size):
                piece = unit[start : start + config.batch_size]
                if len(current) + len(piece) > config.batch_size:
                    batches.append(current)
                    current = []
                current += piece
        if current:
            batches.append(current)
        rng.shuffle(batches)
        return batches
    order = list(range(len(encoded)))
    rng.shuffle(order)
    chunk = config.batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: len(encoded[i][0].ids))
        batches += [
            block[i : i + config.batch_size] for i in range(0, len(block), config.batch_size)
        ]
    rng.shuffle(batches)
    return batches


def _objective(config: TrainConfig) -> ScorerObjective:
    """The run's loss: the pointwise one plus the weighted ones that compare responses."""
    return ScorerObjective(config.loss, config.rank_weight, config.listwise_weight)


@torch.inference_mode()
def _evaluate(
    scorer: Scorer,
    encoded: list[tuple[EncodedPair, float]],
    pairs: Sequence[LabelledPair],
    config: TrainConfig,
) -> dict[str, float]:
    """Held-out loss, score/label correlation, and how often a group's better pair scores higher."""
    scorer.model.eval()
    logits = np.empty(len(encoded), dtype=np.float32)
    for batch in scorer.batches([e[0] for e in encoded]):
        logits[batch] = scorer.logits([encoded[i][0] for i in batch]).cpu().numpy()
    labels = np.array([e[1] for e in encoded], dtype=np.float32)
    logits_t, labels_t = torch.from_numpy(logits), torch.from_numpy(labels)
    objective = _objective(config)
    loss = objective.point(logits_t, labels_t).item()
    scores = 1.0 / (1.0 + np.exp(-logits))
    groups = torch.tensor(_group_ids(pairs[: len(encoded)]))
    extra: dict[str, float] = {}
    if objective.compares:
        # The held-out loss follows the training objective, so early stopping and "best" do too.
        compared, parts = objective.compared(logits_t, labels_t, groups)
        extra = {"pointwise_loss": loss, **parts}
        loss += float(compared)
    ordered = ordered_pairs(labels_t, groups).numpy()
    total = int(ordered.sum())
    right = int((scores[:, None] > scores[None, :])[ordered].sum())
    metrics = {"loss": loss, "pairs": float(len(encoded)), **extra}
    if len(encoded) > 1 and labels.std() > 0 and scores.std() > 0:
        metrics["pearson"] = float(np.corrcoef(scores, labels)[0, 1])
    if total:
        metrics["pairwise_accuracy"] = float(right / total)
    return metrics


def _fingerprint(pairs: Sequence[LabelledPair], config: TrainConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(str(len(pairs)).encode())
    for pair in pairs[:: max(1, len(pairs) // 1000)]:
        digest.update(f"{pair.instruction}\x00{pair.response}\x00{pair.label}".encode())
    return digest.hexdigest()[:16]
