"""The reranked routes: ``POST /v1/chat/completions`` (answered whole or streamed) and
``POST /v1/responses``, each best of n from the upstream."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from capplug.llms.collect import describe_error, names_parameter
from capplug.llms.retry import AttemptBudget
from capplug.serve._http import read_json_object, unless_disconnected
from capplug.serve.proxy._candidates import Candidates, Quirks, Reranked
from capplug.serve.proxy._metrics import TIMING_KEY
from capplug.serve.proxy._replies import completion_chunks, summed_usage
from capplug.serve.proxy._requests import (
    check_sampling,
    choices_wanted,
    header_count,
    header_flag,
    instruction_of,
    stream_flag,
)
from capplug.serve.proxy._responses import as_choice, passthrough_reason, responses_instruction
from capplug.serve.proxy._upstream import Upstream, UpstreamFailure

logger = logging.getLogger("capplug.serve.proxy")


class ChatRoutes:
    """The route handlers that rerank: chat completions and the Responses API."""

    def __init__(
        self,
        upstream: Upstream,
        candidates: Candidates,
        *,
        n: int,
        max_n: int,
        sampling_temperature: float | None,
        request_logprobs: bool,
        quirk_seconds: float,
    ) -> None:
        self.upstream = upstream
        self.candidates = candidates
        self.n = n
        self.max_n = max_n
        self.sampling_temperature = sampling_temperature
        self.request_logprobs = request_logprobs
        self._refuses_logprobs = Quirks(
            upstream.name, "not asking for logprobs", seconds=quirk_seconds
        )

    async def chat_completions(self, request: Request) -> Response:
        if header_flag(request.headers, "X-Capplug-Disable"):
            return await self.upstream.passthrough(request)
        body = read_json_object(
            await request.body(),
            what="a JSON object with 'messages' (and Content-Type: application/json)",
        )
        # A client that goes away takes its upstream calls, retries and scoring with it.
        return await unless_disconnected(request, self._rerank(request, body))

    async def _rerank(self, request: Request, body: dict[str, Any]) -> Response:
        instruction = instruction_of(body)
        want = choices_wanted(body, self.max_n)
        check_sampling(body)
        asked_n = header_count(request.headers, "X-Capplug-N", self.max_n)
        # A request that offers tools is an agent step whose candidates would call tools, and
        # tool calls are not scored: sampling n of them costs n calls for nothing, so it gets
        # the one the client asked for, unless X-Capplug-N asks for more.
        offers_tools = bool(body.get("tools") or body.get("functions"))
        n = max(want, asked_n or (1 if offers_tools else self.n))
        stream, include_usage = stream_flag(body)
        payload = self._sampled(
            {k: v for k, v in body.items() if k not in ("n", "stream", "stream_options")}, n
        )
        model = body.get("model")
        headers = self.upstream.forward_headers(request.headers, reencoded=True)

        model_name = model if isinstance(model, str) else ""
        client_logprobs = body.get("logprobs") is True
        ask_logprobs = (
            self.request_logprobs
            and "logprobs" not in body
            and model_name not in self._refuses_logprobs
        )
        if ask_logprobs:
            payload["logprobs"] = True  # a selection signal; stripped again below
        started = time.perf_counter()
        # Every upstream attempt this request makes (fan-out, retries, the ask without logprobs)
        # comes out of one budget, so a lasting failure costs the configured attempts, not more.
        budget = AttemptBudget(self.upstream.retry.max_attempts)
        try:
            collected, replies = await self.candidates.collect(
                payload, headers, n, model_name, budget
            )
        except UpstreamFailure as failure:
            if not (ask_logprobs and names_parameter(failure.error, "logprobs")):
                raise self.upstream.error(failure) from failure
            # Perhaps the logprobs we added: ask once more without them, as the client did.
            payload.pop("logprobs")
            try:
                collected, replies = await self.candidates.collect(
                    payload, headers, n, model_name, budget
                )
            except UpstreamFailure as again:
                raise self.upstream.error(again) from again
            self._refuses_logprobs.remember(
                model_name, f"refused logprobs ({describe_error(failure.error)})"
            )
        choices = collected.received
        reason = None
        if offers_tools and n == 1:
            reason = (
                "the request offers tools: one candidate, since tool calls are not scored "
                "(X-Capplug-N asks for more)"
            )
        reranked = await self.candidates.choose(
            instruction,
            collected,
            replies,
            choices,
            n=n,
            want=want,
            model=model_name,
            started=started,
            reason=reason,
        )
        _leave_timings(request, reranked)
        order, meta, headers_out = reranked.order, reranked.metadata, reranked.headers
        usage = summed_usage(replies.replies)
        returned = [{**choices[i], "index": j} for j, i in enumerate(order)]
        if not client_logprobs:
            returned = [{**c, "logprobs": None} for c in returned]
        first = replies.replies[0]
        if stream:
            return StreamingResponse(
                completion_chunks(first, returned, usage, meta, include_usage=include_usage),
                media_type="text/event-stream",
                headers={**headers_out, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completion = {k: v for k, v in first.items() if k not in ("choices", "usage")}
        completion.update(choices=returned, usage=usage, capplug=meta)
        return JSONResponse(completion, headers=headers_out)

    async def responses(self, request: Request) -> Response:
        """``POST /v1/responses``: reranked like a chat completion where it can be (see
        ``_responses``), else passed through with ``X-Capplug-Passthrough`` saying why."""
        if header_flag(request.headers, "X-Capplug-Disable"):
            return await self.upstream.passthrough(request)
        body = read_json_object(await request.body(), what="a JSON object with 'input'")
        reason = passthrough_reason(body)
        if reason is not None:
            logger.debug("passing a Responses request through unreranked: %s", reason)
            relayed = await self.upstream.passthrough(request)
            relayed.headers["X-Capplug-Passthrough"] = reason
            return relayed
        return await unless_disconnected(request, self._rerank_response(request, body))

    async def _rerank_response(self, request: Request, body: dict[str, Any]) -> Response:
        instruction = responses_instruction(body)
        n = header_count(request.headers, "X-Capplug-N", self.max_n) or self.n
        payload = self._sampled(dict(body), n)
        headers = self.upstream.forward_headers(request.headers, reencoded=True)
        budget = AttemptBudget(self.upstream.retry.max_attempts)
        started = time.perf_counter()
        try:
            collected, replies = await self.candidates.collect_responses(
                payload, headers, n, budget
            )
        except UpstreamFailure as failure:
            raise self.upstream.error(failure) from failure
        model = body.get("model")
        reranked = await self.candidates.choose(
            instruction,
            collected,
            replies,
            [as_choice(r) for r in collected.received],
            n=n,
            want=1,
            model=model if isinstance(model, str) else "",
            started=started,
        )
        _leave_timings(request, reranked)
        chosen = collected.received[reranked.order[0]]
        usage = summed_usage(replies.replies)
        answer = {
            **chosen,
            **({"usage": usage} if usage is not None else {}),
            "capplug": reranked.metadata,
        }
        return JSONResponse(answer, headers=reranked.headers)

    def _sampled(self, payload: dict[str, Any], n: int) -> dict[str, Any]:
        """``payload`` with temperature 0 raised to ``sampling_temperature`` when several
        candidates are drawn (greedy ones would all be the same)."""
        temperature = payload.get("temperature")
        if (
            n > 1
            and self.sampling_temperature is not None
            and isinstance(temperature, int | float)
            and temperature == 0
        ):
            payload["temperature"] = self.sampling_temperature
        return payload


def _leave_timings(request: Request, reranked: Reranked) -> None:
    """Leave a reranked answer's timings in the request's state, for the ``Server-Timing``
    header the metrics middleware writes."""
    setattr(request.state, TIMING_KEY, list(reranked.timings))
