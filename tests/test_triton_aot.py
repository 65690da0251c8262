"""Every Triton kernel of the package compiles for sm_80 and sm_90 without a GPU.

The harness runs in a subprocess with ``TRITON_INTERPRET=0``: conftest turns
the interpreter on for this process, and under it ``triton.jit`` hands out
interpreter objects that cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from ahn_kernels import triton_aot

CAPS = (80, 90)


@pytest.fixture(scope="module")
def rows():
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "ahn_kernels.triton_aot", "--json"] + [f"--cap={c}" for c in CAPS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip(), f"harness printed nothing; stderr:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout), done.returncode


def test_every_case_compiles(rows):
    rows, returncode = rows
    errors = [f"{r['module']} {r['kernel']} sm_{r['cap']} [{r['label']}]: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    assert returncode == 0, "harness exited non-zero: a must-not-spill case spills"


def test_every_module_has_cases_for_every_cap(rows):
    rows, _ = rows
    modules = triton_aot.discover()
    assert "ahn_kernels.delta_rule.triton_recurrent" in modules
    for module in modules:
        caps = {r["cap"] for r in rows if r["module"] == module}
        assert caps == set(CAPS), f"{module}: compiled for {sorted(caps)}, expected {list(CAPS)}"


def test_fused_recurrent_forward_does_not_spill(rows):
    rows, _ = rows
    mine = [r for r in rows if r["kernel"] == "fused_recurrent_fwd_kernel"]
    assert mine, "no case for fused_recurrent_fwd_kernel"
    bks = {int(r["constexprs"].split("BK=")[1].split()[0]) for r in mine}
    assert bks == {16, 32, 64, 128, 256}, f"tiles compiled: {sorted(bks)}"
    spilling = [f"sm_{r['cap']} [{r['label']}] {r['constexprs']}: {r['spills']} words"
                for r in mine if r["spills"] != 0]
    assert not spilling, "\n".join(spilling)


def test_chunk_delta_rule_backward_fits_shared_memory(rows):
    """The chunked delta rules' Triton backward fits an A100 block (163 KB of shared memory) with a margin."""
    rows, _ = rows
    mine = [r for r in rows if r["module"].startswith("ahn_kernels.delta_rule.triton_chunk_bwd")]
    assert {r["kernel"] for r in mine} >= {"chunk_state_bwd_kernel", "chunk_grad_kernel"}
    big = [f"{r['kernel']} sm_{r['cap']} [{r['label']}]: {r['shared']} bytes" for r in mine if r["shared"] > 128 * 1024]
    assert not big, "\n".join(big)


SPILLING_CASE = """
import dataclasses, json
from ahn_kernels import triton_aot
from ahn_kernels.delta_rule.triton_recurrent import _aot_case
case = _aot_case("bf16", 256, gated=True, full=True, aligned=True)
# A 256 x 64 fp32 state for one warp is 512 registers per thread: it must spill.
case = dataclasses.replace(case, constexprs=dict(case.constexprs, BV=64), label="spills on purpose")
row = triton_aot.compile_case("test", case, 90)
print(json.dumps(dataclasses.asdict(row) | {"failed": row.failed}))
"""


def test_harness_sees_spills():
    # The no-spill checks above are only worth something if the harness can see a spill.
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", SPILLING_CASE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    row = json.loads(done.stdout)
    assert not row["error"], row["error"]
    assert row["spills"] > 0 and row["failed"], row
