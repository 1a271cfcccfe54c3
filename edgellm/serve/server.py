"""The HTTP side of the server: routes, limits, API key, the one worker thread and the bounded queue.

One model, one worker: requests wait in a bounded FIFO queue and are generated one at a time (the runtime
holds one KV cache). A full queue answers 503 with ``Retry-After``. Limits are checked before any work:
401 without the API key (when one is set), 413 for an oversized body, 400 for a bad request. The standard
library's ``ThreadingHTTPServer`` serves the sockets: one thread per connection, all feeding the worker.
JSON answers keep the connection alive; a stream closes it when done.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from edgellm.errors import (ChatTemplateError, ContextOverflowError, EdgeLLMError, InvalidMessagesError,
                            NoChatTemplateError, SettingsError)
from edgellm.runtime.generate import collect
from edgellm.serve.protocol import (ENDPOINTS, Job, RequestError, chunk_body, completion_body, finish_reason,
                                    models_body, parse_request, usage_chunk_body)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"            # loopback only unless the user asks for more
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BYTES = 1 << 20   # 1 MiB of JSON is far more than any prompt that fits a small context
DEFAULT_MAX_TOKENS_LIMIT = 2048       # largest max_tokens a request may ask for; also the default when absent
DEFAULT_QUEUE_SIZE = 8                # requests waiting behind the one being generated
RETRY_AFTER_SECONDS = 2               # hint sent with 503 when the queue is full
POLL_SECONDS = 0.1                    # how often a background server checks for close(): its stop latency


@dataclass(frozen=True)
class ServerConfig:
    """Network and limit settings of a server (the CLI flags of ``edgellm serve``)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT          # 0 picks a free port (tests)
    api_key: str | None = None        # when set, every /v1 request needs ``Authorization: Bearer KEY``
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    queue_size: int = DEFAULT_QUEUE_SIZE
    model_id: str | None = None       # name shown to clients; defaults to the model's name


# ---------------------------------------------------------------------------------------------------------
# The worker: one thread owns the runtime and takes jobs in arrival order.

@dataclass(frozen=True)
class _Done:
    """End of a stream: the token counts for usage."""

    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: int = 0      # early exit: draft tokens verified, and how many of them the model kept
    accepted_tokens: int = 0


class Worker:
    """Runs jobs one at a time on the runtime; ``submit`` refuses when ``queue_size`` jobs already wait."""

    def __init__(self, runtime: Any, queue_size: int):
        self.runtime = runtime
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgellm-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``. Raises RequestError 503 (with Retry-After) when the queue is full or stopping."""
        if self._stopping.is_set():
            raise _shutting_down()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server busy: {self._jobs.maxsize} requests are already waiting; retry "
                                    f"later", type="server_busy",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    def stop(self) -> None:
        """Stop the running generation at its next token, answer waiting jobs 503, end the thread."""
        self._stopping.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.events.put(_shutting_down())
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.cancelled.is_set():
                self._run(job)

    def _run(self, job: Job) -> None:
        call = getattr(self.runtime, ENDPOINTS[job.kind].runtime_stream)
        try:
            chunks = self._watch(job, call(job.payload, job.settings))
            if not job.stream:
                job.events.put(collect(chunks))
                return
            stats = None
            for chunk in chunks:
                job.events.put(chunk)
                stats = chunk.stats or stats   # the final chunk carries the statistics
            job.events.put(_Done(stats.prompt_tokens, stats.generated_tokens, stats.drafted_tokens,
                                      stats.accepted_tokens) if stats else _Done(0, 0))
        except Exception as exc:   # handed to the request thread, which answers with an error
            job.events.put(exc)

    def _watch(self, job: Job, chunks: Iterator[Any]) -> Iterator[Any]:
        """Pass ``chunks`` on until the client goes away (then end quietly) or the server stops (503)."""
        try:
            for chunk in chunks:
                yield chunk
                if job.cancelled.is_set():
                    return
                if self._stopping.is_set():
                    raise _shutting_down()
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()


def _shutting_down() -> RequestError:
    return RequestError(503, "the server is shutting down", type="server_error")


# ---------------------------------------------------------------------------------------------------------
# HTTP: routing, limits, auth; bodies come from the functions above.

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/models"): "models",
    ("GET", "/health"): "health",
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completion",
}
OPEN_ROUTES = {"health"}   # answered without the API key


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive for JSON answers; streams close the connection
    server: "_HTTPServer"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        route = ROUTES.get((method, path))
        self._body_read = False
        try:
            if route is None:
                raise _no_route(method, path)
            if route not in OPEN_ROUTES:
                self._authorize()
            self._route(route)
        except RequestError as exc:
            if self.headers.get("Content-Length", "0") != "0" and not self._body_read:
                self.close_connection = True   # an unread body would be taken for the next request
            self._send_json(exc.status, exc.body(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("%s went away before its answer", self.address_string())
            self.close_connection = True

    def _route(self, route: str) -> None:
        app = self.server.app
        if route == "health":
            self._send_json(200, {"status": "ok"})
        elif route == "models":
            self._send_json(200, models_body(app.model_id, app.created))
        else:
            job = parse_request(route, self._read_json(), app.config.max_tokens_limit)
            self._answer(job)

    def _authorize(self) -> None:
        key = self.server.app.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               type="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    def _read_json(self) -> Any:
        limit = self.server.app.config.max_request_bytes
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        length = int(length_text)
        if length > limit:
            raise RequestError(413, f"request body is {length} bytes, over this server's limit of {limit} bytes")
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"invalid JSON in request body: {exc}") from None

    def _answer(self, job: Job) -> None:
        app = self.server.app
        app.worker.submit(job)
        try:
            first = job.events.get()
            if isinstance(first, BaseException):
                raise _as_request_error(first)
            rid = ENDPOINTS[job.kind].id_prefix + uuid.uuid4().hex[:24]
            if not job.stream:
                self._send_json(200, completion_body(job.kind, rid, app.model_id, first))
            else:
                self._send_stream(job, rid, first)
        finally:
            job.cancelled.set()   # stops the worker if we leave early (client gone, error)

    def _send_stream(self, job: Job, rid: str, event: Any) -> None:
        model = self.server.app.model_id
        self.close_connection = True
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                            ("Connection", "close")):
            self.send_header(name, value)
        self.end_headers()
        first = True
        try:
            while not isinstance(event, _Done):
                if isinstance(event, BaseException):
                    self._send_event(_as_request_error(event).body())
                    break
                reason = finish_reason(event.finish_reason)
                if event.text or reason or first:   # text held back (UTF-8, stop strings) sends nothing
                    self._send_event(chunk_body(job.kind, rid, model, event.text, reason, first))
                    first = False
                event = job.events.get()
            if isinstance(event, _Done) and job.include_usage:
                self._send_event(usage_chunk_body(job.kind, rid, model, event.prompt_tokens, event.completion_tokens,
                                                 event.drafted_tokens, event.accepted_tokens))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client closed the stream %s early", rid)

    def _send_event(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _no_route(method: str, path: str) -> RequestError:
    if any(p == path for _, p in ROUTES):
        return RequestError(405, f"method {method} is not allowed on {path}")
    return RequestError(404, f"no route {method} {path}; routes: "
                             f"{', '.join(f'{m} {p}' for m, p in ROUTES)}", type="not_found_error")


# Runtime errors raised while generating -> HTTP status. The 400s are the request's fault (too long, bad
# values, a conversation the template refuses); a server without a chat template cannot do chat at all
# (501). Anything else is 500.
ERROR_STATUS: dict[type, int] = {
    ContextOverflowError: 400, SettingsError: 400, InvalidMessagesError: 400, ChatTemplateError: 400,
    NoChatTemplateError: 501,
}


def _as_request_error(exc: BaseException) -> RequestError:
    """A failure inside generation as the RequestError the client gets."""
    if isinstance(exc, RequestError):
        return exc
    status = ERROR_STATUS.get(type(exc), 500)
    if isinstance(exc, EdgeLLMError):
        if status == 500:
            logger.error("generation failed: %s", exc)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return RequestError(status, f"{exc} ({exc.hint})", type=kind)
    logger.error("generation failed", exc_info=exc)
    return RequestError(500, f"internal error during generation: {type(exc).__name__}", type="server_error")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: "Server"


class Server:
    """An OpenAI-compatible server over ``runtime``; ``start()`` serves in a background thread.

    Use as a context manager, or call ``serve_forever()`` to block (the CLI). ``url`` is the base URL
    (``http://127.0.0.1:8000``); clients use ``url + "/v1"``.
    """

    def __init__(self, runtime: Any, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        if self.config.max_tokens_limit < 1 or self.config.queue_size < 1 or self.config.max_request_bytes < 1:
            raise ValueError("max_tokens_limit, queue_size and max_request_bytes must be positive")
        self.runtime = runtime
        self.model_id = self.config.model_id or _model_name(runtime)
        self.created = int(time.time())
        self._httpd = _HTTPServer((self.config.host, self.config.port), _Handler)   # OSError if in use
        self._httpd.app = self
        self.worker = Worker(runtime, self.config.queue_size)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(POLL_SECONDS,),
                                        name="edgellm-http", daemon=True)
        self._thread.start()
        logger.info("serving %s at %s/v1", self.model_id, self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until ``shutdown()`` is called from another one, or KeyboardInterrupt
        (which propagates after the server is closed)."""
        try:
            self._httpd.serve_forever(POLL_SECONDS)
        finally:
            self.close()

    def shutdown(self) -> None:
        """Make a ``serve_forever()`` running in another thread return; it closes the server."""
        self._httpd.shutdown()

    def close(self) -> None:
        """Stop accepting connections, stop the running generation at its next token, answer waiting
        requests 503 and end the worker. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self.worker.stop()

    def __enter__(self) -> "Server":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _model_name(runtime: Any) -> str:
    info = runtime.info
    return getattr(info, "model_name", None) or str(info.model_path).rsplit("/", 1)[-1]


def serve(path: str | os.PathLike, config: ServerConfig | None = None, *,
          on_ready: Callable[[Server], None] | None = None, **load_options: Any) -> None:
    """Load the model at ``path`` (``load_options`` go to ``Runtime.load``: n_ctx, n_threads,
    chat_template, ...) and serve it until interrupted; ``on_ready`` gets the server once it listens.

    Raises:
        EdgeLLMError: the model cannot be loaded.
        OSError: the address is in use.
    """
    from edgellm.runtime import Runtime

    with Runtime.load(path, **load_options) as runtime:
        app = Server(runtime, config)
        if on_ready is not None:
            on_ready(app)
        app.serve_forever()
