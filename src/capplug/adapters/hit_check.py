"""Checking a store hit with the scorer before it is used.

A store hit means the instruction is *worded* like one an adapter was made for; it need not mean
the same task ("list the essential words" and "list the words that overlap" embed close together).
:class:`ScorerHitCheck` is an :class:`~capplug.adapters.store.AdapterStore` ``verify_hit``: it
answers a probe with the cached adapter, scores (instruction, answer) with the capplug scorer, and
refuses the hit when the score is below ``bar``. The store then tries the next match, and makes a
fresh adapter when none passes.

    from capplug import Scorer
    from capplug.adapters import AdapterRuntime, AdapterStore, Hypernetwork, ScorerHitCheck

    hypernet = Hypernetwork.from_pretrained()
    runtime = AdapterRuntime.from_pretrained(hypernet.config.base_ref)
    check = ScorerHitCheck(runtime, Scorer(), bar=0.5, probe="The plot made no sense.")
    store = AdapterStore(base_model=hypernet.config.base_model,
                         generator=hypernet.generate, verify_hit=check)

The probe is the user turn the adapter answers: the instruction followed by ``probe`` (a fixed
example input, or a function of the instruction), or the instruction alone. A check costs one
greedy generation of at most ``max_new_tokens`` and one scorer call, and is paid only on hits.
``check.history`` keeps the last checks (adapter, score, answer, accepted, seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capplug.adapters.examples import user_prompt

if TYPE_CHECKING:
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.adapters.store import AdapterRecord
    from capplug.scoring import Scorer

__all__ = ["HitCheckRecord", "ScorerHitCheck"]

logger = logging.getLogger(__name__)

Probe = str | Callable[[str], str | None] | None


@dataclass(frozen=True)
class HitCheckRecord:
    """One check: which adapter answered what, its score, and whether the hit was kept."""

    adapter_id: str
    instruction: str
    prompt: str
    answer: str
    score: float
    accepted: bool
    seconds: float


class ScorerHitCheck:
    """``verify_hit`` for :class:`AdapterStore`: keep a hit only if its answer scores >= ``bar``.

    Args:
        runtime: the model the adapters are for; a checked adapter stays attached under its id.
        scorer: the judge (default: the bundled scorer, loaded on the first check).
        bar: the lowest score in [0, 1] that keeps a hit.
        probe: the input answered after the instruction, or ``f(instruction) -> input or None``;
            ``None`` answers the instruction alone.
        max_new_tokens: the most tokens of the probe's answer.
        lock: held around every use of ``runtime`` (pass the one the rest of the process holds
            when the runtime is shared, as the adapter service does).
        history: how many checks :attr:`history` keeps.
    """

    def __init__(
        self,
        runtime: AdapterRuntime,
        scorer: Scorer | None = None,
        *,
        bar: float = 0.5,
        probe: Probe = None,
        max_new_tokens: int = 48,
        lock: Any = None,
        history: int = 100,
    ) -> None:
        if isinstance(bar, bool) or not isinstance(bar, int | float) or not 0.0 <= bar <= 1.0:
            raise ValueError(f"bar must be a number in [0, 1]; got {bar!r}")
        if probe is not None and not isinstance(probe, str) and not callable(probe):
            raise TypeError("probe must be a string, a function of the instruction, or None")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int; got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        self.runtime = runtime
        self._scorer = scorer
        self.bar = float(bar)
        self.probe = probe
        self.max_new_tokens = max_new_tokens
        self.lock = lock if lock is not None else threading.Lock()
        self.history: deque[HitCheckRecord] = deque(maxlen=history)

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            from capplug.scoring import Scorer

            self._scorer = Scorer()
        return self._scorer

    def prompt(self, instruction: str) -> str:
        """The user turn the cached adapter answers for ``instruction``."""
        given = self.probe(instruction) if callable(self.probe) else self.probe
        if given is None or not str(given).strip():
            return instruction.strip()
        return user_prompt(str(given), instruction)

    def __call__(self, record: AdapterRecord, instruction: str) -> bool:
        from capplug.adapters.store import checked_paths

        started = time.perf_counter()
        prompt = self.prompt(instruction)
        with self.lock:
            if record.id not in self.runtime:
                self.runtime.add(record.id, checked_paths(record).folder)
            answer = self.runtime.generate(
                [prompt], adapter=record.id, max_new_tokens=self.max_new_tokens
            )[0]
        score = self.scorer.score(prompt, [answer])[0]
        accepted = score >= self.bar
        seconds = time.perf_counter() - started
        self.history.append(
            HitCheckRecord(record.id, instruction, prompt, answer, score, accepted, seconds)
        )
        logger.info(
            "capplug: hit %s for %r scored %.3f (bar %.2f): %s in %.2fs",
            record.id,
            instruction[:60],
            score,
            self.bar,
            "kept" if accepted else "refused",
            seconds,
        )
        return accepted
