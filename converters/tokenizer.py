"""Tokenizer files -> GGUF vocabulary (``tokenizer.ggml.*``), as llama.cpp's converter writes it, without transformers.

Two kinds are supported:

* SentencePiece ``tokenizer.model`` -> ``tokenizer.ggml.model = "llama"``: pieces, scores and token types
  from the ``sentencepiece`` package, then added tokens from added_tokens.json and tokenizer_config.json.
* Byte-level BPE ``tokenizer.json`` -> ``"gpt2"``: tokens, types and merges, plus the pre-tokenizer name.
  llama.cpp names the pre-tokenizer by hashing how transformers tokenizes a test string; we cannot run
  transformers here, so ``PRE_TOKENIZERS`` maps the pre_tokenizer *structure* (split regex + byte-level
  step) to the name llama.cpp gives tokenizers of that structure.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgellm.converters.checkpoint import Checkpoint
from edgellm.converters.special_tokens import SpecialTokens, read_special_tokens
from edgellm.errors import TokenizerError

logger = logging.getLogger(__name__)

T = gguf.TokenType
# SentencePiece piece type -> GGUF token type, as llama.cpp's converter maps them (checks IsUnknown, IsControl,
# IsUnused, IsByte; everything else, user-defined pieces included, is NORMAL)
SPM_TYPES = {2: T.UNKNOWN, 3: T.CONTROL, 5: T.UNUSED, 6: T.BYTE}
UNUSED_SCORE = -10000.0      # score of padding ids the SentencePiece model does not define
ADDED_SCORE = -1000.0        # score llama.cpp gives added (user-defined or control) tokens
SPIECE_SPACE = "\u2581"      # SentencePiece's visible space

_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN35_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+"
              "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# pre_tokenizer fingerprint (see fingerprint()) -> tokenizer.ggml.pre. The regexes are the ones llama.cpp's
# src/llama-vocab.cpp implements for that name (it quotes the tokenizer.json original next to each).
PRE_TOKENIZERS: dict[tuple, str] = {
    (("Split", _LLAMA3_RE), ("ByteLevel", False)): "llama-bpe",      # Llama 3.x
    (("Split", _QWEN2_RE), ("ByteLevel", False)): "qwen2",           # Qwen 1.5 / 2 / 2.5 / 3
    (("Split", _QWEN35_RE), ("ByteLevel", False)): "qwen35",         # Qwen 3.5
    (("ByteLevel", True),): "gpt-2",                                 # GPT-2 regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True)): "starcoder",            # digits split one by one, then GPT-2
}


@dataclass
class TokenizerFiles:
    """The parsed tokenizer files of a checkpoint folder (None / {} when absent)."""

    folder: Path
    config: dict[str, Any]                  # raw config.json (special token ids are read from it as written)
    spm_model: Path | None
    tokenizer_json: dict[str, Any] | None
    tokenizer_config: dict[str, Any] | None
    added_tokens_json: dict[str, int]
    chat_templates: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, ckpt: Checkpoint) -> "TokenizerFiles":
        folder = ckpt.path
        spm = folder / "tokenizer.model"
        extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
        jinja = folder / "chat_template.jinja"
        return cls(folder=folder, config=ckpt.config, spm_model=spm if spm.is_file() else None,
                   tokenizer_json=_json_or_none(folder / "tokenizer.json"),
                   tokenizer_config=ckpt.tokenizer_config if ckpt.has_file("tokenizer_config.json") else None,
                   added_tokens_json=_json_or_none(folder / "added_tokens.json") or {},
                   chat_templates={"jinja": jinja.read_text(encoding="utf-8") if jinja.is_file() else None,
                                   "json": _json_or_none(folder / "chat_template.json"),
                                   "additional": {p.stem: p.read_text(encoding="utf-8") for p in extra}})

    def error(self, problem: str) -> TokenizerError:
        return TokenizerError(path=str(self.folder), problem=problem)


def _json_or_none(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(path=str(path), problem=f"not valid JSON ({exc})") from None


@dataclass
class Vocab:
    """A GGUF vocabulary: what ``tokenizer.ggml.*`` will hold."""

    model: str                      # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str                        # pre-tokenizer name; "default" for SentencePiece
    tokens: list[bytes] | list[str]
    types: list[int]                # gguf.TokenType values
    scores: list[float] | None      # SentencePiece only
    special: SpecialTokens

    def calls(self) -> list[tuple]:
        """GGUFWriter calls (method, *args) in llama.cpp's order."""
        out: list[tuple] = [("add_tokenizer_model", self.model), ("add_tokenizer_pre", self.pre),
                            ("add_token_list", self.tokens)]
        if self.scores is not None:
            out.append(("add_token_scores", self.scores))
        out.append(("add_token_types", self.types))
        return out + self.special.calls()


def does_token_look_special(token: str | bytes) -> bool:
    """llama.cpp's heuristic for added tokens some models forget to mark special (<|...|>, <unused..>, <pad>...)."""
    text = token.decode("utf-8") if isinstance(token, (bytes, bytearray)) else token
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))      # deepseek's fullwidth bars
            or (text.startswith("<unused") and text.endswith(">")))


# ---------------------------------------------------------------- SentencePiece


@dataclass
class SpmTable:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def spm_pieces(files: TokenizerFiles, vocab_size: int | None) -> SpmTable:
    """Pieces of tokenizer.model padded to ``vocab_size`` with ``[PAD{i}]`` (llama.cpp's layout).

    Raises:
        TokenizerError: no tokenizer.model, or it does not parse.
    """
    if files.spm_model is None:
        raise files.error("tokenizer.model is missing")
    from google.protobuf.message import DecodeError
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(files.spm_model))   # validates the model as SentencePiece itself sees it
        proto = spm_pb2.ModelProto.FromString(files.spm_model.read_bytes())
    except (OSError, RuntimeError, DecodeError) as exc:
        raise files.error(f"tokenizer.model does not load ({exc})") from None
    n = vocab_size or len(proto.pieces)
    table = SpmTable([f"[PAD{i}]".encode() for i in range(n)], [UNUSED_SCORE] * n, [T.UNUSED] * n)
    # one pass over the proto's pieces: what IdToPiece/GetScore/Is* return, without 5 calls per piece
    for i, piece in zip(range(n), proto.pieces):
        table.tokens[i], table.scores[i] = piece.piece.encode("utf-8"), piece.score
        table.types[i] = SPM_TYPES.get(piece.type, T.NORMAL)
    if len(proto.pieces) > n:
        logger.warning("tokenizer.model has %d pieces, config vocab_size %d: extra pieces ignored",
                       len(proto.pieces), n)
    return table


def _set_added(table: SpmTable, token_id: int, content: str, kind: int, normalize_spaces: bool = False) -> None:
    """Overwrite a piece with an added token; like llama.cpp, warn only when the content itself differs."""
    if table.types[token_id] != T.UNUSED and table.tokens[token_id] != content.encode("utf-8"):
        logger.warning("replacing token %d: %r -> %r", token_id, table.tokens[token_id].decode("utf-8"), content)
    text = content.replace(SPIECE_SPACE, " ") if normalize_spaces else content
    table.tokens[token_id], table.scores[token_id], table.types[token_id] = text.encode("utf-8"), ADDED_SCORE, kind


def spm_added_tokens(table: SpmTable, files: TokenizerFiles) -> SpmTable:
    """added_tokens.json (user-defined) then tokenizer_config.json added_tokens_decoder (control or user-defined).

    User-defined tokens get SentencePiece's visible space replaced by a real one (llama.cpp expects them
    pre-normalized). Ids beyond the vocabulary are ignored with a warning.
    """
    n = len(table.tokens)
    for text, token_id in files.added_tokens_json.items():
        if token_id < n:
            table.tokens[token_id], table.scores[token_id] = text.encode("utf-8"), ADDED_SCORE
            table.types[token_id] = T.USER_DEFINED
    decoder = (files.tokenizer_config or {}).get("added_tokens_decoder", {})
    for key, data in decoder.items():
        token_id, text = int(key), data["content"]
        if token_id >= n:
            logger.warning("ignoring added token %d %r: beyond the vocabulary (%d)", token_id, text, n)
            continue
        special = bool(data.get("special")) or does_token_look_special(text)
        _set_added(table, token_id, text, T.CONTROL if special else T.USER_DEFINED, normalize_spaces=not special)
    return table


def spm_added_tokens_phi3(table: SpmTable, files: TokenizerFiles) -> SpmTable:
    """Phi-3's variant: added tokens from added_tokens.json, tokenizer_config.json and tokenizer.json, typed
    only by their ``special`` flag (no look-special heuristic, no space normalization)."""
    for text, token_id in files.added_tokens_json.items():
        if token_id < len(table.tokens):
            table.tokens[token_id], table.scores[token_id] = text.encode("utf-8"), ADDED_SCORE
            table.types[token_id] = T.USER_DEFINED
    decoder = (files.tokenizer_config or {}).get("added_tokens_decoder", {})
    entries = [(int(k), v) for k, v in decoder.items()]
    entries += [(int(v["id"]), v) for v in (files.tokenizer_json or {}).get("added_tokens", [])]
    for token_id, data in entries:
        _set_added(table, token_id, data["content"], T.CONTROL if data.get("special") else T.USER_DEFINED)
    return table


def spm_vocab(table: SpmTable, files: TokenizerFiles) -> Vocab:
    """A "llama" (SentencePiece) vocabulary with special tokens bounded by the table's size."""
    special = read_special_tokens(files.tokenizer_json, files.tokenizer_config, files.config, files.chat_templates,
                                  n_vocab=len(table.tokens), load_merges=False)
    return Vocab("llama", "default", table.tokens, table.types, table.scores, special)


# ---------------------------------------------------------------- byte-level BPE


def fingerprint(pre_tokenizer: dict | None) -> tuple:
    """The parts of a tokenizer.json pre_tokenizer that decide how text is split, as a hashable tuple."""
    if not pre_tokenizer:
        return ()
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    out = []
    for step in steps or []:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            out.append(("Split", pattern.get("Regex", pattern.get("String"))))
        elif kind == "ByteLevel":
            out.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("Digits", bool(step.get("individual_digits", False))))
        else:
            out.append((kind,))
    return tuple(out)


def bpe_pre_type(files: TokenizerFiles) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for the tokenizer.json pre-tokenizer.

    Raises:
        TokenizerError: the structure is not one llama.cpp implements (named in the message).
    """
    found = fingerprint((files.tokenizer_json or {}).get("pre_tokenizer"))
    if found in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[found]
    raise files.error(f"BPE pre-tokenizer {found!r} is not one llama.cpp implements; known: "
                      f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}")


def bpe_vocab(files: TokenizerFiles, vocab_size: int | None) -> Vocab:
    """A "gpt2" vocabulary from tokenizer.json: base vocab + added tokens, padded with ``[PAD{i}]``.

    Raises:
        TokenizerError: no tokenizer.json, not a BPE model, ids beyond ``vocab_size``, unknown pre-tokenizer.
    """
    tj = files.tokenizer_json
    if tj is None:
        raise files.error("neither tokenizer.model nor tokenizer.json is present")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise files.error(f"tokenizer.json model type {model.get('type')!r} is not BPE")
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    combined = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}  # transformers' get_vocab()
    n = vocab_size or len(combined)
    if max(combined.values()) >= n:
        raise files.error(f"token id {max(combined.values())} is beyond the model's vocab_size {n}")
    pre = bpe_pre_type(files)
    reverse = {i: tok for tok, i in combined.items()}
    added_by_content = {t["content"]: t for t in added.values()}
    tokens, types = [], []
    for i in range(n):
        token, kind = _bpe_token(i, reverse, added_by_content)
        tokens.append(token)
        types.append(kind)
    special = read_special_tokens(tj, files.tokenizer_config, files.config, files.chat_templates,
                                  n_vocab=None, load_merges=True)
    if not special.merges:
        raise files.error("tokenizer.json has no BPE merges")
    return Vocab("gpt2", pre, tokens, types, None, special)


def _bpe_token(i: int, reverse: dict[int, str], added: dict[str, dict]) -> tuple[str, int]:
    if i not in reverse:
        return f"[PAD{i}]", T.UNUSED
    token = reverse[i]
    if token not in added:
        return token, T.NORMAL
    # llama.cpp round-trips non-normalized added tokens through transformers (encode+decode); for byte-level
    # BPE added tokens that is the identity, so the text is kept as it is.
    if added[token].get("special") or does_token_look_special(token):
        return token, T.CONTROL
    return token.replace(SPIECE_SPACE, " "), T.USER_DEFINED
