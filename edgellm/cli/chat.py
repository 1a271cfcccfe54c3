"""``edgellm chat BUNDLE``: an interactive chat on stdin/stdout, replies streamed.

Commands: /reset (forget the conversation), /stats (speed of the last reply), /exit (or end of input).
The prompt marker and notes go to stderr, so stdout holds only the replies (and /stats).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from edgellm.cli.output import note
from edgellm.cli.run import (add_model_flags, add_sampling_flags, format_stats, load_runtime, read_text_file,
                             settings_from_args, write_stream)
from edgellm.errors import NoChatTemplateError
from edgellm.runtime import GenerationSettings, GenerationStats, Runtime
from edgellm.runtime.chat import OVERFLOW_POLICIES, drop_oldest_turn

PROMPT = "> "
CHAT_MAX_TOKENS = 512


class Session:
    """The conversation so far and the runtime it runs on."""

    def __init__(self, runtime: Runtime, settings: GenerationSettings, system: str | None, on_overflow: str) -> None:
        self.runtime, self.settings, self.on_overflow = runtime, settings, on_overflow
        self.start = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)
        self.last_stats: GenerationStats | None = None

    def reply(self, text: str) -> None:
        """Send a user message, stream the reply to stdout, and keep both in the conversation."""
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        chunks = self.runtime.stream_chat(self.messages, self.settings, on_overflow=self.on_overflow)
        try:
            final = write_stream(_tee(chunks, parts))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            note("(reply interrupted)")
            final = None
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        if final is not None:
            self.last_stats = final.stats
            self._forget(final.stats.dropped_messages)

    def _forget(self, dropped: int) -> None:
        """Drop the turns the runtime left out, so they are not counted again on every turn."""
        if dropped:
            note(f"(the {dropped} oldest message(s) no longer fit the context and were dropped)")
        target = len(self.messages) - dropped
        while len(self.messages) > target and (shorter := drop_oldest_turn(self.messages)) is not None:
            self.messages = shorter

    def reset(self) -> None:
        self.messages = list(self.start)
        self.runtime.reset()
        note("(conversation cleared)")

    def stats(self) -> None:
        print(format_stats(self.last_stats) if self.last_stats else "no reply yet")


def _tee(chunks, parts: list[str]):
    for chunk in chunks:
        parts.append(chunk.text)
        yield chunk


# command -> what it does; returns False to end the session
COMMANDS: dict[str, Callable[[Session], bool]] = {
    "/exit": lambda s: False,
    "/quit": lambda s: False,
    "/reset": lambda s: s.reset() or True,
    "/stats": lambda s: s.stats() or True,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="chat with a bundle or a .gguf file (reads stdin)",
                              description="Interactive chat: type a message, the reply streams back. "
                                          "Commands: " + ", ".join(COMMANDS) + ".")
    add_model_flags(p)
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template to use instead of the bundle's or the model's")
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    p.add_argument("--on-overflow", choices=OVERFLOW_POLICIES, default="drop_oldest",
                   help="when the conversation outgrows the context: drop the oldest turns (default) or stop "
                        "with an error")
    add_sampling_flags(p, max_tokens=CHAT_MAX_TOKENS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    template = read_text_file(args.chat_template, "chat template") if args.chat_template else None
    with load_runtime(args, chat_template=template) as runtime:
        if runtime.chat_template is None:
            raise NoChatTemplateError(runtime.info.model_name)
        session = Session(runtime, settings, args.system, args.on_overflow)
        note(f"chatting with {runtime.info.model_name}; commands: {', '.join(COMMANDS)}")
        while True:
            sys.stderr.write(PROMPT)
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if text in COMMANDS:
                if not COMMANDS[text](session):
                    break
            elif text:
                session.reply(text)
    return 0
