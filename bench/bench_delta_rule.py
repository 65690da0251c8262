"""DeltaNet (chunk_delta_rule; fused_recurrent_{,gated_}delta_rule) against transformers'
Qwen3-Next PyTorch fallbacks with g = 0 where ungated, and fla on a GPU."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
CASES = benchmarks.chunk_cases("chunk_delta_rule", *ON) + benchmarks.fused_recurrent_cases(*ON)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "fla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_delta_rule(run_case, case, provider):
    run_case(case, provider)
