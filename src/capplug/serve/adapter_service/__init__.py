"""The adapter service: LoRA adapters by instruction, and chat completions that answer with them.

``create_adapter_app(store, runtime)`` gives a FastAPI app over an :class:`AdapterStore` (the
adapters, found by instruction) and an :class:`AdapterRuntime` (one local model that attaches
them on demand)::

    app = create_adapter_app(store, runtime)
    # or: capplug serve adapters --hypernet path/to/hypernetwork
    client = openai.OpenAI(base_url="http://127.0.0.1:8788/v1", api_key="none")
    client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        extra_body={"instruction": "Answer the question with yes or no."},
    )

Every route, limit and guarantee is in docs/adapter-service.md. One generation runs at a time
(the runtime is not thread-safe: attaching, detaching and generating hold one lock, in a worker
thread, never on the event loop); store lookups and creations hold a second lock and run beside
a generation, so finding an adapter does not wait for the model.

The package, by concern:

- ``app``: :func:`create_adapter_app`, its checks, middleware and route groups;
- ``_model_routes``: ``/healthz``, ``/metrics``, ``/v1/models`` and ``/v1/chat/completions``;
- ``_adapter_routes``: ``/v1/adapters`` and vLLM's load and unload routes;
- ``_schema``: the request and reply models (their names are the schemas ``/openapi.json``
  serves);
- ``_service``: the work behind the routes, one :class:`Service` per app: finding, making,
  attaching and deleting adapters, reading their files, planning and generating an answer, and
  a store or runtime failure as the client sees it;
- ``_metrics``: the service's own Prometheus metrics;
- ``_replies``: an answer as a ``chat.completion``, as a stream of chunks, and as
  ``Server-Timing``.
"""

from capplug.adapters.store import ADAPTER_FILES
from capplug.serve.adapter_service.app import create_adapter_app

__all__ = ["ADAPTER_FILES", "create_adapter_app"]
