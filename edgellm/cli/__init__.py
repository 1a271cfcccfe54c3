"""The ``edgellm`` command: a thin layer over the library.

Each command lives in its own module with ``register(subparsers)`` (flags) and ``run(args) -> int``
(calls one library function and prints). Results go to stdout, logs and hints to stderr. Library errors
are ``EdgeLLMError``s whose message, hint and exit code come from the table in ``edgellm.errors``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from edgellm import __version__
from edgellm.errors import EdgeLLMError

# Command name -> module under edgellm.cli. Only commands that work are listed.
COMMANDS = {
    "probe": "probe",
    "devices": "devices",
    "convert": "convert",
    "fit": "fit",
    "run": "run",
    "chat": "chat",
    "serve": "serve",
    "bench": "bench",
    "eval": "eval",
    "exit": "exit",
}

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="Fit language models to edge devices and run them.")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        importlib.import_module(f"edgellm.cli.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    debug = os.environ.get("EDGELLM_DEBUG") == "1"
    try:
        return args.run(args)
    except EdgeLLMError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}\nhint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
