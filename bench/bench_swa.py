"""Sliding-window attention with sinks against scaled_dot_product_attention with a window mask and
flex_attention with a window mask_mod (forward only on CPU: torch has no flex backward there).

The long cases (T = 8192 and 16384, and the linearity in T) are timed runs only: the smoke run
(``--benchmark-disable``) skips them, as SDPA alone takes a minute at T = 16384.
"""

import pytest

from ahn_kernels import benchmarks

ON = benchmarks.device_and_dtype()  # (device, dtype)
PROVIDERS = ["ahn", "sdpa_mask", "flex_attention", "flash_attn"]


def _run(run_case, case, provider):
    if provider == "flex_attention" and provider not in case.providers:
        if case.label.endswith("fwd+bwd") and ON[0] == "cpu":
            pytest.skip("flex_attention has no backward on CPU (torch raises NotImplementedError)")
        pytest.skip("flex_attention is timed at T=8192 only (a compile per shape; its block mask at "
                    "T=16384 builds GBs of index grids)")
    if provider in ("sdpa_mask", "4 x T/4") and provider not in case.providers:
        pytest.skip(f"{provider} is not a provider of this case")
    run_case(case, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.cases(lambda s: benchmarks.swa_cases(*ON, T=4096 // s))
def test_swa(run_case, case, provider):
    _run(run_case, case, provider)


@pytest.mark.parametrize("provider", [*PROVIDERS, "4 x T/4"])
@pytest.mark.cases(lambda s: benchmarks.swa_long_cases(*ON, T=4096 // s))
def test_swa_long(run_case, request, case, provider):
    if request.config.getoption("benchmark_disable"):
        pytest.skip("long case: timed runs only")
    _run(run_case, case, provider)
