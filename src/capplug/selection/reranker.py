""":class:`Reranker`: best-of-n selection for Python callers, and the one way every surface
configures the selection path (:meth:`Reranker.selector`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from capplug.chat import Instruction
from capplug.feedback import as_feedback_store, check_watcher, judge_selection
from capplug.models import DEFAULT_SCORER
from capplug.selection.combiner import Combiner
from capplug.selection.core import DEFAULT_COMBINER, Scored, Selection, combiner_of
from capplug.selection.selector import Selector, as_task_scorers, signals_for

__all__ = ["Reranker"]


class Reranker:
    """Best-of-n selection that fuses the scorer, agreement and log-probabilities.

    ``Reranker()`` loads the bundled scorer and the selection weights stored with it. Every
    signal is optional: pass ``logprobs`` when the generator returns them; without them the
    weights fitted without log-probabilities apply. Every surface (the proxy, the LangChain and
    LlamaIndex components, the MCP tools) chooses through the same path
    (:class:`~capplug.selection.Selector`), configured by a Reranker.

    Args:
        scorer: a :class:`capplug.Scorer`, a reference to load one, or ``None`` for no scorer.
        combiner: the weights; default: those recorded in the scorer checkpoint's config.
        signals: restrict the signals used (default: those the combiner has weights for).
        lm: a local causal LM (a :class:`capplug.llms.LocalChatModel` or a reference) that
            computes each candidate's log-likelihood when ``logprobs`` is not given.
        feedback: record every selection in a :class:`capplug.feedback.FeedbackStore`
            (``True``: the default file; or a path, or a store), so that it can be judged
            later: :attr:`Selection.id` is then its id (``None`` when the store failed: the
            error is logged and the choice is returned all the same).
        task_scorers: score with the task scorer adapted to the instruction's task, where the
            guard allowed one (:class:`capplug.adapters.TaskScorers`; ``True``: the default
            folder; or a folder); :attr:`Selection.task_scorer` says which scored and why.
        auto_adapt: a :class:`capplug.training.auto_adapt.AutoAdapter` watching ``feedback``:
            judgements stored through :meth:`judge` adapt their task's scorer in the background
            once it is due (by default after 8 judged selections, then after every 8 more);
            with ``task_scorers`` on the same store, the next selections of that task use it
            where its guard allowed it.
    """

    def __init__(
        self,
        scorer: Any = DEFAULT_SCORER,
        *,
        combiner: Combiner | None = None,
        signals: Sequence[str] | None = None,
        lm: Any = None,
        feedback: Any = None,
        task_scorers: Any = None,
        auto_adapt: Any = None,
    ) -> None:
        from capplug.scoring import load_scorer

        if scorer is not None:  # None here means no scorer: the other signals alone
            scorer = load_scorer(scorer)
        if combiner is None:
            combiner = combiner_of(scorer)
        self.scorer = scorer
        self.combiner = combiner or DEFAULT_COMBINER
        self.signals = signals_for(self.combiner, signals)
        if isinstance(lm, str | os.PathLike):
            from capplug.llms import LocalChatModel

            lm = LocalChatModel.from_pretrained(lm)
        self.lm = lm
        self.feedback = as_feedback_store(feedback)
        self.task_scorers = as_task_scorers(task_scorers, scorer)
        self.auto_adapter = check_watcher(auto_adapt, self.feedback, owner="the Reranker")
        """The :class:`~capplug.training.auto_adapt.AutoAdapter` :meth:`judge` notifies."""

    def __repr__(self) -> str:
        return f"Reranker(scorer={self.scorer!r}, signals={self.signals}, lm={self.lm!r})"

    def selector(self, **changes: Any) -> Selector:
        """The selection path with this reranker's scorer, weights, signals, LM, task scorers
        and feedback store as they are now; ``changes`` replace any of the
        :class:`~capplug.selection.Selector`'s fields (``surface="proxy"``, another
        ``feedback``, ``score_single=True``)."""
        path = Selector(
            self.scorer,
            self.combiner,
            self.signals,
            lm=self.lm,
            task_scorers=self.task_scorers,
            feedback=self.feedback,
        )
        return replace(path, **changes) if changes else path

    def select(
        self,
        instruction: Instruction,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
    ) -> Selection:
        """Choose the best of ``candidates`` for ``instruction``.

        Args:
            instruction: the prompt (a string or a chat).
            candidates: the responses; repeats (up to whitespace) are scored once, empty
                strings are allowed.
            logprobs: each candidate's summed token log-probability under the model that wrote
                it, or ``None``.
            token_counts: each candidate's number of tokens (adds the per-token mean).

        Raises:
            ValueError / TypeError: naming the argument, for no candidates, non-strings,
                ``logprobs`` of the wrong length, NaN or infinite values, or numbers mixed with
                ``None``.
        """
        return self.selector().select(
            instruction, candidates, logprobs=logprobs, token_counts=token_counts
        )

    def judge(self, selection_id: str, **judgement: Any) -> Any:
        """Store a judgement of one of this reranker's recorded selections (its
        :attr:`Selection.id`), as :meth:`capplug.feedback.FeedbackStore.add` takes it: ``label``
        (with ``candidate``), ``preferred`` or ``reference``; with ``auto_adapt``, its task is
        adapted in the background once it is due. Returns the stored
        :class:`~capplug.feedback.Judgement`.

        Raises:
            ValueError: this reranker records no selections (no ``feedback``).
            capplug.feedback.FeedbackError: as ``FeedbackStore.add`` (nothing is stored).
        """
        return judge_selection(
            self.feedback,
            selection_id,
            owner="this Reranker",
            watcher=self.auto_adapter,
            **judgement,
        )

    def rank(
        self,
        instruction: Instruction,
        candidates: Sequence[str],
        *,
        logprobs: Sequence[float | None] | None = None,
        token_counts: Sequence[int] | None = None,
        top_k: int | None = None,
    ) -> list[Scored]:
        """Candidates best first, each with its index into ``candidates``."""
        return self.selector().rank(
            instruction, candidates, logprobs=logprobs, token_counts=token_counts, top_k=top_k
        )
