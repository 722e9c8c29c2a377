"""Worker for test_cpu_compat.py::test_uneven_first_dim_collectives_over_gloo (2 ranks, torchrun).

Gathers a different number of rows from each rank with Megatron's
`gather_from_sequence_parallel_region(..., output_split_sizes=...)` (what the alltoall MoE
dispatcher does under expert TP) and back-propagates through it (an uneven reduce-scatter).
Exits non-zero on any mismatch. Exact comparisons: only copies and sums of small integers.
"""

import os

import torch

from dsv4_train.mcore import cpu_compat

cpu_compat.apply()
torch.distributed.init_process_group("gloo")
from megatron.core.tensor_parallel import mappings  # noqa: E402  (after apply())

rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
group = torch.distributed.group.WORLD
sizes = [3, 1][:world]


def rows(r):  # rank r's rows: [sizes[r], 2], distinct values per rank
    return torch.arange(sizes[r] * 2, dtype=torch.float32).view(-1, 2) + 100 * r


x = rows(rank).requires_grad_(True)
gathered = mappings.gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
expected = torch.cat([rows(r) for r in range(world)])
assert torch.equal(gathered, expected), (gathered, expected)

# Backward: each rank sends (rank + 1) * g for all rows; rank r receives the sum over ranks of its rows.
g = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2)
gathered.backward((rank + 1) * g)
start = sum(sizes[:rank])
total = sum(r + 1 for r in range(world))
assert torch.equal(x.grad, total * g[start : start + sizes[rank]]), (x.grad, g)
# Both ranks past their last collective before tearing gloo down (a rank that destroys its group
# while the peer's reduce-scatter is still draining can abort the peer at exit: seen once in CI).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
print(f"rank {rank} ok", flush=True)
# Skip interpreter teardown: torch's C++ static destructors after a gloo run occasionally abort
# ("terminate called without an active exception", seen under heavy load) after both ranks
# passed; what this worker checks is done above.
os._exit(0)
