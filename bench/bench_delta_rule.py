"""DeltaNet (chunk_delta_rule; fused_recurrent_{,gated_}delta_rule) against transformers'
Qwen3-Next PyTorch fallbacks with g = 0 where ungated, and fla on a GPU."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "fla"])
@pytest.mark.cases(lambda s: benchmarks.chunk_cases("chunk_delta_rule", *ON,
                                                    Ts=tuple(T // s for T in benchmarks.CHUNK_T), ahn_T=4096 // s)
                    + benchmarks.fused_recurrent_cases(*ON, T=2048 // s))
def test_delta_rule(run_case, case, provider):
    run_case(case, provider)
