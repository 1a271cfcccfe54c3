"""The OpenAI-compatible server.

Request checks are pure functions; the HTTP limits (401, 413, 503, errors mapped to statuses) are tested
against a scripted runtime that streams a fixed reply and can be held on a gate, so the queue can be filled
on purpose; the real Gemma 3 270M answers chat and completion requests, streamed and not, from concurrent
clients, over a real socket with ``http.client``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

from edgellm.errors import ContextOverflowError, NoChatTemplateError
from edgellm.runtime import Chunk, GenerationStats
from edgellm.serve import RequestError, Server, ServerConfig, parse_request

USER = {"role": "user", "content": "Hello"}


# ------------------------------------------------------------------------------------------ HTTP helpers

def call(server: Server, method: str, path: str, body=None, *, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, bytes]:
    """One request on a fresh connection: (status, headers, body bytes)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def post(server: Server, path: str, body, **kw) -> tuple[int, dict]:
    status, _, payload = call(server, "POST", path, body, **kw)
    return status, json.loads(payload)


def sse_events(payload: bytes) -> list:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    events = []
    for block in payload.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list, kind: str) -> str:
    if kind == "chat":
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


# ------------------------------------------------------------------------------------ pure request checks

def test_openai_fields_become_generation_settings():
    job = parse_request("chat", {"model": "anything", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": "END", "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}, "n": 1, "presence_penalty": None},
        max_tokens_limit=100)
    assert job.payload == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    s = job.settings
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.seed) == (7, 0.5, 0.9, 40, ("END",), 3)
    assert job.stream and job.include_usage
    assert parse_request("completion", {"prompt": ["one prompt"]}, 100).payload == "one prompt"
    assert parse_request("completion", {"prompt": [2, 651]}, 100).payload == [2, 651]
    assert parse_request("completion", {"prompt": "x"}, 100).settings.max_tokens == 100   # default: the limit


MESSAGES = [USER]


@pytest.mark.parametrize("kind, body, param, words", [
    ("chat", [], None, "JSON object"),
    ("chat", {}, "messages", "required"),
    ("chat", {"messages": "hi"}, "messages", "must be an array"),
    ("chat", {"messages": []}, "messages", "non-empty"),
    ("chat", {"messages": ["hi"]}, "messages", "must be an object"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages", '"wizard" is not one of'),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages", "content must be a string"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "only text"),
    ("chat", {"messages": MESSAGES, "temperature": "hot"}, "temperature", "must be a number"),
    ("chat", {"messages": MESSAGES, "max_tokens": True}, "max_tokens", "must be an integer"),
    ("chat", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens", ">= 1"),
    ("chat", {"messages": MESSAGES, "max_tokens": 101}, "max_tokens", "over this server's limit of 100"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": 500}, "max_completion_tokens", "limit"),
    ("chat", {"messages": MESSAGES, "top_p": 0}, "top_p", "must be in (0, 1]"),
    ("chat", {"messages": MESSAGES, "n": 2}, "n", "not supported"),
    ("chat", {"messages": MESSAGES, "stop": ["ok", 3]}, "stop", "list of strings"),
    ("chat", {"messages": MESSAGES, "tools": []}, "tools", "Unrecognized request argument"),
    ("completion", {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ("completion", {"prompt": 5}, "prompt", "must be a string or an array"),
])
def test_bad_requests_are_refused_naming_the_problem(kind, body, param, words):
    with pytest.raises(RequestError) as info:
        parse_request(kind, body, max_tokens_limit=100)
    assert info.value.status == 400 and info.value.param == param
    assert words in info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------- HTTP limits, scripted runtime

class ScriptedRuntime:
    """Streams REPLY word by word like a Runtime; ``gate`` (when set up) holds each generation at its start."""

    REPLY = ["Hello", " from", " the", " scripted", " model", "."]

    def __init__(self, gated: bool = False, error: Exception | None = None, endless_calls: int = 0):
        self.info = SimpleNamespace(model_name="scripted", model_path="/models/scripted.gguf")
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Semaphore(0)    # released once per generation that began
        self.error = error
        self.endless_calls = endless_calls       # the first N generations never end by themselves
        self.seen: list = []

    def stream(self, prompt, settings):
        self.seen.append(prompt)
        self.started.release()
        self.gate.wait(timeout=60)
        if self.error is not None:
            raise self.error
        endless, self.endless_calls = self.endless_calls > 0, self.endless_calls - 1
        while endless:
            time.sleep(0.01)
            yield Chunk("la", 7)
        words = self.REPLY[:settings.max_tokens]
        for i, word in enumerate(words):
            yield Chunk(word, 100 + i)
        reason = "length" if len(words) < len(self.REPLY) else "stop"
        yield Chunk("", None, reason, GenerationStats(3, len(words), 0, 0.01, 300.0, 50.0))

    stream_chat = stream


@pytest.fixture
def scripted():
    """Start a server over a ScriptedRuntime: ``scripted(runtime=None, **config)``; closed after the test."""
    servers = []

    def start(runtime=None, **config):
        server = Server(runtime or ScriptedRuntime(), ServerConfig(port=0, **config)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_binds_loopback_by_default_and_lists_the_model(scripted):
    server = scripted()
    assert server.url.startswith("http://127.0.0.1:")
    status, _, payload = call(server, "GET", "/v1/models")
    body = json.loads(payload)
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "scripted"


def test_completion_and_chat_answer_in_openai_shapes(scripted):
    server = scripted()
    status, body = post(server, "/v1/chat/completions", {"model": "x", "messages": [USER], "max_tokens": 3})
    assert status == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    status, body = post(server, "/v1/completions", {"prompt": "Hi"})
    assert status == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == "".join(ScriptedRuntime.REPLY) and choice["finish_reason"] == "stop"


def test_stream_sends_openai_chunks_then_usage_then_done(scripted):
    server = scripted()
    status, headers, payload = call(server, "POST", "/v1/chat/completions", {
        "messages": [USER], "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert streamed_text(events[:-1], "chat") == "".join(ScriptedRuntime.REPLY)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ScriptedRuntime.REPLY)


def test_invalid_json_and_unknown_routes_get_openai_errors(scripted):
    server = scripted()
    status, body = post(server, "/v1/chat/completions", None, raw=b'{"messages": [')
    assert status == 400 and "invalid JSON" in body["error"]["message"]
    status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert status == 400 and "robot" in body["error"]["message"] and body["error"]["param"] == "messages"
    status, _, payload = call(server, "GET", "/v1/nothing")
    assert status == 404 and "/v1/chat/completions" in json.loads(payload)["error"]["message"]
    status, _, _ = call(server, "GET", "/v1/completions")
    assert status == 405


def test_api_key_is_enforced(scripted):
    server = scripted(api_key="s3cret")
    status, headers, payload = call(server, "GET", "/v1/models")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(payload)["error"]["type"] == "authentication_error"
    assert post(server, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert post(server, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert call(server, "GET", "/health")[0] == 200          # health checks need no key


def test_oversized_request_gets_413_and_the_server_goes_on(scripted):
    server = scripted(max_request_bytes=1000)
    status, body = post(server, "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "1000" in body["error"]["message"]
    assert post(server, "/v1/completions", {"prompt": "short"})[0] == 200


def test_full_queue_answers_503_with_retry_after(scripted):
    runtime = ScriptedRuntime(gated=True)
    server = scripted(runtime, queue_size=1)
    results = {}

    def client(name):
        results[name] = post(server, "/v1/completions", {"prompt": name})

    first = threading.Thread(target=client, args=("first",))
    first.start()
    assert runtime.started.acquire(timeout=30)               # the worker holds "first" at the gate
    second = threading.Thread(target=client, args=("second",))
    second.start()
    deadline = time.monotonic() + 30
    while server.worker._jobs.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)                                      # "second" waits in the queue
    status, headers, payload = call(server, "POST", "/v1/completions", {"prompt": "third"})
    assert status == 503 and int(headers["retry-after"]) > 0
    assert "busy" in json.loads(payload)["error"]["message"]
    runtime.gate.set()
    first.join(30)
    second.join(30)
    assert results["first"][0] == results["second"][0] == 200
    assert runtime.seen == ["first", "second"]                # served in arrival order


def test_a_client_leaving_a_stream_frees_the_worker(scripted):
    runtime = ScriptedRuntime(endless_calls=1)
    server = scripted(runtime)
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "sing", "stream": True}))
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    response.close()                                          # leave in the middle of an endless song
    conn.close()
    status, _, _ = call(server, "POST", "/v1/completions", {"prompt": "next"}, timeout=20)
    assert status == 200 and runtime.seen == ["sing", "next"]  # the worker gave up the song


@pytest.mark.parametrize("error, status, words", [
    (ContextOverflowError(900, 256, "the prompt"), 400, "900 tokens"),
    (NoChatTemplateError("scripted"), 501, "no chat template"),
    (RuntimeError("boom"), 500, "internal error"),
])
def test_generation_errors_map_to_statuses(scripted, error, status, words):
    server = scripted(ScriptedRuntime(error=error))
    got, body = post(server, "/v1/chat/completions", {"messages": [USER]})
    assert got == status and words in body["error"]["message"]
    got, _, payload = call(server, "POST", "/v1/chat/completions", {"messages": [USER], "stream": True})
    assert got == status                                      # errors before the first token: no stream starts


# ------------------------------------------------------------------------------------- the real Gemma

COUNTING = ["Counting: 1, 2, 3, 4, 5,", "The alphabet: A, B, C, D, E,", "Monday, Tuesday, Wednesday,",
            "January, February, March,"]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def gemma_server(gemma_gguf):
    """Gemma 3 270M behind a server, and the answers the runtime gives directly (greedy)."""
    from edgellm.runtime import Runtime
    from edgellm.testing import gemma

    with Runtime.load(gemma_gguf, n_ctx=256, n_threads=1, chat_template=gemma.CHAT_TEMPLATE) as runtime:
        expected = {p: runtime.generate(p, max_tokens=MAX_TOKENS).text for p in COUNTING}
        expected["chat"] = runtime.chat(CHAT, max_tokens=MAX_TOKENS)
        expected["chat_prompt_tokens"] = len(runtime.chat_tokens(CHAT))
        with Server(runtime, ServerConfig(port=0, max_tokens_limit=64)) as server:
            yield server, expected


@pytest.mark.gemma
def test_gemma_completion_streamed_and_not(gemma_server):
    server, expected = gemma_server
    prompt = COUNTING[0]
    status, body = post(server, "/v1/completions", {"model": "gemma", "prompt": prompt, "max_tokens": MAX_TOKENS})
    assert status == 200 and body["choices"][0]["text"] == expected[prompt]
    assert body["model"] == "Gemma 3 270m" and body["usage"]["completion_tokens"] == MAX_TOKENS
    status, _, payload = call(server, "POST", "/v1/completions",
                              {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True})
    events = sse_events(payload)
    assert status == 200 and events[-1] == "[DONE]"
    assert streamed_text(events, "completion") == expected[prompt]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.gemma
def test_gemma_chat_streamed_and_not(gemma_server):
    server, expected = gemma_server
    status, body = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_TOKENS})
    assert status == 200 and body["choices"][0]["message"]["content"] == expected["chat"].text
    assert body["usage"]["prompt_tokens"] == expected["chat_prompt_tokens"]
    status, _, payload = call(server, "POST", "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(payload)
    assert status == 200 and streamed_text(events[:-1], "chat") == expected["chat"].text
    assert events[-2]["usage"]["prompt_tokens"] == expected["chat_prompt_tokens"]


@pytest.mark.gemma
def test_gemma_concurrent_clients_each_get_their_own_answer(gemma_server):
    server, expected = gemma_server
    answers: dict[str, tuple] = {}

    def client(prompt):
        answers[prompt] = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS})

    threads = [threading.Thread(target=client, args=(p,)) for p in COUNTING]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(set(expected[p] for p in COUNTING)) == len(COUNTING)      # distinct answers: no mix-ups
    for prompt in COUNTING:
        status, body = answers[prompt]
        assert status == 200 and body["choices"][0]["text"] == expected[prompt]


@pytest.mark.gemma
def test_gemma_limits_are_client_errors(gemma_server):
    server, _ = gemma_server
    status, body = post(server, "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4})
    assert status == 400 and "context holds 256" in body["error"]["message"]
    status, body = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 65})
    assert status == 400 and "limit of 64" in body["error"]["message"]


# ------------------------------------------------------------------------------------------- entry points

def test_cli_refuses_bad_limits_before_loading(tmp_path):
    import argparse

    from edgellm.cli import serve as command
    from edgellm.errors import UsageError

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["serve", str(tmp_path / "never-loaded.gguf"), "--queue-size", "0"])
    assert args.host == "127.0.0.1" and args.port == 8000
    with pytest.raises(UsageError, match="--queue-size"):
        args.run(args)


@pytest.mark.gemma
def test_serve_loads_a_model_and_stops_on_shutdown(gemma_gguf):
    from edgellm.serve import serve

    ready: list[Server] = []
    thread = threading.Thread(target=serve, args=(gemma_gguf, ServerConfig(port=0)),
                              kwargs={"on_ready": ready.append, "n_ctx": 256, "n_threads": 1})
    thread.start()
    deadline = time.monotonic() + 60
    while not ready and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    server = ready[0]
    status, _, payload = call(server, "GET", "/v1/models")
    assert status == 200 and json.loads(payload)["data"][0]["id"] == "Gemma 3 270m"
    server.shutdown()
    thread.join(30)
    assert not thread.is_alive()


def test_usage_reports_draft_tokens_kept_and_rejected_with_early_exit():
    from types import SimpleNamespace

    from edgellm.serve.protocol import completion_body, usage_chunk_body

    stats = SimpleNamespace(prompt_tokens=4, generated_tokens=10, drafted_tokens=8, accepted_tokens=6)
    body = completion_body("completion", "r1", "m", SimpleNamespace(text="x", finish_reason="length", stats=stats))
    assert body["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": 6,
                                                          "rejected_prediction_tokens": 2}
    plain = usage_chunk_body("chat", "r2", "m", 4, 10)
    assert "completion_tokens_details" not in plain["usage"]      # nothing drafted: OpenAI's plain shape
    assert usage_chunk_body("chat", "r2", "m", 4, 10, 5, 5)["usage"]["completion_tokens_details"] == {
        "accepted_prediction_tokens": 5, "rejected_prediction_tokens": 0}
