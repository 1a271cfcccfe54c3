"""Special token ids, add-BOS/EOS flags, merges and the chat template, read the way llama.cpp's converter does.

This mirrors gguf-py's ``SpecialVocab`` (llama.cpp @0c1e57098, gguf-py/gguf/vocab.py): tokenizer.json first
(merges, normalizer flags, post-processor), then tokenizer_config.json (``*_token`` strings resolved through
tokenizer.json's ``added_tokens``, ``add_*_token`` flags, ``chat_template``), then config.json ``*_token_id``.
The first source that names a special token wins. Pure: callers pass the parsed JSON files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# special token type -> GGUFWriter method writing its id; "cls" has no GGUF key (llama.cpp skips it too)
ID_WRITERS = {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
              "sep": "add_sep_token_id", "pad": "add_pad_token_id", "mask": "add_mask_token_id",
              "eot": "add_eot_token_id", "eom": "add_eom_token_id"}
ADD_WRITERS = {"bos": "add_add_bos_token", "eos": "add_add_eos_token", "sep": "add_add_sep_token"}
NORMALIZER_KEYS = {"lowercase": "tokenizer.ggml.normalizer.lowercase",
                   "strip_accents": "tokenizer.ggml.normalizer.strip_accents"}
# merges with spaces inside a token are stored with U+0120-shifted spaces (llama.cpp issue 9692)
SPACE_SHIFT = 256


@dataclass
class SpecialTokens:
    """What ``SpecialVocab.add_to_gguf`` writes, in its order."""

    merges: list[str] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    chat_template: str | list | None = None
    normalizer: dict[str, bool] = field(default_factory=dict)

    def calls(self) -> list[tuple]:
        """GGUFWriter calls (method name, *args) that store these values."""
        out: list[tuple] = [("add_token_merges", self.merges)] if self.merges else []
        out += [(ID_WRITERS[t], i) for t, i in self.ids.items() if t in ID_WRITERS]
        out += [(ADD_WRITERS[t], v) for t, v in self.add.items() if t in ADD_WRITERS]
        if self.chat_template is not None:
            out.append(("add_chat_template", self.chat_template))
        out += [("add_bool", NORMALIZER_KEYS[k], v) for k, v in self.normalizer.items()]
        return out


def read_special_tokens(tokenizer_json: dict | None, tokenizer_config: dict | None, config: dict,
                        chat_template_files: dict[str, Any], *, n_vocab: int | None, load_merges: bool,
                        types: tuple[str, ...] = DEFAULT_TYPES) -> SpecialTokens:
    """Collect special tokens from the parsed files (``None`` for a file that is absent).

    ``chat_template_files``: {"jinja": text, "json": parsed, "additional": {name: text}} for the optional
    chat_template.jinja / chat_template.json / additional_chat_templates/*.jinja files.
    ``n_vocab``: ids at or beyond it are ignored (None: no bound, as for BPE vocabularies).
    """
    out = SpecialTokens()
    state = _State(out, list(types), n_vocab)
    tok_config = dict(tokenizer_config) if tokenizer_config else None
    added: list = []
    if tokenizer_json:
        if load_merges:
            out.merges = _merges(tokenizer_json.get("model", {}).get("merges"))
        _normalizer(tokenizer_json.get("normalizer") or {}, out.normalizer)
        added = tokenizer_json.get("added_tokens", [])
        _post_processor(tokenizer_json.get("post_processor"), tok_config, state)
    if tok_config:
        _from_tokenizer_config(tok_config, added, chat_template_files, state)
    for typ in state.types:
        token_id = config.get(f"{typ}_token_id")
        if token_id is None and isinstance(config.get("text_config"), dict):
            token_id = config["text_config"].get(f"{typ}_token_id")
        state.set_id(typ, token_id)
    return out


@dataclass
class _State:
    out: SpecialTokens
    types: list[str]
    n_vocab: int | None

    def set_id(self, typ: str, token_id: Any) -> None:
        # bools are ints in Python; llama.cpp's isinstance(tid, int) lets them through as 0/1 too
        if not isinstance(token_id, int) or typ in self.out.ids:
            return
        if token_id < 0:
            raise ValueError(f"invalid value for special token type {typ}: {token_id}")
        if self.n_vocab is None or token_id < self.n_vocab:
            self.out.ids[typ] = token_id
        else:
            logger.warning("special token %s id %d is outside the vocabulary (%d) - skipped", typ, token_id,
                           self.n_vocab)


def _merges(merges: Any) -> list[str]:
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        # transformers >= 4.45 stores pairs; llama.cpp wants "a b" with spaces inside tokens shifted
        shift = lambda part: "".join(chr(ord(c) + SPACE_SHIFT) if c == " " else c for c in part)  # noqa: E731
        return [" ".join(shift(p) for p in pair) for pair in merges]
    raise ValueError("unknown tokenizer merges format")


def _normalizer(normalizer: dict, out: dict[str, bool]) -> None:
    kind = normalizer.get("type")
    if kind == "Lowercase":
        out["lowercase"] = True
    elif kind == "StripAccents":
        out["strip_accents"] = True
    elif kind == "BertNormalizer":
        for key in ("lowercase", "strip_accents"):
            if key in normalizer:
                out[key] = normalizer[key]
    elif kind == "Sequence":
        for child in normalizer.get("normalizers", []):
            _normalizer(child, out)


def _special_names(tok_config: dict | None) -> dict[str, Any]:
    """bos/cls/eos/sep token strings of tokenizer_config.json, with cls standing in for bos and sep for eos."""
    names = {k: (tok_config or {}).get(f"{k}_token") for k in ("bos", "cls", "eos", "sep")}
    if not names["bos"] and names["cls"] and tok_config:
        tok_config["bos_token"] = names["bos"] = names["cls"]
    if not names["eos"] and names["sep"] and tok_config:
        tok_config["eos_token"] = names["eos"] = names["sep"]
    return names


def _post_processor(post: dict | None, tok_config: dict | None, state: _State) -> None:
    names = _special_names(tok_config)
    if not post:
        return
    for processor in post.get("processors", [post]):
        kind = processor.get("type")
        if kind == "ByteLevel":
            state.out.add.setdefault("bos", False)
            state.out.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            _roberta(processor, tok_config, names, state)
        elif kind == "TemplateProcessing":
            _template(processor, tok_config, names, state)


def _roberta(processor: dict, tok_config: dict | None, names: dict, state: _State) -> None:
    state.out.add.update(bos=True, eos=True, sep=True)
    if not names["cls"] and tok_config:
        tok_config["cls_token"] = names["cls"] = processor.get("cls", [names["bos"]])[0]
    if not names["sep"] and tok_config:
        tok_config["sep_token"] = names["sep"] = processor.get("sep", [names["eos"]])[0]


def _special_id(item: dict) -> Any:
    return item.get("SpecialToken", {}).get("id")


def _template(processor: dict, tok_config: dict | None, names: dict, state: _State) -> None:
    """Crude reading of TemplateProcessing (as llama.cpp does): leading special -> add BOS, trailing -> add EOS."""
    single, pair = processor.get("single", []), processor.get("pair", [])
    first = last = None
    if len(single) > 1:
        if first := _special_id(single[0]):
            _template_first(first, tok_config, names, state)
        if last := _special_id(single[-1]):
            _template_last(last, tok_config, names, state)
    if pair:
        _template_pair(pair, first, last, tok_config, names, state)


def _template_first(first: str, tok_config: dict | None, names: dict, state: _State) -> None:
    if not tok_config:
        names["bos"] = first
    elif first not in (names["bos"], names["cls"]):
        if not names["bos"]:
            tok_config["bos_token"] = names["bos"] = first
        if not names["cls"]:
            tok_config["cls_token"] = names["cls"] = first
    state.out.add["bos"] = first in (names["bos"], names["cls"])


def _template_last(last: str, tok_config: dict | None, names: dict, state: _State) -> None:
    if not tok_config:
        names["eos"] = last
    elif last != names["eos"]:
        # the template ends in another token: keep the old EOS as EOT (or EOM), the trailing one becomes EOS
        for extra in ("eot", "eom"):
            if extra not in state.types:
                state.types.append(extra)
                tok_config[f"{extra}_token"] = names["eos"]
                break
        tok_config["eos_token"] = names["eos"] = last
    state.out.add["eos"] = last == names["eos"]


def _template_pair(pair: list, first: Any, last: Any, tok_config: dict | None, names: dict, state: _State) -> None:
    start = 1 if first and _special_id(pair[0]) == first else 0
    stop = -1 if last and _special_id(pair[-1]) == last else None
    pair = pair[start:stop]
    if not pair:
        return
    seq_a, seq_b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
    middle = pair[1:-1]
    if seq_a != "A" or seq_b != "B" or not middle:
        return
    separators = (names["sep"], names["eos"])
    is_separator = lambda item: bool(_special_id(item)) and _special_id(item) in separators  # noqa: E731
    add_sep = is_separator(middle[0]) and not last
    if len(middle) == 2 and is_separator(middle[1]):
        add_sep = True
    state.out.add["sep"] = add_sep
    if add_sep and not names["sep"] and tok_config:
        tok_config["sep_token"] = names["eos"]


def _from_tokenizer_config(tok_config: dict, added: list, templates: dict[str, Any], state: _State) -> None:
    template = tok_config.get("chat_template", _alt_chat_template(templates))
    if template is None or isinstance(template, (str, list)):
        state.out.chat_template = template
    else:
        logger.warning("ignoring chat_template of unexpected type %s", type(template).__name__)
    for typ in list(state.types):
        flag = tok_config.get(f"add_{typ}_token")
        if isinstance(flag, bool):
            state.out.add.setdefault(typ, flag)   # the post-processor's answer wins, as in llama.cpp
        content = _token_content(tok_config.get(f"{typ}_token"))
        if content is not None:
            token_id = next((t.get("id") for t in added if t.get("content") == content), None)
            state.set_id(typ, token_id)


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _alt_chat_template(templates: dict[str, Any]) -> str | list | None:
    """chat_template.jinja (plus additional_chat_templates/) or chat_template.json, when tokenizer_config has none."""
    if templates.get("jinja") is not None:
        if templates.get("additional"):
            return [{"name": "default", "template": templates["jinja"]}] + [
                {"name": name, "template": text} for name, text in templates["additional"].items()]
        return templates["jinja"]
    if isinstance(templates.get("json"), dict):
        return templates["json"].get("chat_template")
    return None
