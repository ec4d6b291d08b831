"""``POST /v1/feedback`` and ``GET /v1/feedback/{selection_id}``: judging recorded selections.

A server that records its selections in a :class:`capplug.feedback.FeedbackStore` returns each
one's ``selection_id`` in the ``capplug`` object of its answer; a client judges it later::

    POST /v1/feedback {"selection_id": "sel_...", "preferred": 2}
    POST /v1/feedback {"selection_id": "sel_...", "label": 0.0}          # the chosen candidate
    POST /v1/feedback {"selection_id": "sel_...", "label": 1.0, "candidate": 3}
    POST /v1/feedback {"selection_id": "sel_...", "reference": "Canberra."}

Answers: 201 with the stored judgement; 400 ``invalid_feedback`` naming the field; 404
``selection_not_found``; 409 ``duplicate_feedback`` (the same judgement again: nothing changes);
404 ``feedback_disabled`` when the server records nothing. Store writes run off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from capplug.errors import DuplicateFeedbackError, FeedbackError, UnknownSelectionError
from capplug.serve._http import APIError, read_json_object

__all__ = ["FEEDBACK_FIELDS", "install_feedback_routes"]

FEEDBACK_FIELDS = ("selection_id", "label", "candidate", "preferred", "reference", "source")


def install_feedback_routes(
    app: FastAPI, store: Any, *, on_judged: Callable[[str], Any] | None = None
) -> None:
    """Add the feedback routes to ``app`` (before any catch-all route); ``store`` may be None.
    ``on_judged`` is called (off the event loop) with each judged selection's id once its
    judgement is stored: an :class:`~capplug.training.auto_adapt.AutoAdapter`'s ``notify``."""

    def require_store() -> Any:
        if store is None:
            raise APIError(
                404,
                "this server records no selections, so there is nothing to judge (it runs "
                "without a feedback store: --no-feedback)",
                code="feedback_disabled",
            )
        return store

    @app.post("/v1/feedback", response_model=None)
    async def post_feedback(request: Request) -> JSONResponse:
        target = require_store()
        body = read_json_object(
            await request.body(),
            what="a JSON object with 'selection_id' and one of 'label', 'preferred', 'reference'",
        )
        unknown = sorted(set(body) - set(FEEDBACK_FIELDS))
        if unknown:
            raise APIError(
                400,
                f"unknown field(s) {', '.join(map(repr, unknown))}; give "
                f"{', '.join(FEEDBACK_FIELDS)}",
                param=unknown[0],
                code="invalid_feedback",
            )
        selection_id = body.get("selection_id")
        if not isinstance(selection_id, str) or not selection_id:
            raise APIError(
                400,
                "'selection_id' must be the id from the capplug object of an answer",
                param="selection_id",
                code="invalid_feedback",
            )
        options = {k: body[k] for k in FEEDBACK_FIELDS[1:] if body.get(k) is not None}
        judgement = await asyncio.to_thread(_add, target, selection_id, options)
        if on_judged is not None:
            await asyncio.to_thread(on_judged, selection_id)  # returns at once: it only schedules
        return JSONResponse({"object": "capplug.feedback", **judgement.to_dict()}, status_code=201)

    @app.get("/v1/feedback/{selection_id}", response_model=None)
    async def get_feedback(selection_id: str) -> JSONResponse:
        target = require_store()
        try:
            found = await asyncio.to_thread(target.selection, selection_id)
        except UnknownSelectionError as error:
            raise APIError(
                404, str(error), param="selection_id", code="selection_not_found"
            ) from None
        return JSONResponse({"object": "capplug.selection", **found})


def _add(store: Any, selection_id: str, options: dict[str, Any]) -> Any:
    try:
        return store.add(selection_id, **options)
    except UnknownSelectionError as error:
        raise APIError(404, str(error), param="selection_id", code="selection_not_found") from None
    except DuplicateFeedbackError as error:
        raise APIError(409, str(error), code="duplicate_feedback") from None
    except FeedbackError as error:
        param = error.param if error.param in FEEDBACK_FIELDS else None
        raise APIError(400, str(error), param=param, code="invalid_feedback") from None
