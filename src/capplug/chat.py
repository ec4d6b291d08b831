"""Chats to text: turning what users pass (strings, chats, message objects) into the texts the
scorer, the selection signals, the local model and the servers read, and telling which candidate
texts are one answer. Every package uses it."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "Instruction",
    "Prompt",
    "blank",
    "chat_turns",
    "check_responses",
    "dedupe_key",
    "distinct",
    "flatten_chat",
    "one_line",
    "task_text",
]

Instruction: TypeAlias = str | Sequence[Any]
"""A plain instruction, or a chat: a list of ``{"role", "content"}`` dicts or message objects."""

# LangChain's message ``type`` values, mapped to the OpenAI role names used for the flat text.
_ROLE_NAMES = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
    "user": "user",
    "assistant": "assistant",
    "chat": "user",
}


def flatten_chat(instruction: Instruction, *, argument: str = "instruction") -> str:
    """Return the single text the scorer reads for an instruction or a chat.

    A string is returned unchanged. A chat is a list of turns, each a mapping with ``role`` and
    ``content`` (OpenAI style) or an object with ``.type`` and ``.content`` (LangChain messages).
    A chat that is one user turn becomes that turn's text; longer chats become one line per
    turn, ``"<role>: <text>"``, with roles ``system``, ``user``, ``assistant`` and ``tool``.
    Content given as a list of parts keeps its text parts, joined by newlines. Since the scorer
    keeps the end of a long instruction, the latest turns survive truncation.

    Raises:
        TypeError: ``instruction`` is neither a string nor a list of turns.
        ValueError: the chat is empty, or a turn lacks a role or content.
    """
    if isinstance(instruction, str):
        return instruction
    return _flat(chat_turns(instruction, argument=argument))


def task_text(instruction: Instruction, *, argument: str = "instruction") -> str:
    """The part of an instruction that says what the task is: a chat's system (and developer)
    turns, joined by newlines; for a plain string or a chat without one, the whole flattened
    text. Task scorers are found, and feedback is grouped, by it. Raises as
    :func:`flatten_chat` does."""
    return Prompt.of(instruction, argument=argument).task


@dataclass(frozen=True)
class Prompt:
    """An instruction read once: ``text``, what the scorer reads (:func:`flatten_chat`), and
    ``task``, what task scorers are found and feedback is grouped by (:func:`task_text`).

    The selection path takes one wherever it takes an instruction, so that a server that has
    read a request's messages (and refused bad ones) does not read them again.
    """

    text: str
    task: str

    @classmethod
    def of(cls, instruction: Instruction | Prompt, *, argument: str = "instruction") -> Prompt:
        """``instruction`` read once (a :class:`Prompt` is returned as it is); raises as
        :func:`flatten_chat` does."""
        if isinstance(instruction, Prompt):
            return instruction
        if isinstance(instruction, str):
            return cls(instruction, instruction)
        turns = chat_turns(instruction, argument=argument)
        text = _flat(turns)
        system = [turn for role, turn in turns if role == "system" and turn.strip()]
        return cls(text, "\n".join(system) if system else text)


def _flat(turns: list[tuple[str, str]]) -> str:
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role}: {text}" for role, text in turns)


def chat_turns(instruction: Instruction, *, argument: str = "instruction") -> list[tuple[str, str]]:
    """The ``(role, text)`` turns of an instruction; a string is one user turn.

    Roles are normalised to ``system``, ``user``, ``assistant`` and ``tool`` (LangChain's
    ``human``/``ai`` included); it raises as :func:`flatten_chat` does.
    """
    if isinstance(instruction, str):
        return [("user", instruction)]
    if (
        instruction is None
        or isinstance(instruction, bytes | Mapping)
        or not isinstance(instruction, Sequence)
    ):
        raise TypeError(
            f"{argument} must be a string or a list of chat turns "
            f"({{'role': ..., 'content': ...}} dicts or message objects); got {type(instruction).__name__}"
        )
    if len(instruction) == 0:
        raise ValueError(f"{argument} is an empty chat; give at least one turn")
    return [_turn(item, i, argument) for i, item in enumerate(instruction)]


def _turn(item: Any, index: int, argument: str) -> tuple[str, str]:
    if isinstance(item, Mapping):
        role, content = item.get("role"), item.get("content")
    elif hasattr(item, "content") and (hasattr(item, "type") or hasattr(item, "role")):
        role, content = getattr(item, "role", None) or item.type, item.content
    else:
        raise TypeError(
            f"{argument}[{index}] must be a {{'role', 'content'}} dict or a message object with "
            f".type and .content; got {type(item).__name__}"
        )
    if not isinstance(role, str) or not role:
        raise ValueError(
            f"{argument}[{index}] has no role; give 'role': 'user' (or system/assistant)"
        )
    return _ROLE_NAMES.get(role.lower(), role.lower()), _content_text(content, index, argument)


def _content_text(content: Any, index: int, argument: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    raise TypeError(
        f"{argument}[{index}].content must be a string or a list of content parts; "
        f"got {type(content).__name__}"
    )


def check_responses(responses: Any, *, argument: str = "responses") -> list[str]:
    """Return ``responses`` as a list of strings, or raise naming the problem and the fix."""
    if isinstance(responses, str):
        raise TypeError(
            f"{argument} must be a list of strings, not a single string; wrap it: [{argument[:-1]}]"
        )
    if responses is None or not isinstance(responses, Sequence):
        raise TypeError(f"{argument} must be a list of strings; got {type(responses).__name__}")
    if len(responses) == 0:
        raise ValueError(f"{argument} must be a non-empty list of strings; got 0 items")
    for i, item in enumerate(responses):
        if not isinstance(item, str):
            raise TypeError(
                f"{argument}[{i}] must be a string; got {type(item).__name__} "
                f"(empty strings are fine, None is not)"
            )
    return list(responses)


def dedupe_key(text: str) -> str:
    """Candidates equal up to whitespace are one candidate: scored once, counted as repeats."""
    return " ".join(text.split())


def distinct(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct texts (the first of each set of repeats, in order) and, for each text, the
    position of its distinct text: score the first list, spread the scores with the second."""
    position: dict[str, int] = {}
    unique: list[str] = []
    where = []
    for text in texts:
        key = dedupe_key(text)
        if key not in position:
            position[key] = len(unique)
            unique.append(text)
        where.append(position[key])
    return unique, where


_INVISIBLE = ("Z", "Cc", "Cf")  # separators, control characters, format characters (U+200B, BOM)


def blank(text: str) -> bool:
    """Whether ``text`` has nothing to read: only whitespace, control characters or invisible
    format characters (zero-width spaces, byte-order marks, direction marks). An instruction,
    probe or task that is blank is refused as empty everywhere."""
    return all(unicodedata.category(c).startswith(_INVISIBLE) for c in text)


def one_line(text: str, width: int) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``width`` characters with
    an ellipsis: for logs and tables."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
