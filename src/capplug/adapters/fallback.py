"""The judged fallback: answer with an adapter and with the bare base model, and let a selector
decide which answer is better.

A generated adapter helps on most tasks and can wreck one. :class:`AdapterJudge` guards against
that at the cost of two short generations and one selection:

- :meth:`AdapterJudge.compare` answers one input with the adapter (the prompt the adapter
  expects) and with the bare base model (the instruction put in the prompt, as anyone without
  the adapter would ask), in one batch, and has the selector pick: the :class:`Comparison`.
- :meth:`AdapterJudge.check` does that on a probe (the instruction's own example, or an input
  the base model writes for the instruction) and keeps the verdict with the adapter in its store
  (:class:`~capplug.adapters.store.AdapterCheck`). An adapter that lost stays stored, but
  :attr:`AdapterRecord.falls_back <capplug.adapters.store.AdapterRecord.falls_back>` is then
  true: the adapter service and ``capplug adapters answer`` use the base model for its
  instruction until the adapter is checked again, made again, or pinned
  (:meth:`AdapterStore.pin <capplug.adapters.store.AdapterStore.pin>`).

The selector is anything with ``select(instruction, candidates)`` returning the chosen
``index`` and each candidate's ``score`` (a :class:`capplug.Reranker`): it judges both answers
against the base model's prompt, so the instruction and the input are what it reads. Candidates
go in as ``[adapter, base]``, so two equal answers keep the adapter.

    judge = AdapterJudge(runtime, Reranker())
    comparison = judge.compare("summaries", "Text: ...", "Summarize in one sentence.\\n\\nText: ...")
    comparison.winner, comparison.scores  # "base", {"adapter": 0.31, "base": 0.69}
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from capplug._runtime import check_positive_int
from capplug.adapters.examples import user_prompt
from capplug.adapters.store.records import AdapterCheck, AdapterRecord, Side
from capplug.chat import Instruction, blank
from capplug.errors import ProbeError

if TYPE_CHECKING:
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.adapters.store import AdapterStore

__all__ = [
    "FALLBACK_MODES",
    "MAX_PROBE_CHARS",
    "AdapterJudge",
    "Comparison",
    "Decision",
    "FallbackMode",
    "ProbeError",
    "decide",
    "judged_meanwhile",
    "reusable",
    "with_definition",
]

FallbackMode = Literal["auto", "best_of", "off"]
"""``auto``: the adapter's check decides (an unchecked one is judged on first use);
``best_of``: answer with both sides and let the judge pick; ``off``: always the adapter."""
FALLBACK_MODES: tuple[str, ...] = get_args(FallbackMode)

MAX_PROBE_CHARS = 500
"""A probe kept with a check is shortened to this many characters."""

_PROBE_REQUEST = (
    "Write one short example input for the task below: only the input itself, as a user of the "
    "task would send it, without its answer or any explanation.\n\nTask: {instruction}"
)


@dataclass(frozen=True)
class Comparison:
    """The adapter's answer and the base model's, as judged."""

    answers: Mapping[Side, str]
    """``{"adapter": ..., "base": ...}``"""
    scores: Mapping[Side, float]
    """The selector's score of each answer (a :class:`capplug.Reranker`'s are probabilities
    that the answer is the better one, summing to 1)."""
    winner: Side
    judge: str
    """What judged (the selector's scorer)."""
    seconds: float
    """Generating both and judging them."""

    @property
    def answer(self) -> str:
        """The winner's answer."""
        return self.answers[self.winner]

    def to_check(self, probe: str) -> AdapterCheck:
        """The verdict as the store keeps it."""
        return AdapterCheck(
            winner=self.winner,
            adapter_score=round(float(self.scores["adapter"]), 6),
            base_score=round(float(self.scores["base"]), 6),
            probe=probe[:MAX_PROBE_CHARS],
            judge=self.judge,
            checked=time.time(),
        )


def with_definition(chat: Instruction, definition: str) -> Instruction:
    """The prompt the bare base model gets for a task: the definition, a blank line, then the
    last user turn (as the adapters were measured against: "base + definition"). A prompt that
    already holds the definition is returned as it is."""
    definition = definition.strip()
    if isinstance(chat, str):
        return chat if definition in chat else user_prompt(chat, definition)
    turns = [dict(turn) for turn in chat]
    if any(definition in str(turn.get("content") or "") for turn in turns):
        return turns
    for turn in reversed(turns):
        if turn.get("role") == "user":
            turn["content"] = user_prompt(str(turn.get("content") or ""), definition)
            return turns
    return [{"role": "user", "content": definition}, *turns]


def judge_name(selector: Any) -> str:
    """What a selector judges with, for the record: its scorer's name, else its class."""
    scorer = getattr(selector, "scorer", None)
    name = getattr(scorer, "name", None) if scorer is not None else None
    if isinstance(name, str) and name:
        return name
    return type(selector).__name__


class AdapterJudge:
    """Compare an adapter's answers with the bare base model's, judged by ``selector``.

    Args:
        runtime: the :class:`~capplug.adapters.AdapterRuntime` the adapters attach to.
        selector: has ``select(instruction, candidates)`` returning ``.index`` and
            ``.candidates[i].score`` (a :class:`capplug.Reranker`).
        max_new_tokens: the longest answer each side gives when judged (short answers keep
            the check cheap; the judge reads the start of an answer most).

    Callers that share the runtime between threads hold their own lock around these calls.
    """

    def __init__(self, runtime: AdapterRuntime, selector: Any, *, max_new_tokens: int = 64):
        if not callable(getattr(selector, "select", None)):
            raise TypeError(
                f"selector must have a select(instruction, candidates) method (a capplug "
                f"Reranker); got {type(selector).__name__}"
            )
        check_positive_int(max_new_tokens, "max_new_tokens")
        self.runtime = runtime
        self.selector = selector
        self.max_new_tokens = max_new_tokens
        self.name = judge_name(selector)

    def __repr__(self) -> str:
        return f"AdapterJudge(judge={self.name!r}, max_new_tokens={self.max_new_tokens})"

    def compare(
        self,
        adapter: str,
        adapter_prompt: Instruction,
        base_prompt: Instruction,
        *,
        max_new_tokens: int | None = None,
    ) -> Comparison:
        """Answer ``adapter_prompt`` with the loaded ``adapter`` and ``base_prompt`` with the
        bare model (greedy, in one batch), and judge both against ``base_prompt``.

        Raises:
            KeyError: ``adapter`` is not loaded in the runtime.
        """
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_positive_int(limit, "max_new_tokens")
        started = time.perf_counter()
        texts = self.runtime.generate(
            [adapter_prompt, base_prompt], adapter=[adapter, None], max_new_tokens=limit
        )
        selection = self.selector.select(base_prompt, texts)
        scores = [float(c.score) for c in selection.candidates]
        winner: Side = "adapter" if selection.index == 0 else "base"
        return Comparison(
            answers={"adapter": texts[0], "base": texts[1]},
            scores={"adapter": scores[0], "base": scores[1]},
            winner=winner,
            judge=self.name,
            seconds=round(time.perf_counter() - started, 4),
        )

    def probe_for(self, instruction: str) -> str:
        """A short input for ``instruction``, written by the bare base model.

        Raises:
            ProbeError: the model wrote nothing usable.
        """
        prompt = _PROBE_REQUEST.format(instruction=instruction.strip())
        text = self.runtime.generate([prompt], adapter=None, max_new_tokens=self.max_new_tokens)
        probe = text[0].strip().strip('"').strip()
        if blank(probe):
            raise ProbeError(
                f"the base model wrote no example input for the instruction "
                f"{instruction[:80]!r}; give a probe (an example input of the task)"
            )
        return probe

    def check(
        self,
        store: AdapterStore,
        adapter_id: str,
        *,
        probe: str | None = None,
        with_instruction: bool = False,
    ) -> tuple[AdapterRecord, Comparison]:
        """Check a stored adapter on ``probe`` (default: an input the base model writes for
        its instruction) and keep the verdict in ``store``; returns the adapter's new record
        and the comparison.

        The base model reads the instruction before the probe; the adapter reads the probe
        alone (it carries the task, as the adapter service uses it), or the instruction too
        with ``with_instruction``: check it as it will be asked.

        The adapter is attached from its checked files if it is not loaded already (under its
        id, as the adapter service attaches it).

        Raises:
            UnknownAdapterError: no such adapter.
            ProbeError: no probe was given and none could be made.
            ValueError: an empty probe.
        """
        record = store.resolve(adapter_id)
        if probe is not None and blank(probe):
            raise ValueError("probe is empty; give an example input of the task, or None")
        if record.id not in self.runtime:
            self.runtime.add(record.id, store.files(record.id).folder)
        probe = self.probe_for(record.instruction) if probe is None else probe.strip()
        base_prompt = with_definition(probe, record.instruction)
        comparison = self.compare(
            record.id, base_prompt if with_instruction else probe, base_prompt
        )
        return store.set_check(record.id, comparison.to_check(probe)), comparison


# ------------------------------------------------------------ which side answers


@dataclass(frozen=True)
class Decision:
    """Which side answers a request with an adapter, and why."""

    side: Side
    reason: Literal["checked now", "stored check", "pinned", "asked by id", "best of both", "off"]
    compare: bool = False
    """Answer with both sides and judge (now, on this request)."""

    @property
    def store(self) -> bool:
        """Keep the comparison as the adapter's check: an unchecked adapter judged now."""
        return self.compare and self.reason == "checked now"


def decide(mode: FallbackMode, record: AdapterRecord | None) -> Decision:
    """Which side answers a request with an adapter (before any judging)."""
    if mode == "off":
        return Decision("adapter", "off")
    if mode == "best_of":
        return Decision("adapter", "best of both", compare=True)
    if record is None:  # named by id in 'model': the client chose the adapter
        return Decision("adapter", "asked by id")
    if record.pinned is not None:
        return Decision(record.pinned, "pinned")
    if record.check is not None:
        return Decision(record.check.winner, "stored check")
    return Decision("adapter", "checked now", compare=True)


def judged_meanwhile(
    store: Any, mode: FallbackMode, record: AdapterRecord, decision: Decision
) -> tuple[AdapterRecord, Decision]:
    """The adapter's record and decision now: a request that waited for the model may find it
    checked (or pinned) by another one meanwhile, and need not judge it again."""
    try:
        fresh = store.get(record.id)
    except KeyError:  # deleted meanwhile (UnknownAdapterError)
        return record, decision
    if fresh.check is None and fresh.pinned is None:
        return record, decision
    return fresh, decide(mode, fresh)


def reusable(plan: Any, decision: Decision, judge: AdapterJudge | None, streamer: Any) -> bool:
    """Whether the judged answer is the reply itself: greedy, whole, and no shorter than
    the request allows (best of both always is)."""
    if decision.reason == "best of both":
        return True
    assert judge is not None
    return plan.greedy and streamer is None and plan.max_tokens <= judge.max_new_tokens
