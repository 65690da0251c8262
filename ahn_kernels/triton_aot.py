"""Compile every Triton kernel of ahn_kernels for NVIDIA GPUs on a machine without one.

Each Triton module (``ahn_kernels/**/triton*.py``) declares, next to its
kernels, a module-level list ``AOT_CASES`` of :class:`AOTCase`: one per
tile / dtype / option variant its launcher can pick. This harness imports every
such module, compiles each case for each compute capability with
``triton.compile`` (PTX and cubin through the ptxas that ships with Triton; no
driver involved) and reads the cubin's resource usage with the bundled
``cuobjdump``: registers, spills and shared memory per case. A compile error, a
module without cases, or a spill in a case marked ``must_not_spill`` is a
failure.

Usage::

    TRITON_INTERPRET=0 python -m ahn_kernels.triton_aot [--cap 80 --cap 90] [--json]

The kernels must be real ``triton.jit`` functions: with ``TRITON_INTERPRET=1``
Triton hands out interpreter objects instead, which cannot be compiled, so the
harness reports that instead of compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

PACKAGE = "ahn_kernels"
CAPS = (80, 90)
WARP_SIZE = 32


@dataclasses.dataclass(frozen=True)
class AOTCase:
    """One compiled variant of a kernel.

    ``types`` maps each runtime argument to its Triton type (``"*bf16"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` gives every other argument its value
    (``None`` for an absent optional pointer, as the launcher passes it; ``1``
    for an int argument the case takes to be 1, since Triton's launcher turns
    such ints into constants). ``divisible`` names the arguments the case takes
    to be multiples of 16 (ints) or 16-byte aligned (pointers): Triton's launcher
    specialises on that too, and it changes vector widths and layouts, hence
    registers.
    """

    label: str  # what the case stands for, e.g. "bf16 gated all-options, K,V%16"
    kernel: object  # triton.runtime.JITFunction
    types: dict
    constexprs: dict
    num_warps: int
    divisible: tuple = ()
    must_not_spill: bool = True

    def signature(self) -> dict:
        """``{arg: type}`` over all kernel arguments, constexprs included, in order."""
        missing = [a for a in self.kernel.arg_names if a not in self.types and a not in self.constexprs]
        if missing:
            raise ValueError(f"AOT case for {self.kernel.__name__}: arguments {missing} have neither "
                             "a type nor a value")
        return {a: self.types.get(a, "constexpr") for a in self.kernel.arg_names}

    def attrs(self) -> dict:
        """``triton.compile``'s attributes: ``{(arg index,): [["tt.divisibility", 16]]}``."""
        names = self.kernel.arg_names
        unknown = [a for a in self.divisible if a not in self.types]
        if unknown:
            raise ValueError(f"AOT case for {self.kernel.__name__}: divisible names non-runtime arguments {unknown}")
        return {(names.index(a),): [["tt.divisibility", 16]] for a in self.divisible}


@dataclasses.dataclass
class Row:
    """The outcome of compiling one case for one capability (``error`` is empty on success)."""

    module: str
    kernel: str
    cap: int
    label: str
    constexprs: str
    num_warps: int
    must_not_spill: bool
    regs: int = -1
    spills: int = -1  # 4-byte words of local memory per thread, as Triton's ``kernel.n_spills``
    shared: int = -1  # bytes of shared memory (Triton allocates it dynamically at launch)
    error: str = ""  # the whole compiler message

    @property
    def failed(self) -> bool:
        return bool(self.error) or (self.must_not_spill and self.spills > 0)


def discover() -> list[str]:
    """Module names of every ``triton*.py`` file under the package, this harness excluded."""
    this = pathlib.Path(__file__).resolve()
    root = this.parent
    return [".".join((PACKAGE, *path.relative_to(root).with_suffix("").parts))
            for path in sorted(root.rglob("triton*.py")) if path != this]


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread) of the one function in ``cubin``.

    The driver is what fills ``CompiledKernel.n_regs``/``n_spills`` (the latter
    from the function's local size); without one we read the cubin. ptxas puts
    spills in the stack frame (cuobjdump's STACK), not in LOCAL, which counts
    only declared local arrays; the driver's local size covers both.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    found = _RESOURCE.search(out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    regs, stack, local = (int(x) for x in found.groups())
    return regs, stack + local


def _describe(constexprs: dict) -> str:
    """The UPPERCASE (tile, flag) constexprs; the lowercase ones (absent pointers, unit strides) follow from them."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items() if k.isupper())


def compile_case(module: str, case: AOTCase, cap: int) -> Row:
    row = Row(module, getattr(case.kernel, "__name__", repr(case.kernel)), cap, case.label, _describe(case.constexprs),
              case.num_warps, case.must_not_spill)
    if not isinstance(case.kernel, triton.runtime.JITFunction):
        row.error = "not a triton.jit function (is TRITON_INTERPRET=1 set? run with TRITON_INTERPRET=0)"
        return row
    try:
        src = triton.compiler.ASTSource(fn=case.kernel, signature=case.signature(), constexprs=case.constexprs,
                                        attrs=case.attrs())
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, WARP_SIZE), options={"num_warps": case.num_warps})
        row.regs, local = _resources(compiled.asm["cubin"])
    except Exception as exc:  # report every failing case, not only the first
        row.error = f"{type(exc).__name__}: {exc}".strip()
        return row
    row.spills = local // 4
    row.shared = compiled.metadata.shared
    return row


def run(caps=CAPS) -> list[Row]:
    """Compile every declared case of every discovered module for each capability in ``caps``."""
    rows = []
    for name in discover():
        try:
            cases = importlib.import_module(name).AOT_CASES
        except Exception as exc:
            rows.append(Row(name, "-", 0, "", "", 0, True, error=f"{type(exc).__name__}: {exc}"))
            continue
        if not cases:
            rows.append(Row(name, "-", 0, "", "", 0, True, error="AOT_CASES is empty"))
        for case in cases:
            for cap in caps:
                rows.append(compile_case(name, case, cap))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "sm", "warps", "regs", "spills", "smem", "case", "constexprs", "status")
    body = []
    for r in rows:
        # A Triton CompilationError starts with the location and ends with the cause.
        lines = r.error.splitlines()
        status = " ... ".join(dict.fromkeys((lines[0], lines[-1]))) if lines else (
            "SPILLS (must not spill)" if r.failed else "ok")
        body.append((r.kernel, str(r.cap), str(r.num_warps), str(r.regs), str(r.spills), str(r.shared),
                     r.label, r.constexprs, status))
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in (head, *body))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.triton_aot", description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, action="append",
                        help="compute capability, e.g. 90 (repeatable; default 80 and 90)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for tests) instead of a table")
    args = parser.parse_args(argv)
    rows = run(tuple(args.cap or CAPS))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) | {"failed": r.failed} for r in rows]))
    else:
        print(format_table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
