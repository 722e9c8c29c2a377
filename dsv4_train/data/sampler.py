"""Which dataset samples each data-parallel rank reads: Megatron-LM's `MegatronPretrainingSampler` order.

Megatron-Core has no sampler (it lives in `megatron.training`, whose import pulls the whole Megatron-LM
training stack and its global args), so this is a re-statement of its semantics, checked against it in
`tests/data/test_sampler.py`:
the global sample stream is `consumed_samples, consumed_samples + 1, ...`; it is cut into chunks of
`micro_batch_size * dp_size`, and rank r takes slice `[r * mbs, (r + 1) * mbs)` of each chunk. So one
optimizer step (global_batch_size consecutive samples) covers exactly the same samples for any dp_size,
and resuming is starting the stream at the number of samples consumed so far.
"""

from __future__ import annotations

from typing import Iterator, List


class PretrainingBatchSampler:
    """Yields lists of `micro_batch_size` dataset indices for one data-parallel rank.

    Args:
        total_samples: length of the sample stream (the train dataset's length).
        consumed_samples: samples already consumed by all ranks together (0 for a fresh run).
        end_samples: stop before this global sample (train.max_steps * train.global_batch_size).
        micro_batch_size, dp_rank, dp_size: this rank's share of each chunk.
    """

    def __init__(self, *, total_samples: int, consumed_samples: int, end_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        assert micro_batch_size > 0 and dp_size > 0 and 0 <= dp_rank < dp_size
        assert 0 <= consumed_samples <= end_samples <= total_samples, (consumed_samples, end_samples, total_samples)
        self.consumed_samples = consumed_samples
        self.end_samples = end_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.chunk = micro_batch_size * dp_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        return (self.end_samples - self.consumed_samples) // self.chunk

    def __iter__(self) -> Iterator[List[int]]:
        for chunk_start in range(self.consumed_samples, self.end_samples - self.chunk + 1, self.chunk):
            first = chunk_start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
