"""HF checkpoint -> ONNX without torch: every tiny architecture matches the numpy reference through ONNX
Runtime (one full pass, and incrementally through the KV cache), with contrib ops and with standard ops;
quantized graphs match the reference run on the same fake-quantized weights; the folder has the layout
ONNX Runtime GenAI expects; bad options fail clearly and leave nothing half-written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgellm import safetensors
from edgellm.converters.onnx import DATA_FILE, MODEL_FILE, convert_onnx, decoder, files, graph, quant
from edgellm.converters.onnx.options import PRECISIONS, TABLE_BLOCK_8BIT, resolve
from edgellm.errors import ConvertTypeError, UnknownQuantTypeError, UsageError
from edgellm.testing import reference
from edgellm.testing.tiny import ARCHITECTURES

TOKENS = [1, 5, 9, 17, 33, 65, 100, 200, 7, 3, 250, 12, 40, 41, 42, 43, 44, 45]   # longer than Gemma's window 8
FP32_TOLERANCE = 1e-3            # the bound; measured: <= 1e-6 for every variant and op set
FP16_TOLERANCE = 5e-3            # measured <= 1.9e-3 (fp16 weights and activations, cast back on the CPU)
QUANT_TOLERANCE = 1e-3           # against the reference on the same dequantized weights, accuracy_level 1
LINEAR = re.compile(r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|down_proj)\.weight$")
TABLES = re.compile(r"(embed_tokens|lm_head)\.weight$")


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


class Graph:
    """A converted folder run through a plain InferenceSession with numpy feeds (no runtime code)."""

    def __init__(self, folder: Path, **config: str) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.config = json.loads((folder / files.GENAI_CONFIG).read_text())["model"]["decoder"]
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = np.float16 if self.inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32

    def empty(self) -> list[np.ndarray]:
        shape = (1, self.config["num_key_value_heads"], 0, self.config["head_size"])
        return [np.zeros(shape, self.dtype)] * (2 * self.config["num_hidden_layers"])

    def run(self, tokens, past: list[np.ndarray], start: int) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": np.array([tokens], np.int64),
                "attention_mask": np.ones((1, start + len(tokens)), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(start, start + len(tokens), dtype=np.int64)[None]
        for i in range(self.config["num_hidden_layers"]):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        logits, *present = self.session.run(None, feed)
        return logits[0].astype(np.float32), present

    def full(self, tokens) -> np.ndarray:
        return self.run(tokens, self.empty(), 0)[0]

    def incremental(self, tokens, first: int = 5) -> np.ndarray:
        """A prompt of ``first`` tokens, a chunk of 3 with a cache, then one token at a time."""
        rows, past, start = [], self.empty(), 0
        for chunk in [tokens[:first], tokens[first:first + 3]] + [[t] for t in tokens[first + 3:]]:
            logits, past = self.run(chunk, past, start)
            rows.append(logits)
            start += len(chunk)
        return np.concatenate(rows)


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(variant, type="fp32", source=None, **options) -> folder, built once per session."""
    cache: dict = {}

    def build(variant: str, type: str = "fp32", source: Path | None = None, **options) -> Path:
        key = json.dumps([variant, type, str(source), options], sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("onnx") / f"{variant}-{type}"
            convert_onnx(source or tiny_checkpoint(variant), out, type, **options)
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def reference_logits(tiny_checkpoint):
    cache: dict = {}

    def get(variant: str, source: Path | None = None) -> np.ndarray:
        key = str(source or variant)
        if key not in cache:
            cache[key] = reference.forward(source or tiny_checkpoint(variant), TOKENS)
        return cache[key]

    return get


def fake_quantized(src: Path, dst: Path, bits: int, block: int, symmetric: bool, table_bits: int | None,
                   method: str = "mse") -> Path:
    """A copy of ``src`` whose linear weights (and with ``table_bits`` the embedding/output tables) are
    replaced by their dequantized MatMulNBits values: what the quantized graph computes with."""
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    weights = safetensors.SafetensorsFile(src / "model.safetensors")
    tensors = {}
    for name in weights.names():
        w = weights.float32(name)
        b = bits if LINEAR.search(name) else table_bits if TABLES.search(name) else None
        size = TABLE_BLOCK_8BIT if TABLES.search(name) and b == 8 else block     # 8-bit tables: blocks of 128
        if b is not None:
            w = quant.dequantize(quant.quantize(w, b, size, symmetric, method), b, size, w.shape[1])
        tensors[name] = w.astype(np.float32)
    weights.close()
    safetensors.write(dst / "model.safetensors", tensors)
    return dst


# ------------------------------------------------------------------------------ fp32 against the reference

@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_fp32_matches_reference_with_and_without_cache(variant, exported, reference_logits):
    g = Graph(exported(variant))
    want = reference_logits(variant)
    full = g.full(TOKENS)
    assert rel_error(full, want) <= FP32_TOLERANCE
    assert rel_error(g.incremental(TOKENS), full) <= FP32_TOLERANCE
    assert "position_ids" not in g.inputs                      # RoPE is fused into GroupQueryAttention


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_standard_op_graph_matches_reference(variant, exported, reference_logits):
    """Providers without contrib ops (OpenVINO, QNN, Core ML) get MatMul/Softmax attention and explicit norms."""
    folder = exported(variant, provider="openvino")
    g = Graph(folder)
    ops = {n.op_type for n in onnx.load(folder / MODEL_FILE, load_external_data=False).graph.node}
    assert not ops & {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                      "MatMulNBits", "FastGelu"}
    assert rel_error(g.full(TOKENS), reference_logits(variant)) <= FP32_TOLERANCE
    assert rel_error(g.incremental(TOKENS), reference_logits(variant)) <= FP32_TOLERANCE


@pytest.mark.parametrize("variant", ["gemma3_text", "qwen3", "llama3"])
def test_unfused_rope_graph_matches_reference(variant, exported, reference_logits):
    """DirectML's op set: GroupQueryAttention without do_rotary, RotaryEmbedding nodes and position_ids."""
    folder = exported(variant, provider="dml")
    g = Graph(folder)
    assert "position_ids" in g.inputs
    assert rel_error(g.incremental(TOKENS), reference_logits(variant)) <= FP32_TOLERANCE


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_partial_rotary(provider, tiny_checkpoint, tmp_path):
    """Phi-4-mini style partial RoPE; 8 rotated dims are too few for GQA's fused RoPE (noted fallback)."""
    src = tiny_checkpoint("phi3", partial_rotary_factor=0.5)
    result = convert_onnx(src, tmp_path / "out", provider=provider)
    assert any("RoPE not fused" in n for n in result.notes) == (provider == "cpu")
    g = Graph(tmp_path / "out")
    want = reference.forward(src, TOKENS)
    assert rel_error(g.incremental(TOKENS), want) <= FP32_TOLERANCE


@pytest.mark.parametrize("variant", ["llama", "gemma3_text", "phi3"])
def test_fp16(variant, exported, reference_logits):
    g = Graph(exported(variant, "fp16"))
    assert g.dtype == np.float16
    assert rel_error(g.full(TOKENS), reference_logits(variant)) <= FP16_TOLERANCE


# ------------------------------------------------------------------------------ quantized weights

@pytest.mark.parametrize("variant,bits,block,symmetric,method", [
    ("llama", 4, 32, True, "mse"), ("gemma3_text", 4, 32, False, "mse"), ("qwen3", 4, 64, True, "rtn"),
    ("qwen3", 8, 128, False, "mse"), ("phi3", 8, 32, True, "mse"), ("qwen2", 4, 128, False, "mse"),
])
def test_matmulnbits_graph_equals_reference_on_dequantized_weights(variant, bits, block, symmetric, method, exported,
                                                                     reference_logits, tiny_checkpoint, tmp_path_factory):
    """Packing, scales, zero points and padding of partial blocks (qwen3's 96-wide MLP with blocks of 64/128)
    are exact: the int graph at accuracy_level 1 equals the reference on the dequantized weights."""
    type = f"int{bits}"
    fake = fake_quantized(tiny_checkpoint(variant), tmp_path_factory.getbasetemp() / f"fq-{variant}-{bits}-{block}-"
                          f"{symmetric}-{method}", bits, block, symmetric, None, method)
    g = Graph(exported(variant, type, block_size=block, symmetric=symmetric, accuracy_level=1, lm_head="float",
                       quant_method=method))
    assert rel_error(g.full(TOKENS), reference_logits(variant, fake)) <= QUANT_TOLERANCE


@pytest.mark.parametrize("variant,lm_head,symmetric,share", [
    ("gemma3_text", "int8", True, False), ("gemma3_text", "int4", False, True), ("llama3", "int4", True, True),
    ("llama", "int8", False, False),
])
def test_quantized_embeddings_and_output(variant, lm_head, symmetric, share, exported, reference_logits,
                                         tiny_checkpoint, tmp_path_factory):
    """The table goes through GatherBlockQuantized and the output through MatMulNBits (one shared copy of the
    codes with share_embeddings on tied models): both equal the dequantized reference."""
    bits = int(lm_head[-1])
    fake = fake_quantized(tiny_checkpoint(variant), tmp_path_factory.getbasetemp() / f"fqt-{variant}-{lm_head}-"
                          f"{symmetric}", 4, 32, symmetric, bits)
    folder = exported(variant, "int4", symmetric=symmetric, accuracy_level=1, lm_head=lm_head, share_embeddings=share)
    assert rel_error(Graph(folder).full(TOKENS), reference_logits(variant, fake)) <= QUANT_TOLERANCE
    model = onnx.load(folder / MODEL_FILE, load_external_data=False)
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMulNBits")
    assert (gather.input[0] == head.input[1]) == (share and variant != "llama")    # llama has its own lm_head


def test_accuracy_level_4_stays_close(exported, reference_logits):
    """CPU default: int8 activations inside MatMulNBits. Close to level 1, not bit-equal."""
    exact = Graph(exported("qwen3", "int4", accuracy_level=1)).full(TOKENS)
    fast = Graph(exported("qwen3", "int4")).full(TOKENS)
    assert 0 < rel_error(fast, exact) <= 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_standard_ops_quantized_graph(bits, exported, reference_logits, tiny_checkpoint, tmp_path_factory):
    """Providers without MatMulNBits: blocked DequantizeLinear (uint4/uint8, opset 21) before each MatMul."""
    fake = fake_quantized(tiny_checkpoint("qwen3"), tmp_path_factory.getbasetemp() / f"fqs-{bits}", bits, 32, True,
                          None)
    folder = exported("qwen3", f"int{bits}", provider="qnn", lm_head="float")
    ops = {n.op_type for n in onnx.load(folder / MODEL_FILE, load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    # ORT's CPU provider fuses DequantizeLinear + MatMul into MatMulNBits with int8 activations by default
    exact = Graph(folder, **{"session.qdq_matmulnbits_accuracy_level": "1"})
    assert rel_error(exact.full(TOKENS), reference_logits("qwen3", fake)) <= QUANT_TOLERANCE


def test_symmetric_int4_codes_are_llama_cpp_q4_0():
    """Symmetric 4-bit blocks of 32 are Q4_0's: same codes (gguf-py's reference quantizer), scale before f16."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    w[0, :32] = 0.0                                            # an all-zero block
    q = quant.quantize(w, 4, 32, True)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0).reshape(16, 8, 18)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0]
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)            # Q4_0: low nibbles first 16
    assert np.array_equal(quant.unpack(q.packed, 4, 32), codes)
    assert np.array_equal(q.scales.astype(np.float16), scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_scale_search_lowers_the_error(bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((64, 256)) * rng.gamma(1.0, 1.0, (64, 256))).astype(np.float32)   # heavy tails
    err = {m: ((quant.dequantize(quant.quantize(w, bits, 32, True, m), bits, 32, 256) - w) ** 2).sum(axis=1)
           for m in quant.METHODS}
    assert (err["mse"] <= err["rtn"] * (1 + 1e-6)).all() and err["mse"].sum() < 0.95 * err["rtn"].sum()


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_matmulnbits_node_layout(bits, symmetric):
    """One MatMulNBits node, K not a multiple of the block: ORT computes x @ dequantize(q)^T."""
    rng = np.random.default_rng(bits)
    n, k, block = 24, 80, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = quant.quantize(w, bits, block, symmetric)
    inits = [onnx.numpy_helper.from_array(q.packed, "B"), onnx.numpy_helper.from_array(q.scales.reshape(-1), "S")]
    inputs = ["A", "B", "S"]
    if not symmetric:
        inits.append(onnx.numpy_helper.from_array(q.zero_points.reshape(-1), "Z"))
        inputs.append("Z")
    node = onnx.helper.make_node("MatMulNBits", inputs, ["Y"], domain=graph.MS_DOMAIN, K=k, N=n, bits=bits,
                                 block_size=block, accuracy_level=1)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, k])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits),
        opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid(graph.MS_DOMAIN, 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]
    np.testing.assert_allclose(y, x @ quant.dequantize(q, bits, block, k).T, rtol=1e-5, atol=1e-5)
    assert np.array_equal(quant.unpack(quant.pack(np.arange(16, dtype=np.uint8) % 16, 4), 4, 16),
                          np.arange(16) % 16)


# ------------------------------------------------------------------------------ the folder

def test_folder_layout_and_io_names(exported, tiny_checkpoint):
    folder = exported("gemma3_text")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MODEL_FILE, DATA_FILE, files.GENAI_CONFIG, files.VOCAB_GGUF, "tokenizer.json", "tokenizer.model",
         "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"])
    model = onnx.load(folder / MODEL_FILE, load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:2] == ["input_ids", "attention_mask"] and outputs[0] == "logits"
    assert inputs[2:14] == [f"past_key_values.{i}.{kv}" for i in range(6) for kv in ("key", "value")]
    assert outputs[1:] == [f"present.{i}.{kv}" for i in range(6) for kv in ("key", "value")]
    past = model.graph.input[2].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in past] == ["batch_size", 1, "past_sequence_length", 32]
    assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {("ai.onnx", 21), ("com.microsoft", 1)}
    # every weight lives in the one data file; big tensors start on 64 KiB boundaries (ORT maps them)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {DATA_FILE}
    assert all(len(t.raw_data) <= 64 or t.name == decoder.LOGITS_TO_KEEP for t in inline)
    for t in external:
        meta = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        assert meta["offset"] % (graph.ALIGN_LARGE if meta["length"] >= graph.LARGE_TENSOR else graph.ALIGN_SMALL) == 0
    assert max(int(e.value) + 0 for t in external for e in t.external_data if e.key == "offset") < \
        (folder / DATA_FILE).stat().st_size
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgellm.provider"] == "cpu" and meta["edgellm.type"] == "fp32"


def test_genai_config(exported, tiny_checkpoint):
    config = json.loads((exported("qwen2") / files.GENAI_CONFIG).read_text())
    model, search = config["model"], config["search"]
    generation = json.loads((tiny_checkpoint("qwen2") / "generation_config.json").read_text())
    assert model["type"] == "qwen2" and model["eos_token_id"] == generation["eos_token_id"]
    hf = json.loads((tiny_checkpoint("qwen2") / "config.json").read_text())
    assert model["vocab_size"] == hf["vocab_size"] and model["context_length"] == hf["max_position_embeddings"]
    dec = model["decoder"]
    assert (dec["head_size"], dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"],
            dec["num_hidden_layers"]) == (16, 64, 4, 2, 2)
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"]["present_key_names"] == "present.%d.key"
    assert search["past_present_share_buffer"] is True and search["top_k"] == generation["top_k"]
    assert json.loads((exported("qwen2", provider="openvino") / files.GENAI_CONFIG).read_text())["search"][
        "past_present_share_buffer"] is False
    gemma = json.loads((exported("gemma3") / files.GENAI_CONFIG).read_text())["model"]
    assert gemma["type"] == "gemma3_text"      # the multimodal wrapper is exported text-only


def test_context_length_bounds_the_rope_cache(exported):
    folder = exported("llama", context_length=256)
    assert json.loads((folder / files.GENAI_CONFIG).read_text())["model"]["context_length"] == 256
    model = onnx.load(folder / MODEL_FILE, load_external_data=False)
    cos = next(t for t in model.graph.initializer if t.name == "cos_cache")
    assert list(cos.dims) == [256, 8]


def test_vocab_gguf_has_the_vocabulary_and_template(exported, tiny_checkpoint):
    reader = gguf.GGUFReader(exported("phi3") / files.VOCAB_GGUF)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert len(reader.tensors) == 0 and fields["general.architecture"] == "phi3"
    config = json.loads((tiny_checkpoint("phi3") / "tokenizer_config.json").read_text())
    assert fields["tokenizer.chat_template"] == config["chat_template"]
    assert len(fields["tokenizer.ggml.tokens"]) == json.loads((tiny_checkpoint("phi3") / "config.json").read_text())[
        "vocab_size"]


# ------------------------------------------------------------------------------ options and failures

def test_options_table():
    assert set(PRECISIONS) == {"fp32", "fp16", "int8", "int4"}
    assert resolve("F16", "cpu", trained_context=100).precision.name == "fp16"      # llama.cpp's spelling
    cpu = resolve("int4", "cpu", trained_context=100)
    assert (cpu.io_dtype, cpu.accuracy_level, cpu.lm_head_bits, cpu.embed_bits) == ("float32", 4, 8, 8)
    cuda = resolve("int4", "CUDAExecutionProvider", trained_context=100)
    assert (cuda.io_dtype, cuda.accuracy_level, cuda.provider.name) == ("float16", 0, "cuda")
    assert resolve("int8", "onnxruntime-openvino", trained_context=100).embed_bits is None
    assert any("slow" in n for n in resolve("fp16", "cpu", trained_context=100).notes)
    assert resolve("int4", "cuda", accuracy_level=4, trained_context=100).accuracy_level == 0   # noted fallback


@pytest.mark.parametrize("kwargs,error", [
    ({"type": "q4_k_m"}, UnknownQuantTypeError), ({"provider": "tpu"}, UnknownQuantTypeError),
    ({"type": "int4", "block_size": 48}, UsageError), ({"type": "int4", "accuracy_level": 7}, UsageError),
    ({"type": "fp32", "lm_head": "int8"}, UsageError), ({"type": "int4", "lm_head": "int2"}, UsageError),
])
def test_bad_options(kwargs, error, tiny_checkpoint, tmp_path):
    with pytest.raises(error):
        convert_onnx(tiny_checkpoint("llama"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_folder_with_other_files_and_replaces_an_export(tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError):
        convert_onnx(tiny_checkpoint("llama"), other)
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    first = convert_onnx(tiny_checkpoint("llama"), out, "fp32")
    second = convert_onnx(tiny_checkpoint("llama"), out, "int8")
    assert first.type == "fp32" and second.type == "int8" and second.size_bytes < first.size_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_failure_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ConvertTypeError(type="onnx", problem="boom", hint_text="")
    monkeypatch.setattr(decoder, "build", broken)
    with pytest.raises(ConvertTypeError):
        convert_onnx(tiny_checkpoint("llama"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_fp16_overflow_is_refused(tiny_checkpoint, tmp_path):
    src = tmp_path / "big"
    shutil.copytree(tiny_checkpoint("llama"), src)
    weights = safetensors.SafetensorsFile(src / "model.safetensors")
    tensors = {n: weights.float32(n).copy() for n in weights.names()}
    weights.close()
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    safetensors.write(src / "model.safetensors", tensors)
    with pytest.raises(ConvertTypeError, match="float16 range"):
        convert_onnx(src, tmp_path / "out", "fp16")
    assert not (tmp_path / "out").exists()


def test_result_reports_choices_and_progress(tiny_checkpoint, tmp_path):
    steps = []
    result = convert_onnx(tiny_checkpoint("qwen3"), tmp_path / "out", "int4", progress=lambda *a: steps.append(a))
    data = result.to_dict()
    assert data["format"] == "onnx" and data["choices"]["block_size"] == 32 and data["choices"]["accuracy_level"] == 4
    assert data["op_counts"]["com.microsoft.MatMulNBits"] == 2 * 4 + 1    # qkv, o, gate_up, down; lm_head
    assert data["op_counts"]["com.microsoft.GroupQueryAttention"] == 2
    assert steps[-1][0] == steps[-1][1] and len(steps) == 2 + 2      # embeddings, 2 layers, files
    assert 4 < result.bits_per_weight < 12
