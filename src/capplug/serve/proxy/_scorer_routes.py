"""The routes the proxy answers with its scorer alone: ``POST /v1/rerank`` and ``/v2/rerank``
(Cohere, Jina, vLLM shape) and ``POST /v1/score`` (vLLM's)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from capplug.llms.collect import describe_error
from capplug.serve._http import APIError, ClientGone, read_json_object, unless_disconnected
from capplug.serve._scoring_queue import ScoringQueue
from capplug.serve.proxy._metrics import TIMING_KEY, ProxyMetrics
from capplug.serve.proxy._requests import rerank_request, score_request

logger = logging.getLogger("capplug.serve.proxy")


T = TypeVar("T")


class ScorerRoutes:
    """The route handlers that need no upstream: documents and pairs scored by the scorer."""

    def __init__(self, scoring: ScoringQueue, metrics: ProxyMetrics) -> None:
        self.scoring = scoring
        self.metrics = metrics

    async def _scored(self, request: Request, work: Awaitable[T], what: str) -> T:
        """The scores ``work`` gives, for a route the proxy answers itself: cancelled if the
        client leaves, timed (metrics, ``Server-Timing``), and a 503 if the scorer fails."""
        started = time.perf_counter()
        try:
            result = await unless_disconnected(request, work)
        except ClientGone:
            raise
        except Exception as error:
            self.metrics.scoring_failures.inc()
            logger.error("scoring failed for a %s request: %s", what, describe_error(error))
            raise APIError(
                503, f"the scorer failed: {describe_error(error)}", code="scorer_unavailable"
            ) from error
        seconds = time.perf_counter() - started
        self.metrics.scoring_seconds.observe(seconds)
        setattr(request.state, TIMING_KEY, [("scoring", seconds)])
        return result

    async def rerank(self, request: Request) -> Response:
        """``POST /v1/rerank`` (Cohere, Jina, vLLM shape): the documents by the scorer's score."""
        body = read_json_object(
            await request.body(), what="a JSON object with 'query' and 'documents'"
        )
        query, texts, top_n, return_documents = rerank_request(body)
        scores = await self._scored(request, self.scoring.score(query, texts), "rerank")
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]  # stable on ties
        results: list[dict[str, Any]] = []
        for i in order:
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if return_documents:  # as the client sent it: a string as {"text"}, an object whole
                sent = body["documents"][i]
                result["document"] = sent if isinstance(sent, dict) else {"text": texts[i]}
            results.append(result)
        model = body.get("model")
        return JSONResponse(
            {
                "id": f"rerank-{secrets.token_hex(12)}",
                "object": "rerank",
                "model": model if isinstance(model, str) and model else "capplug-scorer",
                "results": results,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            }
        )

    async def score(self, request: Request) -> Response:
        """``POST /v1/score`` (vLLM's shape): the scorer's score of each (text_1, text_2) pair."""
        body = read_json_object(
            await request.body(), what="a JSON object with 'text_1' and 'text_2'"
        )
        pairs = score_request(body)
        by_instruction: dict[str, list[int]] = {}
        for i, (instruction, _) in enumerate(pairs):
            by_instruction.setdefault(instruction, []).append(i)

        async def scored() -> list[list[float]]:
            return list(
                await asyncio.gather(
                    *(
                        self.scoring.score(instruction, [pairs[i][1] for i in indices])
                        for instruction, indices in by_instruction.items()
                    )
                )
            )

        groups = await self._scored(request, scored(), "score")
        scores = [0.0] * len(pairs)
        for indices, values in zip(by_instruction.values(), groups, strict=True):
            for i, value in zip(indices, values, strict=True):
                scores[i] = value
        model = body.get("model")
        return JSONResponse(
            {
                "id": f"score-{secrets.token_hex(12)}",
                "object": "list",
                "created": int(time.time()),
                "model": model if isinstance(model, str) and model else "capplug-scorer",
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            }
        )
