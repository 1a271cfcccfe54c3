"""The files around ``model.onnx``: genai_config.json, the checkpoint's tokenizer files, a vocabulary GGUF.

* ``genai_config.json`` in ONNX Runtime GenAI's format (reference/onnx-and-devices.md 1.6), so the folder
  runs under onnxruntime-genai unchanged.
* The Hugging Face tokenizer files, copied as they are (ORT GenAI reads tokenizer.json and
  tokenizer_config.json).
* ``tokenizer.gguf``: a vocabulary-only GGUF written by the GGUF converter's own vocabulary code. Our
  runtime tokenizes with llama.cpp's tokenizer through it, so an ONNX bundle and a GGUF of the same
  checkpoint produce the same token ids, special tokens and chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import gguf

from edgellm.converters.archs.common import Architecture
from edgellm.converters.checkpoint import Checkpoint
from edgellm.converters.general import general_calls
from edgellm.converters.onnx import decoder
from edgellm.converters.onnx.options import Choices
from edgellm.converters.spec import ModelSpec
from edgellm.converters.tokenizer import TokenizerFiles
from edgellm.converters.writer import write_gguf

GENAI_CONFIG = "genai_config.json"
VOCAB_GGUF = "tokenizer.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")

# our architecture -> ORT GenAI model type (src/models/model_type.h IsLLM). The multimodal gemma3 wrapper is
# exported text-only, which GenAI calls gemma3_text ("gemma3" would make it look for a vision model).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "gemma3": "gemma3_text"}
# generation_config.json key -> genai_config search key
SEARCH_KEYS = {"do_sample": "do_sample", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
               "repetition_penalty": "repetition_penalty"}
SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}


def _token_ids(ckpt: Checkpoint, key: str) -> Any:
    """A token id (or list) from generation_config.json, else config.json (text_config for wrappers)."""
    for source in (ckpt.generation_config, ckpt.config, ckpt.config.get("text_config") or {}):
        if source.get(key) is not None:
            return source[key]
    return None


def genai_config(ckpt: Checkpoint, spec: ModelSpec, ch: Choices, vocab_size: int,
                 model_file: str) -> dict[str, Any]:
    """ORT GenAI's genai_config.json for the exported graph."""
    eos = _token_ids(ckpt, "eos_token_id")
    pad = _token_ids(ckpt, "pad_token_id")
    inputs = {"input_ids": decoder.INPUT_IDS, "attention_mask": decoder.ATTENTION_MASK,
              "past_key_names": decoder.PAST_KEY, "past_value_names": decoder.PAST_VALUE}
    if not ch.provider.fused_rope:
        inputs["position_ids"] = decoder.POSITION_IDS
    provider = [{ch.provider.genai_name: {}}] if ch.provider.genai_name else []
    search = dict(SEARCH_DEFAULTS, max_length=ch.context_length, past_present_share_buffer=ch.provider.gqa)
    search.update({ours: ckpt.generation_config[theirs] for theirs, ours in SEARCH_KEYS.items()
                   if ckpt.generation_config.get(theirs) is not None})
    return {
        "model": {
            "bos_token_id": _token_ids(ckpt, "bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "context_length": ch.context_length,
            "vocab_size": vocab_size,
            "type": GENAI_TYPES[spec.model_type],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider},
                "filename": model_file,
                "head_size": spec.head_dim, "hidden_size": spec.n_embd,
                "num_attention_heads": spec.n_head, "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_head,
                "inputs": inputs,
                "outputs": {"logits": decoder.LOGITS, "present_key_names": decoder.PRESENT_KEY,
                            "present_value_names": decoder.PRESENT_VALUE},
            },
        },
        "search": search,
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def copy_tokenizer(src: Path, dst: Path, context_length: int) -> list[str]:
    """Copy the tokenizer files present in ``src``; tokenizer_config's model_max_length becomes the context
    (as ORT GenAI's builder saves it). Returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            continue
        if name == "tokenizer_config.json":
            config = json.loads((src / name).read_text(encoding="utf-8"))
            config["model_max_length"] = context_length
            write_json(dst / name, config)
        else:
            shutil.copyfile(src / name, dst / name)
        copied.append(name)
    return copied


def write_vocab_gguf(path: Path, ckpt: Checkpoint, arch: Architecture, hp: Mapping[str, Any], spec: ModelSpec,
                     files: TokenizerFiles, n_params: int) -> None:
    """A GGUF with the model's metadata and vocabulary but no tensors (llama.cpp loads it vocab-only)."""
    calls = general_calls(ckpt.path, n_params, ckpt.generation_config)
    calls += arch.metadata(hp, spec, int(gguf.LlamaFileType.ALL_F32))
    calls.append(("add_quantization_version", gguf.GGML_QUANT_VERSION))
    calls += arch.vocab(files, hp, spec)
    write_gguf(path, arch.gguf_name, calls, [], lambda plan: None)
