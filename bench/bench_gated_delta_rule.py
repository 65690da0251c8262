"""Gated DeltaNet (chunk_gated_delta_rule) against transformers' torch_chunk_gated_delta_rule
(Qwen3-Next's CPU fallback) and fla on a GPU, at T in {1024, 4096, 16384} and AHN's heads."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
CASES = benchmarks.chunk_cases("chunk_gated_delta_rule", *ON)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "fla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gated_delta_rule(run_case, case, provider):
    run_case(case, provider)
