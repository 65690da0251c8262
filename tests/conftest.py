import os

# Triton kernels run on the CPU through the interpreter in tests; it must be set
# before triton decorates any kernel. The GPU suite sets TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
