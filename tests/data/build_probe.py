"""A process that builds the data pipeline and reports a digest of its micro-batches (used by test_data_concurrency).

Run directly (one process) or under torchrun (then it joins a gloo group and reads its data-parallel share).
Writes `<out>/rank<r>.json`: sha256 of every micro-batch's tokens+labels, in order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

from dsv4_train.config.schema import DataConfig, TrainConfig
from dsv4_train.data import build_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default="")
    parser.add_argument("--slow-lock", action="store_true", help="rank 1 waits 1 s before each cache lock")
    args = parser.parse_args()
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        torch.distributed.init_process_group(backend="gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if args.slow_lock and rank == 1:
        # Make rank 1 the last to reach the cache lock after each preparation barrier: the interleaving in
        # which rank 0 could take the lock for Megatron's (collective) index build while rank 1 waits for it.
        import contextlib
        import time

        from dsv4_train.data import cache

        original = cache.exclusive_lock

        @contextlib.contextmanager
        def slow_lock(*a, **k):
            time.sleep(1.0)
            with original(*a, **k):
                yield

        cache.exclusive_lock = slow_lock
    data = build_data(
        data_cfg=DataConfig(cache_dir=args.cache),
        train_cfg=TrainConfig(max_steps=4, global_batch_size=8, micro_batch_size=2, seq_length=64),
        vocab_size=512, seed=11, dp_rank=rank, dp_size=world, consumed_samples=0,
    )
    digests = [hashlib.sha256(b["tokens"].numpy().tobytes() + b["labels"].numpy().tobytes()).hexdigest()
               for b in data.train_iterator]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}{args.tag}.json").write_text(json.dumps(digests))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
