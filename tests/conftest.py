import os

# Triton kernels run on the CPU through the interpreter in tests; it must be set
# before triton decorates any kernel. The GPU suite sets TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ahn_kernels import testing  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _poison():
    # Every buffer the library allocates uninitialised starts as NaN, so an element a
    # kernel forgets to write fails the test that reads it.
    with testing.poisoned_allocations():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
