"""Mixed-precision candidates: budgets for the converter's allocator, sized by the pure planner, priced by
priors or by a measured loss model, and written by ``build`` within their budget."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgellm import bundle as bundles
from edgellm.fitting import build, fit, mixed
from edgellm.fitting.candidates import FILE_TYPE_LADDER
from edgellm.fitting.facts import facts_from_shape
from edgellm.fitting.planner import CHOSEN, OK, FitOptions, plan
from edgellm.fitting.quality import MixedPriors
from edgellm.fitting.quant import weight_bytes
from edgellm.fitting.tables import builtin_tables
from edgellm.targets import builtin_profiles

from test_fit_plan import GEMMA, LLAMA_8B

TABLES = builtin_tables()


def _mixed_rows(result):
    return [r for r in result.rows if r.candidate.file_type == mixed.MIXED]


def test_gemma_gets_budgets_between_the_stock_types():
    result = plan(GEMMA, builtin_profiles()["raspberry-pi-5-8gb"], FitOptions(context=4096), TABLES)
    rows = _mixed_rows(result)
    stock = sorted(mixed.stock_sizes(GEMMA).values())
    assert rows, "a 16-bit source gets mixed candidates"
    for row in rows:
        cand = row.candidate
        assert cand.label == mixed.label(cand.weights_budget, GEMMA.n_params) == cand.key
        assert stock[0] < cand.weights_budget < stock[-1]
        # the type mix the planner sizes uses the budget (knapsack rounding leaves at most ~1% unused)
        assert 0.98 * cand.weights_budget <= row.memory.weights_bytes <= cand.weights_budget
        assert not row.weights_exact and row.quality.source == "prior"
        assert row.to_dict()["weights_budget_bytes"] == cand.weights_budget
    json.dumps(result.to_dict())


def test_the_prior_credits_the_allocator_against_the_best_stock_type_of_that_size():
    priors = dataclasses.replace(TABLES.quality, mixed=dataclasses.replace(TABLES.quality.mixed, points=()))
    curve = mixed.stock_curve(GEMMA, priors, FILE_TYPE_LADDER)
    budget = mixed.stock_sizes(GEMMA)["Q8_0"] - 1          # Q8_0 does not fit: the best stock type below it does
    kld, note = mixed.mixed_prior(budget, curve, GEMMA.n_params, priors)
    best_kld, best_type = mixed.best_stock(curve, budget)
    assert best_type != "Q8_0" and kld == pytest.approx(priors.mixed.stock_ratio * best_kld)
    assert best_type in note
    # measured points, once in the table, take over within their range
    measured = dataclasses.replace(priors, mixed=MixedPriors(0.75, ((4.0, 0.04), (8.0, 0.004)), GEMMA.n_params))
    kld, note = mixed.mixed_prior(int(6.0 * GEMMA.n_params / 8), curve, GEMMA.n_params, measured)
    assert kld == pytest.approx((0.04 * 0.004) ** 0.5) and "measured" in note
    # above the largest measured point: never worse than that point
    kld, note = mixed.mixed_prior(int(8.4 * GEMMA.n_params / 8), curve, GEMMA.n_params, measured)
    assert kld <= 0.004 and kld <= priors.mixed.stock_ratio * mixed.best_stock(curve, int(8.4 * GEMMA.n_params / 8))[0]


def test_the_largest_affordable_mix_fills_a_tight_device():
    profile = builtin_profiles()["jetson-orin-nano-8gb"]
    result = plan(LLAMA_8B, profile, FitOptions(context=4096), TABLES)
    fitting_stock = [r for r in result.rows if r.verdict in (OK, CHOSEN) and r.candidate.file_type != mixed.MIXED]
    affordable = max((r for r in _mixed_rows(result) if r.fits), key=lambda r: r.candidate.weights_budget)
    assert affordable.memory.total_bytes <= profile.memory.usable
    # no stock type that fits uses as many bytes: the allocator can spend what the recipes leave over
    assert affordable.memory.weights_bytes > max(r.memory.weights_bytes for r in fitting_stock)
    assert profile.memory.usable - affordable.memory.total_bytes < 0.05 * profile.memory.usable


def test_only_16_bit_sources_mix():
    quantized = dataclasses.replace(facts_from_shape(GEMMA.shape, "q4"), source_format="gguf", source_type="Q4_K_M")
    assert not mixed.can_mix(quantized) and mixed.can_mix(GEMMA)
    only_mixed = plan(GEMMA, builtin_profiles()["laptop-x86-8gb"], FitOptions(file_types=("MIXED",)), TABLES)
    assert {r.candidate.file_type for r in only_mixed.rows} == {mixed.MIXED}
    stock_only = plan(GEMMA, builtin_profiles()["laptop-x86-8gb"], FitOptions(file_types=("Q8_0",)), TABLES)
    assert not _mixed_rows(stock_only)


@pytest.fixture(scope="module")
def tiny_mixed_plan(tiny_checkpoint):
    return fit(tiny_checkpoint("llama"), "laptop-x86-8gb", context=1024, file_types=("MIXED",))


@pytest.mark.slow
def test_build_writes_the_allocation_within_its_budget(tiny_mixed_plan, tmp_path):
    cand = tiny_mixed_plan.chosen.candidate
    out = build(tiny_mixed_plan, tmp_path / "bundle")
    data = json.loads((out.path / bundles.MANIFEST_NAME).read_text())
    allocation = data["plan"]["allocation"]
    assert out.weights_bytes <= cand.weights_budget
    assert allocation["file_bytes"] <= allocation["file_budget_bytes"]
    assert allocation["file_bytes"] >= 0.99 * allocation["file_budget_bytes"]     # the allocator's landing
    assert allocation["expected_kld"] > 0 and sum(allocation["types"].values()) > 0
    assert out.model_path.name.endswith(f"-{cand.label.lower().replace('@', '-')}.gguf")
    bundles.verify_files(out.path, bundles.read_manifest(out.path), hashes=True)
    assert sorted(p.name for p in out.path.iterdir()) == sorted(["edgellm.json", "Modelfile", "llama.cpp.txt",
                                                                 out.model_path.name])


@pytest.mark.slow
def test_measure_quality_prices_mixed_budgets_with_the_loss_model(tiny_checkpoint):
    result = fit(tiny_checkpoint("llama"), "laptop-x86-8gb", context=1024, file_types=("MIXED", "Q8_0"),
                 measure_quality=True)
    rows = _mixed_rows(result)
    assert rows and all(r.quality.source == "loss model" and r.weights_exact for r in rows)
    for r in rows:      # exact types of the measured allocation, within the budget
        assert weight_bytes(result.facts.tensors, result.facts.recipes[r.candidate.label]) <= r.candidate.weights_budget
    by_budget = sorted(rows, key=lambda r: r.candidate.weights_budget)
    assert by_budget[0].quality.kld >= by_budget[-1].quality.kld      # fewer bytes never price better
    q8 = next(r for r in result.rows if r.candidate.file_type == "Q8_0")
    assert q8.quality.source == "measured"
