"""Gated DeltaNet (chunk_gated_delta_rule) against transformers' torch_chunk_gated_delta_rule
(Qwen3-Next's CPU fallback) and fla on a GPU, at T in {1024, 4096, 16384} and AHN's heads."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "fla"])
@pytest.mark.cases(lambda s: benchmarks.chunk_cases("chunk_gated_delta_rule", *ON,
                                                    Ts=tuple(T // s for T in benchmarks.CHUNK_T), ahn_T=4096 // s))
def test_gated_delta_rule(run_case, case, provider):
    run_case(case, provider)
