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

Adapters
    ``POST /v1/adapters`` ``{"instruction": ..., "threshold": ...}``: the stored adapter for a
    similar instruction (200, ``hit: true``), or a new one the store's generator makes (201,
    ``hit: false``); with its ``similarity`` and ``files``. ``GET /v1/adapters`` lists them
    (most recently used first), ``GET /v1/adapters/{id}`` shows one, ``DELETE`` removes one (and
    detaches it from the model). ``GET /v1/adapters/{id}/files/{name}`` sends one of the
    adapter's two peft files, ``adapter_model.safetensors`` or ``adapter_config.json``, checked
    against the sha256 the index recorded; no other name is served, nor a file reached through
    a symbolic link, nor anything outside the adapter's own folder.

``POST /v1/chat/completions``
    OpenAI's chat completions. ``model`` picks what answers: ``"<base>"`` the bare base model,
    ``"<base>@<adapter id>"`` a stored adapter; or the request carries ``instruction`` (the SDK's
    ``extra_body``) and the store's :meth:`~AdapterStore.get_or_create` picks (or makes) the
    adapter. The instruction only picks the adapter: it is not added to the messages, which the
    model reads as they are (as the hypernetwork's adapters were trained: the input alone). The
    answer is a standard chat completion whose ``model`` names the adapter used, with a
    ``capplug`` object: ``adapter`` (its id, or null for the base model), ``source`` (``base``,
    ``id`` or ``instruction``), ``hit`` and ``similarity`` (for ``instruction``), ``loaded`` (the
    adapter was attached for this request) and ``timings`` (ms spent finding, loading and
    generating); ``Server-Timing`` says the same. Adapters are attached from the store's checked
    files on first use and stay attached, least recently used detached first
    (``runtime.max_loaded``). Supported: ``messages``, ``n`` (sampled; greedy repeats),
    ``temperature``, ``top_p``, ``max_tokens`` / ``max_completion_tokens``, ``seed``, ``stop``,
    and ``stream`` for one choice: its tokens as they are drawn, the ``capplug`` object and
    ``usage`` on the last chunk (with ``stop``, the reply streams once it is whole). A failure
    before the first token is an ordinary error answer. ``stream`` with ``n`` > 1, ``tools``,
    ``logprobs`` and non-text ``response_format`` get a 400.

No generator
    A store without a generator still serves stored and imported adapters, by id or by an
    instruction that hits; an instruction that would need a new adapter gets a 503 with code
    ``no_generator`` that says so.

Corrupt adapters
    An instruction's hit is checked against its sha256 before it is used (the store's
    ``get_or_create``): a corrupt one is set aside in the store's ``.corrupt`` folder and a fresh
    adapter is made, or, without a generator, that one request's 503 ``no_generator`` names it
    and the fix. An adapter named by id whose files fail their sha256 gets a 500
    ``corrupt_adapter`` (``capplug store verify --repair`` sets it aside).

Limits and errors
    Every error is OpenAI's error JSON. Bodies over ``max_body_bytes`` get a 413; instructions
    over ``max_instruction_chars``, more than ``max_messages`` messages, ``max_tokens`` over
    ``max_tokens_cap``, ``n`` over ``max_n`` and unknown fields' bad values get a 400; unknown
    adapters or models a 404; a bad or missing key a 401. Bad input never gives a 500.

Keys
    With ``api_key``, every ``/v1`` path asks for ``Authorization: Bearer <api_key>`` (the
    SDK's ``api_key``); ``/healthz`` and ``/openapi.json`` stay open.

One generation at a time: the runtime is not thread-safe, so attaching, detaching and
generating hold one lock, in a worker thread, never on the event loop. Store lookups (and
creations) hold a second lock and run beside a generation, so finding an adapter does not wait
for the model.

The package, by concern:

- ``app``: :func:`create_adapter_app`, its checks and settings, the request and reply models
  (their names are the schemas ``/openapi.json`` serves), and the routes;
- ``_service``: the work behind the routes, one :class:`Service` per app: finding, making,
  attaching and deleting adapters, reading their files, planning and generating an answer, and
  a store or runtime failure as the client sees it;
- ``_replies``: an answer as a ``chat.completion``, as a stream of chunks, and as
  ``Server-Timing``.
"""

from capplug.adapters.store import ADAPTER_FILES
from capplug.serve.adapters.app import create_adapter_app

__all__ = ["ADAPTER_FILES", "create_adapter_app"]
