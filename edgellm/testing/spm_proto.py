"""Build a SentencePiece BPE ``tokenizer.model`` from the vocabulary arrays a GGUF file carries.

A GGUF made from a SentencePiece model (``tokenizer.ggml.model == "llama"``) keeps the pieces, their
scores and their types, but not the normalizer or trainer settings: those are the caller's to state.
For Gemma 3 they are: BPE with byte fallback, no dummy prefix, no normalization, spaces escaped as U+2581.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

VISIBLE_SPACE = "\u2581"      # SentencePiece's escaped space "▁"
_Type = spm_pb2.ModelProto.SentencePiece.Type

# GGUF token type (llama_token_type) -> SentencePiece piece type. llama.cpp copied SentencePiece's numbering;
# 0 (undefined) has no SentencePiece counterpart and is read as a normal piece.
GGUF_TO_SPM_TYPE = {
    0: _Type.NORMAL,
    1: _Type.NORMAL,
    2: _Type.UNKNOWN,
    3: _Type.CONTROL,
    4: _Type.USER_DEFINED,
    5: _Type.UNUSED,
    6: _Type.BYTE,
}


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special pieces, as ``tokenizer.ggml.*_token_id`` names them."""

    unk: int
    bos: int
    eos: int
    pad: int


def piece_type(gguf_type: int, token_id: int, special: SpecialIds) -> int:
    """SentencePiece type of one piece.

    SentencePiece needs exactly one UNKNOWN piece, at ``special.unk``; GGUF files often mark ``<unk>``
    CONTROL, and any other piece marked unknown would be a second one, so it becomes CONTROL.
    """
    if token_id == special.unk:
        return _Type.UNKNOWN
    spm_type = GGUF_TO_SPM_TYPE[gguf_type]
    return _Type.CONTROL if spm_type == _Type.UNKNOWN else spm_type


def escape_piece(piece: str, spm_type: int) -> str:
    """The piece as SentencePiece stores it: spaces written as U+2581.

    SentencePiece escapes spaces in the input before matching, so a user-defined piece of raw spaces
    ("  ") would never match and runs of spaces would tokenize differently from llama.cpp.
    """
    return piece if spm_type == _Type.CONTROL else piece.replace(" ", VISIBLE_SPACE)


def build_model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                      special: SpecialIds) -> bytes:
    """Serialized ``ModelProto`` of a byte-fallback BPE model over ``pieces`` (ids are list positions).

    ``types`` are GGUF token types. Returns the bytes of ``tokenizer.model``.
    """
    proto = spm_pb2.ModelProto()
    for token_id, (piece, score, gguf_type) in enumerate(zip(pieces, scores, types, strict=True)):
        spm_type = piece_type(int(gguf_type), token_id, special)
        proto.pieces.add(piece=escape_piece(piece, spm_type), score=float(score), type=spm_type)
    _fill_trainer_spec(proto.trainer_spec, pieces, special)
    _fill_normalizer_spec(proto.normalizer_spec)
    return proto.SerializeToString()


def _fill_trainer_spec(spec, pieces: Sequence[str], special: SpecialIds) -> None:
    # Only the model type, byte fallback and special ids matter when encoding; the rest is training-only.
    spec.model_type = spm_pb2.TrainerSpec.ModelType.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = special.unk, special.bos, special.eos, special.pad
    spec.unk_piece, spec.bos_piece = pieces[special.unk], pieces[special.bos]
    spec.eos_piece, spec.pad_piece = pieces[special.eos], pieces[special.pad]


def _fill_normalizer_spec(spec) -> None:
    # Identity normalizer with an empty charsmap: the text goes in unchanged apart from escaped spaces.
    spec.name = "identity"
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    spec.escape_whitespaces = True
