"""Mamba2 SSD scan and decode step against transformers' Mamba2 PyTorch path."""

import pytest

from ahn_kernels import benchmarks

CASES = benchmarks.ssd_cases() + benchmarks.ssd_state_update_cases()


@pytest.mark.parametrize("provider", ["ahn", "transformers"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ssd(run_case, case, provider):
    run_case(case, provider)
