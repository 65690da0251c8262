"""Command line: ``python -m ahn_kernels {info,check,bench,demo,accounting}``."""

from __future__ import annotations

import argparse
import sys

import torch


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cmd_info(args) -> int:
    from . import _backend

    info = _backend.build_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    if info.get("error"):
        print(f"compiled extension: MISSING ({info['error']}); every op runs its PyTorch reference")
    else:
        print("compiled extension: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"triton interpreter (TRITON_INTERPRET=1): {'on' if _backend.triton_interpret() else 'off'}")
    print()
    devices = _devices()
    header = f"{'op':34s}" + "".join(f"{d + ' (default / available)':44s}" for d in devices)
    print(header)
    for op in _backend.KERNELS:
        row = f"{op:34s}"
        for d in devices:
            avail = _backend.available(op, d)
            row += f"{avail[0] + ' / ' + ', '.join(avail):44s}"
        print(row)
    return 0


def cmd_check(args) -> int:
    from .check import run_checks

    return run_checks()


def cmd_bench(args) -> int:
    from . import benchmarks

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cases = benchmarks.default_cases(device, quick=args.quick)
    jobs = [(c, p) for c in cases for p in c.providers]
    rows = []
    for i, (case, provider) in enumerate(jobs):
        _progress(i, len(jobs), f"{case.name} [{provider}]")
        fn = case.providers[provider]()
        warmup, reps = (0, case.rounds[provider]) if provider in case.rounds else (1, args.reps)
        rows.append((case, provider, benchmarks.time_fn(fn, warmup=warmup, reps=reps)))
    _progress(len(jobs), len(jobs), "done")
    print()
    times = {(c.name, p): t for c, p, t in rows}
    print(f"{'case':66s} {'provider':13s} {'median ms':>10s} {'tokens/s':>11s} {'GFLOP/s':>8s} {'speed-up':>9s}")
    for case, provider, t in rows:
        ratio = ""
        if provider == "ahn" and (case.name, case.peer) in times:
            ratio = f"{times[(case.name, case.peer)] / t:.2f}x"
        gflops = f"{case.flops / t / 1e9:8.1f}" if case.flops and provider == "ahn" else ""
        print(f"{case.name:66s} {provider:13s} {t * 1e3:10.2f} {case.tokens / t:11.0f} {gflops:>8s} {ratio:>9s}")
    dtype = benchmarks.device_and_dtype(device)[1]
    print(f"torch.matmul 2048x2048 {str(dtype)[6:]}: {benchmarks.matmul_gflops(device, dtype):.1f} GFLOP/s; "
          "speed-up = peer median / ahn median; all in the same run, "
          f"{torch.get_num_threads()} threads, device {device}")
    if args.plot:
        _plot(rows, times, args.plot)
    return 0


def _progress(i: int, n: int, what: str) -> None:
    width = 30
    done = width * i // max(n, 1)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what[:70]:70s}")
    sys.stderr.flush()


def _plot(rows, times, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib")
    pairs = [(c.name, times[(c.name, c.peer)] / t) for c, p, t in rows if p == "ahn" and (c.name, c.peer) in times]
    if not pairs:
        print("--plot: no case had its peer here; nothing to plot")
        return
    names, speedups = zip(*pairs)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    ax.barh(names, speedups)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up over the peer (same run)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def cmd_demo(args) -> int:
    from .layers import demo

    print(demo.run(tokens=args.tokens, window=args.window, sinks=args.sinks, memory=args.memory,
                   prompt=args.prompt, rows=args.rows, full=not args.no_full, plot=args.plot))
    return 0


def cmd_accounting(args) -> int:
    from . import accounting

    print(accounting.report(args.config, args.context, args.window, args.sinks, args.memory))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ahn_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and which backend serves each op")
    sub.add_parser("check", help="every available backend against the reference on random inputs")
    bench = sub.add_parser("bench", help="default shapes against the peers, with speed-ups")
    bench.add_argument("--quick", action="store_true", help="4x shorter sequences")
    bench.add_argument("--reps", type=int, default=3, help="timed runs per provider (median reported)")
    bench.add_argument("--cpu", action="store_true", help="benchmark on the CPU even when a GPU is present")
    bench.add_argument("--plot", metavar="FILE.png", help="also write a bar chart of the speed-ups")
    demo = sub.add_parser("demo", help="long greedy generation with a tiny random Qwen2: AHN cache vs full attention")
    demo.add_argument("--tokens", type=int, default=32768, help="context length reached (prompt + generated)")
    demo.add_argument("--prompt", type=int, default=1024, help="prompt length (prefilled at once)")
    demo.add_argument("--window", type=int, default=1024, help="AHN window W")
    demo.add_argument("--sinks", type=int, default=64, help="AHN sinks S")
    demo.add_argument("--memory", choices=("gdn", "dn", "mamba2"), default="gdn")
    demo.add_argument("--rows", type=int, default=8, help="table rows")
    demo.add_argument("--no-full", action="store_true", help="skip the full-attention run")
    demo.add_argument("--plot", metavar="FILE.png", help="also plot cache size and time per token")
    acc = sub.add_parser("accounting", help="KV-cache bytes and FLOPs per token, AHN vs full attention")
    acc.add_argument("--config", choices=("qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"), default="qwen2.5-3b")
    acc.add_argument("--context", type=int, default=131072)
    acc.add_argument("--window", type=int, default=32640, help="AHN window W (the paper's inference default)")
    acc.add_argument("--sinks", type=int, default=128, help="AHN sinks S")
    acc.add_argument("--memory", choices=("gdn", "dn", "mamba2"), default="gdn")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "demo": cmd_demo,
            "accounting": cmd_accounting}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
