"""``POST /v1/rerank`` (and ``/v2/rerank``) on the reranking proxy: the scorer behind the rerank
API that Cohere's, Jina's and vLLM's clients speak, driven here by the real ``cohere`` SDK."""

from __future__ import annotations

import asyncio
from typing import Any

import cohere
import httpx
import pytest
from fake_upstream import LookupScorer, Upstream, error_of, proxy

SCORES = {"Canberra is the capital.": 0.9, "Sydney is the largest city.": 0.4, "Kangaroos.": 0.1}
DOCUMENTS = ["Sydney is the largest city.", "Kangaroos.", "Canberra is the capital."]


def rerank_client(**options: Any) -> Any:
    upstream = Upstream()
    client = proxy(upstream, LookupScorer(SCORES), **options)
    client.upstream = upstream  # type: ignore[attr-defined]
    return client


def test_documents_come_back_best_first_with_their_scores() -> None:
    client = rerank_client()
    reply = client.post(
        "/v1/rerank",
        json={"query": "Capital of Australia?", "documents": DOCUMENTS, "top_n": 2},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [r["index"] for r in body["results"]] == [2, 0]
    assert [r["relevance_score"] for r in body["results"]] == [0.9, 0.4]
    assert "document" not in body["results"][0]
    assert client.upstream.requests == []  # answered by the proxy, not forwarded
    assert "scoring" in reply.headers["server-timing"]


def test_object_documents_rank_fields_and_return_documents() -> None:
    client = rerank_client()
    reply = client.post(
        "/v2/rerank",
        json={
            "query": "Capital of Australia?",
            "documents": [{"text": d, "id": i} for i, d in enumerate(DOCUMENTS)],
            "return_documents": True,
        },
    ).json()
    assert reply["results"][0] == {
        "index": 2,
        "relevance_score": 0.9,
        "document": {"text": "Canberra is the capital.", "id": 2},  # every field kept
    }
    fields = client.post(
        "/v1/rerank",
        json={
            "query": "q",
            "documents": [{"title": "A", "body": "b"}],
            "rank_fields": ["title", "body"],
            "return_documents": True,
        },
    ).json()
    assert fields["results"][0]["document"] == {"title": "A", "body": "b"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"documents": ["a"]}, "query"),
        ({"query": " ", "documents": ["a"]}, "query"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": ["a", 3]}, "documents[1]"),
        ({"query": "q", "documents": [{"title": "x"}]}, "documents[0]"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["a"], "top_n": True}, "top_n"),
        ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
        ({"query": "q", "documents": [{"t": "a"}], "rank_fields": "t"}, "rank_fields"),
    ],
)
def test_bad_rerank_requests_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert error_of(rerank_client().post("/v1/rerank", json=body), 400)["param"] == param


def test_the_proxy_key_guards_rerank_and_is_taken_as_a_bearer_key() -> None:
    client = rerank_client(api_key="proxy-key")
    body = {"query": "q", "documents": ["a"]}
    assert client.post("/v1/rerank", json=body).status_code == 401
    ok = client.post("/v1/rerank", json=body, headers={"Authorization": "Bearer proxy-key"})
    assert ok.status_code == 200


def test_the_cohere_sdk_reranks_through_the_proxy() -> None:
    app = rerank_client(api_key="proxy-key").app

    async def scenario() -> tuple[Any, Any]:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))  # cohere speaks httpx
        v2 = cohere.AsyncClientV2(
            api_key="proxy-key", base_url="http://proxy.test", httpx_client=http
        )
        v1 = cohere.AsyncClient(
            api_key="proxy-key", base_url="http://proxy.test", httpx_client=http
        )
        second = await v2.rerank(
            model="capplug", query="Capital of Australia?", documents=DOCUMENTS, top_n=2
        )
        first = await v1.rerank(
            model="capplug",
            query="Capital of Australia?",
            documents=DOCUMENTS,
            return_documents=True,
        )
        return second, first

    v2_reply, v1_reply = asyncio.run(scenario())
    assert [(r.index, r.relevance_score) for r in v2_reply.results] == [(2, 0.9), (0, 0.4)]
    assert [r.index for r in v1_reply.results] == [2, 0, 1]
    assert v1_reply.results[0].document.text == "Canberra is the capital."


def test_score_pairs_one_instruction_to_many_or_in_order() -> None:
    client = rerank_client()
    one_to_many = client.post(
        "/v1/score", json={"text_1": "Capital of Australia?", "text_2": DOCUMENTS}
    ).json()
    assert [d["score"] for d in one_to_many["data"]] == [0.4, 0.1, 0.9]
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2]
    in_order = client.post(
        "/v1/score", json={"text_1": ["q1", "q2"], "text_2": [DOCUMENTS[2], DOCUMENTS[1]]}
    ).json()
    assert [d["score"] for d in in_order["data"]] == [0.9, 0.1]
    for body, param in (
        ({"text_1": ["a", "b"], "text_2": ["c"]}, "text_2"),
        ({"text_1": 3, "text_2": "c"}, "text_1"),
        ({"text_1": "a", "text_2": []}, "text_2"),
    ):
        assert error_of(client.post("/v1/score", json=body), 400)["param"] == param
    assert client.upstream.requests == []
