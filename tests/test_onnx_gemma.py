"""Gemma 3 270M through ONNX: fp32 agrees with llama.cpp f16 on the greedy next token, and int4 (block 32)
costs no more perplexity and KL divergence against fp32 than llama.cpp's Q4_0 costs against f16, on the
channel-permuted checkpoint (whose weights are off the Q4_K_M grid it was rebuilt from)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgellm import evaluate
from edgellm.converters import convert
from edgellm.converters.onnx import convert_onnx
from edgellm.runtime import Runtime

pytestmark = [pytest.mark.gemma, pytest.mark.slow]

N_CTX = 512
# The whole shipped eval text (1620 scored positions). On its first 2048 tokens alone perplexity is too noisy:
# int4 and Q4_0 then differ by less than the noise. Measured (whole text): ONNX int4 ppl 18.11 -> 25.11,
# KLD 0.330; llama.cpp Q4_0 ppl 18.11 -> 25.33, KLD 0.344 (int4 with quant_method="rtn", Q4_0's own
# rounding, and block-32 tables: 25.34, KLD 0.344).
TEXT_TOKENS = None


def score(model: Path, reference: Path) -> dict[str, float]:
    """Perplexities, mean KLD and top-1 agreement of ``model`` against ``reference`` on the eval text."""
    load = lambda path: Runtime.load(path, n_ctx=N_CTX, n_threads=2, n_threads_batch=2)   # noqa: E731
    with load(model) as m, load(reference) as r:
        ids = evaluate.check_same_tokenizer(m, r, evaluate.default_text())[:TEXT_TOKENS]
        totals = evaluate.score(m, ids, n_ctx=N_CTX, reference=r)
    nll, ref_nll = np.concatenate(totals.nll), np.concatenate(totals.ref_nll)
    return {"ppl": float(np.exp(nll.mean())), "ref_ppl": float(np.exp(ref_nll.mean())),
            "kld": float(np.concatenate(totals.kld).mean()), "top1": float(np.concatenate(totals.agree).mean()),
            "positions": len(nll)}


def test_fp32_agrees_with_llama_cpp_f16(gemma_checkpoint, tmp_path):
    gguf = tmp_path / "f16.gguf"
    convert(gemma_checkpoint, gguf, "f16")
    convert_onnx(gemma_checkpoint, tmp_path / "fp32", "fp32")
    result = score(tmp_path / "fp32" / "model.onnx", gguf)
    assert result["positions"] > 1500
    assert result["top1"] >= 0.99              # measured 0.999, KLD 1e-5
    assert abs(result["ppl"] / result["ref_ppl"] - 1) < 0.01


def test_int4_costs_no_more_than_q4_0(gemma_permuted_checkpoint, tmp_path):
    src = gemma_permuted_checkpoint
    convert(src, tmp_path / "f16.gguf", "f16")
    convert(src, tmp_path / "q4_0.gguf", "q4_0")
    convert_onnx(src, tmp_path / "fp32", "fp32")
    convert_onnx(src, tmp_path / "int4", "int4", block_size=32)
    onnx = score(tmp_path / "int4" / "model.onnx", tmp_path / "fp32" / "model.onnx")
    llama = score(tmp_path / "q4_0.gguf", tmp_path / "f16.gguf")
    assert onnx["kld"] <= llama["kld"]
    assert onnx["ppl"] - onnx["ref_ppl"] <= llama["ppl"] - llama["ref_ppl"]
