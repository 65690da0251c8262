"""Delta rule and gated delta rule against transformers' Qwen3-Next PyTorch fallbacks."""

import pytest

from ahn_kernels import benchmarks

CASES = benchmarks.fused_recurrent_cases() + benchmarks.chunk_gated_delta_rule_cases()


@pytest.mark.parametrize("provider", ["ahn", "transformers"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_delta_rule(run_case, case, provider):
    run_case(case, provider)
