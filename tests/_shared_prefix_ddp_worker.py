"""tests/test_shared_prefix.py's DDP run: each of 2 ranks takes half of the batch's groups through
`token_logprobs` (the shared-prefix forward) on a DDP-wrapped model; rank 0 saves the averaged gradients.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_shared_prefix_ddp_worker.py OUT
"""

from __future__ import annotations

import sys

import torch
from test_shared_prefix import online_batch, tiny

from posttrain.rl import distributed
from posttrain.rl import logprobs as lp


def main(out: str) -> None:
    device = torch.device("cpu")
    distributed.init(device)
    rank = distributed.env_world()[0]
    model = distributed.wrap(tiny(), device)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    batch = online_batch(prompt_lengths=(5, 9, 4, 7), G=3)
    half = {k: v[6 * rank : 6 * (rank + 1)] for k, v in batch.items()}
    assert lp.shared_prefix(model.module, half, half["completion_mask"]) is not None
    lp.token_logprobs(model, half, share_prompts=True).logps.sum().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    distributed.barrier()  # neither process leaves the group while the other still uses it
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
