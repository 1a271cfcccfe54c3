"""``edgellm serve BUNDLE``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``) on 127.0.0.1:8000 by default. The URL goes to stderr; Ctrl+C stops it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal

from edgellm import serve as server
from edgellm.cli.output import note
from edgellm.cli.run import add_model_flags, load_runtime, read_text_file
from edgellm.errors import UsageError

API_KEY_ENV = "EDGELLM_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a bundle or .gguf file over an OpenAI-compatible HTTP API. "
                                          "Requests queue and are answered one at a time.")
    add_model_flags(p)
    p.add_argument("--host", default=server.DEFAULT_HOST,
                   help=f"address to listen on (default {server.DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=server.DEFAULT_PORT, help=f"port (default {server.DEFAULT_PORT})")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--max-request-bytes", type=int, default=server.DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                   help=f"largest request body; larger ones get 413 (default {server.DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--max-tokens-limit", type=int, default=server.DEFAULT_MAX_TOKENS_LIMIT, metavar="N",
                   help="largest max_tokens a request may ask for, and the value when it gives none "
                        f"(default {server.DEFAULT_MAX_TOKENS_LIMIT})")
    p.add_argument("--queue-size", type=int, default=server.DEFAULT_QUEUE_SIZE, metavar="N",
                   help="requests that may wait behind the running one; more get 503 "
                        f"(default {server.DEFAULT_QUEUE_SIZE})")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use instead of the model's")
    p.add_argument("--model-id", metavar="NAME", help="model name shown to clients (default: the model's name)")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> server.ServerConfig:
    for flag in ("port", "max_request_bytes", "max_tokens_limit", "queue_size"):
        value = getattr(args, flag)
        if value < (0 if flag == "port" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    return server.ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                               max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit,
                               queue_size=args.queue_size, model_id=args.model_id)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    template = read_text_file(args.chat_template, "chat template") if args.chat_template else None
    if not _is_loopback(config.host) and config.api_key is None:
        note(f"warning: listening on {config.host} without an API key: anyone who can reach this port can use "
             f"the model (set --api-key or ${API_KEY_ENV})")
    with load_runtime(args, chat_template=template) as runtime:
        if runtime.chat_template is None:
            note("note: the model has no chat template: /v1/chat/completions will answer 501 "
                 "(pass --chat-template FILE)")
        app = server.Server(runtime, config)
        note(f"serving {app.model_id} at {app.url}/v1 (queue {config.queue_size}, Ctrl+C to stop)")
        previous = signal.signal(signal.SIGTERM, _interrupt)   # `kill` / a service manager stops it cleanly
        try:
            app.serve_forever()
        except KeyboardInterrupt:
            note("stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
