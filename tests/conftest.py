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


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A folder holding the embedded task's tiny causal LM (random weights, seed 0) and its tokenizer, for a
    loop's --model_name_or_path. Files that need another start define their own `start`."""
    from posttrain.data import embedded

    path = tmp_path_factory.mktemp("start")
    embedded.build_model(seed=0).save_pretrained(path)
    embedded.build_tokenizer().save_pretrained(path)
    return str(path)


# The slowest files first (seconds on a 2-core machine, both workers busy: demo ~260, prm ~260, reward ~180,
# faults, fsdp, epochs, cpo, sft_e2e, dpo, ppo ~50-120 each). pytest-xdist's loadfile hands files out in
# collection order as workers free up, so the long ones start at once and the many short files fill in
# around them, instead of a long file starting last while the other worker idles. Order only: each file's
# tests keep their own order.
SLOWEST_FIRST = (
    "test_demo.py", "test_prm.py", "test_reward.py", "test_faults.py", "test_fsdp.py", "test_epochs.py",
    "test_cpo.py", "test_sft_e2e.py", "test_dpo.py", "test_ppo.py", "test_online_dpo.py", "test_lora.py",
    "test_rollout.py", "test_kto.py", "test_compare.py", "test_compile.py", "test_loop.py", "test_shared_prefix.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def shared_prefix_calls(monkeypatch):
    """A list that grows by one at each shared-prefix forward (`rl.logprobs._shared_prefix_hidden`): a loop's
    step asserts that its rows' prompts ran once per prompt."""
    from posttrain.rl import logprobs

    calls, real = [], logprobs._shared_prefix_hidden

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(logprobs, "_shared_prefix_hidden", counted)
    return calls
