"""The pure planner on every built-in profile, for tiny and Gemma-3-270M-shaped models built without files."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgellm.converters import archs
from edgellm.converters.spec import ModelSpec, hparams
from edgellm.errors import NoFitError, UsageError
from edgellm.fitting import memory, onnx_plan, quant
from edgellm.fitting.candidates import FILE_TYPE_LADDER, SOURCE, contexts, threads
from edgellm.fitting.facts import ModelFacts, TensorFact, facts_from_shape, shape_from_spec
from edgellm.fitting.planner import CHOSEN, OK, TOO_LOSSY, TOO_SLOW, FitOptions, plan
from edgellm.fitting.report import render
from edgellm.fitting.tables import builtin_tables
from edgellm.targets import builtin_profiles, resolve_device
from edgellm.targets.schema import Accelerator

GEMMA_CONFIG = {
    "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768, "sliding_window": 512,
    "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 256,
    "tie_word_embeddings": True,
}
# A Llama-3.1-8B-shaped model: too big for the small boards, the case that exercises every fallback.
LLAMA_8B_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
}
TINY_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
PROFILES = sorted(builtin_profiles())
TABLES = builtin_tables()


def facts_for(config: dict, name: str) -> ModelFacts:
    arch = archs.get(config["model_type"])
    spec = ModelSpec.from_hparams(hparams(config, arch.defaults), arch.name, arch.traits)
    return facts_from_shape(shape_from_spec(spec, arch.gguf_name), name)


GEMMA = facts_for(GEMMA_CONFIG, "gemma-3-270m")
TINY = facts_for(TINY_CONFIG, "tiny-llama")
LLAMA_8B = facts_for(LLAMA_8B_CONFIG, "llama-3.1-8b")


def _need(row):
    return row.memory.host_bytes if row.device_budget_bytes else row.memory.total_bytes


@pytest.mark.parametrize("facts", [TINY, GEMMA], ids=["tiny", "gemma"])
@pytest.mark.parametrize("profile_id", PROFILES)
def test_every_profile_gets_a_plan_that_fits(facts, profile_id):
    profile = builtin_profiles()[profile_id]
    result = plan(facts, profile, FitOptions(), TABLES)
    chosen = result.chosen
    assert chosen.verdict == CHOSEN and chosen in result.rows
    assert _need(chosen) <= profile.memory.usable
    assert chosen.memory.total_bytes > chosen.memory.weights_bytes > 0
    assert chosen.speed.decode_tokens_per_s > 0 and chosen.speed.prefill_tokens_per_s > 0
    assert result.runtime.n_ctx == chosen.candidate.n_ctx >= min(2048, facts.shape.context_length)
    first_of = "onnxruntime" if onnx_plan.prefers_onnx(profile) else "llama.cpp"     # format "auto"
    assert result.backend == next(b for b in profile.backends if b.startswith(first_of))
    for row in result.rows:    # every fitting row really fits; every rejected row says why
        assert (row.verdict in (OK, CHOSEN)) == (row.fits and row.verdict not in (TOO_SLOW, TOO_LOSSY))
        assert row.reason
    json.dumps(result.to_dict())   # the plan is plain data


@pytest.mark.parametrize("profile_id", PROFILES)
def test_a_big_model_fits_or_says_what_would(profile_id):
    profile = builtin_profiles()[profile_id]
    try:
        result = plan(LLAMA_8B, profile, FitOptions(context=4096), TABLES)
    except NoFitError as error:
        text = f"{error} {error.hint}"
        assert "needs" in str(error) and profile_id in str(error)
        assert "smaller model" in error.hint or "--context" in error.hint or "--kv-type" in error.hint
        assert any(ch.isdigit() for ch in error.hint), text
        return
    assert _need(result.chosen) <= profile.memory.usable
    assert result.chosen.candidate.n_ctx == 4096


def test_quality_first_ties_go_to_the_faster():
    profile = builtin_profiles()["laptop-x86-32gb"]
    result = plan(GEMMA, profile, FitOptions(context=4096), TABLES)
    by_type = {r.candidate.file_type: r for r in result.rows}
    # F16 and Q8_0 differ by less than Q8_0's own loss: a tie, and Q8_0 decodes faster
    assert by_type["F16"].verdict == OK and result.chosen.candidate.file_type == "Q8_0"
    assert by_type["Q8_0"].speed.decode_tokens_per_s > by_type["F16"].speed.decode_tokens_per_s
    assert "slower" in by_type["F16"].reason
    assert "lower expected quality" in by_type["Q4_K_M"].reason


def test_min_tokens_per_s_and_max_quality_loss_filter():
    profile = builtin_profiles()["raspberry-pi-5-8gb"]
    free = plan(GEMMA, profile, FitOptions(context=2048), TABLES)
    speeds = sorted(r.speed.decode_tokens_per_s for r in free.rows)
    floor = (speeds[-1] + speeds[-2]) / 2                      # only the fastest candidate qualifies
    fast = plan(GEMMA, profile, FitOptions(context=2048, min_tokens_per_s=floor), TABLES)
    assert fast.chosen.speed.decode_tokens_per_s >= floor
    assert sum(r.verdict == TOO_SLOW for r in fast.rows) == len(fast.rows) - 1
    strict = plan(GEMMA, profile, FitOptions(context=2048, max_quality_loss=0.02), TABLES)
    assert strict.chosen.quality.kld <= 0.02
    assert any(r.verdict == TOO_LOSSY for r in strict.rows)
    with pytest.raises(NoFitError) as info:
        plan(GEMMA, profile, FitOptions(context=2048, min_tokens_per_s=speeds[-1] * 10), TABLES)
    assert "--min-tokens-per-s" in info.value.hint
    with pytest.raises(NoFitError) as info:
        plan(GEMMA, profile, FitOptions(context=2048, max_quality_loss=1e-9), TABLES)
    assert "--max-quality-loss" in info.value.hint


def test_infeasible_request_names_numbers_that_would_fit():
    profile = builtin_profiles()["jetson-orin-nano-4gb"]
    with pytest.raises(NoFitError) as info:
        plan(LLAMA_8B, profile, FitOptions(context=8192), TABLES)
    error = info.value
    assert error.exit_code != 0 and "jetson-orin-nano-4gb" in str(error)
    assert "smaller model: about" in error.hint and "M parameters" in error.hint


def test_context_and_kv_suggestions_are_real():
    # Q2_K at n_ctx 32768 needs about 7.8 GB with an f16 cache and 5.9 GB with q8_0
    profile = builtin_profiles()["laptop-x86-8gb"]
    tight = dataclasses.replace(profile, memory=dataclasses.replace(profile.memory, usable=int(6.5e9)))
    with pytest.raises(NoFitError) as info:
        plan(LLAMA_8B, tight, FitOptions(context=32768, kv_type="f16"), TABLES)
    hint = info.value.hint
    assert "--context" in hint and "--kv-type q8_0" in hint
    n_ctx = int(hint.split("--context ")[1].split()[0])
    assert plan(LLAMA_8B, tight, FitOptions(context=n_ctx), TABLES).chosen.candidate.n_ctx == n_ctx
    fixed = plan(LLAMA_8B, tight, FitOptions(context=32768, kv_type="q8_0"), TABLES)
    assert fixed.chosen.candidate.kv_type == "q8_0"


def test_quantized_kv_is_a_fallback_with_a_note():
    profile = builtin_profiles()["laptop-x86-8gb"]
    tight = dataclasses.replace(profile, memory=dataclasses.replace(profile.memory, usable=int(6.5e9)))
    result = plan(LLAMA_8B, tight, FitOptions(context=32768), TABLES)
    chosen = result.chosen.candidate
    assert chosen.kv_type in ("q8_0", "q4_0")
    assert any("quantized caches were tried" in n for n in result.notes)
    # the cache's own loss is part of the expectation
    assert result.chosen.quality.kld == pytest.approx(TABLES.quality.kld[chosen.file_type]
                                                      + TABLES.quality.kv_kld[chosen.kv_type])


def test_auto_context_is_the_largest_affordable():
    profile = builtin_profiles()["jetson-orin-nano-8gb"]
    # stock types only: a mixed candidate's budget is itself sized to the context (test_fit_mixed.py)
    result = plan(LLAMA_8B, profile, FitOptions(file_types=FILE_TYPE_LADDER), TABLES)
    n_ctx = result.chosen.candidate.n_ctx
    assert n_ctx in contexts(None, LLAMA_8B.shape.context_length)
    bigger = FitOptions(context=n_ctx * 2, file_types=(result.chosen.candidate.file_type,),
                        kv_type=result.chosen.candidate.kv_type)
    with pytest.raises(NoFitError):
        plan(LLAMA_8B, profile, bigger, TABLES)


def test_aliases_resolve_to_the_smallest_member():
    resolved = resolve_device("jetson-orin")
    assert resolved.profile.id == "jetson-orin-nano-8gb" or resolved.profile.memory.usable <= min(
        p.memory.usable for p in builtin_profiles().values() if "jetson-orin" in p.aliases)
    result = plan(GEMMA, resolved.profile, FitOptions(), TABLES, device_request="jetson-orin",
                  device_reason=resolved.reason)
    assert result.to_dict()["device"] == {"id": resolved.profile.id, "requested": "jetson-orin",
                                          "reason": resolved.reason}


def test_discrete_gpu_splits_layers():
    base = builtin_profiles()["laptop-x86-32gb"]
    gpu = Accelerator(kind="gpu", name="test dGPU", api="cuda", memory=3 * 10**9, bandwidth=300e9)
    profile = dataclasses.replace(base, backends=("llama.cpp-cuda", "llama.cpp-cpu"), accelerators=(gpu,),
                                  memory=dataclasses.replace(base.memory, unified=False))
    result = plan(LLAMA_8B, profile, FitOptions(context=4096, file_types=("Q4_K_M",)), TABLES)
    chosen = result.chosen
    assert 0 < chosen.memory.n_gpu_layers < 32
    assert chosen.memory.device_bytes <= 3 * 10**9 < chosen.memory.device_bytes + 2 * 220 * 10**6
    assert 0 < result.runtime.n_gpu_layers < 32 and not result.runtime.mmap
    assert any("layers fit on the GPU" in n for n in result.notes)


def test_gguf_sources_are_only_requantized_downward():
    q4 = quant.approximate_recipe(GEMMA.tensors, GEMMA.shape, "Q4_K_M")    # a Q4_K_M file as llama.cpp writes it
    tensors = tuple(TensorFact(t.name, t.ne, q4[t.name]) for t in GEMMA.tensors)
    facts = dataclasses.replace(GEMMA, source_format="gguf", source_type="Q4_K_M", tensors=tensors)
    result = plan(facts, builtin_profiles()["laptop-x86-16gb"], FitOptions(context=2048), TABLES)
    kinds = [r.candidate.file_type for r in result.rows]
    assert kinds[0] == SOURCE and "Q8_0" not in kinds and "Q4_K_M" not in kinds and "Q3_K_M" in kinds
    assert result.chosen.candidate.file_type == SOURCE         # requantizing only loses quality
    assert any("only downward" in n for n in result.notes)
    q3 = next(r for r in result.rows if r.candidate.file_type == "Q3_K_M")
    assert "requantized from Q4_K_M" in q3.quality.note


def test_measured_quality_beats_priors():
    profile = builtin_profiles()["laptop-x86-16gb"]
    measured = dataclasses.replace(GEMMA, measured_kld={"Q4_K_M": 0.0005, "Q8_0": 0.01})
    result = plan(measured, profile, FitOptions(context=2048), TABLES)
    assert result.chosen.candidate.file_type == "Q4_K_M" and result.chosen.quality.source == "measured"


def test_exact_recipes_are_used_and_flagged():
    profile = builtin_profiles()["laptop-x86-16gb"]
    exact = dict(quant.approximate_recipe(GEMMA.tensors, GEMMA.shape, "Q8_0"))
    exact["blk.0.attn_q.weight"] = "F16"                       # llama.cpp's word beats the rules table
    facts = dataclasses.replace(GEMMA, recipes={"Q8_0": exact})
    result = plan(facts, profile, FitOptions(context=2048, file_types=("Q8_0", "Q6_K")), TABLES)
    rows = {r.candidate.file_type: r for r in result.rows}
    assert rows["Q8_0"].weights_exact and not rows["Q6_K"].weights_exact
    assert rows["Q8_0"].memory.weights_bytes == quant.weight_bytes(GEMMA.tensors, exact)


def test_options_are_checked():
    profile = builtin_profiles()["laptop-x86-16gb"]
    for bad in (FitOptions(context=16), FitOptions(kv_type="q3"),
                FitOptions(min_tokens_per_s=-1)):
        with pytest.raises(UsageError):
            plan(GEMMA, profile, bad, TABLES)


def test_threads_use_the_big_cores():
    phone = builtin_profiles()["snapdragon-8-gen-3-12gb"]
    fastest = max(c.max_clock for c in phone.cpu.clusters)
    big = sum(c.cores for c in phone.cpu.clusters if c.max_clock >= 0.8 * fastest)
    assert threads(phone) == (big, phone.cpu.cores) and big < phone.cpu.cores
    assert threads(builtin_profiles()["raspberry-pi-5-8gb"]) == (4, 4)


def test_speed_is_bandwidth_bound_on_a_pi_and_grows_with_bandwidth():
    pi = plan(GEMMA, builtin_profiles()["raspberry-pi-5-8gb"], FitOptions(context=2048, file_types=("F16",)), TABLES)
    fast = plan(GEMMA, builtin_profiles()["laptop-x86-32gb"], FitOptions(context=2048, file_types=("F16",)), TABLES)
    assert pi.chosen.speed.bound == "bandwidth"
    assert fast.chosen.speed.decode_tokens_per_s > pi.chosen.speed.decode_tokens_per_s
    # bytes over 0.6 of 17 GB/s bound the Pi from above
    assert pi.chosen.speed.decode_tokens_per_s < 0.6 * 17.07e9 / pi.chosen.speed.bytes_per_token


def test_report_marks_the_choice():
    result = plan(GEMMA, builtin_profiles()["raspberry-pi-5-4gb"], FitOptions(), TABLES)
    text = render(result)
    chosen_line = next(line for line in text.splitlines() if line.startswith("* "))
    assert result.chosen.candidate.key in chosen_line and "chosen" in chosen_line
    assert "raspberry-pi-5-4gb" in text and "KLD" in text and memory.MiB
