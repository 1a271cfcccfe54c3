"""The lightweight runtime: load a bundle or a GGUF file and generate, stream, chat or score.

Public API::

    from edgellm.runtime import Runtime, GenerationSettings, Completion, Chunk
    rt = Runtime.load("bundle-or-model.gguf")          # n_ctx=, n_threads=, mmap=, mlock=, verify=, chat_template=
    rt.generate("Once upon a time", max_tokens=32).text
    for chunk in rt.stream_chat([{"role": "user", "content": "Hi"}]): print(chunk.text, end="")

The engine sits behind ``edgellm.runtime.base.Backend``; llama.cpp is the one implemented here.
"""

from edgellm.runtime.base import Backend, SpecialTokens
from edgellm.runtime.core import Runtime, RuntimeInfo
from edgellm.runtime.generate import Chunk, Completion, GenerationStats
from edgellm.runtime.sampling import GenerationSettings
from edgellm.runtime.threads import ThreadChoice

__all__ = ["Backend", "Chunk", "Completion", "GenerationSettings", "GenerationStats", "Runtime", "RuntimeInfo",
           "SpecialTokens", "ThreadChoice"]
