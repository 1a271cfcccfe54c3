"""Predicted vs measured peak RSS for bundles fitted with ``--device local``.

Each bundle runs in a fresh process that fills its context with a prompt and samples 32 tokens
(``edgellm.fitting.measure``). The goal from the issue: within 5% of the measured peak and never under it by
more than 2%. benchmarks/fit_accuracy.py prints the full table (more models, types, contexts, speeds).
"""

from __future__ import annotations

import sys

import pytest

from edgellm.fitting import build, fit
from edgellm.fitting.measure import measure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (VmHWM)")

OVER, UNDER = 0.05, 0.02      # allowed relative error of the prediction above / below the measurement
# The same Python process with the same imports measured 43 MiB in one venv and 50 MiB in a freshly installed
# one (library pages just written are all resident): a few MiB of the process baseline depend on the page
# cache, not on the model. Tiny models (~80 MiB in all) are judged with this absolute allowance; Gemma's
# totals are large enough for the relative bounds alone.
BASELINE_NOISE = 8 * 2**20
TEMPERATURE = 0.8             # sample as users do (the sampler's temporaries are part of the plan)


def _check(plan, bundle_dir):
    measured = measure(bundle_dir, max_tokens=32, temperature=TEMPERATURE).peak_rss_bytes
    predicted = plan.chosen.memory.total_bytes
    over, under = max(OVER * measured, BASELINE_NOISE), max(UNDER * measured, BASELINE_NOISE)
    assert -under <= predicted - measured <= over, \
        f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


@pytest.mark.parametrize("variant, file_type", [("llama", "Q8_0"), ("gemma3_text", "F16")])
def test_tiny_bundle_memory(tiny_checkpoint, tmp_path, variant, file_type):
    plan = fit(tiny_checkpoint(variant), "local", context=2048, file_types=(file_type,))
    _check(plan, build(plan, tmp_path / "bundle").path)


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [512, 1024])
def test_gemma_bundle_memory(gemma_gguf, tmp_path, n_ctx):
    plan = fit(gemma_gguf, "local", context=n_ctx)
    assert plan.chosen.weights_exact
    _check(plan, build(plan, tmp_path / "bundle").path)
