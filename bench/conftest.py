"""pytest-benchmark harness: every case times ``ahn`` and its peers in the same run.

The terminal summary prints, per case, each provider's median, tokens/s and the
speed-up of ``ahn`` over the case's peer (peer time / ahn time).
With ``--benchmark-disable`` each provider runs once (a smoke test, as in CI), except the
peers a case gives a fixed number of ``rounds`` (seconds per call), which only timed runs run.
``--quick`` builds every case at a quarter of its T, as ``python -m ahn_kernels bench --quick``
(the same code paths at a quarter of the cost: CI's smoke run).
"""

import pytest

ROUNDS = 5
_results: dict[str, dict] = {}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="every case at a quarter of its T (a smoke run)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cases(build): parametrize `case` with build(s), T divided by s "
                                       "(4 under --quick, else 1)")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("cases")
    if marker is not None:
        s = 4 if metafunc.config.getoption("quick") else 1
        metafunc.parametrize("case", marker.args[0](s), ids=lambda c: c.name)


@pytest.fixture
def run_case(benchmark):
    def run(case, provider):
        if provider not in case.providers:
            pytest.skip(f"{provider} is not importable here")
        if provider in case.rounds and provider != "ahn" and benchmark.disabled:
            pytest.skip(f"{provider} takes seconds per call here: not run in a smoke test")
        fn = case.providers[provider]()
        benchmark.group = case.name
        rounds, warmup = (case.rounds[provider], 0) if provider in case.rounds else (ROUNDS, 1)
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable
            return
        median = benchmark.stats.stats.median
        benchmark.extra_info["tokens_per_s"] = case.tokens / median
        if case.flops:
            benchmark.extra_info["gflops"] = case.flops / median / 1e9
        _results.setdefault(case.name, {"case": case, "times": {}})["times"][provider] = median
    return run


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    from ahn_kernels import benchmarks

    tr = terminalreporter
    tr.section("ahn_kernels: speed-up against the peer in the same run")
    tr.write_line(f"{'case':64s} {'provider':14s} {'median ms':>10s} {'tokens/s':>12s} {'GFLOP/s':>8s} {'speed-up':>9s}")
    for name, entry in _results.items():
        case, times = entry["case"], entry["times"]
        for provider, t in times.items():
            ratio = ""
            if provider == "ahn" and case.peer in times:
                ratio = f"{times[case.peer] / t:8.2f}x"
            gflops = f"{case.flops / t / 1e9:8.1f}" if case.flops and provider == "ahn" else ""
            tr.write_line(f"{name:64s} {provider:14s} {t * 1e3:10.2f} {case.tokens / t:12.0f} {gflops:>8s} {ratio:>9s}")
    device, dtype = benchmarks.device_and_dtype()
    tr.write_line(f"torch.matmul 2048x2048 {str(dtype)[6:]} on {device}: "
                  f"{benchmarks.matmul_gflops(device, dtype):.1f} GFLOP/s (same run)")
