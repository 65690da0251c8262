"""The compiled extension ``ahn_kernels._C``: what it holds, and that it is torch-free.

Numerical checks of the kernels live in the op tests (``test_delta_rule.py``).
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ahn_kernels import _backend

_C = _backend._C

BUILD_INFO_KEYS = {"cpu", "cuda", "cuda_archs", "cxx_compiler", "cuda_compiler", "openmp", "native", "sanitize"}


def test_extension_built():
    assert _C is not None, f"ahn_kernels._C failed to import: {_backend._C_ERROR}"
    info = _C.build_info()
    assert BUILD_INFO_KEYS <= set(info), f"build_info() lacks {BUILD_INFO_KEYS - set(info)}"
    assert info["cpu"] is True
    assert isinstance(info["cxx_compiler"], str) and info["cxx_compiler"]
    for key in ("cuda", "openmp", "native", "sanitize"):
        assert isinstance(info[key], bool), key
    assert _backend.build_info() == info


def test_cuda_part_matches_build_info():
    info = _C.build_info()
    assert hasattr(_C, "launch_fused_recurrent_fwd_cuda") == info["cuda"]
    if info["cuda"]:
        assert info["cuda_compiler"].startswith("nvcc ")
        assert all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])
        assert any(a.startswith("compute_") for a in info["cuda_archs"]), "no PTX for forward compatibility"
    else:
        assert info["cuda_archs"] == [] and info["cuda_compiler"] is None


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("AHN_CUDA") == "0",
                    reason="no nvcc here, or CUDA switched off with AHN_CUDA=0")
def test_cuda_built_where_nvcc_is():
    # CI has nvcc: the CUDA sources must have compiled, for the default targets.
    info = _C.build_info()
    assert info["cuda"], "nvcc is on PATH but _C was built without CUDA"
    if not os.environ.get("AHN_CUDA_ARCHS"):
        assert {"sm_80", "sm_90a"} <= set(info["cuda_archs"]), info["cuda_archs"]


def test_extension_is_torch_free():
    # Load the shared object by path in a fresh interpreter (importing the package
    # would import torch): neither the torch module nor libtorch / libc10 may load.
    probe = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("ahn_kernels._C", {_C.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.build_info()["cpu"]
        assert "torch" not in sys.modules, "loading _C imported torch"
        if sys.platform.startswith("linux"):
            maps = open("/proc/self/maps").read()
            linked = [lib for lib in ("libtorch", "libc10") if lib in maps]
            assert not linked, f"_C links {{linked}}"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_params_fields_round_trip():
    p = _C.FusedRecurrentParams()
    t = torch.zeros(4)
    p.q = t.data_ptr()
    assert p.q == t.data_ptr() and p.k == 0 and p.cu_seqlens == 0
    p.K, p.q_st, p.scale, p.l2norm = 128, 1 << 40, 0.25, True
    assert (p.K, p.q_st, p.scale, p.l2norm) == (128, 1 << 40, 0.25, True)
    for code in (0, 1, 2):
        p.dtype = code
        assert p.dtype == code
    with pytest.raises(ValueError, match="dtype"):
        p.dtype = 3


def _tiny_params(q, k, v, beta, o):
    p = _C.FusedRecurrentParams()
    p.q, p.k, p.v, p.beta, p.o = (t.data_ptr() for t in (q, k, v, beta, o))
    B, T, H, K = q.shape
    p.B, p.T, p.N, p.HQ, p.HK, p.HV, p.HS, p.K, p.V = B, T, B, H, H, H, H, K, v.shape[-1]
    p.q_sb, p.q_st, p.q_sh = q.stride()[:3]
    p.k_sb, p.k_st, p.k_sh = k.stride()[:3]
    p.v_sb, p.v_st, p.v_sh = v.stride()[:3]
    p.beta_sb, p.beta_st, p.beta_sh = beta.stride()
    p.scale = 1.0
    return p


def test_launcher_guards_reject_bad_params():
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 5)
    beta, o = torch.rand(1, 3, 2), torch.empty(1, 3, 2, 5)
    for field, value, message in [("K", 257, "K and V"), ("V", 0, "K and V"), ("HQ", 3, "divide HS"),
                                  ("N", 2, "N must equal B"), ("beta", 0, "must be set")]:
        p = _tiny_params(q, k, v, beta, o)
        setattr(p, field, value)
        with pytest.raises(ValueError, match=message):
            _C.launch_fused_recurrent_fwd_cpu(p, 1)


def test_cpu_launcher_runs():
    # Plumbing only (pointers, strides, GIL release): one small case against a token loop.
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4) * 0.5, torch.randn(1, 3, 2, 5)
    beta, o = torch.rand(1, 3, 2), torch.empty(1, 3, 2, 5)
    _C.launch_fused_recurrent_fwd_cpu(_tiny_params(q, k, v, beta, o), 2)
    S = torch.zeros(2, 4, 5, dtype=torch.float64)  # [HS, K, V]
    for t in range(3):
        kt, qt = k[0, t].double(), q[0, t].double()
        u = beta[0, t, :, None].double() * (v[0, t].double() - torch.einsum("hkv,hk->hv", S, kt))
        S = S + kt[:, :, None] * u[:, None, :]
        torch.testing.assert_close(o[0, t].double(), torch.einsum("hkv,hk->hv", S, qt), rtol=1e-5, atol=1e-6)
