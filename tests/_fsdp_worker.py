"""Several `posttrain` runs one after the other in one torchrun launch (the imports are paid once).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_fsdp_worker.py JOBS.json

JOBS.json: a list of {"argv": [command, --option, value, ...], "kill_at": regex or null}, or of
{"check": name, "out": path} (a function below, whose findings rank 0 writes to path as JSON). Each argv job
runs `posttrain.cli.main(argv)` (its exit code is written to OUTPUT_DIR/exit_code.rank{r}); a job with
`kill_at` SIGKILLs rank 0 when it is about to write a file whose path matches (the run dies there, mid-save,
as a `kill -9` would), so it must be the launch's last.

The process group of the first job is kept for the next ones (each run's `finish` would destroy it, and a
gloo group re-created in the same process now and then hung in start-up here); it is destroyed at the end.
A launch that has not ended after HANG_SECONDS prints every thread's stack and exits, so a hang fails the
test with the place it hung.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import sys
from pathlib import Path

import torch

from posttrain.cli import main
from posttrain.rl import checkpoint, distributed

HANG_SECONDS = 400


def kill_rank0_at(pattern: str) -> None:
    """SIGKILL rank 0 where it would write a JSON file (trainer_state.json: a save's last file) matching."""
    write_json = checkpoint._write_json

    def dying(path, data):
        if os.environ["RANK"] == "0" and re.search(pattern, str(path)):
            os.kill(os.getpid(), signal.SIGKILL)
        write_json(path, data)

    checkpoint._write_json = dying


def frozen_reference_root(out: Path) -> None:
    """A sharded frozen reference (`models.frozen_reference` under --fsdp): after each no-grad log-prob pass its
    root unit (embeddings, output layer) is freed to its shard again, and the log-probs equal the unsharded
    model's; inside `distributed.gathered` it stays whole (forwards there must not gather); a trainable
    sharded model keeps its root gathered after its forward, for the backward that reads the output layer."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    from posttrain.data import embedded
    from posttrain.rl.logprobs import token_logprobs
    from posttrain.rl.models import frozen_reference

    torch.manual_seed(0)
    input_ids = torch.randint(3, 40, (2, 12))
    batch = {"input_ids": input_ids, "completion_mask": torch.ones_like(input_ids)}
    plain = embedded.build_model(seed=0).eval()
    with torch.no_grad():
        expected = token_logprobs(plain, batch).logps
    ref = frozen_reference(
        embedded.build_model(seed=0), SimpleNamespace(fsdp_enabled=True), torch.device("cpu")
    )
    sharded = lambda model: isinstance(model.get_output_embeddings().weight, DTensor)  # noqa: E731
    found = {"before": sharded(ref)}
    with torch.no_grad():
        first = token_logprobs(ref, batch).logps
        found["after_first"] = sharded(ref)
        second = token_logprobs(ref, batch).logps
        found["after_second"] = sharded(ref)
        with distributed.gathered(ref):
            token_logprobs(ref, batch)
            found["inside_gathered"] = sharded(ref)
        found["after_gathered"] = sharded(ref)
    found["max_diff"] = max((first - expected).abs().max().item(), (second - expected).abs().max().item())
    policy = distributed.shard(embedded.build_model(seed=0))
    token_logprobs(policy, batch).logps.sum().backward()  # its root is gathered from forward to backward
    found["policy_after_backward"] = sharded(policy)
    with torch.no_grad():
        token_logprobs(policy, batch)
    found["policy_after_no_grad_forward"] = sharded(policy)
    if os.environ["RANK"] == "0":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(found))


CHECKS = {"frozen_reference_root": frozen_reference_root}


def output_dir(argv: list[str]) -> Path:
    return Path(argv[argv.index("--output_dir") + 1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    destroy, distributed.destroy = distributed.destroy, lambda: None
    for job in json.loads(Path(sys.argv[1]).read_text()):
        if "check" in job:
            CHECKS[job["check"]](Path(job["out"]))
            continue
        if job.get("kill_at"):
            kill_rank0_at(job["kill_at"])
        code = main(job["argv"])
        out = output_dir(job["argv"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"exit_code.rank{os.environ['RANK']}").write_text(str(code))
    destroy()
