"""Every Python snippet in the README runs as written, with the packaged models.

Each snippet runs in a fresh namespace, in a temporary working folder. A snippet that talks to
a server says so in an HTML comment on the line above it
(``<!-- snippet runs against the test servers: ... -->``); it then runs against real servers
started here on free ports: ``capplug serve local`` (the packaged SmolLM2, as the endpoint
``OPENAI_BASE_URL`` names), the reranking proxy in front of it where the README says
``127.0.0.1:8787``, and the adapter service with the bundled hypernetwork where it says
``127.0.0.1:8788``. Only those addresses are changed in the code that runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(
    r"(<!-- snippet runs against the test servers[^>]*-->\n)?```python\n(.*?)```", re.S
)
SNIPPETS = [(bool(m.group(1)), m.group(2)) for m in _BLOCK.finditer(README.read_text())]
PROXY, SERVICE = "http://127.0.0.1:8787", "http://127.0.0.1:8788"
MODEL = "smollm2-135m-instruct"


def test_the_readme_has_snippets_and_each_runs() -> None:
    assert len(SNIPPETS) >= 8
    assert sum(not servers for servers, _ in SNIPPETS) >= 4
    assert "snippet not run" not in README.read_text()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The local endpoint, the proxy in front of it and the adapter service, on free ports."""
    import contextlib

    from capplug import Scorer
    from capplug.adapters import AdapterRuntime, Hypernetwork
    from capplug.adapters.store import AdapterStore
    from capplug.llms import LocalChatModel
    from capplug.serve import create_adapter_app, create_app, create_proxy_app, serve_in_thread

    model = LocalChatModel.from_pretrained(MODEL, device="cpu")
    hypernet = Hypernetwork.from_pretrained()
    store = AdapterStore(
        tmp_path_factory.mktemp("readme-store"),
        base_model=hypernet.config.base_ref,
        generator=hypernet.generate,
    )
    runtime = AdapterRuntime.from_pretrained(hypernet.config.base_ref, device="cpu", max_loaded=2)
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        local = stack.enter_context(serve_in_thread(create_app(model, max_tokens_cap=16)))
        proxy = create_proxy_app(f"{local}/v1", scorer=Scorer(device="cpu"), n=3)
        service = create_adapter_app(store, runtime, max_tokens_cap=16)
        yield {
            "local": local,
            PROXY: stack.enter_context(serve_in_thread(proxy)),
            SERVICE: stack.enter_context(serve_in_thread(service)),
        }


@pytest.mark.parametrize(
    ("needs_servers", "code"),
    SNIPPETS,
    ids=[f"snippet-{i}-{c.splitlines()[0][:30]}" for i, (_, c) in enumerate(SNIPPETS)],
)
def test_a_readme_snippet_runs_as_written(
    needs_servers: bool,
    code: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if needs_servers:
        urls = request.getfixturevalue("servers")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{urls['local']}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "none")
        monkeypatch.delenv("OPENAI_API_BASE", raising=False)
        for documented in (PROXY, SERVICE):
            code = code.replace(documented, urls[documented])
    compiled = compile(code, "README.md snippet", "exec")
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    exec(compiled, {"__name__": "readme_snippet"})
