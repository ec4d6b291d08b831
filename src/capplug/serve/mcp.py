"""``capplug mcp``: capplug's selection as Model Context Protocol tools (the official ``mcp`` SDK).

An agent or an MCP client (Claude Desktop, an IDE, the SDK's own client) starts the server over
stdio and calls:

- ``score``: the scorer's score in [0, 1] of each response to an instruction;
- ``rank``: candidates best first through capplug's selection core (the scorer, agreement among
  the candidates, and log-probabilities when given), with each one's signals;
- ``select``: the best candidate, its index, fused score and signals, and the ``capplug``
  metadata; with a feedback store, its ``selection_id`` too;
- ``judge`` (with a feedback store): a label, a preferred candidate or a reference for a
  recorded selection;
- ``lookup_adapter`` (with an adapter store): the stored adapters closest to an instruction,
  and whether each falls back to the base model (the judged fallback's verdict).

Bad arguments come back as tool errors (``isError``) whose text names the argument; the server
keeps running. Needs ``pip install 'capplug[mcp]'``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["create_mcp_server"]

SURFACE = "mcp"
"""What the feedback store records as the surface of the tools' selections."""

INSTRUCTIONS = (
    "capplug judges candidate answers: give it an instruction and several candidate responses "
    "(say, n samples from a model) and it ranks them or picks the best, fusing a small "
    "cross-encoder's score with the candidates' agreement and, when given, their "
    "log-probabilities."
)


def create_mcp_server(
    *,
    scorer: Any = None,
    feedback: Any = None,
    store: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
) -> Any:
    """A ``FastMCP`` server with capplug's tools (see the module docstring).

    Args:
        scorer: a :class:`capplug.Reranker`, a :class:`capplug.Scorer`, a reference, or
            ``None`` for the bundled default. A Reranker's ``auto_adapt`` hears every
            judgement ``judge`` stores.
        feedback: a feedback store (or a path, or ``True`` for the default file): ``select``
            records each choice and ``judge`` takes judgements.
        store: an adapter store folder: adds ``lookup_adapter``.
        base_model: the store's base model (default: the store's default).
    """
    from capplug.feedback import as_feedback_store, check_watcher
    from capplug.models import DEFAULT_SCORER
    from capplug.selection import Reranker

    if isinstance(scorer, Reranker):
        reranker = scorer
    else:
        reranker = Reranker(scorer if scorer is not None else DEFAULT_SCORER)
    if feedback is not None:
        given = as_feedback_store(feedback)
        check_watcher(reranker.auto_adapter, given, owner="the MCP server")
        reranker.feedback = given
    feedback_store = reranker.feedback  # given here, or the reranker's own
    server = _sdk_server()
    _add_selection_tools(server, reranker)
    if feedback_store is not None:
        _add_judge_tool(server, reranker)
    if store is not None:
        _add_adapter_tool(server, store, base_model)
    return server


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """Bad arguments as the SDK's ``ToolError``, so the client reads what was wrong (mcp 2.x
    hides any other exception's message behind "Error executing tool")."""
    try:
        yield
    except (ValueError, TypeError, LookupError) as exc:
        try:
            from mcp.server.mcpserver.exceptions import ToolError
        except ImportError:
            from mcp.server.fastmcp.exceptions import ToolError
        raise ToolError(str(exc)) from exc


def _sdk_server() -> Any:
    """The MCP SDK's server named capplug, reporting capplug's version: ``MCPServer`` in mcp
    2.x, ``FastMCP`` in 1.x (which takes no version, so its low-level server's is set)."""
    from capplug import __version__

    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:
        pass
    else:
        return MCPServer("capplug", instructions=INSTRUCTIONS, version=__version__)
    try:
        from mcp.server.fastmcp import FastMCP
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"`capplug mcp` needs the MCP SDK: pip install 'capplug[mcp]' ({exc})"
        ) from exc
    server = FastMCP("capplug", instructions=INSTRUCTIONS)
    server._mcp_server.version = __version__
    return server


def _add_selection_tools(server: Any, reranker: Any) -> None:
    """``score``, ``rank`` and ``select``."""

    @server.tool()
    def score(instruction: str, responses: list[str]) -> list[float]:
        """How well each response answers the instruction, in [0, 1] (higher is better)."""
        with _tool_errors():
            return [float(s) for s in reranker.scorer.score(instruction, responses)]

    @server.tool()
    def rank(
        instruction: str,
        candidates: list[str],
        logprobs: list[float] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        """Candidates best first: each one's index into ``candidates``, the fused probability
        that it is the best, and its raw signals. ``logprobs``: each candidate's summed token
        log-probability, when the model that wrote them gives them."""
        with _tool_errors():
            path = reranker.selector(surface=SURFACE)
            ranked = path.rank(instruction, candidates, logprobs=logprobs, top_k=top_k)
            return [_scored(c) for c in ranked]

    @server.tool()
    def select(
        instruction: str, candidates: list[str], logprobs: list[float] | None = None
    ) -> dict[str, Any]:
        """The best candidate: its index into ``candidates``, the response, the fused score and
        signals, (when the server records selections) the ``selection_id`` to judge, and the
        ``capplug`` metadata every surface reports (every candidate's scores and signals)."""
        with _tool_errors():
            path = reranker.selector(surface=SURFACE)
            chosen = path.select(instruction, candidates, logprobs=logprobs)
            return {**_scored(chosen), "selection_id": chosen.id, "capplug": chosen.metadata()}


def _add_judge_tool(server: Any, reranker: Any) -> None:
    """``judge``, where the server records selections."""

    @server.tool()
    def judge(
        selection_id: str,
        label: float | None = None,
        candidate: int | None = None,
        preferred: int | None = None,
        reference: str | None = None,
    ) -> dict[str, Any]:
        """Judge a recorded selection: exactly one of ``label`` (in [0, 1], for
        ``candidate`` or else the chosen one), ``preferred`` (a candidate index) or
        ``reference`` (the wanted answer)."""
        with _tool_errors():
            return reranker.judge(
                selection_id,
                label=label,
                candidate=candidate,
                preferred=preferred,
                reference=reference,
                source="mcp",
            ).to_dict()


def _add_adapter_tool(server: Any, store: Any, base_model: str | None) -> None:
    """``lookup_adapter``, over an adapter store."""
    from capplug.adapters import AdapterStore

    adapters = AdapterStore(store, **({"base_model": base_model} if base_model else {}))

    @server.tool()
    def lookup_adapter(instruction: str, k: int = 3) -> list[dict[str, Any]]:
        """The stored LoRA adapters whose instructions are closest to ``instruction``,
        best first, with their similarity in [0, 1], and whether the judged fallback
        answers with the base model instead (the adapter lost its check, or is pinned so)."""
        with _tool_errors():
            return [
                {
                    "id": m.record.id,
                    "instruction": m.record.instruction,
                    "similarity": m.similarity,
                    "falls_back": m.record.falls_back,
                }
                for m in adapters.lookup(instruction, k=k)
            ]


def _scored(candidate: Any) -> dict[str, Any]:
    """A candidate (or a selection's chosen one) as the tools answer it."""
    return {
        "index": candidate.index,
        "response": candidate.response,
        "score": candidate.score,
        "signals": dict(candidate.signals),
    }
