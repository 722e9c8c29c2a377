"""PretrainingBatchSampler == Megatron-LM's MegatronPretrainingSampler (the real class is the oracle).

`megatron.training` cannot be imported here (its package __init__ pulls the whole Megatron-LM training
stack, which needs Python 3.12's typing.override), so the oracle class is compiled from the installed
`megatron/training/datasets/data_samplers.py` source itself.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from dsv4_train.data.sampler import PretrainingBatchSampler


def _megatron_sampler_class():
    spec = importlib.util.find_spec("megatron")
    source_path = Path(list(spec.submodule_search_locations)[0]) / "training" / "datasets" / "data_samplers.py"
    tree = ast.parse(source_path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MegatronPretrainingSampler")
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source_path), "exec"), namespace)
    return namespace["MegatronPretrainingSampler"]


@pytest.mark.parametrize("mbs,dp,gbs,consumed", [(2, 1, 8, 0), (2, 2, 8, 0), (1, 4, 8, 16), (3, 2, 12, 24), (2, 2, 8, 40)])
def test_matches_megatron_sampler(mbs, dp, gbs, consumed):
    oracle_cls = _megatron_sampler_class()
    end = 6 * gbs
    for rank in range(dp):
        ours = list(PretrainingBatchSampler(total_samples=end + 5, consumed_samples=consumed, end_samples=end,
                                            micro_batch_size=mbs, dp_rank=rank, dp_size=dp))
        # Megatron's sampler runs to the end of the dataset; the run stops at `end` samples.
        theirs = [b for b in oracle_cls(end + 5, consumed, mbs, rank, dp) if b[-1] < end]
        assert ours == theirs
        assert len(PretrainingBatchSampler(total_samples=end + 5, consumed_samples=consumed, end_samples=end,
                                           micro_batch_size=mbs, dp_rank=rank, dp_size=dp)) == len(ours)


def test_each_step_covers_the_same_samples_for_any_dp_size():
    gbs, mbs, steps = 8, 2, 3
    per_dp = {}
    for dp in (1, 2, 4):
        ranks = [list(PretrainingBatchSampler(total_samples=100, consumed_samples=0, end_samples=steps * gbs,
                                              micro_batch_size=mbs, dp_rank=r, dp_size=dp)) for r in range(dp)]
        micro_per_step = gbs // (mbs * dp)
        per_dp[dp] = [
            sorted(i for rank in ranks for batch in rank[s * micro_per_step:(s + 1) * micro_per_step] for i in batch)
            for s in range(steps)
        ]
    assert per_dp[1] == per_dp[2] == per_dp[4] == [list(range(s * gbs, (s + 1) * gbs)) for s in range(steps)]
