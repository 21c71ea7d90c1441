"""One KTO optimizer step's forward and backward under torchrun, 4 rows per process:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_kto_ddp_worker.py OUT

Rank 0 saves the step's loss and metrics (summed over processes, as the loop logs them) and the policy's
gradients (DDP-averaged) to OUT; tests/test_kto.py compares them with a plain one-process computation.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from datasets import Dataset

from posttrain.data import embedded, unpaired
from posttrain.rl import distributed, kto, loop

ROWS, PER_PROCESS, BETA = 8, 4, 0.5


def halves(tokenizer) -> list[dict]:
    """The two micro-batches: 8 unpaired rows, mismatched completions rotated within blocks of 4."""
    data = embedded.rows("unpaired_preference", "train", seed=0)[:ROWS]
    tokenized, _ = unpaired.tokenize_unpaired(Dataset.from_list(data), tokenizer)
    rows = list(unpaired.add_kl_completions(tokenized, PER_PROCESS))
    return [
        unpaired.collate_unpaired(rows[i : i + PER_PROCESS], tokenizer.pad_token_id)
        for i in range(0, ROWS, PER_PROCESS)
    ]


def models():
    """(policy, reference): two random tiny models, so that the KL estimate is not 0."""
    return embedded.build_model(seed=0), embedded.build_model(seed=1).requires_grad_(False)


def main(out: str) -> None:
    import datasets

    datasets.disable_progress_bars()  # keeps the stderr a failing test shows to the error itself
    device = torch.device("cpu")
    distributed.init(device)
    rank, world_size, _ = distributed.env_world()
    config = kto.KTOConfig(beta=BETA, per_device_train_batch_size=PER_PROCESS)
    run = loop.Run(config, "kto", Path(out).parent, device, rank=rank, world_size=world_size)
    policy, ref = models()
    model = distributed.wrap(policy.train(), device)
    batch = halves(embedded.build_tokenizer())[rank]
    step_loss = functools.partial(kto.kto_step_loss, config=config, ref_model=ref)
    sums = loop.forward_backward(run, model, [batch], step_loss, kto.count_rows)
    metrics = {name: distributed.all_reduce_sum(value.clone()).item() for name, value in sums.items()}
    if rank == 0:
        grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
        torch.save({"metrics": metrics, "grads": grads}, out)
    distributed.barrier()  # neither process leaves the group while the other still uses it
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
