"""A training-loop stand-in for the preemption protocol test: real gloo group, real watcher.

Each step does a real collective (an all-reduce, like a gradient sync), prints `step <n>` and then
follows the loop's protocol: should_stop() -> "save" (a file per rank) -> requeue_if_slurm() ->
exit EXIT_PREEMPTED. Prints one JSON line at the end.
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from dsv4_train.launch.env import discover
from dsv4_train.launch.preemption import EXIT_PREEMPTED, PreemptionWatcher


def main() -> int:
    out_dir = Path(sys.argv[1])
    process = discover()
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=process.rank,
        world_size=process.world_size, timeout=timedelta(seconds=60),
    )
    watcher = PreemptionWatcher.install()
    for step in range(1, 2000):
        watcher.step_in_flight = step
        grad = torch.ones(4)
        torch.distributed.all_reduce(grad)
        print(f"step {step}", flush=True)
        time.sleep(0.02)
        if watcher.should_stop():
            (out_dir / f"saved_rank{process.rank}").write_text(str(step))
            watcher.requeue_if_slurm()
            print(json.dumps({"rank": process.rank, "stopped_at": step, "received": watcher.received_signal,
                              "received_during_step": watcher.received_during_step}),
                  flush=True)
            torch.distributed.destroy_process_group()
            return EXIT_PREEMPTED
    return 1


if __name__ == "__main__":
    sys.exit(main())
