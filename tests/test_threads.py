"""Thread tuning: candidate counts, the measurement (on a simulated clock), the cache, and load-time choice."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from edgellm.runtime import Runtime
from edgellm.runtime import threads
from edgellm.runtime.threads import CoreCounts, ThreadChoice


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def test_candidates_cover_performance_physical_and_fewer():
    hybrid = CoreCounts(physical=10, logical=12, performance=2)        # e.g. 2 P-cores (HT) + 8 E-cores
    assert threads.decode_candidates(hybrid) == [1, 2, 10]
    assert threads.batch_candidates(hybrid) == [1, 2, 10, 12]
    pi = CoreCounts(physical=4, logical=4, performance=4)
    assert threads.decode_candidates(pi) == [2, 3, 4] and threads.batch_candidates(pi) == [2, 4]
    assert threads.decode_candidates(CoreCounts(1, 1, 1)) == [1]


def test_pick_prefers_fewer_threads_when_as_fast():
    assert threads.pick({1: 10.0, 2: 19.0, 4: 30.0, 8: 30.2}) == 4
    assert threads.pick({2: 50.0, 4: 40.0}) == 2


class SimulatedBackend:
    """Decode costs ``step[n]`` simulated seconds at n threads; batches cost ``per_token[n]`` per token."""

    n_ctx, n_vocab = 4096, 8

    def __init__(self, clock: list[float], step: dict[int, float], per_token: dict[int, float]) -> None:
        self.clock, self.step, self.per_token = clock, step, per_token
        self.threads = (1, 1)
        self.n_past = 0

    def tokenize(self, text, **_):
        return [1, 2, 3]

    def set_threads(self, n_decode, n_batch):
        self.threads = (n_decode, n_batch)

    def truncate(self, n_past):
        self.n_past = min(self.n_past, n_past)
        return True

    def decode(self, tokens, logits_for="last"):
        n_decode, n_batch = self.threads
        self.clock[0] += self.step[n_decode] if len(tokens) == 1 else self.per_token[n_batch] * len(tokens)
        self.n_past += len(tokens)
        return np.zeros((1, self.n_vocab), np.float32)


def test_tune_picks_the_fastest_counts_within_budget():
    clock = [0.0]
    backend = SimulatedBackend(clock, step={1: 0.050, 2: 0.030, 4: 0.020, 3: 0.021},
                               per_token={4: 0.004, 8: 0.002, 2: 0.006})
    # decode candidates 2, 3, 4; batch candidates 2, 4, 8
    choice = threads.tune(backend, CoreCounts(physical=4, logical=8, performance=4), budget_s=2.0,
                          clock=lambda: clock[0])
    assert (choice.n_threads, choice.n_threads_batch, choice.source) == (4, 8, "tuned")
    assert backend.threads == (4, 8)                       # applied
    assert choice.decode_tokens_per_s[4] == pytest.approx(50.0)
    assert choice.seconds <= 2.0 * 1.2                     # the budget holds (a warm-up comes on top)


def test_a_slow_candidate_cannot_blow_the_budget():
    clock = [0.0]
    backend = SimulatedBackend(clock, step={1: 0.02, 2: 1.5}, per_token={1: 0.01, 2: 0.05})   # 2 threads thrash
    choice = threads.tune(backend, CoreCounts(physical=2, logical=2, performance=2), budget_s=2.0,
                          clock=lambda: clock[0])
    assert (choice.n_threads, choice.n_threads_batch) == (1, 1) and choice.seconds < 5.0


def test_cache_round_trip_in_xdg_cache_home(cache_home, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    key = threads.cache_key(model)
    assert threads.cache_path() == cache_home / "edgellm" / "threads.json"
    assert threads.load_cached(key) is None
    threads.store(key, ThreadChoice(3, 6, "tuned", {3: 12.5}, {6: 300.0}, 1.2))
    cached = threads.load_cached(key)
    assert cached == ThreadChoice(3, 6, "cached", {3: 12.5}, {6: 300.0}, 1.2)
    os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))     # the file changed: another key
    assert threads.cache_key(model) != key
    threads.cache_path().write_text("{not json")
    assert threads.load_cached(key) is None                            # a broken cache is ignored...
    threads.store(key, ThreadChoice(1, 1, "tuned"))                    # ...and replaced
    assert json.loads(threads.cache_path().read_text())["version"] == threads.CACHE_VERSION


def test_choose_order_override_manifest_cache_tune(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    backend = SimulatedBackend([0.0], {}, {})
    tuned = ThreadChoice(2, 4, "tuned", {2: 10.0}, {4: 100.0}, 0.5)
    calls = []
    monkeypatch.setattr(threads, "tune", lambda b: calls.append(b) or tuned)
    assert threads.choose(backend, model, n_threads=3, n_threads_batch=5).source == "override"
    assert threads.choose(backend, model, manifest_threads=(1, None)) == ThreadChoice(1, 1, "manifest")
    assert not calls
    assert threads.choose(backend, model) == tuned and len(calls) == 1
    again = threads.choose(backend, model)
    assert again.source == "cached" and (again.n_threads, again.n_threads_batch) == (2, 4) and len(calls) == 1
    partial = threads.choose(backend, model, n_threads_batch=7)         # the other count comes from the cache
    assert (partial.n_threads, partial.n_threads_batch, partial.source) == (2, 7, "override")
    assert backend.threads == (2, 7)


def test_runtime_tunes_once_then_reuses_the_cache(tiny_checkpoint, tmp_path):
    from edgellm import converters
    model = tmp_path / "tiny.gguf"
    converters.convert(tiny_checkpoint("qwen2"), model, "f32")
    with Runtime.load(model, n_ctx=256) as rt:
        assert rt.info.threads_source == "tuned"
        first = (rt.info.n_threads, rt.info.n_threads_batch)
        assert rt.backend.threads == first and rt.backend.n_past == 0      # tuning leaves the cache empty
    with Runtime.load(model, n_ctx=256) as rt:
        assert rt.info.threads_source == "cached" and (rt.info.n_threads, rt.info.n_threads_batch) == first
        assert rt.info.threads_tuning_seconds == 0


@pytest.mark.gemma
def test_gemma_tuning_is_short(gemma_gguf):
    # The goal is under 3 s (2.0-2.6 s measured here, probe included). A single decode step cannot be cut
    # short, so a machine oversubscribed by other jobs can stretch it: the bound here leaves room for that.
    with Runtime.load(gemma_gguf, n_ctx=512) as rt:
        assert rt.info.threads_source == "tuned"
        assert rt.info.threads_tuning_seconds < 6.0
        assert rt.generate("Hi", max_tokens=2).stats.generated_tokens >= 1


# ------------------------------------------------------------------ edge cases: tiny contexts, one thread pool

class BoundedBackend(SimulatedBackend):
    """A SimulatedBackend whose KV cache holds ``n_ctx`` tokens, as a real one: more raises."""

    def __init__(self, n_ctx: int, separate: bool = True) -> None:
        super().__init__([0.0], step={1: 0.02, 2: 0.015, 3: 0.013, 4: 0.012},
                         per_token={1: 0.01, 2: 0.006, 3: 0.005, 4: 0.004})
        self.n_ctx, self.separate_batch_threads = n_ctx, separate
        self.most = 0

    def decode(self, tokens, logits_for="last"):
        from edgellm.errors import ContextOverflowError
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextOverflowError(self.n_past + len(tokens), self.n_ctx, "the timing run")
        out = super().decode(tokens, logits_for)
        self.most = max(self.most, self.n_past)
        return out


@pytest.mark.parametrize("n_ctx", [2, 5, 16, 24, 200])
def test_tuning_stays_inside_a_tiny_context(n_ctx):
    backend = BoundedBackend(n_ctx)
    choice = threads.tune(backend, CoreCounts(physical=4, logical=4, performance=4), budget_s=1.0,
                          clock=lambda: backend.clock[0])
    assert backend.most <= n_ctx and backend.n_past == 0 and choice.n_threads == 4
    # in a 2-token context the "batches" are single tokens (decode steps, timed by decode speed here)
    assert choice.n_threads_batch == 4 or n_ctx < 4


def test_run_sizes_are_bounded_by_the_context():
    assert threads.run_sizes(4096, 0.01, 0.001, 0.1) == threads.RunSizes(16, 100, 10)
    assert threads.run_sizes(20, 0.01, 0.001, 0.1) == threads.RunSizes(10, 20, 10)
    assert threads.run_sizes(3, 1e-9, 1e-9, 1.0) == threads.RunSizes(1, 3, 2)


def test_one_pool_backend_is_tuned_on_decode_only():
    backend = BoundedBackend(4096, separate=False)
    calls = []
    original = backend.set_threads
    backend.set_threads = lambda d, b: calls.append((d, b)) or original(d, b)
    choice = threads.tune(backend, CoreCounts(physical=4, logical=8, performance=4), budget_s=1.0,
                          clock=lambda: backend.clock[0])
    assert choice.n_threads == choice.n_threads_batch == 4 and choice.prefill_tokens_per_s == {}
    # batch candidates (8 logical CPUs) never tried: timing ran with one count, then the choice was applied
    assert {b for _, b in calls[:-1]} == {2} and calls[-1] == (4, 4)


def test_only_n_threads_given_skips_tuning(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    monkeypatch.setattr(threads, "tune", lambda b: pytest.fail("tuned although --threads was given"))
    backend = BoundedBackend(64)
    assert threads.choose(backend, model, n_threads=3) == ThreadChoice(3, 3, "override")
    assert backend.threads == (3, 3)
    one_pool = BoundedBackend(64, separate=False)
    threads.store(threads.cache_key(model), ThreadChoice(2, 4, "tuned"))
    choice = threads.choose(one_pool, model, n_threads_batch=4)      # decode from the cache, batch = decode
    assert (choice.n_threads, choice.n_threads_batch) == (2, 2) and one_pool.threads == (2, 2)


def test_onnx_runtime_tunes_a_tiny_context_and_rebuilds_the_session(tiny_checkpoint, tmp_path, monkeypatch):
    from edgellm.converters.onnx import convert_onnx
    from edgellm.runtime.onnx import OnnxBackend

    folder = tmp_path / "onnx"
    convert_onnx(tiny_checkpoint("llama"), folder, "fp32")
    created = []
    make = OnnxBackend._create_session
    monkeypatch.setattr(OnnxBackend, "_create_session",
                        lambda self, model: created.append(self._threads[0]) or make(self, model))
    monkeypatch.setattr(threads, "core_counts", lambda: CoreCounts(physical=2, logical=2, performance=2))
    with Runtime.load(folder, n_ctx=8) as rt:                    # timing runs of 16+ tokens would overflow
        assert rt.info.threads_source == "tuned" and rt.info.n_threads == rt.info.n_threads_batch
        assert rt.backend.n_past == 0 and set(created) == {1, 2}     # a session per count tried
        session = rt.backend._stages[0].session.get_session_options()
        assert session.intra_op_num_threads == rt.info.n_threads
        assert len(rt.generate("Hi", max_tokens=3).tokens) >= 1
