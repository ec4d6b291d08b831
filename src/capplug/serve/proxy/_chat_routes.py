"""The reranked routes: ``POST /v1/chat/completions`` (answered whole or streamed) and
``POST /v1/responses``, each best of n from the upstream; a stream of one candidate passes
the upstream's own stream through."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from capplug.llms.collect import Collected, describe_error, names_parameter
from capplug.llms.retry import AttemptBudget
from capplug.selection import unscored_metadata
from capplug.serve._http import read_json_object, unless_disconnected
from capplug.serve.proxy._candidates import Candidates, Quirks, Reranked
from capplug.serve.proxy._metrics import TIMING_KEY, failure_reason, is_timeout
from capplug.serve.proxy._replies import (
    StreamRelay,
    candidate_text,
    completion_chunks,
    is_event_stream,
    sse,
    summed_usage,
)
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

STREAMED_ONE = "one candidate: streamed as the upstream sent it"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
        if stream and n == 1:  # nothing to choose among: the upstream's tokens as they come
            return await self._stream_one(request, body, include_usage=include_usage)
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
        collected, replies = await self._collect(payload, headers, n, model_name, ask_logprobs)
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
        return self._reply(
            replies,
            choices,
            reranked,
            client_logprobs=client_logprobs,
            stream=stream,
            include_usage=include_usage,
        )

    async def _collect(
        self,
        payload: dict[str, Any],
        headers: dict[str, str],
        n: int,
        model_name: str,
        ask_logprobs: bool,
    ) -> tuple[Any, Any]:
        """The candidates from upstream; asked once more without the logprobs the proxy added
        when the upstream refuses them (and the model remembered as refusing them)."""
        # Every upstream attempt this request makes (fan-out, retries, the ask without logprobs)
        # comes out of one budget, so a lasting failure costs the configured attempts, not more.
        budget = AttemptBudget(self.upstream.retry.max_attempts)
        try:
            return await self.candidates.collect(payload, headers, n, model_name, budget)
        except UpstreamFailure as failure:
            if not (ask_logprobs and names_parameter(failure.error, "logprobs")):
                raise self.upstream.error(failure) from failure
            # Perhaps the logprobs we added: ask once more without them, as the client did.
            payload.pop("logprobs")
            try:
                result = await self.candidates.collect(payload, headers, n, model_name, budget)
            except UpstreamFailure as again:
                raise self.upstream.error(again) from again
            self._refuses_logprobs.remember(
                model_name, f"refused logprobs ({describe_error(failure.error)})"
            )
            return result

    @staticmethod
    def _reply(
        replies: Any,
        choices: list[dict[str, Any]],
        reranked: Any,
        *,
        client_logprobs: bool,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        """The reranked choices as the client asked for them: one completion, or its chunks."""
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
                headers={**headers_out, **_STREAM_HEADERS},
            )
        completion = {k: v for k, v in first.items() if k not in ("choices", "usage")}
        completion.update(choices=returned, usage=usage, capplug=meta)
        return JSONResponse(completion, headers=headers_out)

    async def _stream_one(
        self, request: Request, body: dict[str, Any], *, include_usage: bool
    ) -> Response:
        """A stream of one candidate: the upstream asked to stream (with the client's
        ``stream_options``, and no ``logprobs`` it did not ask for), its events relayed as they
        arrive, the ``capplug`` metadata in the last chunk. Retried as :meth:`Upstream.call`
        is, but only before the first byte; an error status then is the usual error answer."""
        payload = {k: v for k, v in body.items() if k != "n"}
        headers = self.upstream.forward_headers(request.headers, reencoded=True)
        budget = AttemptBudget(self.upstream.retry.max_attempts)
        started = time.perf_counter()
        try:
            response = await self.upstream.open_stream(payload, headers, budget)
        except UpstreamFailure as failure:
            raise self.upstream.error(failure) from failure
        setattr(request.state, TIMING_KEY, [("upstream", time.perf_counter() - started)])
        headers_out = {
            **{k: v for k, v in response.headers.items() if k.lower().startswith("x-ratelimit-")},
            "X-Capplug-Candidates": "1",
            "X-Capplug-Failures": "0",
            **_STREAM_HEADERS,
        }
        if not is_event_stream(response):  # an upstream that ignores stream: its whole reply
            reply = response.json()
            choice = {**reply["choices"][0], "index": 0}
            meta = self._streamed_metadata(candidate_text(choice), started)
            chunks = completion_chunks(
                reply, [choice], reply.get("usage"), meta, include_usage=include_usage
            )
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers_out)
        return StreamingResponse(
            self._relayed(response, StreamRelay(body.get("model")), started),
            media_type="text/event-stream",
            headers=headers_out,
            # Closes the upstream also where a client that left stops the stream before it began.
            background=BackgroundTask(response.aclose),
        )

    async def _relayed(
        self, response: httpx2.Response, relay: StreamRelay, started: float
    ) -> AsyncIterator[str]:
        """The upstream's events as they arrive, then the metadata chunk and ``[DONE]`` (also
        where the upstream ended without its own); the upstream closed however it ends, a
        client that leaves included."""
        try:
            try:
                async for event in relay.events(response.aiter_lines()):
                    yield event
            except httpx2.RequestError as error:
                # Part of the answer has gone out: too late to retry or to answer with a status.
                yield self._broken_off(error)
                return
            yield relay.closing(self._streamed_metadata(relay.text, started))
        finally:
            await response.aclose()

    def _broken_off(self, error: httpx2.RequestError) -> str:
        """The error event that ends a stream the upstream broke off (the SDKs raise it)."""
        self.upstream.metrics.upstream_failures.labels(failure_reason(error)).inc()
        message = f"the upstream {self.upstream.name} broke off its stream: {describe_error(error)}"
        logger.warning("%s", message)
        code = "upstream_timeout" if is_timeout(error) else "upstream_error"
        return sse(
            {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        )

    def _streamed_metadata(self, text: str, started: float) -> dict[str, Any]:
        """The ``capplug`` metadata of one candidate streamed through (unscored: there was
        nothing to choose among), the proxy's own keys included; counts and times it."""
        seconds = time.perf_counter() - started
        self.upstream.metrics.upstream_seconds.observe(seconds)
        self.upstream.metrics.candidates.inc()
        return {
            **Collected(received=[text], calls=1).metadata(1),
            **unscored_metadata([text], [0], STREAMED_ONE),
            "returned": [0],
            "upstream_seconds": round(seconds, 6),
            "scoring_seconds": 0.0,
        }

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
