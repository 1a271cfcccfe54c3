"""The ONNX Runtime backend behind the runtime protocol: logits equal the numpy reference through the
preallocated, IO-bound KV cache (and through Concat caches of standard-op graphs), only requested
positions are computed, tokens match the GGUF path, the generation loop runs unchanged, and a missing
execution provider falls back to the CPU with the reason reported."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgellm.converters import convert
from edgellm.converters.onnx import convert_onnx, files
from edgellm.errors import ContextOverflowError, ModelLoadError
from edgellm.runtime import Runtime
from edgellm.runtime import onnx as onnx_backend
from edgellm.runtime.base import Backend
from edgellm.runtime.llamacpp import LlamaCppBackend
from edgellm.runtime.onnx import OnnxBackend, choose_provider
from edgellm.testing import reference

TEXT = "Hello world, the quick brown fox jumps over the lazy dog. 12345"
TOLERANCE = 1e-3


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def folders(tiny_checkpoint, tmp_path_factory):
    """folders(variant, type="fp32", provider="cpu") -> exported folder, built once per module."""
    cache: dict = {}

    def build(variant: str, type: str = "fp32", provider: str = "cpu") -> Path:
        if (variant, type, provider) not in cache:
            out = tmp_path_factory.mktemp("onnx-rt") / f"{variant}-{type}-{provider}"
            convert_onnx(tiny_checkpoint(variant), out, type, provider=provider)
            cache[(variant, type, provider)] = out
        return cache[(variant, type, provider)]

    return build


@pytest.mark.parametrize("variant,provider", [("llama", "cpu"), ("gemma3_text", "cpu"), ("qwen3", "cpu"),
                                              ("gemma3_text", "openvino"), ("phi3", "dml")])
def test_decode_matches_reference_through_the_cache(variant, provider, folders, tiny_checkpoint):
    backend = OnnxBackend.load(folders(variant, provider=provider), n_ctx=64, n_threads=2, n_batch=8)
    try:
        assert isinstance(backend, Backend)
        ids = backend.tokenize(TEXT)
        want = reference.forward(tiny_checkpoint(variant), ids)
        assert rel_error(backend.decode(ids[:5], "all"), want[:5]) <= TOLERANCE
        # 8-token runs: the rest of the prompt spans several session runs; rows only where asked
        rest = backend.decode(ids[5:], [0, 3, 9, len(ids) - 6])
        assert rel_error(rest, want[[5, 8, 14, len(ids) - 1]]) <= TOLERANCE
        assert backend.n_past == len(ids)
        assert backend.truncate(7) and backend.n_past == 7
        assert rel_error(backend.decode(ids[7:12], "last"), want[11:12]) <= TOLERANCE
        assert backend.decode(ids[12:14], []).shape == (0, backend.n_vocab)
        assert backend.n_past == 14
        with pytest.raises(ContextOverflowError):
            backend.decode(list(range(3, 3 + 51)))
        assert backend.n_past == 14
    finally:
        backend.close()


def test_shared_buffer_cache_is_preallocated_and_reused(folders):
    backend = OnnxBackend.load(folders("qwen2"), n_ctx=32, n_threads=1)
    try:
        stage = backend._stages[0]
        assert stage.layout.shared
        buffers = [id(v) for pair in stage.kv for v in pair]
        assert stage.kv[0][0].shape() == [1, 2, 32, 16]
        backend.decode([1, 2, 3, 4])
        backend.decode([5])
        assert [id(v) for pair in stage.kv for v in pair] == buffers
    finally:
        backend.close()


def test_tokens_and_specials_match_the_gguf_backend(folders, tiny_checkpoint, tmp_path):
    gguf_path = tmp_path / "m.gguf"
    convert(tiny_checkpoint("qwen2"), gguf_path, "f32")
    onnx = OnnxBackend.load(folders("qwen2"), n_ctx=32, n_threads=1)
    llama = LlamaCppBackend.load(gguf_path, n_ctx=32, n_threads=1, n_threads_batch=1)
    try:
        text = TEXT + "<|im_end|> naïve 中文"
        assert onnx.tokenize(text) == llama.tokenize(text)
        ids = onnx.tokenize(text)
        assert onnx.detokenize(ids) == llama.detokenize(ids)
        assert [onnx.token_bytes(t) for t in ids] == [llama.token_bytes(t) for t in ids]
        assert onnx.special == llama.special and onnx.chat_template == llama.chat_template
        assert [t for t in range(onnx.n_vocab) if onnx.is_end(t)] == [t for t in range(onnx.n_vocab) if llama.is_end(t)]
        assert onnx.metadata["general.architecture"] == "qwen2" and onnx.metadata["edgellm.type"] == "fp32"
    finally:
        onnx.close()
        llama.close()


def test_runtime_generates_greedy_reference_tokens(folders, tiny_checkpoint):
    folder = folders("gemma3_text", "fp32")
    with Runtime.load(folder / "model.onnx", n_ctx=64, n_threads=1, n_threads_batch=1) as rt:
        assert rt.info.backend == "onnxruntime-cpu"
        prompt = rt.tokenize("The quick brown fox")
        done = rt.generate(prompt, max_tokens=8, temperature=0.0)
        expected = list(prompt)
        for _ in range(len(done.tokens)):
            expected.append(int(reference.forward(tiny_checkpoint("gemma3_text"), expected)[-1].argmax()))
        assert done.tokens == expected[len(prompt):]
        chat = rt.chat([{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.stats.prompt_tokens > 3
        rows = rt.logits(prompt + done.tokens, start=2)
        assert rows.shape == (len(prompt) + len(done.tokens) - 2, rt.info.n_vocab)


def test_int4_runtime_runs_and_stays_close(folders, tiny_checkpoint):
    backend = OnnxBackend.load(folders("llama", "int4"), n_ctx=64, n_threads=1)
    try:
        ids = backend.tokenize(TEXT)
        got = backend.decode(ids, "all")
        want = reference.forward(tiny_checkpoint("llama"), ids)
        # random tiny weights lose a lot to 4 bits; the top token still agrees on most positions
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.6
    finally:
        backend.close()


def test_set_threads_recreates_the_session_and_keeps_the_cache(folders):
    backend = OnnxBackend.load(folders("llama"), n_ctx=32, n_threads=1)
    try:
        first = backend.decode([1, 5, 9, 17], "all")
        backend.truncate(2)
        session = backend._stages[0].session
        backend.set_threads(2, 2)
        assert backend._stages[0].session is not session and backend.threads == (2, 2)
        again = backend.decode([9, 17], "all")
        assert rel_error(again, first[2:]) <= TOLERANCE
        backend.set_threads(2, 1)
        assert backend._stages[0].session is not None and backend.threads == (2, 2)
    finally:
        backend.close()


def test_set_threads_releases_the_old_session_first(folders, monkeypatch):
    # two live sessions would hold two prepacked copies of the weights (the peak RSS of thread tuning)
    backend = OnnxBackend.load(folders("llama"), n_ctx=16, n_threads=1)
    seen = []
    make = OnnxBackend._create_session
    monkeypatch.setattr(OnnxBackend, "_create_session",
                        lambda self, model: seen.append(self._stages[0].session) or make(self, model))
    try:
        backend.set_threads(2, 2)
        assert seen == [None] and backend.decode([1, 2, 3]).shape == (1, backend.n_vocab)
    finally:
        backend.close()


# ------------------------------------------------------------------------------ execution providers

def test_provider_choice_table():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = choose_provider("cuda", None, available)
    assert (chosen.backend, chosen.providers, chosen.fallback) == (
        "onnxruntime-cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), False)
    built = choose_provider(None, "cuda", available)
    assert built.backend == "onnxruntime-cuda" and "exported for it" in built.reason
    missing = choose_provider("openvino", "cuda", available)
    assert missing.fallback and missing.backend == "onnxruntime-cpu" and missing.providers == ("CPUExecutionProvider",)
    assert "OpenVINOExecutionProvider" in missing.reason and "requested" in missing.reason
    assert choose_provider(None, None, ["CPUExecutionProvider"]).providers == ("CPUExecutionProvider",)
    assert choose_provider("QNNExecutionProvider", None, ["QNNExecutionProvider", "CPUExecutionProvider"]).backend == \
        "onnxruntime-qnn"
    with pytest.raises(ModelLoadError):
        choose_provider("tpu", None, available)


def test_missing_provider_falls_back_and_says_so(folders, caplog):
    wanted = "CUDAExecutionProvider"
    if wanted in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to fall back from")
    with caplog.at_level(logging.WARNING, logger="edgellm.onnxruntime"):
        backend = OnnxBackend.load(folders("llama", "fp16", "cuda"), n_ctx=16, n_threads=1)
    try:
        assert backend.id == "onnxruntime-cpu"
        assert wanted in backend.provider_note and "falling back" in backend.provider_note
        assert any(wanted in r.message for r in caplog.records)
        assert backend.decode([1, 2, 3]).shape == (1, backend.n_vocab)     # the fp16 graph still runs on the CPU
    finally:
        backend.close()


def test_folder_errors(folders, tmp_path):
    with pytest.raises(ModelLoadError, match="genai_config"):
        OnnxBackend.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(folders("llama"), copy)
    (copy / files.VOCAB_GGUF).unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.gguf"):
        OnnxBackend.load(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="no such file"):
        OnnxBackend.load(copy)


def _probed(*rows: tuple[str, bool, str]):
    """The probe's ONNX choice with ``rows`` (backend, usable, reason) in preference order."""
    from edgellm.probe.info import BackendChoice, Considered
    considered = tuple(Considered(b, usable, True, reason) for b, usable, reason in rows)
    chosen = next(c.backend for c in considered if c.usable)
    return BackendChoice("onnx", chosen, "", True, considered)


def test_provider_choice_from_the_probe():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"]
    with_gpu = _probed(("onnxruntime-cuda", True, "CUDAExecutionProvider on Jetson Orin"),
                       ("onnxruntime-cpu", True, "CPU"))
    chosen = choose_provider(None, "cpu", gpu_build, with_gpu)
    assert chosen.backend == "onnxruntime-cuda" and not chosen.fallback and "Jetson Orin" in chosen.reason
    assert choose_provider("auto", None, gpu_build, with_gpu).backend == "onnxruntime-cuda"
    # a GPU build on a machine without the GPU: the probe rejects CUDA, so the CPU, with why
    no_gpu = _probed(("onnxruntime-cuda", False, "no NVIDIA GPU found"), ("onnxruntime-cpu", True, "CPU"))
    cpu = choose_provider(None, "cpu", gpu_build, no_gpu)
    assert cpu.providers == ("CPUExecutionProvider",) and not cpu.fallback and "probe found no hardware" in cpu.reason
    # DirectML's GQA has no fused RoPE: a CPU graph (fused RoPE) is not handed to it
    dml = _probed(("onnxruntime-dml", True, "DirectML"), ("onnxruntime-cpu", True, "CPU"))
    assert choose_provider(None, "cpu", ["DmlExecutionProvider", "CPUExecutionProvider"], dml).backend == \
        "onnxruntime-cpu"
    assert choose_provider(None, "openvino", ["DmlExecutionProvider", "CPUExecutionProvider"], dml).fallback
    # an explicit request beats the probe; the exported-for provider beats it too
    assert choose_provider("cpu", "cpu", gpu_build, with_gpu).backend == "onnxruntime-cpu"
    assert choose_provider(None, "tensorrt", gpu_build, with_gpu).backend == "onnxruntime-tensorrt"
    # Azure is not a local execution provider; an unknown exported-for name is ignored, not fatal
    only = choose_provider(None, "webgpu", ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert only.providers == ("CPUExecutionProvider",) and "only execution provider" in only.reason


def test_probe_runs_only_when_there_is_a_choice(monkeypatch):
    import edgellm.probe
    monkeypatch.setattr(edgellm.probe, "probe", lambda: pytest.fail("probed without a choice to make"))
    assert onnx_backend.probe_choice(["AzureExecutionProvider", "CPUExecutionProvider"]) is None
    fake = type("Machine", (), {"onnx": _probed(("onnxruntime-cpu", True, "CPU"))})()
    monkeypatch.setattr(edgellm.probe, "probe", lambda: fake)
    assert onnx_backend.probe_choice(["CUDAExecutionProvider", "CPUExecutionProvider"]) is fake.onnx


def test_runtime_provider_from_argument_and_bundle(folders, tmp_path, caplog):
    from edgellm import bundle
    from edgellm.errors import BundleError
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to fall back from")
    folder = tmp_path / "bundle"
    shutil.copytree(folders("qwen2"), folder)
    with Runtime.load(folder, n_ctx=16, n_threads=1) as rt:                       # plain folder, no manifest
        assert rt.info.provider == "CPUExecutionProvider" and rt.info.provider_note is None
        assert rt.info.bundle_dir is None and rt.info.model_path == str(folder / "model.onnx")
    files = tuple(bundle.describe_file(folder, p.name) for p in sorted(folder.iterdir()))
    bundle.write_manifest(folder, bundle.Manifest(model="model.onnx", files=files,
                                                  runtime=bundle.RuntimeSettings(n_threads=1, provider="cuda")))
    assert bundle.read_manifest(folder).runtime.provider == "cuda"
    with caplog.at_level(logging.WARNING, logger="edgellm.onnxruntime"), Runtime.load(folder, n_ctx=16) as rt:
        assert rt.info.backend == "onnxruntime-cpu" and "falling back" in rt.info.provider_note
        assert "requested" in rt.info.provider_reason and rt.info.bundle_dir == str(folder)
    assert any("CUDAExecutionProvider" in r.message for r in caplog.records)
    with Runtime.load(folder, n_ctx=16, provider="cpu") as rt:                    # the argument beats the bundle
        assert rt.info.provider_note is None and "requested" in rt.info.provider_reason
    data = bundle.manifest_to_dict(bundle.read_manifest(folder))
    data["runtime"]["provider"] = 3
    with pytest.raises(BundleError, match="runtime.provider"):
        bundle.parse_manifest(data, folder / "edgellm.json")
