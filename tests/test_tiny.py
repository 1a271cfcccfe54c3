"""The tiny checkpoints: files, configs, tensor shapes, dtypes, shards, determinism and tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.safetensors import SafetensorsFile, bf16_to_f32
from edgellm.testing import tiny
from edgellm.testing.tiny import ARCHITECTURES, make_checkpoint

SAMPLES = ["Hello world", "The quick brown fox, 12345 times.", "  two  spaces\nand a newline",
           "naïve café 日本 🙂", "def f(x):\n    return x ** 2"]


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def text_config(directory):
    config = read_json(directory / "config.json")
    return config.get("text_config", config)


def tensors(directory):
    """name -> float32 array of every tensor (shards merged)."""
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for path in files:
        with SafetensorsFile(path) as f:
            for name in f.names():
                out[name] = np.array(f.float32(name))
    return out


def token_count(directory) -> int:
    """Ids the tokenizer files define (sentencepiece pieces or tokenizer.json vocab, plus added tokens)."""
    if not (directory / "tokenizer.model").is_file():
        doc = read_json(directory / "tokenizer.json")
        return len(doc["model"]["vocab"]) + len(doc["added_tokens"])
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    added = read_json(directory / "added_tokens.json") if (directory / "added_tokens.json").is_file() else {}
    return sp.get_piece_size() + len(added)


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_checkpoint_files_and_config(tiny_checkpoint, variant):
    directory = tiny_checkpoint(variant)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors"):
        assert (directory / name).is_file(), name
    assert (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file()
    config = read_json(directory / "config.json")
    assert config["torch_dtype"] == "float32"
    assert config["architectures"][0].endswith(("ForCausalLM", "ForConditionalGeneration"))
    text = text_config(directory)
    assert text["hidden_size"] == 64
    assert text["num_key_value_heads"] < text["num_attention_heads"]        # grouped-query attention
    n_tokens = token_count(directory)
    assert 256 < n_tokens <= text["vocab_size"] < n_tokens + 64               # padded at most to a multiple of 64


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_tensor_shapes_follow_config(tiny_checkpoint, variant):
    directory = tiny_checkpoint(variant)
    text = text_config(directory)
    weights = tensors(directory)
    prefix = "language_model.model." if variant == "gemma3" else "model."
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    q_rows, kv_rows = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    assert weights[prefix + "embed_tokens.weight"].shape == (text["vocab_size"], text["hidden_size"])
    for i in range(text["num_hidden_layers"]):
        layer = f"{prefix}layers.{i}."
        if variant == "phi3":
            assert weights[layer + "self_attn.qkv_proj.weight"].shape == (q_rows + 2 * kv_rows, 64)
            assert weights[layer + "mlp.gate_up_proj.weight"].shape == (2 * text["intermediate_size"], 64)
        else:
            assert weights[layer + "self_attn.q_proj.weight"].shape == (q_rows, 64)
            assert weights[layer + "self_attn.k_proj.weight"].shape == (kv_rows, 64)
        assert weights[layer + "self_attn.o_proj.weight"].shape == (64, q_rows)
    tied = text.get("tie_word_embeddings", True)
    assert any(name.endswith("lm_head.weight") for name in weights) == (not tied)
    assert max(int(n.split(".layers.")[1].split(".")[0]) for n in weights if n.startswith(prefix + "layers.")) \
        == text["num_hidden_layers"] - 1


def test_architecture_specific_tensors(tiny_checkpoint):
    assert "model.layers.0.self_attn.q_proj.bias" in tensors(tiny_checkpoint("qwen2"))
    qwen3 = tensors(tiny_checkpoint("qwen3"))
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].shape == (32,)             # per head
    assert qwen3["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)          # 4 x 32 != hidden 64
    gemma = tensors(tiny_checkpoint("gemma3_text"))
    norms = [n for n in gemma if n.startswith("model.layers.0.") and n.endswith("layernorm.weight")]
    assert len(norms) == 4
    assert abs(float(np.mean(gemma["model.layers.0.input_layernorm.weight"]))) < 0.1   # stored w of (1 + w)
    llama = tensors(tiny_checkpoint("llama"))
    assert abs(float(np.mean(llama["model.layers.0.input_layernorm.weight"])) - 1.0) < 0.1


def test_gemma3_multimodal_layout(tiny_checkpoint):
    directory = tiny_checkpoint("gemma3")
    config = read_json(directory / "config.json")
    assert config["model_type"] == "gemma3" and config["architectures"] == ["Gemma3ForConditionalGeneration"]
    text = config["text_config"]
    assert text["model_type"] == "gemma3_text"
    assert "rope_theta" not in text and "sliding_window_pattern" not in text          # implied, as in the 4B
    assert text["rope_scaling"] == {"factor": 8.0, "rope_type": "linear"}
    names = set(tensors(directory))
    assert "language_model.model.embed_tokens.weight" in names
    assert not any(n.startswith("model.") for n in names)
    assert any(n.startswith("vision_tower.vision_model.") for n in names)
    assert "multi_modal_projector.mm_input_projection_weight" in names
    assert read_json(directory / "added_tokens.json") == {"<image_soft_token>": config["image_token_index"]}


def test_gemma3_text_has_local_and_global_layers(tiny_checkpoint):
    text = text_config(tiny_checkpoint("gemma3_text"))
    assert text["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert text["sliding_window"] < 16 and text["query_pre_attn_scalar"] == text["head_dim"]


def test_llama3_rope_scaling_is_llama3_type(tiny_checkpoint):
    scaling = text_config(tiny_checkpoint("llama3"))["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    assert {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} <= set(scaling)


def test_same_arguments_write_same_bytes(tmp_path):
    a = make_checkpoint("qwen3", tmp_path / "a")
    b = make_checkpoint("qwen3", tmp_path / "b")
    c = make_checkpoint("qwen3", tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("dtype, st_dtype, torch_dtype, rel", [("f16", "F16", "float16", 1e-3),
                                                                ("bf16", "BF16", "bfloat16", 8e-3)])
def test_half_precision_checkpoints(tiny_checkpoint, dtype, st_dtype, torch_dtype, rel):
    base, half = tiny_checkpoint("llama"), tiny_checkpoint("llama", dtype=dtype)
    assert read_json(half / "config.json")["torch_dtype"] == torch_dtype
    with SafetensorsFile(half / "model.safetensors") as f, SafetensorsFile(base / "model.safetensors") as g:
        for name in f.names():
            assert f.infos[name].dtype == st_dtype
            full, narrow = np.array(g.float32(name)), np.array(f.float32(name))   # copies: no views at close
            assert np.all(np.abs(narrow - full) <= rel * np.abs(full) + 1e-6), name


def test_bf16_bits_are_rounded_f32(tiny_checkpoint):
    with SafetensorsFile(tiny_checkpoint("qwen2", dtype="bf16") / "model.safetensors") as f:
        raw = np.array(f.raw("model.norm.weight"))
        assert raw.dtype == np.uint16
        assert np.all(np.abs(bf16_to_f32(raw) - 1.0) < 0.6)       # norms near 1


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_checkpoint_has_index(tiny_checkpoint, shards):
    single, split = tiny_checkpoint("llama3"), tiny_checkpoint("llama3", shards=shards)
    index = read_json(split / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert not (split / "model.safetensors").exists()
    merged, whole = tensors(split), tensors(single)
    assert set(index["weight_map"]) == set(merged) == set(whole)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in merged.values())
    for name, path in index["weight_map"].items():
        with SafetensorsFile(split / path) as f:
            assert name in f
        assert np.array_equal(merged[name], whole[name])


def test_config_overrides_resize_the_model(tiny_checkpoint):
    directory = tiny_checkpoint("gemma3_text", num_hidden_layers=3, sliding_window_pattern=3)
    text = text_config(directory)
    assert text["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert "model.layers.2.mlp.down_proj.weight" in tensors(directory)
    assert "model.layers.3.mlp.down_proj.weight" not in tensors(directory)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(KeyError):
        make_checkpoint("gpt2", tmp_path)
    with pytest.raises(KeyError):
        make_checkpoint("llama", tmp_path, dtype="f8")
    with pytest.raises(ValueError):
        make_checkpoint("llama", tmp_path, shards=0)


@pytest.mark.parametrize("variant", [v for v in ARCHITECTURES if tiny.VARIANTS[v].tokenizer.startswith("spm")])
def test_sentencepiece_tokenizer_round_trips(tiny_checkpoint, variant):
    import sentencepiece as spm
    directory = tiny_checkpoint(variant)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    for text in SAMPLES:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
    emoji = sp.encode("🙂", out_type=str)
    assert any(piece.startswith("<0x") for piece in emoji)                  # byte fallback
    assert sum(sp.id_to_piece(i).startswith("<0x") for i in range(sp.get_piece_size())) == 256
    config, tok = text_config(directory), read_json(directory / "tokenizer_config.json")
    bos = config.get("bos_token_id", 2)                                     # Gemma 3's text_config omits it
    assert sp.id_to_piece(bos) == tok["bos_token"]


@pytest.mark.parametrize("variant", [v for v in ARCHITECTURES if tiny.VARIANTS[v].tokenizer.startswith("spm")])
def test_sentencepiece_checkpoints_ship_an_agreeing_tokenizer_json(tiny_checkpoint, variant):
    """Like real Llama/Mistral/Phi-3/Gemma repos: tokenizer.json beside tokenizer.model, same ids."""
    import sentencepiece as spm
    tokenizers = pytest.importorskip("tokenizers")
    directory = tiny_checkpoint(variant)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    add_bos = read_json(directory / "tokenizer_config.json")["add_bos_token"]
    for text in [*SAMPLES, "a  b   c    d", "trailing  ", "\t\tmixed \t tabs", "the then there"]:
        assert tok.encode(text).ids == [sp.bos_id()] * add_bos + sp.encode(text), text
        assert tok.decode(tok.encode(text).ids) == text
    added = {t["content"]: t["id"] for t in read_json(directory / "tokenizer.json")["added_tokens"]}
    for text, entry in read_json(directory / "tokenizer_config.json")["added_tokens_decoder"].items():
        assert added[entry["content"]] == int(text)


@pytest.mark.parametrize("variant", [v for v in ARCHITECTURES if tiny.VARIANTS[v].tokenizer.startswith("bpe")])
def test_bpe_tokenizer_round_trips(tiny_checkpoint, variant):
    tokenizers = pytest.importorskip("tokenizers")
    directory = tiny_checkpoint(variant)
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in SAMPLES:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    config, tok_config = text_config(directory), read_json(directory / "tokenizer_config.json")
    assert tok.token_to_id(tok_config["eos_token"]) == config["eos_token_id"]
    encoded = tok.encode("Hello").ids
    assert (encoded[0] == config["bos_token_id"]) == tok_config["add_bos_token"]     # Llama 3 prepends BOS


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_chat_template_renders(tiny_checkpoint, variant):
    jinja2 = pytest.importorskip("jinja2")
    tok = read_json(tiny_checkpoint(variant) / "tokenizer_config.json")
    template = jinja2.Environment().from_string(tok["chat_template"])
    text = template.render(messages=[{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                           bos_token=tok.get("bos_token") or "", eos_token=tok["eos_token"])
    assert "Hi there" in text
    specials = {t["content"] for t in tok["added_tokens_decoder"].values()}
    assert any(s in text for s in specials if s not in ("<s>", "<bos>")) or "[INST]" in text


def test_rewriting_a_directory_leaves_no_stale_files(tmp_path):
    make_checkpoint("llama", tmp_path, shards=2)
    make_checkpoint("qwen2", tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "tokenizer.model" not in names and "model.safetensors.index.json" not in names
    assert not any(n.startswith("model-0") for n in names)
    assert read_json(tmp_path / "config.json")["model_type"] == "qwen2"
