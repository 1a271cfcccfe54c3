"""The exported folder runs unchanged under onnxruntime-genai (a test-only dependency) and generates the
same greedy tokens as our runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgellm.converters.onnx import convert_onnx
from edgellm.runtime.onnx import OnnxBackend

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai has no wheel installed for this platform "
                                                     "(pip install onnxruntime-genai)")

PROMPT = [1, 5, 9, 17, 33, 65, 100, 200, 7, 3, 250, 12]     # longer than the tiny Gemma's window of 8
N_NEW = 12
TEXT = "Hello world, the quick brown fox"


def genai_greedy(folder: Path, prompt: list[int], n: int, cpu_only: bool = False) -> list[int]:
    config = og.Config(str(folder))
    if cpu_only:
        config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    # plain greedy: genai_config carries the checkpoint's repetition_penalty (qwen2: 1.05) as its default
    params.set_search_options(do_sample=False, max_length=len(prompt) + n, repetition_penalty=1.0)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done() and len(out) < n:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def our_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    backend = OnnxBackend.load(folder, n_ctx=64, n_threads=1)
    try:
        logits, out = backend.decode(prompt), []
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            logits = backend.decode([out[-1]])
        return out
    finally:
        backend.close()


@pytest.mark.parametrize("variant,type,provider", [
    ("llama", "fp32", "cpu"), ("qwen2", "fp32", "cpu"), ("gemma3_text", "fp32", "cpu"), ("phi3", "fp32", "cpu"),
    ("gemma3_text", "int4", "cpu"), ("qwen3", "fp32", "openvino"),
])
def test_genai_generates_our_greedy_tokens(variant, type, provider, tiny_checkpoint, tmp_path):
    folder = tmp_path / variant
    convert_onnx(tiny_checkpoint(variant), folder, type, provider=provider, accuracy_level=1)
    # the standard-op graph names OpenVINO in genai_config; this onnxruntime-genai build runs it on the CPU
    theirs = genai_greedy(folder, PROMPT, N_NEW, cpu_only=provider != "cpu")
    assert theirs == our_greedy(folder, PROMPT, N_NEW)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma3_text"])
def test_genai_reads_the_copied_tokenizer(variant, tiny_checkpoint, tmp_path):
    folder = tmp_path / variant
    convert_onnx(tiny_checkpoint(variant), folder)
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    backend = OnnxBackend.load(folder, n_ctx=16, n_threads=1)
    try:
        assert list(tokenizer.encode(TEXT)) == backend.tokenize(TEXT, add_special=False)
    finally:
        backend.close()
