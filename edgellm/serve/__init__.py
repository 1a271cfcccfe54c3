"""An OpenAI-compatible HTTP server over one loaded ``Runtime`` (``edgellm serve``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream: true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models`` and ``GET /health``::

    from edgellm.runtime import Runtime
    from edgellm.serve import Server, ServerConfig
    with Runtime.load("model.gguf") as rt, Server(rt, ServerConfig(port=8000)) as server:
        ...   # server.url + "/v1" is the base URL for OpenAI clients

``protocol`` holds the request checks and response shapes (pure), ``server`` the sockets, queue and worker.
"""

from edgellm.serve.server import (DEFAULT_HOST, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TOKENS_LIMIT,
                                DEFAULT_PORT, DEFAULT_QUEUE_SIZE, Server, ServerConfig, serve)
from edgellm.serve.protocol import RequestError, parse_request

__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_MAX_TOKENS_LIMIT", "DEFAULT_PORT",
           "DEFAULT_QUEUE_SIZE", "RequestError", "Server", "ServerConfig", "parse_request", "serve"]
