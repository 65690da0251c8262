"""One AHN decode step (evict + memory update + attention) against the paper's concatenate-and-trim procedure."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)


@pytest.mark.parametrize("provider", ["ahn", "concat_trim", "flash_attn"])
@pytest.mark.cases(lambda _: benchmarks.decode_cases(*ON))  # one step: no T to shrink
def test_decode(run_case, case, provider):
    run_case(case, provider)
