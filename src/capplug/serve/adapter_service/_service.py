"""The adapter service's work behind its routes: :class:`Service` finds, makes, attaches and
deletes adapters, reads their files, and plans and generates the answers, with the judged
fallback (:mod:`._fallback`) deciding which side answers; a store or runtime failure becomes the
error the client gets (:mod:`._errors`)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from capplug.adapters.fallback import (
    AdapterJudge,
    Comparison,
    Decision,
    FallbackMode,
    ProbeError,
    decide,
    judged_meanwhile,
    reusable,
    with_definition,
)
from capplug.adapters.runtime import AdapterRuntime
from capplug.adapters.store import (
    AdapterNameError,
    AdapterNameTakenError,
    AdapterRecord,
    AdapterStore,
    CorruptAdapterError,
    RefusedAdapterFileError,
    Side,
    UnknownAdapterError,
    UnknownAdapterFileError,
    check_name,
)
from capplug.chat import blank
from capplug.models import packaged_model
from capplug.models.adapter_folder import (
    AdapterFileError,
    WrongBaseModelError,
)
from capplug.serve import _chat
from capplug.serve._http import APIError
from capplug.serve.adapter_service._errors import not_found, shown, store_failure
from capplug.serve.adapter_service._fallback import (
    fallback_json,
    fallback_mode,
    probe_of,
    require_judge,
)
from capplug.serve.adapter_service._metrics import ServiceMetrics

logger = logging.getLogger("capplug.serve.adapter_service")

# ---------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class Plan(_chat.Sampling):
    """A validated chat request: which adapter, what to generate, how to answer."""

    adapter_id: str | None
    instruction: str | None
    stream: bool = False
    fallback: FallbackMode = "off"
    asked_as: str | None = None
    """The ``model`` the request named its adapter by, echoed in the reply (as vLLM does)."""


@dataclass
class Answer:
    texts: list[str]
    finish: list[Literal["stop", "length"]]
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str | None
    hit: bool | None = None
    similarity: float | None = None
    loaded: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    used: Side | None = None
    """Which side answered (None: the base model was asked for)."""
    fallback: dict[str, Any] | None = None
    """The judged fallback's part of the reply's ``capplug`` object."""
    asked_as: str | None = None
    """The ``model`` the request named its adapter by (see :class:`Plan`)."""


class ChatRequest(_chat.ChatRequest, Protocol):
    """The chat-completions request a plan is made from (the app's request body)."""

    messages: Sequence[Any]
    """The turns; each one's ``turn()`` is the role and text the model reads."""
    model: str | None
    instruction: str | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str] | None
    fallback: str | None


class Service:
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
        judge: AdapterJudge | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.model_name = model_name
        self.names = {model_name.casefold(), store.base_model.casefold()}
        packaged = packaged_model(store.base_model)
        if packaged is not None:  # its packaged name and aliases name it too
            self.names |= {packaged.name, *packaged.aliases}
        self.max_instruction_chars = max_instruction_chars
        self.max_messages = max_messages
        self.max_tokens_cap = max_tokens_cap
        self.max_n = max_n
        self.judge = judge
        self.lock = lock if lock is not None else threading.Lock()
        # Lookups and creations one at a time too, beside generation: the embedding model's
        # fast tokenizer is not safe to call from several threads at once ("Already borrowed").
        self.store_lock = threading.Lock()
        self.metrics: ServiceMetrics | None = None

    # ------------------------------------------------------------------------- adapters

    def instruction(self, text: str, param: str = "instruction") -> str:
        if blank(text):
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
            raise store_failure(exc, "") from exc
        return result.record, result

    def intact_or_remade(self, record: AdapterRecord) -> tuple[str, AdapterRecord]:
        """``record`` when its files are intact; when they are corrupt and the store can make
        adapters, one made again from its instruction (the corrupt one is set aside by the
        lookup, as for a request by instruction); else the corrupt adapter's 503."""
        try:
            self.store.files(record.id)
            return record.id, record
        except CorruptAdapterError as exc:
            if self.store.generator is None or not (record.instruction or "").strip():
                raise store_failure(exc, record.id) from exc
            logger.warning("adapter %s is corrupt (%s); making it again", record.id, exc)
        remade, _ = self.get_or_create(record.instruction, None)
        return remade.id, remade

    def record(self, adapter_id: str) -> AdapterRecord:
        """The adapter with this id or name (404 for neither)."""
        try:
            return self.store.resolve(adapter_id)
        except UnknownAdapterError as exc:
            raise not_found(adapter_id) from exc

    def file_bytes(self, adapter_id: str, name: str) -> bytes:
        """One of the adapter's peft files, read without following links and checked."""
        try:
            return self.store.read_file(self.store.resolve(adapter_id).id, name)
        except UnknownAdapterFileError as exc:
            raise APIError(404, str(exc), code="file_not_found") from exc
        except RefusedAdapterFileError as exc:
            raise APIError(403, str(exc), code="file_refused") from exc
        except UnknownAdapterError as exc:
            raise not_found(adapter_id) from exc
        except CorruptAdapterError as exc:
            raise store_failure(exc, adapter_id) from exc

    def delete(self, adapter_id: str) -> AdapterRecord:
        try:
            record = self.store.remove(self.store.resolve(adapter_id).id)
        except UnknownAdapterError as exc:
            raise not_found(adapter_id) from exc
        with self.lock:
            if record.id in self.runtime:
                self.runtime.remove(record.id)
        return record

    def load_lora(
        self, name: str, path: str, instruction: str | None, *, inplace: bool = False
    ) -> AdapterRecord:
        """Import the peft folder at ``path`` (on this server) under ``name``, as vLLM's
        ``/v1/load_lora_adapter`` does (in a worker thread: it reads, hashes and embeds).

        ``inplace``: when an adapter already has ``name``, the new one takes the name and the
        old one is deleted (vLLM's ``load_inplace``: a reload, even of the same files)."""
        try:
            check_name(name)
        except AdapterNameError as exc:
            raise APIError(400, str(exc), param="lora_name", code="invalid_value") from exc
        if name.casefold() in self.names:
            raise APIError(
                400,
                f"Invalid value for 'lora_name': {name!r} is the base model's own name; "
                f"pick another",
                param="lora_name",
                code="invalid_value",
            )
        # Without an instruction the name stands in for it (the store indexes every adapter
        # by one); an instruction lookup then hits it only with a near-identical text.
        text = self.instruction(instruction if instruction is not None else name)
        try:
            with self.store_lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                old = self._named(name) if inplace else None
                if old is None:
                    return self.store.import_folder(path, text, name=name)
                new = self.store.import_folder(path, text)
                self.store.rename(old.id, None)
                try:
                    renamed = self.store.rename(new.id, name)
                except BaseException:
                    self.store.rename(old.id, name)  # the name stays where it was
                    raise
        except AdapterNameError as exc:
            raise APIError(400, str(exc), param="lora_name", code="invalid_value") from exc
        except AdapterNameTakenError as exc:
            raise APIError(409, str(exc), param="lora_name", code="adapter_name_taken") from exc
        except WrongBaseModelError as exc:
            raise APIError(400, str(exc), param="lora_path", code="wrong_base_model") from exc
        except (AdapterFileError, OSError, ValueError) as exc:
            raise APIError(
                400,
                f"Invalid value for 'lora_path': not a peft LoRA folder this service can load: "
                f"{exc}",
                param="lora_path",
                code="invalid_value",
            ) from exc
        self.delete(old.id)  # the replaced adapter, detached from the runtime too
        return renamed

    def _named(self, name: str) -> AdapterRecord | None:
        try:
            record = self.store.resolve(name)
        except UnknownAdapterError:
            return None
        return record if record.name == name else None

    def unload_lora(self, name: str) -> AdapterRecord:
        """Delete the adapter with this name (or id) from the store, detaching it."""
        try:
            record = self.store.resolve(name)
        except UnknownAdapterError as exc:
            raise APIError(
                404,
                f"The LoRA adapter {shown(name)!r} cannot be found in this service's store; "
                f"GET /v1/models lists the adapters there are",
                param="lora_name",
                code="adapter_not_found",
            ) from exc
        return self.delete(record.id)

    # ------------------------------------------------------------------------- requests

    def plan(self, request: ChatRequest) -> Plan:
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
        fallback = fallback_mode(
            request, self.judge, adapter_id is not None or instruction is not None
        )
        return Plan(
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
            fallback=fallback,
            asked_as=request.model if adapter_id is not None else None,
        )

    def adapter_in_model(self, model: str | None) -> str | None:
        """The adapter id ``model`` names, None for the base model: ``<base>@<id or name>``,
        or an adapter's name or id alone (as vLLM names a LoRA adapter)."""
        if model is None or model.casefold() in self.names:
            return None
        base, at, ref = model.rpartition("@")
        if at and base.casefold() not in self.names:
            raise APIError(
                404,
                f"The model '{model[:80]}' does not exist; this server serves "
                f"'{self.model_name}', and its adapters as '{self.model_name}@<adapter id or "
                f"name>' or by their name alone",
                param="model",
                code="model_not_found",
            )
        try:
            return self.store.resolve(ref if at else model).id
        except UnknownAdapterError as exc:
            asked = (ref if at else model)[:40]
            raise APIError(
                404,
                f"The model '{model[:80]}' does not exist: no adapter {asked!r} (by id or name) "
                f"in this service's store, and the base model is '{self.model_name}' "
                f"(GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            ) from exc

    def _adapter_for(self, plan: Plan) -> tuple[str | None, bool | None, float | None, Any]:
        """The adapter a request uses (found or made for its instruction, or named by id and
        remade if its files broke), whether it was a hit and how similar, and its record where
        the answer needs it."""
        adapter_id, record = plan.adapter_id, None
        if plan.instruction is not None:
            record, result = self.get_or_create(plan.instruction, None)
            if self.metrics is not None:
                self.metrics.lookups.labels("hit" if result.hit else "made").inc()
            return record.id, result.hit, result.similarity, record
        if adapter_id is None:
            return None, None, None, None
        if plan.fallback == "best_of":
            record = self.record(adapter_id)  # its instruction goes in the base prompt
        if adapter_id not in self.runtime:  # attached ones were checked when attached
            stored = record or self.record(adapter_id)
            remade_id, remade = self.intact_or_remade(stored)
            if remade_id != adapter_id:
                adapter_id, record = remade_id, (remade if record is not None else None)
        return adapter_id, None, None, record

    def _attach_for(self, plan: Plan, adapter_id: Any) -> str | None:
        """Attach the adapter a request uses; why not, where the base model answers instead.

        With the judged fallback, an instruction whose adapter cannot be attached is answered
        by the base model; without it, or for an adapter asked for by id, the client hears why.
        """
        try:
            self.attach(adapter_id)
        except APIError as exc:
            if plan.fallback != "auto" or plan.instruction is None or exc.status < 500:
                raise
            return exc.message
        return None

    def _judge(
        self, plan: Plan, adapter_id: Any, chats: dict[str, Any], decision: Decision
    ) -> Comparison:
        """Both sides answer the request and the judge picks (a check made now answers at
        most the judge's own length; best of both, the request's)."""
        assert self.judge is not None and adapter_id is not None
        limit = plan.max_tokens
        if decision.reason != "best of both":
            limit = min(limit, self.judge.max_new_tokens)
        return self.judge.compare(adapter_id, chats["adapter"], chats["base"], max_new_tokens=limit)

    def answer(self, plan: Plan, streamer: Any = None) -> Answer:
        """Pick the adapter, attach it if needed, decide which side answers (the judged
        fallback), and generate: runs in a worker thread."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        adapter_id, hit, similarity, record = self._adapter_for(plan)
        timings["adapter"] = _ms(started)
        decision = None if adapter_id is None else decide(plan.fallback, record)
        comparison: Comparison | None = None
        unloadable = None
        waited = time.perf_counter()
        with self.lock:
            timings["queue"] = _ms(waited)
            if decision is not None and decision.store and record is not None:
                # A request that waited here may find the adapter judged meanwhile.
                record, decision = judged_meanwhile(self.store, plan.fallback, record, decision)
            loaded = False
            needs_adapter = decision is not None and (
                decision.side == "adapter" or decision.compare
            )
            if needs_adapter and adapter_id not in self.runtime:
                began = time.perf_counter()
                unloadable = self._attach_for(plan, adapter_id)
                loaded = unloadable is None
                if unloadable is not None:
                    decision = Decision("base", "checked now")
                timings["load"] = _ms(began)
            # The base model has no adapter to carry the task: it reads the instruction.
            chats = {"adapter": plan.chat}
            needs_base = decision is not None and (decision.side == "base" or decision.compare)
            if record is not None and needs_base:
                chats["base"] = with_definition(plan.chat, record.instruction)
            # Both prompts are checked before anything is generated (a 400 for either).
            tokens = {
                side: _chat.prompt_tokens(self.runtime.chat, chat, plan.max_tokens)
                for side, chat in chats.items()
            }
            if decision is not None and decision.compare and unloadable is None:
                began = time.perf_counter()
                comparison = self._judge(plan, adapter_id, chats, decision)
                decision = Decision(comparison.winner, decision.reason, compare=True)
                timings["judge"] = _ms(began)
            used = "adapter" if decision is None else decision.side
            prompt = tokens[used]
            began = time.perf_counter()
            if comparison is not None and reusable(plan, decision, self.judge, streamer):
                texts = [comparison.answer] * plan.n
            else:
                side = adapter_id if used == "adapter" else None
                texts = self.generate(plan, side, streamer, chat=chats[used])
            tokenizer = self.runtime.chat.tokenizer
            counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            timings["generate"] = _ms(began)
            if self.metrics is not None:
                self.metrics.generation_seconds.observe(time.perf_counter() - began)
                self.metrics.tokens.inc(sum(counts))
                self.metrics.attaches.inc(int(loaded))
        if comparison is not None and decision is not None and decision.store:
            assert adapter_id is not None
            record = self.keep_check(adapter_id, comparison, plan.chat) or record
        fallback = None
        if decision is not None:
            fallback = fallback_json(
                plan.fallback, self.judge, decision, record, comparison, unloadable
            )
            if self.metrics is not None:
                self.metrics.fallback.labels(plan.fallback, decision.side).inc()
        texts, finish = _finished(texts, counts, plan)
        return Answer(
            texts=texts,
            finish=finish,
            prompt_tokens=prompt,
            completion_tokens=sum(counts),
            adapter_id=adapter_id,
            hit=hit,
            similarity=similarity,
            loaded=loaded,
            timings=timings,
            used=None if decision is None else decision.side,
            fallback=fallback,
            asked_as=plan.asked_as,
        )

    def keep_check(
        self, adapter_id: str, comparison: Comparison, chat: Sequence[dict[str, Any]]
    ) -> AdapterRecord | None:
        """Keep a comparison as the adapter's check; an adapter deleted meanwhile is skipped."""
        try:
            return self.store.set_check(adapter_id, comparison.to_check(probe_of(chat)))
        except UnknownAdapterError:
            return None

    def check(self, adapter_id: str, probe: str | None) -> AdapterRecord:
        """Check a stored adapter now (``POST /v1/adapters/{id}/check``): in a worker thread."""
        judge = require_judge(self.judge)
        record = self.record(adapter_id)
        with self.lock:
            if record.id not in self.runtime:
                self.attach(record.id)
            try:
                checked, _ = judge.check(self.store, record.id, probe=probe)
            except ProbeError as exc:
                raise APIError(422, str(exc), param="probe", code="no_probe") from exc
            except UnknownAdapterError as exc:
                raise not_found(adapter_id) from exc
        return checked

    def pin(self, adapter_id: str, side: Side | None) -> AdapterRecord:
        """Pin an adapter to a side, or unpin it (``PATCH /v1/adapters/{id}``)."""
        try:
            return self.store.pin(self.record(adapter_id).id, side)
        except UnknownAdapterError as exc:
            raise not_found(adapter_id) from exc

    def attach(self, adapter_id: str) -> None:
        """Attach a stored adapter from its checked files (caller holds the lock)."""
        try:
            paths = self.store.files(adapter_id)
            self.runtime.add(adapter_id, paths.folder)
        except Exception as exc:
            raise store_failure(exc, adapter_id) from exc

    def generate(
        self,
        plan: Plan,
        adapter_id: str | None,
        streamer: Any = None,
        *,
        chat: Any = None,
    ) -> list[str]:
        """The answers to ``chat`` (default: the request's turns) with ``adapter_id`` or the
        bare model."""
        extra: dict[str, Any] = {} if streamer is None else {"streamer": streamer}
        if not plan.greedy:
            extra["temperature"] = plan.temperature
            if plan.top_p is not None:
                extra["top_p"] = plan.top_p
        prompts = [plan.chat if chat is None else chat] * (1 if plan.greedy else plan.n)
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


def _finished(
    texts: list[str], counts: list[int], plan: Plan
) -> tuple[list[str], list[Literal["stop", "length"]]]:
    """Each choice cut at the request's first stop sequence, and why it ended."""
    cut_texts, finish = [], []
    for text, count in zip(texts, counts, strict=True):
        cut = _chat.cut_at_stop(text, plan.stops)
        cut_texts.append(text if cut is None else cut)
        reason: Literal["stop", "length"] = (
            "length" if cut is None and count >= plan.max_tokens else "stop"
        )
        finish.append(reason)
    return cut_texts, finish
