"""``capplug mcp``, driven by the MCP SDK's own client over stdio."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

mcp = pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from capplug.feedback import FeedbackStore  # noqa: E402


async def _session(args: list[str], work) -> object:
    params = StdioServerParameters(command=sys.executable, args=["-m", "capplug.cli", "mcp", *args])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        session.init_result = await session.initialize()
        return await work(session)


def _field(model, snake: str, camel: str) -> object:
    """A field of an MCP type: snake_case in mcp 2.x, camelCase in 1.x."""
    return getattr(model, snake) if hasattr(model, snake) else getattr(model, camel)


def _is_error(result) -> bool:
    return bool(_field(result, "is_error", "isError"))


def _json(result) -> object:
    assert not _is_error(result), result.content
    structured = _field(result, "structured_content", "structuredContent")
    return structured.get("result", structured)


def test_the_tools_answer_an_mcp_client(tiny_bert_scorer: Path, tmp_path: Path) -> None:
    db = tmp_path / "feedback.sqlite3"

    async def work(session):
        tools = {t.name for t in (await session.list_tools()).tools}
        scores = _json(
            await session.call_tool("score", {"instruction": "q", "responses": ["a", "b"]})
        )
        chosen = _json(
            await session.call_tool(
                "select",
                {"instruction": "q", "candidates": ["a", "b", "b"], "logprobs": [-1, -2, -2]},
            )
        )
        ranked = _json(
            await session.call_tool("rank", {"instruction": "q", "candidates": ["a", "b"]})
        )
        judged = _json(
            await session.call_tool(
                "judge", {"selection_id": chosen["selection_id"], "preferred": 0}
            )
        )
        bad = await session.call_tool("select", {"instruction": "q", "candidates": []})
        wrong = await session.call_tool("judge", {"selection_id": "sel_nope", "label": 1.0})
        return (
            tools,
            scores,
            chosen,
            ranked,
            judged,
            bad,
            wrong,
            _field(session.init_result, "server_info", "serverInfo"),
        )

    tools, scores, chosen, ranked, judged, bad, wrong, info = asyncio.run(
        _session(["--scorer", str(tiny_bert_scorer), "--feedback", str(db)], work)
    )
    assert tools == {"score", "rank", "select", "judge"}
    # the client learns which capplug answers, not which MCP SDK it is built on
    from capplug import __version__

    assert (info.name, info.version) == ("capplug", __version__)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert chosen["response"] in ("a", "b") and chosen["selection_id"].startswith("sel_")
    assert sorted(r["index"] for r in ranked) == [0, 1]
    assert judged["kind"] == "preferred" and judged["source"] == "mcp"
    # Bad arguments are tool errors naming the problem; the server keeps answering.
    assert _is_error(bad) and "candidates" in bad.content[0].text
    assert _is_error(wrong) and "sel_nope" in wrong.content[0].text
    assert FeedbackStore(db).selection(chosen["selection_id"])["judgements"][0]["candidate"] == 0
    json.dumps(chosen)  # plain JSON


def test_without_a_feedback_store_there_is_no_judge_tool(tiny_bert_scorer: Path) -> None:
    async def work(session):
        return {t.name for t in (await session.list_tools()).tools}

    assert asyncio.run(_session(["--scorer", str(tiny_bert_scorer)], work)) == {
        "score",
        "rank",
        "select",
    }


def test_a_judgement_reaches_the_rerankers_auto_adapter(
    tiny_bert_scorer: Path, tmp_path: Path
) -> None:
    from capplug import Reranker
    from capplug.serve.mcp import create_mcp_server
    from capplug.training.auto_adapt import AutoAdapter

    class Watching(AutoAdapter):  # what the server tells it, without training anything
        def notify(self, selection_id):
            self.told = [*getattr(self, "told", []), selection_id]

    feedback = FeedbackStore(tmp_path / "feedback.sqlite3")
    auto = Watching(feedback, task_scorers=None, out_root=tmp_path / "runs")
    reranker = Reranker(tiny_bert_scorer, feedback=feedback, auto_adapt=auto)
    server = create_mcp_server(scorer=reranker)

    async def work():
        chosen = await server.call_tool("select", {"instruction": "q", "candidates": ["a", "b"]})
        # mcp 1.x answers (content, structured); 2.x a CallToolResult.
        structured = chosen[1] if isinstance(chosen, tuple) else chosen.structured_content
        selection_id = structured["selection_id"]
        await server.call_tool("judge", {"selection_id": selection_id, "label": 1.0})
        return selection_id

    selection_id = asyncio.run(work())
    assert auto.told == [selection_id]
    auto.close()
    with pytest.raises(ValueError, match="must watch the feedback store the MCP server records"):
        create_mcp_server(scorer=reranker, feedback=tmp_path / "other.sqlite3")
    assert reranker.feedback is feedback  # refused: nothing changed


def test_capplug_mcp_with_auto_adapt_gives_its_reranker_an_auto_adapter(
    tiny_bert_scorer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from capplug.cli import main
    from capplug.serve import mcp as mcp_module
    from capplug.training.auto_adapt import AutoAdapter

    made = {}

    class Server:
        def run(self, transport):
            made["transport"] = transport

    def create(**kwargs):
        made.update(kwargs)
        return Server()

    monkeypatch.setattr(mcp_module, "create_mcp_server", create)
    db, folder = tmp_path / "feedback.sqlite3", tmp_path / "scorers"
    args = ["mcp", "--scorer", str(tiny_bert_scorer), "--feedback", str(db)]
    assert main([*args, "--task-scorers", str(folder), "--auto-adapt", "4"]) == 0
    reranker = made["scorer"]
    assert isinstance(reranker.auto_adapter, AutoAdapter) and reranker.auto_adapter.every == 4
    assert reranker.auto_adapter.feedback is reranker.feedback
    assert reranker.task_scorers.store.root == folder and made["transport"] == "stdio"
    reranker.auto_adapter.close()
    assert main([*args, "--auto-adapt", "4"]) == 2  # no --task-scorers: said before loading
    assert "--auto-adapt needs --feedback" in capsys.readouterr().err
