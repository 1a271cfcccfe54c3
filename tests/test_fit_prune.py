"""--allow-prune: which blocks go (measured), the pruned model's facts (pure), the GGUF without them, a bundle."""

from __future__ import annotations

import dataclasses

import pytest

from edgellm.fitting import build, fit, prune
from edgellm.fitting.planner import FitOptions, plan
from edgellm.fitting.tables import builtin_tables
from edgellm.targets import builtin_profiles

from test_fit_plan import GEMMA, TINY

PROFILE = builtin_profiles()["laptop-x86-8gb"]


def test_drop_layers_renumbers_and_shrinks():
    pruned = prune.drop_layers(TINY, [0])
    assert pruned.shape.n_layers == TINY.shape.n_layers - 1
    assert {t.layer for t in pruned.tensors if t.layer is not None} == set(range(pruned.shape.n_layers))
    per_block = sum(t.n_elements for t in TINY.tensors if t.layer == 1)
    assert pruned.n_params == TINY.n_params - per_block and pruned.recipes == {}
    assert prune.renumber("blk.3.attn_q.weight", {3: 1}) == "blk.1.attn_q.weight"
    assert prune.renumber("blk.2.attn_q.weight", {3: 1}) is None
    assert prune.renumber("output.weight", {}) == "output.weight"
    assert prune.order_by_cost({0: 0.5, 1: 0.1, 2: 0.1}) == [2, 1, 0]


def test_pruning_is_refused_where_llama_cpp_derives_windows_from_the_index():
    assert "sliding-window" in prune.not_prunable(GEMMA)
    result = plan(GEMMA, PROFILE, FitOptions(context=2048, allow_prune=True), builtin_tables())
    assert not any(r.candidate.prune for r in result.rows)
    assert any("no pruned candidates" in n for n in result.notes)


def test_pruned_rows_need_a_measurement_and_carry_it():
    options = FitOptions(context=2048, allow_prune=True, file_types=("Q8_0",))
    unmeasured = plan(TINY, PROFILE, options, builtin_tables())
    assert not any(r.candidate.prune for r in unmeasured.rows)
    assert any("no pruning was measured" in n for n in unmeasured.notes)
    measured = dataclasses.replace(TINY, prunings=(prune.Pruning((1,), 0.25, {0: 0.9, 1: 0.2}),))
    result = plan(measured, PROFILE, options, builtin_tables())
    row = next(r for r in result.rows if r.candidate.prune)
    assert row.candidate.key == "Q8_0-PRUNE1" and row.quality.source == "measured"
    assert row.quality.kld > 0.25 and "measured KLD 0.2500" in row.quality.note
    full = next(r for r in result.rows if not r.candidate.prune)
    assert row.memory.weights_bytes < full.memory.weights_bytes
    assert not plan(measured, PROFILE, FitOptions(context=2048, file_types=("Q8_0",)), builtin_tables()).rows[1:]


@pytest.mark.slow
def test_fit_measures_pruning_and_builds_a_smaller_model(tiny_checkpoint, tmp_path):
    from edgellm.converters.quantize import read_gguf_header
    from edgellm.fitting.measure import measure

    result = fit(tiny_checkpoint("llama", num_hidden_layers=4), PROFILE.id, context=1024, file_types=("Q8_0",),
                 allow_prune=True)
    (pruning,) = result.facts.prunings        # 4 blocks: at most a quarter may go
    assert len(pruning.drop) == 1 and set(pruning.costs) == {0, 1, 2, 3} and pruning.kld > 0
    assert min(pruning.costs, key=pruning.costs.get) in pruning.drop
    row = next(r for r in result.rows if r.candidate.prune)
    bundle = build(dataclasses.replace(result, chosen=row), tmp_path / "bundle")
    header = read_gguf_header(bundle.model_path)
    assert header.metadata["llama.block_count"] == 3
    assert bundle.weights_bytes == row.memory.weights_bytes
    assert measure(bundle.path, max_tokens=4).generated_tokens > 0
