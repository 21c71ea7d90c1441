"""`tests/_ddp_worker.py`'s training with one rank's writes to files matching a pattern failing (ENOSPC).

    python -m torch.distributed.run --nproc_per_node 2 tests/_faults_worker.py RANK PATTERN OUT [options]

Exits like the CLI: the stop message on stderr, the error's exit code.
"""

from __future__ import annotations

import errno
import io
import os
import re
import sys

import torch
from _ddp_worker import train

from posttrain.rl.config import TrainConfig, parse_config
from posttrain.rl.faults import RunStopped

if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, pattern, out, rest = int(sys.argv[1]), re.compile(sys.argv[2]), sys.argv[3], sys.argv[4:]
    if int(os.environ["RANK"]) == rank:
        real_open = io.open

        def failing_open(file, mode="r", *args, **kwargs):
            if (
                any(m in mode for m in "wax")
                and isinstance(file, (str, os.PathLike))
                and pattern.search(str(file))
            ):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real_open(file, mode, *args, **kwargs)

        io.open = failing_open
        import builtins

        builtins.open = failing_open
    try:
        train(parse_config(TrainConfig, ["--output_dir", out, *rest]))
    except RunStopped as err:
        print(f"rank {os.environ['RANK']}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
