"""Early exit on the ONNX backend (issue 7): the decoder graph cut at a layer runs exactly as the whole graph,
lower-half states computed while drafting are reused by verification, the fill graph writes the upper
layers' cache from the exit state, the self-draft keeps greedy output equal to plain decoding, and the
confidence exit and calibration work on an ONNX bundle. Tiny random models; ``gemma`` tests the real 270M."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellm import bundle as bundles
from edgellm.converters.onnx import convert_onnx
from edgellm.converters.onnx.split import boundary, cut, head_weights
from edgellm.early_exit import onnx_exit
from edgellm.early_exit.attach import MANIFEST_KEY
from edgellm.early_exit.calibrate import HEAD_FILE, calibrate, decode_speed, windows_of
from edgellm.early_exit.heads import rank_vocab, rms_norm, save_head
from edgellm.runtime import Runtime
from edgellm.runtime.onnx import OnnxBackend

THREADS = 1
IDS = [1, 5, 9, 17, 33, 2, 60, 7]
PROMPTS = ("one two three four five six", "the cat sat on the mat and the cat", "abc abc abc abc")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(variant) -> an fp32 CPU ONNX folder (GroupQueryAttention), built once per module."""
    cache: dict = {}

    def build(variant: str) -> Path:
        if variant not in cache:
            out = tmp_path_factory.mktemp("ee-onnx") / variant
            convert_onnx(tiny_checkpoint(variant), out, "fp32", provider="cpu")
            cache[variant] = out
        return cache[variant]
    return build


def _bundle(folder: Path, section: dict | None = None, head=None) -> Path:
    files = [bundles.describe_file(folder, p.name, role="model" if p.name == "model.onnx" else "support")
             for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (bundles.MANIFEST_NAME, HEAD_FILE)]
    extra = {}
    if head is not None:
        save_head(folder / HEAD_FILE, head)
        files.append(bundles.describe_file(folder, HEAD_FILE, role="early_exit_head"))
    if section is not None:
        extra[MANIFEST_KEY] = {**section, "head": HEAD_FILE} if head is not None else section
    bundles.write_manifest(folder, bundles.Manifest(model="model.onnx", files=tuple(files), extra=extra))
    return folder


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_split_graph_equals_the_whole_graph(variant, exported):
    backend = OnnxBackend.load(exported(variant), n_ctx=64, n_threads=THREADS)
    try:
        whole = [backend.decode(IDS[:5], "all")] + [backend.decode([t]) for t in IDS[5:]]
        for layer in range(1, backend.n_layers + 1):
            backend.split(layer)
            halves = [backend.decode(IDS[:5], "all")] + [backend.decode([t]) for t in IDS[5:]]
            assert all(np.array_equal(a, b) for a, b in zip(whole, halves)), layer
            assert backend.decode(IDS[:2], []).shape == (0, backend.n_vocab)     # no logits asked: no rows
            backend.truncate(0)
        backend.split(None)
        assert np.array_equal(backend.decode(IDS[:5], "all"), whole[0])
    finally:
        backend.close()


def test_the_parts_share_the_weights_file_and_partition_the_cache(exported):
    folder = exported("llama")
    proto = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
    parts = cut(proto, 1, 2, 64)
    lower_out = {o.name for o in parts.lower.graph.output}
    middle_in = {i.name for i in parts.middle.graph.input}
    middle_out = {o.name for o in parts.middle.graph.output}
    head_in = {i.name for i in parts.head.graph.input}
    assert {"present.0.key", *boundary(1)} <= lower_out and "present.1.key" not in lower_out
    assert {"past_key_values.1.key", *boundary(1)} <= middle_in and "input_ids" not in middle_in
    assert {"present.1.key", *boundary(2)} <= middle_out and "logits" not in middle_out
    assert set(boundary(2)) <= head_in and not any(n.startswith("past") for n in head_in)
    external = {e.value for part in (parts.lower, parts.middle, parts.head) for t in part.graph.initializer
                for e in t.external_data if e.key == "location"}
    assert external == {"model.onnx.data"}
    whole = cut(proto, 2, 2, 64)                 # at the final norm: no middle, the lower part runs every layer
    assert whole.middle is None and "present.1.key" in {o.name for o in whole.lower.graph.output}
    with pytest.raises(ValueError, match="outside"):
        cut(proto, 3, 2, 64)


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_verification_computes_what_one_token_steps_compute(variant, exported):
    backend = OnnxBackend.load(exported(variant), n_ctx=64, n_threads=THREADS)
    try:
        backend.decode(IDS[:4])
        plain = np.concatenate([backend.decode([t]) for t in IDS[4:]])
        for layer in range(1, backend.n_layers + 1):
            backend.split(layer)
            backend.decode(IDS[:4])
            for t in IDS[4:6]:                   # drafted ahead one at a time: reused
                backend.lower([t])
            rows = backend.verify(IDS[4:])
            assert backend.n_past == len(IDS)
            if backend._split.head_exact:
                assert np.array_equal(rows, plain), layer
            else:                                # a float head: a few ulps, never on the greedy token
                np.testing.assert_allclose(rows, plain, rtol=1e-5, atol=1e-5)
                assert np.array_equal(rows.argmax(1), plain.argmax(1))
    finally:
        backend.close()
    with pytest.raises(ValueError, match="split"):
        backend.verify(IDS[:1])


def test_lower_states_are_reused_and_equal_recomputation(exported):
    backend = OnnxBackend.load(exported("qwen2"), n_ctx=64, n_threads=THREADS)
    try:
        backend.split(1)
        backend.decode(IDS[:4])
        for t in IDS[4:6]:                       # drafting: the lower half alone, one token at a time
            backend.lower([t])
        reused = backend.decode(IDS[4:7], "all")
        assert backend.n_past == 7
        backend.truncate(4)
        for t in IDS[4:6]:
            backend.lower([t])
        backend.lower([99])                      # a wrong guess run ahead is dropped, not used
        assert np.array_equal(backend.decode(IDS[4:7], "all"), reused)
        backend.truncate(4)
        backend.split(None)
        backend.decode(IDS[:4])
        plain = np.concatenate([backend.decode([t]) for t in IDS[4:7]])
        np.testing.assert_allclose(reused, plain, rtol=0, atol=1e-4)   # batched upper half: rounding only
    finally:
        backend.close()


def test_fill_writes_the_cache_the_upper_half_would(exported):
    # cut before the last layer, that layer's input IS the exit state: the filled K/V equal the real ones
    backend = OnnxBackend.load(exported("llama"), n_ctx=64, n_threads=THREADS)
    try:
        backend.decode(IDS[:4])
        plain = np.concatenate([backend.decode([t]) for t in IDS[4:]])
        backend.truncate(0)
        backend.split(backend.n_layers - 1)
        backend.decode(IDS[:4])
        filled = []
        for t in IDS[4:]:
            filled.append(backend.decode([t]))
            backend.lower([t + 1])               # an exit step at the next position, rolled back below
            backend.fill()
            assert backend.n_past == backend._stages[0].n_past
            backend.truncate(backend.n_past - 1)
        np.testing.assert_allclose(np.concatenate(filled), plain, rtol=0, atol=1e-5)
        backend.lower([IDS[0]])
        backend.fill()                           # the cache the next token sees holds the filled entry
        after_fill = backend.decode([IDS[1]])
        backend.truncate(backend.n_past - 2)
        backend.decode([IDS[0]])
        np.testing.assert_allclose(backend.decode([IDS[1]]), after_fill, rtol=0, atol=1e-5)
    finally:
        backend.close()


def test_head_weights_reproduce_the_graphs_logits(exported):
    folder = exported("gemma3_text")
    backend = OnnxBackend.load(folder, n_ctx=64, n_threads=THREADS)
    try:
        backend.split(backend.n_layers)
        logits = backend.decode(IDS, "all")
        backend.truncate(0)
        final = backend.lower(IDS)
    finally:
        backend.close()
    proto = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
    ids = np.arange(logits.shape[1])
    weights = head_weights(proto, folder, ids)
    mine = rms_norm(final, weights.norm_weight, weights.norm_eps) @ weights.rows.T
    if weights.softcap:
        mine = weights.softcap * np.tanh(mine / weights.softcap)
    np.testing.assert_allclose(mine, logits, rtol=0, atol=1e-3 * np.abs(logits).max())


def _drafted(backend, draft, prompts, max_tokens: int, k: int = 4) -> tuple[float, list[list[int]]]:
    """(acceptance, greedy tokens per prompt) generating with ``draft``, which is closed afterwards."""
    try:
        _, accepted, tokens = decode_speed(backend, prompts, max_tokens, draft, k)
    finally:
        draft.close()
    return accepted, tokens


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_self_draft_on_the_split_graph_keeps_greedy_output(variant, exported):
    backend = OnnxBackend.load(exported(variant), n_ctx=256, n_threads=THREADS)
    try:
        tokens = backend.tokenize(" ".join(PROMPTS) * 20, add_special=False)
        ranked = rank_vocab(tokens, backend.n_vocab)
        heads = onnx_exit.fit_heads(backend, windows_of(tokens, 64), ranked,
                                    [(1, backend.n_vocab), (backend.n_layers, backend.n_vocab)], 1e-4)
        _, _, plain = decode_speed(backend, PROMPTS, 24)
        for head in heads:
            accepted, drafted = _drafted(backend, onnx_exit.SplitDraft(backend, head), PROMPTS, 24)
            assert drafted == plain, head.exit_layer
        # the full-depth head over every token is the model's own head: it agrees nearly always
        assert accepted > 0.9
        assert backend.exit_layer is None
    finally:
        backend.close()


def test_confidence_exit_and_calibration_on_an_onnx_bundle(exported, tmp_path):
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(exported("llama"), folder)
    _bundle(folder)
    result = calibrate(folder, exit_layers=(1, 2), vocab_sizes=(64,), ks=(2,), max_tokens=8, n_threads=THREADS)
    assert {m.get("draft") for m in result.measurements if m["mode"] == "lossless"} == {"self", "prompt-lookup"}
    section = bundles.read_manifest(folder).extra[MANIFEST_KEY]
    assert section["mode"] == result.mode and (folder / HEAD_FILE).exists()
    with Runtime.load(folder, n_ctx=128, n_threads=THREADS, early_exit="lossless") as rt:
        assert rt.info.early_exit == "lossless"
        rt.generate("one two", max_tokens=6)
    # a head below full depth: the exit skips the upper layer, whose cache the fill graph writes
    with Runtime.load(folder, n_ctx=128, n_threads=THREADS) as rt:
        tokens = rt.backend.tokenize(" ".join(PROMPTS) * 20, add_special=False)
        head = onnx_exit.fit_heads(rt.backend, windows_of(tokens, 64), rank_vocab(tokens, rt.backend.n_vocab),
                                   [(1, 64)], 1e-4)[0]
    _bundle(folder, {"mode": "confidence", "threshold": 0.01}, head)
    with Runtime.load(folder, n_ctx=128, n_threads=THREADS) as rt:
        assert rt.info.early_exit == "confidence:0.01" and "filled from the exit state" in rt.info.early_exit_note
        rt.generate("one two three", max_tokens=10)
        counters = rt.backend.counters
        assert counters.exits > 0 and counters.steps >= counters.exits
    with Runtime.load(folder, n_ctx=128, n_threads=THREADS, early_exit="off") as rt:
        plain = rt.generate("one two three", max_tokens=10).tokens
    with Runtime.load(folder, n_ctx=128, n_threads=THREADS, early_exit="confidence:1") as rt:
        assert rt.generate("one two three", max_tokens=10).tokens == plain     # a margin of 1 is never reached
        assert rt.backend.counters.exits == 0 and rt.backend.counters.steps > 0


GEMMA_PROMPTS = ("The capital of France is", "def add(a, b):\n    return", "List three colours: red,",
                 "Water boils at a temperature of", "Once upon a time", "The three laws of motion are",
                 "1, 1, 2, 3, 5, 8,", "Dear hiring manager,")


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_int4_drafts_keep_plain_greedy_output_token_for_token(gemma_checkpoint, tmp_path):
    """Gemma 3 270M int4: verification runs the blocks one token at a time and the 262k-row int8 head (whose
    batched kernel rounds differently from its one-row kernel) computes near ties again alone, so every draft,
    below full depth too, keeps plain greedy output exactly."""
    from edgellm.converters.imatrix import default_calibration_text

    convert_onnx(gemma_checkpoint, tmp_path / "int4", "int4")
    backend = OnnxBackend.load(tmp_path / "int4", n_ctx=512, n_threads=2)
    try:
        tokens = backend.tokenize(default_calibration_text(), add_special=False)
        ranked = rank_vocab(tokens, backend.n_vocab, [backend.special.eos, backend.special.eot])
        heads = onnx_exit.fit_heads(backend, windows_of(tokens[:2048]), ranked, [(12, 4096), (18, 4096)], 1e-4)
        _, _, plain = decode_speed(backend, GEMMA_PROMPTS, 40)
        drafts = [lambda h=h: onnx_exit.SplitDraft(backend, h) for h in heads]
        drafts.append(lambda: onnx_exit.SplitLookup(backend))
        for make in drafts:
            draft = make()
            assert not draft.backend._split.head_exact      # the near-tie path is the one exercised
            label = (draft.name, backend.exit_layer)        # the cut is undone when the draft closes
            accepted, got = _drafted(backend, draft, GEMMA_PROMPTS, 40)
            assert got == plain, label
            assert accepted > 0.1
    finally:
        backend.close()
