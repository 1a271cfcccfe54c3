"""Tiny tokenizers for the tiny checkpoints: SentencePiece models and byte-level BPE tokenizer.json files.

Both are trained in-process on ``CORPUS`` (no downloads) and are deterministic: the same kind gives the same
bytes. SentencePiece models are trained with sentencepiece's own trainer (BPE with byte fallback, so every
byte has a ``<0xNN>`` piece); like real Llama/Mistral/Phi-3/Gemma repos they also get a tokenizer.json
(BPE + byte fallback, merges read off the pieces) that gives the same ids. The byte-level BPE is trained here by a small greedy merge loop and written as a
``tokenizers`` JSON by hand, so building it needs neither the ``tokenizers`` package nor ``regex``.
Each family's special tokens, normalizer and pre-tokenizer follow the real checkpoints of that family.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field

# A small English/code/number text; the tokenizers learn their merges from it. Non-ASCII characters beyond
# these lines are covered by byte fallback (SentencePiece) or by the 256 byte symbols (byte-level BPE).
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
Edge devices run small language models when the weights fit in memory.
A tiny model has a hidden size of sixty-four and only a few layers.
We convert the checkpoint, quantize the weights and compare the logits.
def forward(tokens, weights):
    return weights @ tokens + 1
for i in range(10): print(i * 2, i ** 3)
In 2024 there were 365 days, 12 months and 52 weeks; in 2025 too.
Hello, world! How are you today? I am fine, thank you.
The cat sat on the mat, and the bird sang in the tree near the house.
Memory bandwidth limits the speed of decoding on a small board.
Attention uses queries, keys and values; the softmax turns scores into weights.
Numbers like 3.14159, 2.71828 and 1.41421 appear in many places.
She said: "Tokenizers split text into pieces, then into ids."
Le café est très bon, naïve façade, über cool.
{"name": "edge", "layers": [1, 2, 3], "ok": true}
"""

SPM_VOCAB = 384        # pieces: 256 byte pieces + specials + characters of CORPUS + merges
BPE_BASE_VOCAB = 320   # 256 byte symbols + 64 merges


@dataclass(frozen=True)
class TokenizerBuild:
    """What a tokenizer builder produced: files to write and the ids the configs must name."""
    files: dict[str, bytes]         # file name -> bytes (tokenizer.model or tokenizer.json)
    size: int                       # number of token ids, added tokens included
    ids: dict[str, int]             # token text -> id, for every special/added token
    added: tuple[tuple[int, str, bool], ...] = field(default=())   # (id, text, special) beyond the base vocab


# ---------------------------------------------------------------- SentencePiece

@dataclass(frozen=True)
class SpmKind:
    """A SentencePiece family: its control pieces (with fixed ids) and normalizer settings."""
    meta: dict[str, tuple[str, int]]        # "unk"/"bos"/"eos"/"pad" -> (piece, id); id -1 means none
    user_defined: tuple[str, ...] = ()      # pieces inside the model, never split (Gemma's turn markers)
    added: tuple[tuple[str, bool], ...] = ()  # (text, special) appended after the model, as HF added tokens
    add_dummy_prefix: bool = True           # Llama: "Hello" is encoded as "▁Hello"; Gemma: no prefix
    add_bos: bool = True                    # the tokenizer.json post-processor prepends BOS (Phi-3: no)


_LLAMA_META = {"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<pad>", -1)}
_GEMMA_META = {"pad": ("<pad>", 0), "eos": ("<eos>", 1), "bos": ("<bos>", 2), "unk": ("<unk>", 3)}
_GEMMA_USER = ("<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")
# Phi-3's chat tokens are added tokens 32000.. after the Llama-2 SentencePiece vocab, all special.
_PHI3_ADDED = tuple((t, True) for t in (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"))

SPM_KINDS: dict[str, SpmKind] = {
    "spm_llama": SpmKind(_LLAMA_META),
    "spm_phi3": SpmKind(_LLAMA_META, added=_PHI3_ADDED, add_bos=False),
    "spm_gemma": SpmKind(_GEMMA_META, user_defined=_GEMMA_USER, add_dummy_prefix=False),
    # Gemma3ForConditionalGeneration: the image placeholder is an added token after the SentencePiece vocab
    "spm_gemma_mm": SpmKind(_GEMMA_META, user_defined=_GEMMA_USER, added=(("<image_soft_token>", True),),
                            add_dummy_prefix=False),
}


def train_sentencepiece(kind: SpmKind) -> bytes:
    """Train a BPE SentencePiece model on CORPUS and return the serialized ModelProto."""
    import sentencepiece as spm

    options = {f"{role}_id": ident for role, (_, ident) in kind.meta.items()}
    options.update({f"{role}_piece": piece for role, (piece, _) in kind.meta.items()})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=buf, model_type="bpe",
        vocab_size=SPM_VOCAB, byte_fallback=True, character_coverage=1.0, num_threads=1,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=kind.add_dummy_prefix, allow_whitespace_only_pieces=True,
        user_defined_symbols=list(kind.user_defined), minloglevel=2, **options)
    return buf.getvalue()


def build_sentencepiece(kind_name: str) -> TokenizerBuild:
    """tokenizer.model for one SentencePiece family, plus the ids of its special and added tokens."""
    import sentencepiece as spm

    kind = SPM_KINDS[kind_name]
    proto = train_sentencepiece(kind)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    base = sp.get_piece_size()
    ids = {piece: ident for piece, ident in kind.meta.values() if ident >= 0}
    ids.update({piece: sp.piece_to_id(piece) for piece in kind.user_defined})
    added = tuple((base + k, text, special) for k, (text, special) in enumerate(kind.added))
    ids.update({text: ident for ident, text, _ in added})
    blob = json.dumps(spm_tokenizer_json(proto, kind, added), ensure_ascii=False, indent=2).encode("utf-8")
    return TokenizerBuild({"tokenizer.model": proto, "tokenizer.json": blob}, base + len(added), ids, added)


# SentencePiece piece types (sentencepiece_model.proto)
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_BYTE = 1, 2, 3, 4, 6


def spm_tokenizer_json(proto: bytes, kind: SpmKind, added: tuple) -> dict:
    """The tokenizer.json that real SentencePiece checkpoints ship beside tokenizer.model (BPE with byte
    fallback; merges read off the pieces, ranked by the merged piece's score as SentencePiece's BPE does)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    pieces = list(model.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == PIECE_NORMAL}
    merges = sorted((-pieces[vocab[p]].score, vocab[p], vocab[p[:k]], vocab[p[k:]], p[:k], p[k:])
                    for p in normal for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    specials = [(i, p.piece) for i, p in enumerate(pieces)
                if p.type in (PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED)]
    added_tokens = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for i, t in specials]
    added_tokens += [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": special} for i, t, special in added]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
                  if kind.add_dummy_prefix else replace)
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if kind.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos_piece, bos_id = kind.meta["bos"]
    post = None
    if kind.add_bos:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_piece, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_piece: {"id": bos_piece, "ids": [bos_id], "tokens": [bos_piece]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": normalizer, "pre_tokenizer": None, "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": kind.meta["unk"][0], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{m[4]} {m[5]}" for m in merges]},
    }


# ---------------------------------------------------------------- byte-level BPE

# Pre-tokenizer regexes as written in the real tokenizer.json files (Llama 3 groups digits by 3, Qwen splits
# every digit). They are only written to the JSON; training below uses a simpler split (see _train_words).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class BpeKind:
    """A byte-level BPE family: pre-tokenizer, normalizer, special tokens and whether BOS is prepended."""
    pattern: str
    specials: tuple[tuple[str, bool], ...]   # (text, special) added after the base vocab, in id order
    nfc: bool = False                         # Qwen normalizes to NFC
    prepend: str | None = None                # Llama 3's post-processor prepends <|begin_of_text|>


_LLAMA3_SPECIALS = tuple((t, True) for t in (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"))
_QWEN_SPECIALS = (("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True))

BPE_KINDS: dict[str, BpeKind] = {
    "bpe_llama3": BpeKind(LLAMA3_PATTERN, _LLAMA3_SPECIALS, prepend="<|begin_of_text|>"),
    "bpe_qwen2": BpeKind(QWEN_PATTERN, _QWEN_SPECIALS, nfc=True),
    # Qwen3 adds the thinking markers as ordinary (non-special) added tokens
    "bpe_qwen3": BpeKind(QWEN_PATTERN, _QWEN_SPECIALS + (("<think>", False), ("</think>", False)), nfc=True),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _train_words(text: str) -> Counter:
    """Word counts for training: a space stays attached to the word after it, as the real regexes do."""
    byte_map = bytes_to_unicode()
    words = re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", text)
    return Counter(tuple(byte_map[b] for b in w.encode("utf-8")) for w in words)


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair)."""
    words = _train_words(text)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_bpe(kind_name: str) -> TokenizerBuild:
    """tokenizer.json for one byte-level BPE family, plus the ids of its special tokens."""
    kind = BPE_KINDS[kind_name]
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = train_bpe(CORPUS, BPE_BASE_VOCAB - len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = tuple((len(vocab) + k, text, special) for k, (text, special) in enumerate(kind.specials))
    doc = _tokenizer_json(kind, vocab, merges, added)
    ids = {text: ident for ident, text, _ in added}
    blob = json.dumps(doc, ensure_ascii=False, indent=2).encode("utf-8")
    return TokenizerBuild({"tokenizer.json": blob}, len(vocab) + len(added), ids, added)


def _tokenizer_json(kind: BpeKind, vocab: dict[str, int], merges: list, added: tuple) -> dict:
    """The tokenizers-library JSON document, laid out like the real Llama 3 / Qwen2 files."""
    added_tokens = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": not special, "special": special} for i, t, special in added]
    post: dict = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if kind.prepend is not None:
        bos_id = next(i for i, t, _ in added if t == kind.prepend)
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": kind.prepend, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": kind.prepend, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": kind.prepend, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {kind.prepend: {"id": kind.prepend, "ids": [bos_id], "tokens": [kind.prepend]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"} if kind.nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": kind.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }


def build(kind_name: str) -> TokenizerBuild:
    """Build the tokenizer of one kind (a key of SPM_KINDS or BPE_KINDS)."""
    return build_sentencepiece(kind_name) if kind_name in SPM_KINDS else build_bpe(kind_name)
