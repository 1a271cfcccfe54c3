"""Shared fixtures: tiny random checkpoints of every architecture, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from edgellm.testing.tiny import ARCHITECTURES, make_checkpoint

__all__ = ["ARCHITECTURES"]   # tests parametrize with: @pytest.mark.parametrize("variant", ARCHITECTURES)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``tiny_checkpoint(variant, dtype="f32", **kw) -> Path``; equal arguments share one directory.

    ``kw`` are make_checkpoint's keywords (seed, shards, config overrides). Treat the directory as read-only:
    it is shared by every test that asks for the same arguments.
    """
    cache: dict[str, Path] = {}

    def build(variant: str, dtype: str = "f32", **kw: Any) -> Path:
        key = json.dumps([variant, dtype, kw], sort_keys=True, default=repr)
        if key not in cache:
            cache[key] = make_checkpoint(variant, tmp_path_factory.mktemp(f"tiny-{variant}-{dtype}"), dtype=dtype, **kw)
        return cache[key]

    return build


# ---------------------------------------------------------------------------------------- Gemma 3 270M
# The real model (edgellm.testing.gemma): rebuilt once into the user cache, then reused by every session.
# A test that asks for these is skipped, with the install hint, when the [demo] package is missing.

def _gemma_or_skip(build: Callable[[], Path]) -> Path:
    from edgellm.errors import MissingDependencyError

    try:
        return build()
    except MissingDependencyError as error:
        pytest.skip(f"{error}: {error.hint}")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The original Gemma 3 270M Q4_K_M GGUF."""
    from edgellm.testing import gemma

    return _gemma_or_skip(gemma.gguf_path)


@pytest.fixture(scope="session")
def gemma_checkpoint() -> Path:
    """The HF checkpoint (bf16) rebuilt from the GGUF. Read-only: it lives in the user cache."""
    from edgellm.testing import gemma

    return _gemma_or_skip(gemma.rebuilt_checkpoint)


@pytest.fixture(scope="session")
def gemma_permuted_checkpoint() -> Path:
    """The channel-permuted copy (seed 0): same logits, weights off the Q4_K_M grid. Read-only."""
    from edgellm.testing import gemma

    return _gemma_or_skip(gemma.permuted_checkpoint)
