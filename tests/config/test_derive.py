"""derive(): data-parallel sizes, micro-batches, LR schedule points and pipeline stages."""

import pytest

from dsv4_train.config.derive import derive, parse_layout
from dsv4_train.config.load import compose


def test_single_process():
    d = derive(compose([]), world_size=1)
    assert (d.dp, d.ep, d.etp, d.edp, d.vpp) == (1, 1, 1, 1, 1)
    assert d.num_microbatches == 8 // 4  # tiny_pretrain: global 8, micro 4
    assert d.tokens_per_step == 8 * 64
    assert d.decay_start_step == 20 and d.decay_end_step == 200  # cosine right after warm-up
    (stage,) = d.stages
    assert stage.decoder_layers == [0, 1, 2, 3, 4] and stage.mtp_layers == [0]
    assert stage.hash_layers == [0, 1] and stage.has_embedding and stage.has_loss


def test_expert_layout_and_pipeline():
    d = derive(compose(["parallel=cpu_ep2_pp2"]), world_size=4)
    assert (d.dp, d.ep, d.etp, d.edp) == (2, 2, 1, 1)
    assert d.num_microbatches == 8 // (4 * 2)
    first, last = d.stage(0), d.stage(1)
    assert first.decoder_layers == [0, 1, 2] and first.hash_layers == [0, 1] and first.has_embedding
    assert last.decoder_layers == [3, 4] and last.mtp_layers == [0] and last.has_loss
    assert last.hash_layers == []


def test_etp_and_edp():
    d = derive(compose(["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]), world_size=8)
    assert d.dp == 4 and d.edp == 2 * 4 // 2


def test_default_layout_with_virtual_stages():
    cfg = compose(["model.num_layers=8", "model.compress_ratios=[0,4,16,4,16,4,16,4,0]",
                   "parallel.pp=2", "parallel.vpp=2", "model.num_hash_layers=3"])
    d = derive(cfg, world_size=2)
    assert d.layout_str == "Et*2|t*2|t*2|t*2mL"
    assert [(s.pp_rank, s.vpp_stage, s.decoder_layers) for s in d.stages] == [
        (0, 0, [0, 1]), (1, 0, [2, 3]), (0, 1, [4, 5]), (1, 1, [6, 7])]
    assert d.stage(1, 1).mtp_layers == [0] and d.stage(0, 0).hash_layers == [0, 1]
    assert d.stage(1, 0).hash_layers == [2]
    assert [s.vpp_stage for s in d.stages_of_rank(0)] == [0, 1]


def test_wsd_decay_start_is_the_mtp_switch():
    d = derive(compose(["conf=flash_pretrain"]))  # world size from parallel.world_size
    assert d.world_size == 128 and d.dp == 16
    assert d.decay_start_step == 424000 - 42000 and d.decay_end_step == 424000
    default_wsd = derive(compose(["optim.decay_style=wsd"]), world_size=1)
    assert default_wsd.decay_start_step == 200 - int(0.2 * (200 - 20))
    assert derive(compose(["optim.decay_style=constant"]), world_size=1).decay_start_step is None


def test_release_layouts_cover_every_layer():
    for recipe, layers in (("flash_pretrain", 43), ("pro_pretrain", 61)):
        d = derive(compose([f"conf={recipe}"]))
        covered = [i for s in d.stages for i in s.decoder_layers]
        assert covered == list(range(layers))
        assert d.stages[-1].mtp_layers == [0] and d.stages[0].hash_layers == [0, 1, 2]


def test_parse_layout_grammar():
    assert parse_layout("Et*2|(tt|)*2,mL") == [
        ["embedding", "decoder", "decoder"], ["decoder", "decoder"], ["decoder", "decoder"], ["mtp", "loss"]]
    with pytest.raises(ValueError, match="pipeline_layout"):
        parse_layout("Ex|L")


def test_uneven_pipeline_layouts_are_derived_lighter_at_the_ends():
    from dsv4_train.config.derive import default_layout, parse_layout

    # V4-Flash: 43 layers + MTP over 8 stages; the embedding and the MTP/head stages get fewer layers.
    flash = default_layout(num_layers=43, mtp_num_layers=1, pp=8, vpp=1)
    assert flash == "Et*5|t*6|t*6|t*6|t*6|t*6|t*5|t*3mL"
    assert sum(kinds.count("decoder") for kinds in parse_layout(flash)) == 43
    assert default_layout(num_layers=5, mtp_num_layers=1, pp=2, vpp=1) == "Et*3|t*2mL"  # tiny, PP2
    assert default_layout(num_layers=4, mtp_num_layers=1, pp=2, vpp=1) == "Et*2|t*2mL"  # even: unchanged
    interleaved = parse_layout(default_layout(num_layers=5, mtp_num_layers=1, pp=2, vpp=2))
    assert len(interleaved) == 4 and all("decoder" in kinds for kinds in interleaved)


def test_uneven_pp_without_a_layout_is_accepted_and_a_bad_layout_gets_a_fitting_example():
    from dsv4_train.config.validate import ConfigError, validate

    validate(compose(["parallel.pp=2"]), world_size=2)  # 5 layers over 2 stages: derived
    with pytest.raises(ConfigError, match=r'A layout that fits this model: parallel.pipeline_layout="Et\*3\|t\*2mL"'):
        validate(compose(["parallel.pp=2", 'parallel.pipeline_layout="Et*2|t*2mL"']), world_size=2)
