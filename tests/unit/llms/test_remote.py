"""Candidates from an OpenAI-compatible endpoint: the real openai SDK over a mock transport."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import openai
import pyarrow.parquet as pq
import pytest
from bigbench_fakes import GEN_TASK, fake_loader

from capplug.cli import main
from capplug.data.build import EndpointCandidateSource, build_dataset
from capplug.llms.remote import ENDPOINT_RECIPE, EndpointSampling, OpenAICompatibleModel
from capplug.llms.retry import RetryPolicy


class Endpoint:
    def __init__(self, *, max_choices: int = 64, faults=()) -> None:
        self.max_choices = max_choices
        self.faults = list(faults)
        self.bodies: list[dict] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.faults:
            return self.faults.pop(0)
        n = min(body.get("n", 1), self.max_choices)
        question = body["messages"][-1]["content"]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": f" answer {question[-1]} #{i} "},
                "finish_reason": "stop",
            }
            for i in range(n)
        ]
        return httpx2.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": choices,
            },
        )

    def model(self, **kwargs) -> OpenAICompatibleModel:
        client = openai.OpenAI(
            base_url="http://endpoint.test/v1",
            api_key="sk-x",
            max_retries=2,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self)),
        )
        retry = RetryPolicy(max_attempts=3, initial_backoff=0, jitter=0, sleep=lambda s: None)
        return OpenAICompatibleModel("big-model", client=client, retry=retry, **kwargs)


def test_the_recipe_asks_for_n_choices_per_step_and_labels_each_candidate():
    endpoint = Endpoint()
    rows = endpoint.model().candidates(["q1", "q2"], max_tokens=32, seed=3)
    assert len(rows) == 2 and len(rows[0]) == sum(s.n for s in ENDPOINT_RECIPE) == 13
    assert rows[0][0] == ("answer 1 #0", "greedy(temperature=0.0)")
    assert {settings for _, settings in rows[1]} == {s.settings() for s in ENDPOINT_RECIPE}
    assert len(endpoint.bodies) == 2 * len(ENDPOINT_RECIPE)
    top_p = next(b for b in endpoint.bodies if "top_p" in b)
    assert top_p["n"] == 4 and top_p["top_p"] == 0.95 and top_p["max_tokens"] == 32
    assert top_p["seed"] == 3


def test_an_endpoint_returning_fewer_choices_is_topped_up():
    endpoint = Endpoint(max_choices=1)
    texts = endpoint.model().sample("q", EndpointSampling("t", 4, 0.9))
    assert len(texts) == 4 and len(endpoint.bodies) == 4
    assert "n" not in endpoint.bodies[-1]


def test_rate_limits_are_retried_by_the_policy_not_the_sdk():
    endpoint = Endpoint(faults=[httpx2.Response(429, json={"error": {"message": "slow"}})])
    texts = endpoint.model().sample("q", EndpointSampling("t", 2, 0.9))
    assert len(texts) == 2 and len(endpoint.bodies) == 2


def test_persistent_errors_raise_after_bounded_attempts():
    down = httpx2.Response(503, json={"error": {"message": "down"}})
    endpoint = Endpoint(faults=[down] * 10)
    with pytest.raises(openai.InternalServerError):
        endpoint.model().sample("q", EndpointSampling("t", 4, 0.9))
    assert len(endpoint.bodies) == 3


def test_an_endpoint_source_feeds_the_data_build(tmp_path: Path):
    source = EndpointCandidateSource(Endpoint().model(), seed=0)
    assert json.loads(source.name)["model"].startswith("big-model@")
    build_dataset(
        tmp_path / "b", source=source, tasks=[GEN_TASK], progress=False, task_loader=fake_loader([])
    )
    shard = tmp_path / "b" / "shards" / f"{GEN_TASK}.parquet"
    sampled = [r for r in pq.read_table(shard).to_pylist() if r["source"] == "sampled"]
    assert sampled and all(
        r["generator"].startswith("greedy") or "temperature" in r["generator"] for r in sampled
    )


def test_bad_settings_are_refused(capsys):
    with pytest.raises(ValueError, match="model"):
        OpenAICompatibleModel("  ", client=object())
    assert main(["data", "build", "--out", "x", "--endpoint", "http://127.0.0.1:1/v1"]) == 2
    assert "--generator" in capsys.readouterr().err
