"""Sliding-window attention with sinks against scaled_dot_product_attention with a window mask."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
CASES = benchmarks.swa_cases(*ON)


@pytest.mark.parametrize("provider", ["ahn", "sdpa_mask", "flash_attn"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_swa(run_case, case, provider):
    run_case(case, provider)
