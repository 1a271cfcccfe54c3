"""The OpenAI API as data: which request fields are accepted, how they become GenerationSettings, and the
JSON shapes of responses and streamed chunks. Pure functions; the HTTP side is ``edgellm.serve.server``.

Every refusal is a ``RequestError`` carrying the HTTP status and OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}``. Unknown fields are refused (as OpenAI does) rather
than ignored; OpenAI options this server does not implement are accepted only at their no-op value
(``n: 1``, ``presence_penalty: 0``, ...). ``null`` means "not given". ``developer`` messages are treated as
``system`` ones. ``top_k``, ``min_p`` and ``repeat_penalty`` are accepted as extensions, as llama.cpp's
own server does.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from edgellm.errors import SettingsError
from edgellm.runtime.sampling import GenerationSettings

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}   # runtime reason -> OpenAI reason


@dataclass
class RequestError(Exception):
    """A request the server refuses; becomes an HTTP status and OpenAI's error JSON."""

    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


# ---------------------------------------------------------------------------------------------------------
# Request validation: each accepted field is one row. Values of None mean "not given", as in OpenAI's API.

def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _neutral(value: Any) -> Callable[[Any], str | None]:
    """OpenAI options this server does not implement: accepted only at their no-op value."""
    return lambda v: None if v == value else f"is not supported (only {json.dumps(value)})"


def _stop_strings(v: Any) -> str | None:
    items = [v] if isinstance(v, str) else v
    return None if all(isinstance(s, str) for s in items) else "must be a string or a list of strings"


def _stream_options(v: Any) -> str | None:
    return None if isinstance(v.get("include_usage", False), bool) else "include_usage must be a boolean"


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    setting: str | None = None        # GenerationSettings attribute the value sets, if any
    check: Callable[[Any], str | None] = lambda v: None


_NUMBER = (int, float)
COMMON_FIELDS: dict[str, Field] = {
    "model": Field((str,)),
    "stream": Field((bool,)),
    "stream_options": Field((dict,), check=_stream_options),
    "max_tokens": Field((int,), "max_tokens", _at_least(1)),
    # Ranges of sampling values are checked by GenerationSettings itself (one source of truth).
    "temperature": Field(_NUMBER, "temperature", _between(0, 2)),     # OpenAI's documented range
    "top_p": Field(_NUMBER, "top_p"),
    "top_k": Field((int,), "top_k"),                                  # extension, as llama.cpp's server
    "min_p": Field(_NUMBER, "min_p"),                                 # extension
    "repeat_penalty": Field(_NUMBER, "repeat_penalty"),               # extension
    "seed": Field((int,), "seed"),
    "stop": Field((str, list), "stop", _stop_strings),
    "user": Field((str,)),
    "n": Field((int,), check=_neutral(1)),
    "presence_penalty": Field(_NUMBER, check=_neutral(0)),
    "frequency_penalty": Field(_NUMBER, check=_neutral(0)),
}
CHAT_FIELDS: dict[str, Field] = {
    **COMMON_FIELDS,
    "messages": Field((list,)),
    "max_completion_tokens": Field((int,), "max_tokens", _at_least(1)),   # newer name of max_tokens
    "logprobs": Field((bool,), check=_neutral(False)),
}
COMPLETION_FIELDS: dict[str, Field] = {
    **COMMON_FIELDS,
    "prompt": Field((str, list)),
    "echo": Field((bool,), check=_neutral(False)),
    "best_of": Field((int,), check=_neutral(1)),
    "suffix": Field((str,), check=_neutral("")),
}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int in Python; JSON true is not a number.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
             dict: "an object"}
    if float in types:                       # an integer is a number too
        types = tuple(t for t in types if t is not int)
    return " or ".join(names[t] for t in types)


def check_fields(body: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """Return the given (non-null) fields of ``body`` after checking names, types and ranges.

    Raises:
        RequestError: 400 naming the first unknown field or bad value.
    """
    given = {k: v for k, v in body.items() if v is not None}
    for name, value in given.items():
        row = fields.get(name)
        if row is None:
            raise RequestError(400, f"Unrecognized request argument supplied: {name}", name)
        if not _type_ok(value, row.types):
            raise RequestError(400, f"'{name}' must be {_type_names(row.types)}, got {json.dumps(value)[:80]}", name)
        problem = row.check(value)
        if problem:
            raise RequestError(400, f"'{name}' {problem}", name)
    return given


def sampling_settings(given: dict[str, Any], fields: dict[str, Field], max_tokens_limit: int) -> GenerationSettings:
    """GenerationSettings from the checked fields; ``max_tokens`` defaults to the limit.

    Raises:
        RequestError: 400 when ``max_tokens`` is over ``max_tokens_limit`` or a value is out of range.
    """
    params = {fields[k].setting: k for k in given if fields[k].setting}   # setting name -> request field
    values = {setting: given[param] for setting, param in params.items()}
    if "stop" in values:
        values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(values["stop"])
    requested = values.setdefault("max_tokens", max_tokens_limit)
    if requested > max_tokens_limit:
        param = params.get("max_tokens", "max_tokens")
        raise RequestError(400, f"'{param}' is {requested}, over this server's limit of {max_tokens_limit}", param)
    try:
        return GenerationSettings(**values)
    except SettingsError as exc:
        param = params.get(exc.name, exc.name)
        raise RequestError(400, f"'{param}' {exc.problem}, got {exc.value}", param) from None


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
        raise RequestError(400, f"messages[{index}].content: only text parts are supported", "messages")
    raise RequestError(400, f"messages[{index}].content must be a string or a list of text parts", "messages")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as ``[{"role", "content"}]`` with text content; ``developer`` becomes ``system``.

    Raises:
        RequestError: 400 for an empty list, a non-object message, an unknown role or non-text content.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = message.get("role")
        if role not in ROLE_ALIASES:
            raise RequestError(400, f"messages[{i}].role {json.dumps(role)} is not one of: "
                                    f"{', '.join(ROLE_ALIASES)}", "messages")
        parsed.append({"role": ROLE_ALIASES[role], "content": _message_text(message.get("content"), i)})
    return parsed


def parse_prompt(prompt: Any) -> str | list[int]:
    """A completion prompt: a string, a list of one string, or a list of token ids.

    Raises:
        RequestError: 400 for several prompts or any other shape.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and prompt and all(_type_ok(t, (int,)) for t in prompt):
        return list(prompt)
    raise RequestError(400, "'prompt' must be a string, one string in a list, or a list of token ids "
                            "(one prompt per request)", "prompt")


@dataclass
class Job:
    """One accepted request, waiting in the queue or being generated."""

    kind: str                              # "chat" or "completion"
    payload: Any                           # messages (chat) or prompt (completion)
    settings: GenerationSettings
    stream: bool
    include_usage: bool = False
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)   # Chunk..., then _Done or exception
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Endpoint:
    """What differs between chat and plain completions."""

    fields: dict[str, Field]
    payload: str                           # the required field holding the input
    parse: Callable[[Any], Any]            # that field -> what the runtime takes
    runtime_stream: str                    # Runtime method that streams it
    object: str                            # OpenAI "object" of a response
    chunk_object: str                      # ... and of a streamed chunk
    id_prefix: str


ENDPOINTS: dict[str, Endpoint] = {
    "chat": Endpoint(CHAT_FIELDS, "messages", parse_messages, "stream_chat", "chat.completion",
                     "chat.completion.chunk", "chatcmpl-"),
    "completion": Endpoint(COMPLETION_FIELDS, "prompt", parse_prompt, "stream", "text_completion",
                           "text_completion", "cmpl-"),
}


def parse_request(kind: str, body: Any, max_tokens_limit: int) -> Job:
    """Validate a decoded JSON body for ``kind`` (a key of ENDPOINTS) and return its Job.

    Raises:
        RequestError: 400 naming the problem.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    endpoint = ENDPOINTS[kind]
    given = check_fields(body, endpoint.fields)
    if endpoint.payload not in given:
        raise RequestError(400, f"'{endpoint.payload}' is a required property", endpoint.payload)
    payload = endpoint.parse(given[endpoint.payload])
    settings = sampling_settings(given, endpoint.fields, max_tokens_limit)
    include_usage = bool(given.get("stream_options", {}).get("include_usage", False))
    return Job(kind, payload, settings, bool(given.get("stream", False)), include_usage)


# ---------------------------------------------------------------------------------------------------------
# Response shaping: OpenAI's JSON objects.

def _usage(prompt_tokens: int, completion_tokens: int, drafted: int = 0, accepted: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; with early exit, draft tokens the model kept or rejected are reported where
    OpenAI reports predicted-output tokens (``completion_tokens_details``)."""
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if drafted:
        usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                              "rejected_prediction_tokens": drafted - accepted}
    return usage


def _envelope(rid: str, object_name: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": object_name, "created": int(time.time()), "model": model, "choices": choices}


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, "stop")


def completion_body(kind: str, rid: str, model: str, completion: Any) -> dict[str, Any]:
    """The non-streaming response for a runtime ``Completion``."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(completion.finish_reason)}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": completion.text}
    else:
        choice["text"] = completion.text
    body = _envelope(rid, ENDPOINTS[kind].object, model, [choice])
    stats = completion.stats
    body["usage"] = _usage(stats.prompt_tokens, stats.generated_tokens, stats.drafted_tokens, stats.accepted_tokens)
    return body


def chunk_body(kind: str, rid: str, model: str, text: str, reason: str | None, first: bool = False) -> dict:
    """One streaming chunk; the chat stream's first chunk carries the role, its last the finish reason."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
    if kind == "chat":
        choice["delta"] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    else:
        choice["text"] = text
    return _envelope(rid, ENDPOINTS[kind].chunk_object, model, [choice])


def usage_chunk_body(kind: str, rid: str, model: str, prompt_tokens: int, completion_tokens: int,
                     drafted: int = 0, accepted: int = 0) -> dict:
    """The extra last chunk sent when ``stream_options.include_usage`` is true: no choices, only usage."""
    body = _envelope(rid, ENDPOINTS[kind].chunk_object, model, [])
    body["usage"] = _usage(prompt_tokens, completion_tokens, drafted, accepted)
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "edgellm"}]}


