"""The adapter service's request and reply bodies (pydantic models: they are its OpenAPI
schema) and the error statuses each route documents."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from capplug.serve import _chat

MAX_STOP_CHARS = 256
MAX_MODEL_CHARS = 512
MAX_PATH_CHARS = 4096
MAX_PROBE_CHARS = 8192


# ------------------------------------------------------------------------------- requests


class CreateAdapter(_chat.CheckedBody):
    """Find or make the adapter for an instruction."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(min_length=1, description="the task's instruction")
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="least similarity of a hit (the store's default)"
    )
    probe: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PROBE_CHARS,
        description="an example input of the task: the adapter is checked on it (the judged "
        "fallback; needs a service started with a judge)",
    )


class CheckAdapter(_chat.CheckedBody):
    """Check an adapter against the bare base model now."""

    model_config = ConfigDict(extra="forbid")

    probe: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PROBE_CHARS,
        description="an example input of the task (default: one the base model writes)",
    )


class PatchAdapter(_chat.CheckedBody):
    """Change what a person decides about an adapter."""

    model_config = ConfigDict(extra="forbid")

    pinned: Literal["adapter", "base"] | None = Field(
        description="answer this adapter's instruction with the adapter or the base model "
        "whatever its check says; null: the check decides",
    )


class LoadLoRA(_chat.CheckedBody):
    """vLLM's ``/v1/load_lora_adapter`` body, and ``instruction``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64, description="the adapter's unique name")
    lora_path: str = Field(
        min_length=1, max_length=MAX_PATH_CHARS, description="a peft LoRA folder on the server"
    )
    instruction: str | None = Field(
        default=None,
        min_length=1,
        description="what the adapter was made for, so an instruction finds it too (default: "
        "its name)",
    )
    load_inplace: bool = Field(
        default=False,
        description="replace the adapter that has this name (vLLM's reload), instead of a 409",
    )


class UnloadLoRA(_chat.CheckedBody):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    lora_int_id: int | None = Field(default=None, description="accepted and ignored, as vLLM")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat turn; extra fields (``name``, ``tool_call_id``...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def turn(self) -> dict[str, str]:
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_chat.CheckedBody):
    """The fields of OpenAI's chat-completions request this server reads, and ``instruction``."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(
        default=None,
        max_length=MAX_MODEL_CHARS,
        description="'<base>' for the bare model; '<base>@<adapter id or name>', or the "
        "adapter's name or id alone, for a stored adapter",
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
    stop: Annotated[str | list[str] | None, _chat.stop_validator(MAX_STOP_CHARS)] = None
    stream: StrictBool | None = None
    fallback: str | None = Field(
        default=None,
        max_length=16,
        description="with an adapter: 'auto' (the adapter's check decides; an unchecked adapter "
        "is checked on this request), 'best_of' (answer with both, the judge picks) or 'off' "
        "(always the adapter); default 'auto' on a service with a judge, else 'off'",
    )
    tools: list[Any] | None = None
    logprobs: StrictBool | None = None
    response_format: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Error(BaseModel):
    """OpenAI's error object."""

    error: ErrorDetail


class File(BaseModel):
    name: str
    bytes: int | None
    sha256: str
    url: str


class Check(BaseModel):
    """The judged fallback's verdict on an adapter."""

    winner: Literal["adapter", "base"]
    adapter_score: float
    base_score: float
    probe: str
    judge: str
    checked: float


class Adapter(BaseModel):
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
    name: str | None = None
    check: Check | None = None
    pinned: Literal["adapter", "base"] | None = None
    falls_back: bool = False
    """Requests for its instruction get the base model (it lost its check, or is pinned so)."""
    files: list[File]


class AdapterResult(Adapter):
    hit: bool
    similarity: float | None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Adapter]


class Deleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    """For an adapter: the base model it is for (as vLLM lists LoRA adapters)."""
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Fallback(BaseModel):
    mode: Literal["auto", "best_of", "off"]
    used: Literal["adapter", "base"]
    reason: Literal[
        "checked now",
        "stored check",
        "pinned",
        "asked by id",
        "best of both",
        "off",
        "adapter unloadable",
    ]
    winner: Literal["adapter", "base"] | None
    scores: dict[str, float] | None
    judged: Literal["now"] | float | None
    """'now' for this request, else when the stored check was made (Unix time)."""
    pinned: Literal["adapter", "base"] | None
    judge: str | None
    error: str | None = None


class CapplugInfo(BaseModel):
    adapter: str | None
    source: Literal["base", "id", "instruction"]
    hit: bool | None
    similarity: float | None
    loaded: bool
    fallback: Fallback | None = None
    timings: dict[str, float]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    capplug: CapplugInfo


class Health(BaseModel):
    status: str
    model: str
    can_create: bool
    judge: str | None = None
    """What judges adapters against the base model (the judged fallback), or None."""


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route may answer (400, 401 and 413 always:
    a path that climbs or holds a control character is refused before any route runs)."""
    described = {
        400: "invalid input or URL path",
        401: "missing or wrong API key",
        403: "loading adapters from server paths is not enabled",
        404: "no such adapter, model or route",
        409: "the adapter was made for another base model, or its name is taken",
        413: "request body too large",
        500: "a stored adapter is corrupt or cannot be attached",
        503: "a new adapter is needed and the service has no generator",
    }
    return {
        status: {"model": Error, "description": described[status]}
        for status in sorted({400, 401, 413, *statuses})
    }
