"""Mamba2 SSD scan and decode step against transformers' Mamba2 PyTorch path."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
CASES = benchmarks.ssd_cases(*ON) + benchmarks.ssd_state_update_cases(*ON)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "mamba_ssm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ssd(run_case, case, provider):
    run_case(case, provider)
