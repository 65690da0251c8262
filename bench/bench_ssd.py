"""Mamba2 SSD scan (forward, forward + backward) and decode step against transformers' Mamba2 PyTorch path.

The forward + backward cases print GFLOP/s of our CPU algorithm (three token-serial passes over the
[P, N_state] state, 16 T H P N flops) beside torch.matmul's rate in the same run."""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)


@pytest.mark.parametrize("provider", ["ahn", "transformers", "mamba_ssm"])
@pytest.mark.cases(lambda s: benchmarks.ssd_cases(*ON, T=4096 // s)
                    + benchmarks.ssd_cases(*ON, T=4096 // s, H=16, P=128, N=128, G=16)  # bench shape, AHN's
                    + benchmarks.ssd_long_cases(*ON, T=16384 // s) + benchmarks.ssd_state_update_cases(*ON))
def test_ssd(run_case, case, provider):
    run_case(case, provider)
