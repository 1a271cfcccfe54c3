"""Early exit (issue 7): exit heads, draft sources, the draft-and-verify loop, the confidence exit and
calibration. Fast tests use a scripted backend and tiny random models; ``gemma`` ones the real 270M."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgellm import bundle as bundles
from edgellm.early_exit import parse_mode
from edgellm.early_exit.attach import MANIFEST_KEY
from edgellm.early_exit.calibrate import HEAD_FILE, calibrate, choose, fit_head
from edgellm.early_exit.draft import PromptLookup
from edgellm.early_exit.heads import (ExitHead, fit_affine, load_head, probability_margin, rank_vocab,
                                      reduced_head, save_head)
from edgellm.early_exit.speculative import DraftCounters, accept_or_resample, speculative_tokens
from edgellm.errors import BundleError, SettingsError
from edgellm.runtime import GenerationSettings, Runtime
from edgellm.runtime.base import SpecialTokens, near_ties, output_indices
from edgellm.runtime.generate import collect, run

THREADS = 1


# ------------------------------------------------------------------------------------------ pure parts

def test_modes_parse_and_refuse_bad_values():
    assert str(parse_mode("off")) == "off" and not parse_mode("off").on
    assert parse_mode("lossless").on
    assert parse_mode("confidence:0.3").threshold == pytest.approx(0.3)
    assert parse_mode("confidence").threshold == pytest.approx(0.5)
    for bad in ("fast", "confidence:2", "confidence:x", "lossless:0.5"):
        with pytest.raises(SettingsError):
            parse_mode(bad)


def test_least_squares_recovers_a_known_affine_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24))
    w, b = rng.normal(size=(24, 16)), rng.normal(size=16)
    got_w, got_b = fit_affine(x, x @ w + b)
    np.testing.assert_allclose(got_w, w, atol=1e-4)
    np.testing.assert_allclose(got_b, b, atol=1e-4)
    ridge_w, _ = fit_affine(x, x @ w + b, ridge=1e-6)
    np.testing.assert_allclose(ridge_w, w, atol=1e-2)


def test_vocab_ranking_puts_first_ids_then_frequent_ones():
    ranked = rank_vocab([5, 5, 5, 2, 2, 7], 10, first=[9])
    assert ranked.tolist()[:4] == [9, 5, 2, 7]
    assert sorted(ranked.tolist()) == list(range(10))
    # a vocabulary without an end-of-turn token passes None: skipped
    assert rank_vocab([5, 5, 5, 2, 2, 7], 10, first=[None, 9]).tolist() == ranked.tolist()


def test_head_round_trips_and_scores_only_its_rows(tmp_path):
    rng = np.random.default_rng(1)
    head = ExitHead(exit_layer=1, n_layers=2, vocab_ids=np.array([3, 0, 7]), rows=rng.normal(size=(3, 4)).astype(np.float32),
                    w=np.eye(4, dtype=np.float32), b=np.zeros(4, np.float32), norm_weight=np.ones(4, np.float32))
    back = load_head(save_head(tmp_path / "h.npz", head))
    h = rng.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(back.logits(h), head.logits(h))
    ids, margin = back.predict(h)
    assert set(ids.tolist()) <= {3, 0, 7} and np.all((margin >= 0) & (margin <= 1))
    assert probability_margin(np.array([[0.0, 0.0]]))[0] == pytest.approx(0.0)


def test_near_ties_are_the_rows_rounding_could_flip():
    rows = np.array([[10.0, 9.9995, 1.0], [10.0, 5.0, 1.0], [-3.0, -3.0, -9.0]], np.float32)
    assert near_ties(rows).tolist() == [0, 2]
    assert near_ties(rows[:0]).size == 0


def test_prompt_lookup_copies_what_followed_the_last_match():
    draft = PromptLookup()
    assert draft.propose([1, 2, 3, 4, 9, 2, 3], 3) == [4, 9, 2]
    assert draft.propose([1, 2, 3], 2) == []


def test_speculative_acceptance_keeps_the_target_distribution():
    rng = np.random.default_rng(1234)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    for q in (np.array([0.1, 0.1, 0.1, 0.2, 0.5]), np.eye(5)[3]):      # a sampled and a deterministic draft
        n = 40000
        kept = np.empty(n, np.int64)
        for i in range(n):
            drafted = int(rng.choice(5, p=q))
            kept[i] = accept_or_resample(p, q, drafted, rng)[1]
        freq = np.bincount(kept, minlength=5) / n
        # three standard errors of a binomial proportion at n draws
        assert np.all(np.abs(freq - p) < 3 * np.sqrt(p * (1 - p) / n)), (freq, p)


# ------------------------------------------------------------------------------------ scripted backend

class FixedBackend:
    """A Backend whose next-token logits depend only on the last token: ``table[last]`` (a Markov chain)."""

    id = "llama.cpp-cpu"
    n_ctx_train = 1024
    chat_template = None
    metadata: dict = {}

    def __init__(self, table: np.ndarray, n_ctx: int = 512) -> None:
        self.table, self.n_ctx, self.n_vocab = table, n_ctx, table.shape[1]
        self.special = SpecialTokens(bos=None, eos=None, eot=None, add_bos=False)
        self.cache: list[int] = []

    @property
    def n_past(self):
        return len(self.cache)

    def token_bytes(self, token):
        return b"x"

    def is_end(self, token):
        return False

    def decode(self, tokens, logits_for="last"):
        wanted = output_indices(len(tokens), logits_for)
        self.cache += list(tokens)
        return self.table[[tokens[i] for i in wanted]].astype(np.float32)

    def truncate(self, n_past):
        del self.cache[n_past:]
        return True


class NoisyDraft:
    """Proposes the chain's greedy continuation, with every third token wrong."""

    name = "noisy"

    def __init__(self, table):
        self.table, self.calls = table, 0

    def propose(self, context, k):
        out, last = [], context[-1]
        for i in range(k):
            self.calls += 1
            last = int(np.argmax(self.table[last])) if self.calls % 3 else (last + 1) % self.table.shape[0]
            out.append(last)
        return out

    def close(self):
        pass


def _generate(backend, prompt, settings, draft=None, k=4):
    backend.truncate(0)
    cached: list[int] = []
    counters = DraftCounters()
    source = {} if draft is None else {"source": lambda *a: speculative_tokens(*a, draft=draft, k=k, counters=counters),
                                       "counters": counters}
    done = collect(run(backend, cached, prompt, settings, **source))
    assert cached == backend.cache              # the loop's record of the KV cache matches the cache
    return done


def test_greedy_speculation_equals_plain_greedy_and_counts_acceptance():
    rng = np.random.default_rng(3)
    backend = FixedBackend(rng.normal(size=(50, 50)))
    settings = GenerationSettings(max_tokens=40, repeat_penalty=1.3)
    plain = _generate(backend, [1, 2, 3], settings)
    for k in (1, 3, 6):
        spec = _generate(backend, [1, 2, 3], settings, NoisyDraft(backend.table), k)
        assert spec.tokens == plain.tokens
        assert 0 < spec.stats.accepted_tokens < spec.stats.drafted_tokens


def test_sampled_speculation_keeps_the_models_distribution():
    p = np.array([0.45, 0.3, 0.15, 0.1])
    backend = FixedBackend(np.tile(np.log(p), (4, 1)))           # every position: the same distribution p
    counts = np.zeros(4)
    n = 4000
    for seed in range(n):
        settings = GenerationSettings(max_tokens=3, temperature=1.0, seed=seed)
        counts[_generate(backend, [0], settings, PromptLookup(max_ngram=1), k=2).tokens[2]] += 1
    freq = counts / n
    assert np.all(np.abs(freq - p) < 3.5 * np.sqrt(p * (1 - p) / n)), (freq, p)


# ------------------------------------------------------------------------------------------ tiny models

@pytest.fixture(scope="module")
def tiny_ggufs(tiny_checkpoint, tmp_path_factory):
    from edgellm import converters

    out = {}
    for variant, kw in (("llama", {}), ("gemma3_text", {"sliding_window": 4})):
        path = tmp_path_factory.mktemp(f"ee-{variant}") / f"{variant}.gguf"
        converters.convert(tiny_checkpoint(variant, **kw), path, "f32")
        out[variant] = path
    return out


def make_bundle(gguf: Path, folder: Path, section: dict | None = None, head: ExitHead | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.gguf"
    if not target.exists():
        target.symlink_to(gguf)
    files = [bundles.describe_file(folder, "model.gguf", role="model")]
    extra = {}
    if head is not None:
        save_head(folder / HEAD_FILE, head)
        files.append(bundles.describe_file(folder, HEAD_FILE, role="early_exit_head"))
    if section is not None:
        extra[MANIFEST_KEY] = section
    bundles.write_manifest(folder, bundles.Manifest(model="model.gguf", files=tuple(files), extra=extra))
    return folder


PROMPTS = ("one two three four five six", "the cat sat on the mat and the cat", "abc abc abc abc")


def _tokens(path, mode, prompts=PROMPTS, max_tokens=24):
    with Runtime.load(path, n_ctx=256, n_threads=THREADS, early_exit=mode) as rt:
        outs = [rt.generate(p, max_tokens=max_tokens) for p in prompts]
        return [o.tokens for o in outs], outs, rt.info


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_tiny_greedy_equals_plain_with_every_draft(variant, tiny_ggufs, tmp_path):
    gguf = tiny_ggufs[variant]
    plain, _, _ = _tokens(gguf, "off")
    # no head: the shared draft over a head ranked on edgellm's calibration text
    bare = make_bundle(gguf, tmp_path / "bare", {"mode": "lossless"})
    tokens, outs, info = _tokens(bare, None)
    assert tokens == plain and info.early_exit == "lossless" and "shared draft" in info.early_exit_note
    assert sum(o.stats.accepted_tokens for o in outs) > 0
    # the calibration's choice of prompt lookup is followed, and the note says so
    lookup = make_bundle(gguf, tmp_path / "lookup", {"mode": "lossless", "draft": "prompt-lookup"})
    tokens, outs, info = _tokens(lookup, None)
    assert tokens == plain and "the calibration chose it" in info.early_exit_note
    assert "one token at a time" in info.early_exit_note            # HeadVerifier, not a batched decode
    # a full-depth reduced head and a head fitted after block 1, both self-drafting through a second context
    with Runtime.load(gguf, n_ctx=256, n_threads=THREADS) as rt:
        backend = rt.backend
        ranked = rank_vocab(backend.tokenize(" ".join(PROMPTS) * 3, add_special=False), backend.n_vocab)
        text = backend.tokenize("the quick brown fox jumps over the lazy dog " * 40, add_special=False)
        n_layers = int(backend.metadata[f"{backend.metadata['general.architecture']}.block_count"])
        heads = [fit_head(backend, gguf, text, ranked, e, 96, n_layers) for e in (n_layers, 1)]
    assert heads[0].full_depth and heads[1].w is not None
    for i, head in enumerate(heads):
        section = {"mode": "lossless", "head": HEAD_FILE, "k": 3, "draft": "self"}
        folder = make_bundle(gguf, tmp_path / f"head{i}", section, head)
        tokens, outs, info = _tokens(folder, None)
        assert tokens == plain, info.early_exit_note
        assert "self-draft" in info.early_exit_note and "one token at a time" in info.early_exit_note
        assert sum(o.stats.drafted_tokens for o in outs) > 0
    # the bundle's full-depth head drives the shared draft unless the calibration chose otherwise
    folder = make_bundle(gguf, tmp_path / "shared", {"mode": "lossless", "head": HEAD_FILE, "k": 5}, heads[0])
    tokens, outs, info = _tokens(folder, None)
    assert tokens == plain and "shared draft" in info.early_exit_note and "the bundle's" in info.early_exit_note


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_shared_draft_verifies_with_the_logits_llama_cpp_computes(variant, tiny_ggufs):
    """The verifier's logits for the states drafting captured equal llama_decode's, bit for bit, one row at a
    time or several at once: the KV entries written while drafting are the ones a plain decode writes."""
    from edgellm.early_exit.attach import default_head
    from edgellm.early_exit.shared import SharedDraft

    with Runtime.load(tiny_ggufs[variant], n_ctx=128, n_threads=THREADS) as rt:
        b = rt.backend
        prompt, steps = b.tokenize("one two three four"), [7, 19, 3, 42, 11, 5]
        b.decode(prompt[:-1])
        want = [b.decode([t])[0] for t in [prompt[-1]] + steps]     # one token at a time, as drafting decodes
        b.truncate(0)
        draft = SharedDraft(b, default_head(b, 64))
        assert draft.verifier.full.n_rows == b.n_vocab and draft.reduced.n_rows == 64
        b.decode(prompt[:-1])
        states = [draft.step(t)[0] for t in [prompt[-1]] + steps]
        assert b.n_past == len(prompt) + len(steps)
        single = np.concatenate([draft.verify_logits(h) for h in states])
        assert np.array_equal(single, np.array(want))
        # several rows at once: the same numbers where ggml's kernels agree (quantized heads); float heads round
        # a few ulps differently, and the draft knows it (near ties are then recomputed one row at a time)
        batch = draft.verify_logits(np.concatenate(states))
        assert draft.verifier.batch_exact == np.array_equal(batch, single)
        np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)
        # the reduced head's rows score exactly as the full head's rows do
        ids = draft.reduced.vocab_ids
        assert np.array_equal(draft.reduced.logits(states[0])[0], single[0, ids])


def test_shared_draft_sampling_and_context_end(tiny_ggufs):
    with Runtime.load(tiny_ggufs["gemma3_text"], n_ctx=40, n_threads=THREADS, early_exit="lossless") as rt:
        assert "shared draft" in rt.info.early_exit_note
        sampled = rt.generate("one two three", max_tokens=12, temperature=0.8, seed=3)
        assert len(sampled.tokens) == 12 and sampled.stats.drafted_tokens > 0
        again = rt.generate("one two three", max_tokens=12, temperature=0.8, seed=3)
        assert again.tokens == sampled.tokens                  # seeded: reproducible
        n_ctx = rt.backend.n_ctx                               # llama.cpp rounds small contexts up
        long = rt.generate("one two three", max_tokens=n_ctx + 50)
        assert long.finish_reason == "length" and len(rt.tokenize("one two three")) + len(long.tokens) <= n_ctx + 1
    with Runtime.load(tiny_ggufs["gemma3_text"], n_ctx=40, n_threads=THREADS, early_exit="off") as rt:
        assert rt.generate("one two three", max_tokens=n_ctx + 50).tokens == long.tokens


def test_truncating_rejected_drafts_matches_recomputation(tiny_ggufs):
    with Runtime.load(tiny_ggufs["gemma3_text"], n_ctx=256, n_threads=THREADS) as rt:
        b = rt.backend
        prompt = b.tokenize("one two three four five six seven")
        b.decode(prompt)
        b.decode([10, 11, 12, 13], "all")            # four draft tokens, three of them rejected
        assert b.truncate(len(prompt) + 1)
        after = b.decode([20, 21], "all")
        b.truncate(0)
        b.decode(prompt)
        fresh = np.concatenate([b.decode([10]), b.decode([20, 21], "all")])[1:]
        np.testing.assert_allclose(after, fresh, rtol=1e-4, atol=1e-3)   # batch-shape rounding only


def test_confidence_mode_exits_and_counts(tiny_ggufs, tmp_path):
    gguf = tiny_ggufs["llama"]
    plain, _, _ = _tokens(gguf, "off")
    with Runtime.load(gguf, n_ctx=256, n_threads=THREADS) as rt:
        n_vocab = rt.backend.n_vocab
    head = reduced_head(gguf, rank_vocab([], n_vocab), n_vocab)   # every row: the exit's token is the full model's
    folder = make_bundle(gguf, tmp_path / "conf", {"mode": "off", "head": HEAD_FILE}, head)
    with Runtime.load(folder, n_ctx=256, n_threads=THREADS, early_exit="confidence:0.01") as rt:
        tokens = [rt.generate(p, max_tokens=24).tokens for p in PROMPTS]
        assert rt.info.early_exit == "confidence:0.01"
        assert rt.backend.counters.exits > 0
    assert tokens == plain
    with pytest.raises(SettingsError):
        Runtime.load(gguf, n_ctx=256, n_threads=THREADS, early_exit="confidence")   # no head: refused


def test_manifest_section_is_strict(tiny_ggufs, tmp_path):
    folder = make_bundle(tiny_ggufs["llama"], tmp_path / "bad", {"mode": "lossless", "speed": 2})
    with pytest.raises(BundleError):
        Runtime.load(folder, n_ctx=64, n_threads=THREADS)


def test_choice_stays_off_below_the_bar_and_says_why():
    rows = [{"mode": "lossless", "draft": "self", "k": 4, "tok_s": 10.5, "acceptance": 0.9, "exit_layer": 2,
             "vocab_size": 64}]
    off = choose(rows, plain_tok_s=10.0)
    assert off.mode == "off" and "below 1.1x" in off.reason and "self k=4" in off.reason
    on = choose(rows, plain_tok_s=9.0)
    assert on.mode == "lossless" and on.k == 4 and on.speedup == pytest.approx(10.5 / 9.0)


def test_calibrate_writes_heads_and_the_manifest(tiny_ggufs, tmp_path):
    folder = make_bundle(tiny_ggufs["llama"], tmp_path / "cal")
    result = calibrate(folder, vocab_sizes=(64,), ks=(2,), max_tokens=8, n_threads=THREADS)
    manifest = bundles.read_manifest(folder)
    section = manifest.extra[MANIFEST_KEY]
    assert section["mode"] == result.mode and section["reason"] == result.reason
    assert manifest.file(HEAD_FILE) is not None and (folder / HEAD_FILE).exists()
    assert any(m["mode"] == "acceptance" for m in result.measurements)
    with Runtime.load(folder, n_ctx=128, n_threads=THREADS, verify=True) as rt:
        assert rt.info.early_exit == result.mode
        rt.generate("one two", max_tokens=4)


def test_onnx_greedy_equals_plain_with_prompt_lookup(tiny_checkpoint, tmp_path, monkeypatch):
    from edgellm.converters.onnx import convert_onnx
    from edgellm.runtime import core
    from edgellm.runtime import onnx as onnx_backend

    if ".onnx" not in core._LOADERS:
        monkeypatch.setitem(core._LOADERS, ".onnx", onnx_backend.load)
    out = tmp_path / "onnx"
    convert_onnx(tiny_checkpoint("llama"), out, "fp32", provider="cpu")
    plain, _, _ = _tokens(out, "off")
    tokens, outs, info = _tokens(out, "lossless")
    assert tokens == plain and "prompt lookup" in info.early_exit_note and "one token at a time" in info.early_exit_note
    assert sum(o.stats.accepted_tokens for o in outs) > 0


# ------------------------------------------------------------------------------------------ Gemma 3 270M

@pytest.mark.gemma
@pytest.mark.parametrize("draft", ["self", "prompt-lookup"])
def test_gemma_verified_drafts_are_identical_to_plain(gemma_gguf, tmp_path, draft):
    """A sibling context drafting at full depth in its own cache, or prompt lookup: the main context verifies
    through the blocks one token at a time and the output head at once, so greedy output is plain decoding's
    token for token (a batched decode of the guesses is not: llama.cpp's batched kernels round differently)."""
    prompts = ["The capital of France is", "def add(a, b):\n    return", "List three colours: red,",
               "Water boils at a temperature of", "Once upon a time"]
    with Runtime.load(gemma_gguf, n_ctx=512, n_threads=THREADS) as rt:
        ranked = rank_vocab(rt.backend.tokenize(" ".join(prompts) * 2, add_special=False), rt.backend.n_vocab,
                            [rt.backend.special.eos, rt.backend.special.eot])
        plain = [rt.generate(p, max_tokens=20).tokens for p in prompts]
    folder = make_bundle(gemma_gguf, tmp_path / "g", {"mode": "lossless", "head": HEAD_FILE, "k": 3, "draft": draft},
                         reduced_head(gemma_gguf, ranked, 4096))
    tokens, outs, info = _tokens(folder, None, prompts, max_tokens=20)
    assert draft.replace("-", " ") in info.early_exit_note and "one token at a time" in info.early_exit_note
    assert sum(o.stats.accepted_tokens for o in outs) > 0
    assert tokens == plain


GEMMA_PROMPTS = ("The capital of France is", "def add(a, b):\n    return", "List three colours: red,",
                 "Water boils at a temperature of", "Once upon a time", "import numpy as np\n",
                 "The three laws of motion are", "Translate to French: good morning", "SELECT name FROM",
                 "A haiku about the sea:", "1, 1, 2, 3, 5, 8,", "Dear hiring manager,")


@pytest.mark.gemma
@pytest.mark.parametrize("k", [4, 8])
def test_gemma_shared_draft_greedy_is_identical_to_plain(gemma_gguf, k):
    """The shared draft decodes every token one at a time, as plain decoding does, and verifies with the
    model's own output head: its greedy output is plain greedy output, token for token."""
    with Runtime.load(gemma_gguf, n_ctx=512, n_threads=2) as rt:
        plain = [rt.generate(p, max_tokens=40).tokens for p in GEMMA_PROMPTS]
    with Runtime.load(gemma_gguf, n_ctx=512, n_threads=2, early_exit="lossless") as rt:
        assert "shared draft" in rt.info.early_exit_note
        rt.early_exit.k = k
        outs = [rt.generate(p, max_tokens=40) for p in GEMMA_PROMPTS]
    assert [o.tokens for o in outs] == plain
    assert sum(o.stats.accepted_tokens for o in outs) > 0.5 * sum(o.stats.drafted_tokens for o in outs)


def test_cli_calibrates_and_runs_with_the_flag(tiny_ggufs, tmp_path, capsys):
    from edgellm.cli import main

    folder = make_bundle(tiny_ggufs["llama"], tmp_path / "cli")
    assert main(["exit", "calibrate", str(folder), "--vocab-sizes", "64", "-k", "2", "-n", "6", "--threads", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] in ("off", "lossless") and result["reason"]
    assert main(["run", str(folder), "-p", "one two three", "-n", "6", "--threads", "1", "--early-exit", "lossless",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["info"]["early_exit"] == "lossless" and "drafted_tokens" in out["stats"]
    assert main(["run", str(folder), "-p", "x", "--early-exit", "sideways"]) != 0
