"""Run Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is first imported anywhere in the process, so it lives here
(conftest.py is imported before any test module)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: intra-op threads add only synchronisation, and on a loaded 2-core machine
# spinning OpenMP workers stall each small op (a tiny-model SFT step measured 40x slower with 2 threads
# than with 1 while other processes ran). Subprocesses the tests start inherit the same setting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def posttrain_cache(tmp_path_factory):
    """POSTTRAIN_CACHE in a temporary folder for the whole session (subprocesses inherit it): tests never
    touch ~/.cache, and the embedded SFT model that `posttrain rm` starts from when no model is named
    (`sft.embedded_sft_model`) is trained at most once per session, by the first test that needs it. Under
    pytest-xdist the workers share one folder (their temporary folders' parent): the cache's file lock makes
    one worker train a model while the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "posttrain-cache"
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POSTTRAIN_CACHE", str(path))
        yield path
