"""Import and first-call hygiene: no network, no files written, offline sdist.

Each check runs in a fresh interpreter whose ``socket`` refuses to be created
(a ``sitecustomize`` planted on ``PYTHONPATH``), with ``HOME``, ``TMPDIR`` and
the working directory pointed at empty temporary folders that must stay empty.
"""

import os
import pathlib
import re
import subprocess
import sys
import tarfile
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

# Any attempt to create a socket, connect or resolve a name fails loudly (an audit
# hook: it sees the C-level calls too, and leaves the socket class intact).
NO_NETWORK = textwrap.dedent("""
    import sys

    def _refuse(event, args):
        if event in ("socket.__new__", "socket.connect", "socket.getaddrinfo"):
            raise RuntimeError(f"network access attempted: {event}")

    sys.addaudithook(_refuse)
""")

def _run_offline(tmp_path, args, cwd=None):
    guard, home, tmp, work = (tmp_path / n for n in ("guard", "home", "tmp", "work"))
    for d in (guard, home, tmp, work):
        d.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "TRITON_", "TORCHINDUCTOR_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join([str(guard), str(REPO)]),
               PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, *args], check=False, cwd=cwd or work, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, {"HOME": home, "TMPDIR": tmp, "cwd": work}


def test_network_guard_works(tmp_path):
    # The guard itself must bite, or the tests below prove nothing.
    proc, _ = _run_offline(tmp_path, ["-c", "import socket; socket.socket()"])
    assert proc.returncode != 0 and "network access attempted" in proc.stderr


def test_import_and_first_calls_touch_nothing(tmp_path):
    # `check` imports the package and calls every op on every backend available here once.
    proc, dirs = _run_offline(tmp_path, ["-W", "ignore", "-m", "ahn_kernels", "check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, d in dirs.items():
        written = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        assert not written, f"wrote under {name}: {written}"


def test_sdist_builds_offline(tmp_path):
    out = tmp_path / "dist"
    proc, _ = _run_offline(tmp_path, [str(REPO / "setup.py"), "-q", "sdist", "-d", str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = out.glob("ahn_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    sources = [p for d in ("csrc", "bindings") for p in (REPO / d).rglob("*") if p.is_file()]
    required = ["setup.py", "CMakeLists.txt", "pyproject.toml"] + [str(p.relative_to(REPO)) for p in sources]
    missing = [r for r in required if not any(n.endswith("/" + r) for n in names)]
    assert not missing, f"the sdist lacks what the build reads: {missing}"


def test_no_pickle_loads_in_package():
    # Weights load through safetensors or torch.load(weights_only=True) only.
    offenders = []
    for path in (REPO / "ahn_kernels").rglob("*.py"):
        text = path.read_text()
        if "pickle" in text or ("torch.load(" in text and "weights_only=True" not in text):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_uninitialised_allocations_are_poisoned():
    # The test-time poison and guards (ahn_kernels.testing) intercept torch.empty, torch.empty_like and
    # Tensor.new_empty, looked up at call time; any other uninitialised allocation would escape them.
    pattern = re.compile(r"empty_strided|resize_\(|from torch import[^\n]*empty")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "ahn_kernels").rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders
