"""One AHN decode step (evict + memory update + attention) against the paper's concatenate-and-trim procedure."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
CASES = benchmarks.decode_cases(*ON)


@pytest.mark.parametrize("provider", ["ahn", "concat_trim", "flash_attn"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decode(run_case, case, provider):
    run_case(case, provider)
