"""Delta rule and gated delta rule against transformers' Qwen3-Next PyTorch fallbacks (and fla on a GPU)."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
CASES = benchmarks.fused_recurrent_cases(*ON) + benchmarks.chunk_gated_delta_rule_cases(*ON)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "fla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_delta_rule(run_case, case, provider):
    run_case(case, provider)
