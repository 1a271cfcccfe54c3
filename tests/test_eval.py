"""Perplexity and KL divergence: the windowing and numerics as pure functions, then on Gemma 3 270M against
a direct full-logits computation and the model compared with itself."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgellm import evaluate as ev
from edgellm.errors import EvalTextError, TokenizerMismatchError

N_CTX = 64
THREADS = 1


# ------------------------------------------------------------------------------------------- pure parts

def test_windows_cover_the_text_once():
    spans = ev.windows(300, 128, n_prefix=1)
    assert spans == [(0, 127), (127, 254), (254, 300)]
    assert ev.windows(300, 128, n_prefix=0)[0] == (0, 128)
    with pytest.raises(ValueError):
        ev.windows(10, 2, n_prefix=1)


def test_second_half_of_each_window_is_scored():
    assert ev.scored_positions(128) == range(64, 127)       # logits at 126 predict the last token
    assert len(ev.scored_positions(2)) == 0


def test_log_softmax_kld_and_perplexity_match_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 4
    expected = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    logp = ev.log_softmax(logits.copy())
    np.testing.assert_allclose(logp, expected, atol=1e-5)
    other = ev.log_softmax(rng.normal(size=(3, 50)).astype(np.float32))
    p = np.exp(expected)
    np.testing.assert_allclose(ev.kl_divergence(logp, other), (p * (expected - other)).sum(axis=1), rtol=1e-4)
    np.testing.assert_allclose(ev.kl_divergence(logp, logp), 0.0, atol=1e-7)
    np.testing.assert_allclose(ev.token_nll(logp, np.array([0, 1, 2])), -expected[[0, 1, 2], [0, 1, 2]], rtol=1e-5)
    mean, ppl, err = ev.perplexity_stats(np.array([1.0, 2.0, 3.0]))
    assert mean == 2.0 and math.isclose(ppl, math.e ** 2) and math.isclose(err, ppl * 1 / math.sqrt(3))


def _fake(n_vocab: int, ids: list[int], path: str):
    """A runtime-like object whose tokenizer maps any non-empty text to ``ids`` (BOS 2 when asked)."""
    def tokenize(text, add_special=True):
        return ([2] if add_special else []) + (ids if text else [])
    return SimpleNamespace(info=SimpleNamespace(n_vocab=n_vocab, model_path=path), tokenize=tokenize)


def test_models_must_share_the_tokenizer():
    a = _fake(100, [5, 6, 7], "a.gguf")
    assert ev.check_same_tokenizer(a, _fake(100, [5, 6, 7], "b.gguf"), "text") == [5, 6, 7]
    with pytest.raises(TokenizerMismatchError, match="vocabularies of 100 and 200"):
        ev.check_same_tokenizer(a, _fake(200, [5, 6, 7], "b.gguf"), "text")
    with pytest.raises(TokenizerMismatchError, match="from token 1 on") as info:
        ev.check_same_tokenizer(a, _fake(100, [5, 9, 7], "b.gguf"), "text")
    assert "b.gguf" in str(info.value) and info.value.exit_code != 0


def test_default_text_ships_and_is_not_the_calibration_text():
    text = ev.default_text()
    assert len(text) > 10_000 and "def " in text and "ferry" in text
    calibration = Path(ev.__file__).parent / "data" / "calibration.txt"
    if calibration.exists():                 # no 200-character stretch of one appears in the other
        other = calibration.read_text(encoding="utf-8")
        assert not any(text[i:i + 200] in other for i in range(0, len(text) - 200, 100))


# ------------------------------------------------------------------------------------------ Gemma 3 270M

@pytest.fixture(scope="module")
def short_text() -> str:
    return ev.default_text()[:700]         # about 145 Gemma tokens: 3 windows of 64


def _direct_perplexity(runtime, ids: list[int]) -> float:
    """Each window's scored logits fetched in one call and log-softmaxed in float64, all at once."""
    nll = []
    for begin, end in ev.windows(len(ids), N_CTX, 1):
        tokens = [2] + ids[begin:end]                       # Gemma's BOS is 2
        positions = list(ev.scored_positions(len(tokens)))
        logits = runtime.logits(tokens[:-1], start=0, positions=positions).astype(np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nll += [-logp[i, tokens[p + 1]] for i, p in enumerate(positions)]
    return float(np.exp(np.mean(nll)))


@pytest.mark.gemma
def test_perplexity_matches_a_direct_computation(gemma_gguf, short_text):
    from edgellm.runtime import Runtime

    with Runtime.load(gemma_gguf, n_ctx=N_CTX, n_threads=THREADS) as runtime:
        ids = runtime.tokenize(short_text, add_special=False)
        direct = _direct_perplexity(runtime, ids)
    # The default group (32) equals llama.cpp's outputs per decode call here, so the decode calls are the
    # same as the direct computation's and the numbers agree to float rounding.
    result = ev.evaluate(gemma_gguf, text=short_text, n_ctx=N_CTX, n_threads=THREADS)
    assert result.text_tokens == len(ids) and result.windows == 3
    assert result.scored_tokens == sum(len(ev.scored_positions(e - b + 1)) for b, e in ev.windows(len(ids), N_CTX, 1))
    assert result.perplexity == pytest.approx(direct, rel=1e-5)
    assert 1 < result.perplexity < 200 and result.perplexity_stderr > 0


@pytest.mark.gemma
def test_model_against_itself_has_zero_kld_and_full_agreement(gemma_gguf, short_text):
    result = ev.evaluate(gemma_gguf, reference=gemma_gguf, text=short_text, n_ctx=N_CTX, n_threads=THREADS,
                         group=16)
    c = result.comparison
    assert c is not None and c.top1_agreement == 1.0
    assert abs(c.kld_mean) < 1e-6 and c.kld_p99 < 1e-5
    assert c.reference_perplexity == pytest.approx(result.perplexity, rel=1e-6)


@pytest.mark.gemma
def test_too_short_a_text_is_a_typed_error(gemma_gguf):
    with pytest.raises(EvalTextError, match="too few"):
        ev.evaluate(gemma_gguf, text="Hi", n_ctx=64, n_threads=THREADS)


@pytest.mark.gemma
def test_cli_prints_json(gemma_gguf, tmp_path, capsys):
    from edgellm.cli import eval as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    text = tmp_path / "t.txt"
    text.write_text(ev.default_text()[:400], encoding="utf-8")
    args = parser.parse_args(["eval", str(gemma_gguf), "--text", str(text), "--ctx", "64", "--threads", "1", "--json"])
    assert args.run(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text_source"] == str(text) and data["perplexity"] > 1 and data["comparison"] is None
