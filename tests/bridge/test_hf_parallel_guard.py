"""`load_hf` maps checkpoint tensors 1:1 onto a whole model; inside a process that holds a parallel
layout it must refuse (naming the layout and the resharding route) instead of loading wrong experts.
(That a whole-model process is accepted is what every other test of tests/bridge exercises.)"""

import pytest


def test_load_hf_refuses_a_split_layout(megatron_world1, monkeypatch, tmp_path):
    from megatron.core import parallel_state

    from dsv4_train.bridge import hf

    monkeypatch.setattr(parallel_state, "get_expert_model_parallel_world_size", lambda *a, **k: 2)
    with pytest.raises(ValueError, match=r"\{'ep': 2\}.*checkpoint.load_model_only=true"):
        hf._ensure_runtime(seed=0)
