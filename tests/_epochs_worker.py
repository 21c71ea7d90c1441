"""One `loop.fit` on hand-tokenized rows that records which rows each rank trained (tests/test_epochs.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/_epochs_worker.py OUT NUM_ROWS NUM_EVAL_ROWS \
        --per_device_train_batch_size 4 ...

Train rows carry an "id"; the ids of every training micro-batch, in order, go to OUT_seen_rank<r>.jsonl
(one line per micro-batch). Evaluation reports, besides eval_loss over NUM_EVAL_ROWS rows, `eval_one_row_loss`: the
loss of the first eval row alone, a set with fewer rows than processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from _ddp_worker import build_model, collate, count_fn, make_rows, nll_loss_fn

from posttrain.data import embedded
from posttrain.rl import loop
from posttrain.rl.config import TrainConfig, parse_config


def id_rows(num_rows: int, split: str = "train") -> list[dict]:
    return [{**row, "id": i} for i, row in enumerate(make_rows(num_rows, split))]


def train(config: TrainConfig, num_rows: int, num_eval_rows: int, *, rows=None, seen_path=None):
    """(run, model, fit's result); `rows` replaces the first num_rows train rows when given."""
    run = loop.start(config, command="test")
    rows = id_rows(num_rows) if rows is None else rows
    eval_rows = make_rows(num_eval_rows, "test")  # no ids: evaluation's batches are not recorded
    calls = []

    def recording_collate(batch_rows):
        if "id" in batch_rows[0]:
            calls.append([r["id"] for r in batch_rows])
        return collate(batch_rows)

    def one_row(module):
        out = loop.evaluate(run, module, eval_rows[:1], collate, nll_loss_fn, count_fn)
        return {"one_row_loss": out["eval_loss"]}

    result = loop.fit(
        run,
        build_model(),
        embedded.build_tokenizer(),
        rows,
        recording_collate,
        nll_loss_fn,
        count_fn,
        eval_rows=eval_rows,
        eval_fn=one_row if num_eval_rows else None,
    )
    if seen_path is not None:
        Path(seen_path).write_text("".join(json.dumps(ids) + "\n" for ids in calls))
    return run, result, calls


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, num_rows, num_eval_rows, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    config = parse_config(TrainConfig, ["--output_dir", out, *rest])
    rank = loop.distributed.env_world()[0]
    train(
        config,
        num_rows,
        num_eval_rows,
        seen_path=Path(out).parent / f"{Path(out).name}_seen_rank{rank}.jsonl",
    )
