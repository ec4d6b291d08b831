"""The precision a scorer runs at: bfloat16 on a GPU, and on a CPU chosen per machine when it loads.

The rule, in order:

1. ``dtype`` given to the scorer (or ``$CAPPLUG_CPU_DTYPE`` set to ``float32`` or ``bfloat16``):
   that precision, no questions asked.
2. A processor without native bfloat16 dot products (AMX-BF16 or AVX512-BF16 on x86-64; arm64 is
   not measured yet) runs float32, with the linear layers routed through oneDNN: bfloat16 would
   be emulated there, and slower.
3. Otherwise a short calibration, run once per processor, torch version, thread count and model
   (its shape and head weights) and then cached in ``$CAPPLUG_HOME/cpu_paths.json``: the scorer scores fixed probe pairs
   at both precisions and keeps bfloat16 only if it is at least :data:`MIN_SPEEDUP` times faster
   *and* ranks the probes as float32 does (Spearman >= :data:`MIN_SPEARMAN`, the same best
   response in every probe group). It takes about a second.

In bfloat16 the pooler and the classifier head stay in float32 (:func:`keep_head_float32`): the
final logit is where rounding would otherwise reorder close candidates.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from capplug._cache import cache_home, lock_for, write_json_atomic

if TYPE_CHECKING:
    from capplug.scoring.model import Scorer

logger = logging.getLogger(__name__)

ENV_VAR = "CAPPLUG_CPU_DTYPE"
MIN_SPEEDUP = 1.2
MIN_SPEARMAN = 0.99
CACHE_FILE = "cpu_paths.json"
_HEAD_NAMES = ("pooler", "classifier", "score")

# Probe groups: an instruction and responses of clearly different quality and length.
_PROBES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "What is the capital of Australia? Answer in one sentence.",
        (
            "The capital of Australia is Canberra, a planned city chosen as a compromise "
            "between Sydney and Melbourne.",
            "Canberra.",
            "Sydney is the largest city in Australia and many people think it is the capital.",
            "I like kangaroos.",
            "The capital of Austria is Vienna.",
            "Australia is a country and a continent in the southern hemisphere, surrounded by "
            "the Indian and Pacific oceans, with a population of about 27 million people.",
        ),
    ),
    (
        "Translate into French: The cat is sleeping on the sofa.",
        (
            "Le chat dort sur le canapé.",
            "The cat is sleeping on the sofa.",
            "Le chien mange dans la cuisine.",
            "Der Hund schläft auf dem Sofa.",
            "Sure! Here is the translation you asked for: le chat dort sur le canapé, which "
            "keeps the meaning of the original sentence.",
            "Bonjour.",
        ),
    ),
    (
        "Classify the sentiment of this review as positive or negative: the battery died after "
        "two days and support never answered my emails, so I returned it.",
        (
            "Negative.",
            "Positive.",
            "The review is negative: the battery failed quickly and support did not respond.",
            "The review is positive because the customer returned the product.",
            "Batteries are made of lithium.",
            "Neutral.",
        ),
    ),
    (
        "Tom has 5 apples and gives 2 to Anna. How many apples does Tom have left?",
        (
            "3",
            "Tom has 3 apples left, since 5 - 2 = 3.",
            "7",
            "Tom has 2 apples left.",
            "Anna now has 2 apples and Tom has the rest, which is five minus two, three apples.",
            "Apples are a kind of fruit that grows on trees in many parts of the world.",
        ),
    ),
)


@dataclass(frozen=True)
class Precision:
    """The precision a scorer runs at, and why (``speedup`` and ``spearman`` where calibrated)."""

    dtype: str
    reason: str
    speedup: float | None = None
    spearman: float | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def native_bf16() -> bool:
    """Whether this processor multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def processor_name() -> str:
    """The processor's model name, as the OS reports it (for reports and the cache key)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forced_dtype() -> str | None:
    """``$CAPPLUG_CPU_DTYPE`` when it names a precision; ``None`` for unset or ``auto``."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("float32", "bfloat16"):
        raise ValueError(f"${ENV_VAR} must be 'auto', 'float32' or 'bfloat16'; got {value!r}")
    return value


def choose(scorer: Scorer) -> Precision:
    """The precision for ``scorer`` (loaded in float32 on the CPU), by the module's rule."""
    forced = forced_dtype()
    if forced is not None:
        return Precision(forced, f"${ENV_VAR}")
    if not native_bf16():
        return Precision("float32", "no native bfloat16 on this processor")
    key = _cache_key(scorer.model)
    chosen: Precision | None = None
    try:
        path = cache_home() / CACHE_FILE
        with lock_for("cpu-paths"):
            known = _read(path)
            cached = _cached(known.get(key))
            if cached is not None:
                return cached
            chosen = calibrate(scorer)
            known[key] = asdict(chosen)
            write_json_atomic(path, known)
    except OSError as exc:  # a read-only home only costs a calibration per process
        logger.warning("capplug: could not cache the scorer's CPU precision: %s", exc)
        if chosen is None:
            chosen = calibrate(scorer)
    logger.info("capplug: scorer runs at %s on this CPU (%s)", chosen.dtype, chosen.reason)
    return chosen


def calibrate(scorer: Scorer, *, rounds: int = 3) -> Precision:
    """Time and compare the probe pairs at float32 and bfloat16; keep the better one."""
    from scipy.stats import spearmanr

    pairs = [(instruction, r) for instruction, responses in _PROBES for r in responses]
    inputs = scorer.collate(scorer.encode([a for a, _ in pairs], [b for _, b in pairs]))
    fast = prepare(copy.deepcopy(unroute_linears(scorer.model)), scorer.device, torch.bfloat16)
    reference = prepare(scorer.model, scorer.device, torch.float32)
    models = {"float32": reference, "bfloat16": fast}
    times: dict[str, list[float]] = {name: [] for name in models}
    logits: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for name, model in models.items():  # warm up (oneDNN builds its kernels on first use)
            logits[name] = model(**inputs).logits[:, 0].float().numpy()
        for _ in range(rounds):
            for name, model in models.items():
                started = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - started)
    speedup = min(times["float32"]) / min(times["bfloat16"])
    spearman = float(spearmanr(logits["float32"], logits["bfloat16"])[0])
    same_best = _same_best(logits["float32"], logits["bfloat16"])
    if speedup < MIN_SPEEDUP:
        return Precision(
            "float32", f"bfloat16 measured only {speedup:.2f}x faster", speedup, spearman
        )
    if not (spearman >= MIN_SPEARMAN and same_best):
        return Precision(
            "float32",
            f"bfloat16 ranks the probes differently (Spearman {spearman:.4f})",
            speedup,
            spearman,
        )
    return Precision(
        "bfloat16", f"calibrated: {speedup:.1f}x float32, same ranking", speedup, spearman
    )


def prepare(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Put a scorer's model on ``device`` at ``dtype``, ready to score; safe to call again.

    Half precision keeps the head in float32 (:func:`keep_head_float32`); float32 on a CPU
    routes the linear layers through oneDNN (:func:`route_linears_to_onednn`)."""
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and dtype == torch.float32:
        route_linears_to_onednn(model)
    else:
        unroute_linears(model)
    if dtype in (torch.bfloat16, torch.float16):
        keep_head_float32(model)
    return model


def keep_head_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Keep the pooler and the classifier head of a half-precision model in float32.

    Their input is cast to their weights' precision on the way in, so the final logit is
    computed in float32."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _HEAD_NAMES and name.count(".") <= 1:
            module.float()
            if not getattr(module, "_capplug_cast_inputs", False):
                module.register_forward_pre_hook(_inputs_to_weight_dtype)
                module._capplug_cast_inputs = True
    return model


def _inputs_to_weight_dtype(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    weight = next(module.parameters(), None)
    if weight is None:
        return args
    return tuple(
        a.to(weight.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


def unroute_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Back to torch's own ``Linear.forward`` wherever :func:`route_linears_to_onednn` routed."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), functools.partial):
            del module.forward
    return model


def _same_best(reference: np.ndarray, other: np.ndarray) -> bool:
    start = 0
    for _, responses in _PROBES:
        end = start + len(responses)
        if int(np.argmax(reference[start:end])) != int(np.argmax(other[start:end])):
            return False
        start = end
    return True


def _cache_key(model: torch.nn.Module) -> str:
    """Machine, torch, threads, model shape, and the head's weights (checkpoints of one shape
    differ there, and a fresh random head ranks nothing, so it must not speak for a trained one)."""
    config = model.config
    shape = [
        getattr(config, name, None)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    ]
    head = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if any(part in _HEAD_NAMES for part in name.split(".")[:2]):
            head.update(parameter.detach().float().cpu().numpy().tobytes())
    return (
        f"{processor_name()} | {platform.machine()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {config.model_type} {shape} | head "
        f"{head.hexdigest()[:12]}"
    )


def _cached(entry: Any) -> Precision | None:
    """A cached verdict, or None for none or one this version cannot read (calibrate again)."""
    try:
        cached = Precision(**entry)
    except TypeError:
        return None
    return cached if cached.dtype in ("float32", "bfloat16") else None


def _read(path: Any) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------ float32 through oneDNN


def route_linears_to_onednn(model: torch.nn.Module) -> int:
    """Run the model's float32 linear layers through oneDNN when scoring on CPU.

    On CPUs where MKL's sgemm is slow for these shapes (measured on AMD EPYC: about half of
    oneDNN's throughput) this roughly doubles scoring speed, with results equal to float32
    ``F.linear`` to rounding. It applies only with gradients off, so training is unchanged, and
    the state dict is untouched. Returns how many layers were routed (0 where the op is absent).
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return 0
    try:
        probe_x, probe_w = torch.randn(2, 3, 8), torch.randn(4, 8)
        if not torch.allclose(
            op(probe_x, probe_w, None, "none", [], ""), probe_x @ probe_w.T, atol=1e-5
        ):
            return 0
    except (RuntimeError, TypeError):
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            module.forward = functools.partial(_onednn_linear, module, op)
            routed += 1
    return routed


def _onednn_linear(module: torch.nn.Linear, op: Any, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return op(x, module.weight, module.bias, "none", [], "")
