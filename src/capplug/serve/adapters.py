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
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.concurrency import run_in_threadpool

from capplug.adapters.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFileError,
    WrongBaseModelError,
)
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import (
    AdapterRecord,
    AdapterStore,
    CorruptAdapterError,
    NoGeneratorError,
    RefusedAdapterFileError,
    UnknownAdapterError,
    UnknownAdapterFileError,
)
from capplug.serve import _chat
from capplug.serve._http import (
    APIError,
    BodyLimit,
    RequireKey,
    SafePath,
    check_positive_int,
    install_error_handlers,
)
from capplug.serve._request_metrics import CountRequests, RequestMetrics

__all__ = ["ADAPTER_FILES", "create_adapter_app"]

ADAPTER_FILES: tuple[str, ...] = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
"""The only files ``GET /v1/adapters/{id}/files/{name}`` serves."""

_MEDIA_TYPES = {ADAPTER_WEIGHTS: "application/octet-stream", ADAPTER_CONFIG: "application/json"}
_MAX_STOP_CHARS = 256
_MAX_MODEL_CHARS = 512
_MAX_LIST = 1000

# ------------------------------------------------------------------------------- requests


class _CreateAdapter(_chat.CheckedBody):
    """Find or make the adapter for an instruction."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(min_length=1, description="the task's instruction")
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="least similarity of a hit (the store's default)"
    )


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class _Message(BaseModel):
    """One chat turn; extra fields (``name``, ``tool_call_id``...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def turn(self) -> dict[str, str]:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _ChatCompletionRequest(_chat.CheckedBody):
    """The fields of OpenAI's chat-completions request this server reads, and ``instruction``."""

    model_config = ConfigDict(extra="ignore")

    messages: list[_Message] = Field(min_length=1)
    model: str | None = Field(
        default=None,
        max_length=_MAX_MODEL_CHARS,
        description="'<base>' for the bare model, '<base>@<adapter id>' for a stored adapter",
    )
    instruction: str | None = Field(
        default=None,
        min_length=1,
        description="pick (or make) the adapter for this instruction; not added to the messages",
    )
    n: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Annotated[str | list[str] | None, _chat.stop_validator(_MAX_STOP_CHARS)] = None
    stream: StrictBool | None = None
    tools: list[Any] | None = None
    logprobs: StrictBool | None = None
    response_format: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ responses


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class _Error(BaseModel):
    """OpenAI's error object."""

    error: _ErrorDetail


class _File(BaseModel):
    name: str
    bytes: int | None
    sha256: str
    url: str


class _Adapter(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    base_model: str
    instruction: str
    source: str
    rank: int
    target_modules: list[str]
    size: int
    created: float
    last_used: float
    hypernetwork_version: str | None
    files: list[_File]


class _AdapterResult(_Adapter):
    hit: bool
    similarity: float | None


class _AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[_Adapter]


class _Deleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


class _ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    """For an adapter: the base model it is for (as vLLM lists LoRA adapters)."""
    root: str | None = None


class _ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[_ModelCard]


class _ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class _Choice(BaseModel):
    index: int
    message: _ReplyMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class _Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _CapplugInfo(BaseModel):
    adapter: str | None
    source: Literal["base", "id", "instruction"]
    hit: bool | None
    similarity: float | None
    loaded: bool
    timings: dict[str, float]


class _ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_Choice]
    usage: _Usage
    capplug: _CapplugInfo


class _Health(BaseModel):
    status: str
    model: str
    can_create: bool


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route may answer (400, 401 and 413 always:
    a path that climbs or holds a control character is refused before any route runs)."""
    described = {
        400: "invalid input or URL path",
        401: "missing or wrong API key",
        404: "no such adapter, model or route",
        409: "the adapter was made for another base model",
        413: "request body too large",
        500: "a stored adapter is corrupt or cannot be attached",
        503: "a new adapter is needed and the service has no generator",
    }
    return {
        status: {"model": _Error, "description": described[status]}
        for status in sorted({400, 401, 413, *statuses})
    }


# --------------------------------------------------------------------------------- errors


_on_validation_error = _chat.validation_error_handler(
    "the request body must be a JSON object (with Content-Type: application/json); "
    "see /openapi.json for its fields"
)


def _not_found(adapter_id: str) -> APIError:
    shown = adapter_id if len(adapter_id) <= 64 else adapter_id[:64] + "..."
    return APIError(
        404,
        f"no adapter {shown!r} in this service's store; GET /v1/adapters lists the ids there "
        f"are, POST /v1/adapters makes one",
        code="adapter_not_found",
    )


def _store_failure(exc: Exception, adapter_id: str) -> APIError:
    """The error a store or runtime failure on one adapter is answered with."""
    if isinstance(exc, UnknownAdapterError):
        return _not_found(adapter_id)
    if isinstance(exc, NoGeneratorError):
        corrupt = ""
        if exc.set_aside:
            corrupt = (
                f"the stored adapter {', '.join(exc.set_aside)} for this instruction is corrupt "
                f"(its files fail their sha256): it was set aside in the store's .corrupt folder "
                f"and is not used again; import it again (`capplug store import`) or "
            )
        return APIError(
            503,
            f"{corrupt}no stored adapter is similar enough to this instruction and this service "
            "cannot make new ones (it runs without a hypernetwork: start it with --hypernet REF); "
            "stored adapters still answer by id ('<base>@<id>') or by an instruction that hits",
            param="instruction",
            code="no_generator",
            kind="server_error",
        )
    if isinstance(exc, WrongBaseModelError):
        return APIError(409, str(exc), code="wrong_base_model")
    if isinstance(exc, CorruptAdapterError):
        return APIError(
            500,
            f"adapter {adapter_id} is corrupt: {exc}",
            code="corrupt_adapter",
            kind="server_error",
        )
    if isinstance(exc, AdapterFileError):
        return APIError(
            500,
            f"adapter {adapter_id} cannot be attached to the model: {exc}",
            code="adapter_unloadable",
            kind="server_error",
        )
    raise exc


# ---------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class _Plan(_chat.Sampling):
    """A validated chat request: which adapter, what to generate, how to answer."""

    adapter_id: str | None
    instruction: str | None
    stream: bool = False


@dataclass
class _Answer:
    texts: list[str]
    finish: list[Literal["stop", "length"]]
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str | None
    hit: bool | None = None
    similarity: float | None = None
    loaded: bool = False
    timings: dict[str, float] = field(default_factory=dict)


_ROUTES = (
    (r"/v1/chat/completions", "/v1/chat/completions"),
    (r"/v1/adapters", "/v1/adapters"),
    (r"/v1/adapters/[^/]+", "/v1/adapters/{id}"),
    (r"/v1/adapters/[^/]+/files/[^/]+", "/v1/adapters/{id}/files/{name}"),
    (r"/v1/models", "/v1/models"),
    (r"/v1/models/.+", "/v1/models/{id}"),
    (r"/healthz", "/healthz"),
    (r"/metrics", "/metrics"),
)


def _key_headers(path: str) -> list[Any]:
    """The key guards every ``/v1`` route and ``/metrics`` (``Authorization: Bearer``)."""
    return _chat.v1_key_headers(path) or (_chat.v1_key_headers("/v1") if path == "/metrics" else [])


class _ServiceMetrics:
    """What the service itself does, beside the requests: adapters found or made, attached,
    and the generation that answers."""

    def __init__(self, registry: Any) -> None:
        self.lookups = Counter(
            "capplug_adapters_lookups",
            "Chat completions with an instruction, by whether a stored adapter was hit or one made",
            ["result"],
            registry=registry,
        )
        self.attaches = Counter(
            "capplug_adapters_attached",
            "Adapters attached to the model to answer",
            registry=registry,
        )
        self.generation_seconds = Histogram(
            "capplug_adapters_generation_seconds", "Time generating one answer", registry=registry
        )
        self.tokens = Counter(
            "capplug_adapters_completion_tokens", "Tokens generated in answers", registry=registry
        )


class _Service:
    """The store, the runtime, and the one lock every use of the runtime holds."""

    def __init__(
        self,
        store: AdapterStore,
        runtime: AdapterRuntime,
        *,
        model_name: str,
        max_instruction_chars: int,
        max_messages: int,
        max_tokens_cap: int,
        max_n: int,
        lock: Any = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.model_name = model_name
        self.names = {model_name.casefold(), store.base_model.casefold()}
        self.max_instruction_chars = max_instruction_chars
        self.max_messages = max_messages
        self.max_tokens_cap = max_tokens_cap
        self.max_n = max_n
        self.lock = lock if lock is not None else threading.Lock()
        # Lookups and creations one at a time too, beside generation: the embedding model's
        # fast tokenizer is not safe to call from several threads at once ("Already borrowed").
        self.store_lock = threading.Lock()
        self.metrics: _ServiceMetrics | None = None

    # ------------------------------------------------------------------------- adapters

    def instruction(self, text: str, param: str = "instruction") -> str:
        if not text.strip():
            raise APIError(
                400,
                f"Invalid value for '{param}': it is empty; give the task's instruction",
                param=param,
                code="invalid_value",
            )
        if len(text) > self.max_instruction_chars:
            raise APIError(
                400,
                f"Invalid value for '{param}': {len(text)} characters; this service takes at "
                f"most {self.max_instruction_chars}",
                param=param,
                code="invalid_value",
            )
        return text

    def get_or_create(self, text: str, threshold: float | None) -> tuple[AdapterRecord, Any]:
        """The store's result for an instruction (in a worker thread: it may embed and generate)."""
        try:
            with self.store_lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the length is checked above; nothing to cut
                result = self.store.get_or_create(text, threshold=threshold)
        except Exception as exc:
            raise _store_failure(exc, "") from exc
        return result.record, result

    def record(self, adapter_id: str) -> AdapterRecord:
        try:
            return self.store.get(adapter_id)
        except UnknownAdapterError as exc:
            raise _not_found(adapter_id) from exc

    def adapter_json(self, record: AdapterRecord) -> dict[str, Any]:
        files = []
        for name, sha in ((ADAPTER_WEIGHTS, record.sha256), (ADAPTER_CONFIG, record.config_sha256)):
            try:
                size: int | None = (record.folder / name).stat().st_size
            except OSError:
                size = None
            files.append(
                {
                    "name": name,
                    "bytes": size,
                    "sha256": sha,
                    "url": f"/v1/adapters/{record.id}/files/{name}",
                }
            )
        return {
            "id": record.id,
            "object": "adapter",
            "base_model": record.base_model,
            "instruction": record.instruction,
            "source": record.source,
            "rank": record.rank,
            "target_modules": list(record.target_modules),
            "size": record.size,
            "created": record.created,
            "last_used": record.last_used,
            "hypernetwork_version": record.hypernetwork_version,
            "files": files,
        }

    def file_bytes(self, adapter_id: str, name: str) -> bytes:
        """One of the adapter's peft files, read without following links and checked."""
        try:
            return self.store.read_file(adapter_id, name)
        except UnknownAdapterFileError as exc:
            raise APIError(404, str(exc), code="file_not_found") from exc
        except RefusedAdapterFileError as exc:
            raise APIError(403, str(exc), code="file_refused") from exc
        except UnknownAdapterError as exc:
            raise _not_found(adapter_id) from exc
        except CorruptAdapterError as exc:
            raise _store_failure(exc, adapter_id) from exc

    def delete(self, adapter_id: str) -> AdapterRecord:
        try:
            record = self.store.remove(adapter_id)
        except UnknownAdapterError as exc:
            raise _not_found(adapter_id) from exc
        with self.lock:
            if record.id in self.runtime:
                self.runtime.remove(record.id)
        return record

    # ------------------------------------------------------------------------- requests

    def plan(self, request: _ChatCompletionRequest) -> _Plan:
        _chat.check_supported(request, stream=True)
        if request.stream and (request.n or 1) > 1:
            raise APIError(
                400,
                "stream works with one choice here (n = 1): each choice is generated after the "
                "other, so several could not stream side by side",
                param="stream",
                code="unsupported_value",
            )
        if len(request.messages) > self.max_messages:
            raise APIError(
                400,
                f"Invalid value for 'messages': {len(request.messages)} messages; this server "
                f"takes at most {self.max_messages}",
                param="messages",
                code="invalid_value",
            )
        adapter_id = self.adapter_in_model(request.model)
        instruction = None
        if request.instruction is not None:
            if adapter_id is not None:
                raise APIError(
                    400,
                    "give either an adapter in 'model' ('<base>@<id>') or an 'instruction', not "
                    "both",
                    param="instruction",
                    code="invalid_value",
                )
            instruction = self.instruction(request.instruction)
        n = _chat.choices_wanted(request, self.max_n)
        max_tokens = _chat.max_tokens_wanted(request, self.max_tokens_cap)
        sampling_asked = request.temperature is not None or request.top_p is not None
        greedy = request.temperature == 0 or not sampling_asked
        return _Plan(
            chat=[message.turn() for message in request.messages],
            adapter_id=adapter_id,
            instruction=instruction,
            n=n,
            greedy=greedy,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=_chat.nucleus(request.top_p),
            max_tokens=max_tokens,
            seed=secrets.randbelow(2**31) if request.seed is None else request.seed % (2**32),
            stops=list(request.stop or []),
            stream=bool(request.stream),
        )

    def adapter_in_model(self, model: str | None) -> str | None:
        """The adapter id ``model`` names (``<base>@<id>``), None for the base model."""
        if model is None:
            return None
        base, at, adapter_id = model.rpartition("@")
        if not at:
            base = model
        if base.casefold() not in self.names:
            raise APIError(
                404,
                f"The model '{model[:80]}' does not exist; this server serves "
                f"'{self.model_name}', and its adapters as '{self.model_name}@<adapter id>'",
                param="model",
                code="model_not_found",
            )
        if not at:
            return None
        try:
            return self.store.get(adapter_id).id
        except UnknownAdapterError as exc:
            raise APIError(
                404,
                f"The model '{model[:80]}' does not exist: no adapter {adapter_id[:40]!r} in this "
                f"service's store (GET /v1/adapters lists them)",
                param="model",
                code="model_not_found",
            ) from exc

    def answer(self, plan: _Plan, streamer: Any = None) -> _Answer:
        """Pick the adapter, attach it if needed, and generate: runs in a worker thread."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        adapter_id, hit, similarity = plan.adapter_id, None, None
        if plan.instruction is not None:
            record, result = self.get_or_create(plan.instruction, None)
            adapter_id, hit, similarity = record.id, result.hit, result.similarity
            if self.metrics is not None:
                self.metrics.lookups.labels("hit" if hit else "made").inc()
        timings["adapter"] = _ms(started)
        waited = time.perf_counter()
        with self.lock:
            timings["queue"] = _ms(waited)
            loaded = False
            if adapter_id is not None and adapter_id not in self.runtime:
                began = time.perf_counter()
                self.attach(adapter_id)
                loaded = True
                timings["load"] = _ms(began)
            began = time.perf_counter()
            prompt = _chat.prompt_tokens(self.runtime.chat, plan.chat, plan.max_tokens)
            texts = self.generate(plan, adapter_id, streamer)
            tokenizer = self.runtime.chat.tokenizer
            counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            timings["generate"] = _ms(began)
            if self.metrics is not None:
                self.metrics.generation_seconds.observe(time.perf_counter() - began)
                self.metrics.tokens.inc(sum(counts))
                self.metrics.attaches.inc(int(loaded))
        finish: list[Literal["stop", "length"]] = []
        for i, text in enumerate(texts):
            cut = _chat.cut_at_stop(text, plan.stops)
            if cut is not None:
                texts[i] = cut
                finish.append("stop")
            else:
                finish.append("length" if counts[i] >= plan.max_tokens else "stop")
        return _Answer(
            texts=texts,
            finish=finish,
            prompt_tokens=prompt,
            completion_tokens=sum(counts),
            adapter_id=adapter_id,
            hit=hit,
            similarity=similarity,
            loaded=loaded,
            timings=timings,
        )

    def attach(self, adapter_id: str) -> None:
        """Attach a stored adapter from its checked files (caller holds the lock)."""
        try:
            paths = self.store.files(adapter_id)
            self.runtime.add(adapter_id, paths.folder)
        except Exception as exc:
            raise _store_failure(exc, adapter_id) from exc

    def generate(self, plan: _Plan, adapter_id: str | None, streamer: Any = None) -> list[str]:
        extra: dict[str, Any] = {} if streamer is None else {"streamer": streamer}
        if not plan.greedy:
            extra["temperature"] = plan.temperature
            if plan.top_p is not None:
                extra["top_p"] = plan.top_p
        prompts = [plan.chat] * (1 if plan.greedy else plan.n)
        texts = self.runtime.generate(
            prompts,
            adapter=adapter_id,
            max_new_tokens=plan.max_tokens,
            do_sample=not plan.greedy,
            seed=None if plan.greedy else plan.seed,
            **extra,
        )
        # Greedy decoding gives one answer however often it is asked.
        return texts * plan.n if plan.greedy else texts


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 2)


def _completion(service: _Service, answer: _Answer) -> dict[str, Any]:
    model = service.model_name
    if answer.adapter_id is not None:
        model = f"{model}@{answer.adapter_id}"
    source = (
        "base" if answer.adapter_id is None else ("instruction" if answer.hit is not None else "id")
    )
    usage = _chat.usage_json(answer.prompt_tokens, answer.completion_tokens)
    choices = zip(answer.texts, answer.finish, strict=True)
    return {
        **_chat.completion_json(f"chatcmpl-{uuid.uuid4().hex}", model, choices, usage),
        "capplug": {
            "adapter": answer.adapter_id,
            "source": source,
            "hit": answer.hit,
            "similarity": None if answer.similarity is None else round(answer.similarity, 4),
            "loaded": answer.loaded,
            "timings": answer.timings,
        },
    }


async def _streamed(service: _Service, plan: _Plan) -> Response:
    """One choice streamed as its tokens are drawn; the adapter's ``capplug`` object comes with
    the last chunk. A failure before the first token (no adapter can be made, say) is an
    ordinary error answer."""
    streamer, work = _chat.start_streaming(lambda queue: service.answer(plan, queue))
    first = await _chat.first_step(streamer, work)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tokenizer = service.runtime.chat.tokenizer
    stop_ids = service.runtime.chat.eos_token_ids

    async def events() -> AsyncIterator[str]:
        def event(model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
            return _chat.chunk_event(completion_id, created, model, choices, extra=extra)

        def delta(content: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}

        model = service.model_name
        yield event(model, [delta({"role": "assistant", "content": ""})])
        sent = ""
        # Stop sequences are only known to have ended the reply once it is whole.
        if not plan.stops:
            async for piece in _chat.new_text(first, streamer, tokenizer, stop_ids):
                yield event(model, [delta({"content": piece})])
                sent += piece
        done = await work
        whole = _completion(service, done)
        text = done.texts[0]
        if text.startswith(sent) and len(text) > len(sent):
            yield event(whole["model"], [delta({"content": text[len(sent) :]})])
        yield event(
            whole["model"],
            [delta({}, done.finish[0])],
            usage=whole["usage"],
            capplug=whole["capplug"],
        )
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={value:g}" for name, value in timings.items())


# ------------------------------------------------------------------------------------ app


def create_adapter_app(
    store: AdapterStore,
    runtime: AdapterRuntime,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_instruction_chars: int = 4096,
    max_messages: int = 256,
    max_tokens_cap: int = 512,
    max_n: int = 8,
) -> FastAPI:
    """The adapter service over ``store`` and ``runtime``; see the module docstring.

    Args:
        store: the adapters (its ``generator``, when set, makes new ones on a miss).
        runtime: the local model the adapters attach to; made for the store's base model.
        model_name: the id ``/v1/models`` lists and requests name (default: the store's
            base model); the store's base model name is accepted too.
        api_key: when set, every ``/v1`` route asks for ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get a 413.
        max_instruction_chars: longer instructions get a 400 (never cut silently); at most the
            store's own ``max_instruction_chars``.
        max_messages: the most chat messages one request may carry.
        max_tokens_cap: the most tokens one choice may have; also the default ``max_tokens``.
        max_n: the most choices (``n``) one request may ask for.

    Raises:
        WrongBaseModelError: the runtime's model is not the store's base model.
    """
    if not isinstance(store, AdapterStore):
        raise TypeError(f"store must be an AdapterStore; got {type(store).__name__}")
    if not isinstance(runtime, AdapterRuntime):
        raise TypeError(f"runtime must be an AdapterRuntime; got {type(runtime).__name__}")
    for value, argument in (
        (max_body_bytes, "max_body_bytes"),
        (max_instruction_chars, "max_instruction_chars"),
        (max_messages, "max_messages"),
        (max_tokens_cap, "max_tokens_cap"),
        (max_n, "max_n"),
    ):
        check_positive_int(value, argument)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string, or None for no key")
    if model_name is not None and (not isinstance(model_name, str) or not model_name.strip()):
        raise ValueError(f"model_name must be a non-empty string; got {model_name!r}")
    if runtime.identity.name.casefold() != store.base_model.casefold():
        raise WrongBaseModelError(
            f"the runtime's model is {runtime.identity.name}, but the store holds adapters for "
            f"{store.base_model}; open the store with base_model={runtime.identity.name!r}"
        )
    name = model_name or store.base_model
    if "@" in name:
        raise ValueError(f"model_name cannot hold '@' (it separates adapter ids); got {name!r}")
    service = _Service(
        store,
        runtime,
        model_name=name,
        max_instruction_chars=min(max_instruction_chars, store.max_instruction_chars),
        max_messages=max_messages,
        max_tokens_cap=max_tokens_cap,
        max_n=max_n,
        # A hit check generates with the same runtime (inside lookups): one lock for both.
        lock=getattr(store.verify_hit, "lock", None)
        if getattr(store.verify_hit, "runtime", None) is runtime
        else None,
    )
    created = int(time.time())
    card = {"id": name, "object": "model", "created": created, "owned_by": "capplug"}

    app = FastAPI(
        title="capplug adapter service",
        summary=f"LoRA adapters for {name} by instruction, and chat completions that use them.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.adapter_service = service
    metrics = RequestMetrics("capplug_adapters", _ROUTES)
    service.metrics = _ServiceMetrics(metrics.registry)
    install_error_handlers(app)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(SafePath)  # innermost: no route sees a path out of its base
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        # Added last so it runs first: an unauthenticated request learns nothing else.
        app.add_middleware(RequireKey, api_key=api_key, headers_for=_key_headers)
    # Outermost: refused and oversized requests are counted too.
    app.add_middleware(CountRequests, metrics=metrics)

    @app.get("/healthz", response_model=_Health)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": name, "can_create": store.generator is not None}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=_ModelList, responses=_errors())
    async def list_models() -> dict[str, Any]:
        # The base model, then each stored adapter as vLLM lists LoRA adapters: its own id
        # (what `model` takes) with the base as `parent`.
        records = await run_in_threadpool(store.list_adapters, order="created")
        adapters = [_adapter_card(card, r) for r in records]
        return {"object": "list", "data": [card, *adapters]}

    @app.get("/v1/models/{model_id:path}", response_model=_ModelCard, responses=_errors(404))
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        adapter_id = await run_in_threadpool(service.adapter_in_model, model_id)
        if adapter_id is None:
            return card
        record = await run_in_threadpool(service.record, adapter_id)
        return _adapter_card(card, record)

    @app.post(
        "/v1/adapters",
        response_model=_AdapterResult,
        status_code=200,
        responses={
            201: {"model": _AdapterResult, "description": "a new adapter was made"},
            **_errors(400, 500, 503),
        },
    )
    async def create_adapter(body: _CreateAdapter) -> Response:
        text = service.instruction(body.instruction)
        record, result = await run_in_threadpool(service.get_or_create, text, body.threshold)
        data = await run_in_threadpool(service.adapter_json, record)
        data.update(
            hit=result.hit,
            similarity=None if result.similarity is None else round(result.similarity, 4),
        )
        return JSONResponse(data, status_code=200 if result.hit else 201)

    @app.get("/v1/adapters", response_model=_AdapterList, responses=_errors(400))
    async def list_adapters(
        limit: int = Query(100, ge=1, le=_MAX_LIST, description="most adapters to list"),
    ) -> dict[str, Any]:
        def listing() -> list[dict[str, Any]]:
            records = store.list_adapters()[:limit]
            return [service.adapter_json(r) for r in records]

        return {"object": "list", "data": await run_in_threadpool(listing)}

    @app.get("/v1/adapters/{adapter_id}", response_model=_Adapter, responses=_errors(404))
    async def retrieve_adapter(adapter_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.record, adapter_id)
        return await run_in_threadpool(service.adapter_json, record)

    @app.get(
        "/v1/adapters/{adapter_id}/files/{name}",
        response_class=Response,
        responses={
            200: {
                "description": "the file's bytes",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            },
            403: {"model": _Error, "description": "not a regular file in the adapter's folder"},
            **_errors(404, 500),
        },
    )
    async def adapter_file(adapter_id: str, name: str) -> Response:
        data = await run_in_threadpool(service.file_bytes, adapter_id, name)
        return Response(
            data,
            media_type=_MEDIA_TYPES[name],
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.delete("/v1/adapters/{adapter_id}", response_model=_Deleted, responses=_errors(404))
    async def delete_adapter(adapter_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(service.delete, adapter_id)
        return {"id": record.id, "object": "adapter", "deleted": True}

    @app.post(
        "/v1/chat/completions",
        response_model=_ChatCompletion,
        responses=_errors(400, 404, 409, 500, 503),
    )
    async def chat_completions(body: _ChatCompletionRequest) -> Response:
        plan = await run_in_threadpool(service.plan, body)
        if plan.stream:
            return await _streamed(service, plan)
        answer = await run_in_threadpool(service.answer, plan)
        headers = {"Server-Timing": _server_timing(answer.timings)}
        if answer.adapter_id is not None:
            headers["X-Capplug-Adapter"] = answer.adapter_id
        return JSONResponse(_completion(service, answer), headers=headers)

    return app


def _adapter_card(base: dict[str, Any], record: Any) -> dict[str, Any]:
    """A stored adapter as ``/v1/models`` lists it: ``<base>@<id>``, with its base as parent."""
    return {
        **base,
        "id": f"{base['id']}@{record.id}",
        "created": int(record.created),
        "parent": base["id"],
        "root": record.id,
    }
