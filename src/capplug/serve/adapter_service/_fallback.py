"""The adapter service's judged fallback as HTTP sees it: the request's ``fallback`` mode
checked (400s), and the reply's ``capplug.fallback``. Which side answers is decided in the
library (:func:`capplug.adapters.fallback.decide`), the judging is
:class:`capplug.adapters.AdapterJudge`; :class:`~._service.Service` runs both."""

from __future__ import annotations

from typing import Any

from capplug.adapters.fallback import (
    FALLBACK_MODES,
    AdapterJudge,
    Comparison,
    Decision,
    FallbackMode,
)
from capplug.adapters.store import AdapterRecord
from capplug.serve._http import APIError


def probe_of(chat: Any) -> str:
    """The input a check kept from a request: its last user turn."""
    return next(
        (str(t.get("content") or "") for t in reversed(chat) if t.get("role") == "user"), ""
    )


def fallback_mode(request: Any, judge: AdapterJudge | None, with_adapter: bool) -> FallbackMode:
    """The request's ``fallback``, checked: ``auto`` by default with a judge, else ``off``."""
    mode = request.fallback
    if mode is None:
        return "auto" if judge is not None else "off"
    if mode not in FALLBACK_MODES:
        raise APIError(
            400,
            f"Invalid value for 'fallback': {str(mode)[:40]!r}; use 'auto' (the adapter's "
            f"check decides), 'best_of' (answer with the adapter and the base model, the "
            f"judge picks) or 'off' (always the adapter)",
            param="fallback",
            code="invalid_value",
        )
    if mode != "off" and judge is None:
        raise APIError(
            400,
            f"'fallback': {mode!r} needs a judge, and this service runs without one: start "
            f"it with `capplug serve adapters --fallback` (create_adapter_app(..., "
            f"judge=AdapterJudge(...))), or send 'fallback': 'off'",
            param="fallback",
            code="fallback_unavailable",
        )
    if mode == "best_of":
        problem = None
        if not with_adapter:
            problem = "a request for an adapter (an 'instruction', or an adapter in 'model')"
        elif request.stream:
            problem = "a whole answer: both are generated before one is picked; not stream"
        elif (request.n or 1) > 1:
            problem = "one choice (n = 1): the judge picks one answer of two"
        if problem is not None:
            raise APIError(
                400,
                f"'fallback': 'best_of' needs {problem}",
                param="fallback",
                code="unsupported_value",
            )
    return mode  # type: ignore[return-value]


def fallback_json(
    mode: FallbackMode,
    judge: AdapterJudge | None,
    decision: Decision,
    record: AdapterRecord | None,
    comparison: Comparison | None,
    unloadable: str | None,
) -> dict[str, Any]:
    """The reply's ``capplug.fallback``: the mode, the side that answered and why, and the
    verdict it rests on (both scores, when judged)."""
    check = None if record is None else record.check
    info: dict[str, Any] = {
        "mode": mode,
        "used": decision.side,
        "reason": "adapter unloadable" if unloadable else decision.reason,
        "winner": None,
        "scores": None,
        "judged": None,
        "pinned": None if record is None else record.pinned,
        "judge": None if judge is None else judge.name,
    }
    if unloadable:
        info["error"] = unloadable
    if comparison is not None:
        info.update(
            winner=comparison.winner,
            scores={k: round(float(v), 6) for k, v in comparison.scores.items()},
            judged="now",
        )
    elif check is not None and decision.reason in ("stored check", "pinned"):
        info.update(
            winner=check.winner,
            scores={"adapter": check.adapter_score, "base": check.base_score},
            judged=check.checked,
        )
    return info


def require_judge(judge: AdapterJudge | None) -> AdapterJudge:
    """The service's judge (400 when it runs without one)."""
    if judge is None:
        raise APIError(
            400,
            "this service runs without a judge, so it cannot check adapters: start it with "
            "`capplug serve adapters --fallback`",
            param="probe",
            code="fallback_unavailable",
        )
    return judge
