"""Chat: render a model's Jinja chat template safely, and fit a conversation into the context.

Templates come from model files and bundles, that is from strangers, so they render in jinja2's
``ImmutableSandboxedEnvironment``: no access to private attributes or Python internals, no mutation of
the messages. The globals match what Hugging Face's ``apply_chat_template`` gives templates
(``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape, loop controls).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Callable, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.errors import ChatTemplateError, ContextOverflowError, InvalidMessagesError

OVERFLOW_POLICIES = ("error", "drop_oldest")
SYSTEM_ROLE = "system"
USER_ROLE = "user"


class _TemplateRaised(Exception):
    """raise_exception() called by a template: carries its message out of jinja."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The one sandboxed environment chat templates render in (HF's settings: trim and lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once. Raises ChatTemplateError on a syntax error."""
    try:
        return environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"syntax error on line {exc.lineno}: {exc.message}") from exc


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape of a conversation: a non-empty list of dicts with string role and content.

    Raises:
        InvalidMessagesError: naming the first bad message.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidMessagesError("expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidMessagesError(f"message {i} is a {type(message).__name__}, not a dict")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidMessagesError(f"message {i} has no 'role' string")
        if not isinstance(message.get("content"), str):
            raise InvalidMessagesError(f"message {i} ({message['role']}) has no 'content' string")
    return [dict(m) for m in messages]


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **variables: Any) -> str:
    """Render chat template ``source`` for ``messages`` in the sandbox.

    Raises:
        ChatTemplateError: syntax errors, a template's own raise_exception(), or a sandbox refusal
            (an attribute or operation the sandbox forbids).
        InvalidMessagesError: malformed messages.
    """
    template = compile_template(source)
    try:
        return template.render(messages=validate_messages(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **variables)
    except _TemplateRaised as exc:
        raise ChatTemplateError(f"the template refused the conversation: {exc}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the sandbox refused an operation: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"rendering failed: {exc}") from exc


def drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``messages`` without its oldest non-system turn, or None when only the last user message is left.

    Leading system messages stay. After a drop the conversation restarts at a user message, since many
    templates insist that roles alternate starting with the user.
    """
    n_system = next((i for i, m in enumerate(messages) if m["role"] != SYSTEM_ROLE), len(messages))
    rest = messages[n_system:]
    if len(rest) <= 1:
        return None
    rest = rest[1:]
    while len(rest) > 1 and rest[0]["role"] != USER_ROLE:
        rest = rest[1:]
    return messages[:n_system] + rest


def fit_messages(messages: list[dict[str, Any]], count: Callable[[list[dict[str, Any]]], int], n_ctx: int,
                 reserve: int, on_overflow: str) -> tuple[list[dict[str, Any]], int]:
    """Make the prompt of ``messages`` (``count`` tokens) plus ``reserve`` generated tokens fit in ``n_ctx``.

    Returns (messages that fit, number of messages dropped).

    Raises:
        ContextOverflowError: with on_overflow "error" when it does not fit, or when even the last user
            message alone (with the system messages) does not.
        ValueError: an unknown policy.
    """
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, not {on_overflow!r}")
    kept, needed = messages, count(messages) + reserve
    while needed > n_ctx:
        shorter = drop_oldest_turn(kept) if on_overflow == "drop_oldest" else None
        if shorter is None:
            raise ContextOverflowError(needed, n_ctx, "the prompt + max_tokens")
        kept, needed = shorter, count(shorter) + reserve
    return kept, len(messages) - len(kept)
