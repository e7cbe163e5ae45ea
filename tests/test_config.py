import json

import pytest

from jowa_core.config import PRESETS, ConfigError, TrainConfig, WorldActionConfig, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_serialise(name):
    p = preset(name)
    assert p.name == name
    assert json.loads(p.to_json())["model"]["tokens_per_block"] == 37


def test_official_sizes():
    assert preset("jowa_40m").model.num_layers == 4
    assert (preset("jowa_70m").model.embed_dim, preset("jowa_70m").model.num_heads) == (768, 12)
    assert preset("jowa_150m").model.num_q == 3
    assert preset("jowa_150m").size == "150M" and preset("tiny").size is None


def test_overrides_and_their_errors():
    assert preset("tiny", train={"batch_size": 8}).train.batch_size == 8
    with pytest.raises(ConfigError, match="Unknown train field"):
        preset("tiny", train={"batchsize": 8})
    with pytest.raises(ConfigError, match="Unknown preset"):
        preset("huge")


def test_validation_names_the_fix():
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        WorldActionConfig(embed_dim=100, num_heads=8)
    with pytest.raises(ConfigError, match="gamma"):
        TrainConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="tokenizer_lr_schedule"):
        TrainConfig(tokenizer_lr_schedule="linear")
    with pytest.raises(ConfigError, match="tokenizer_warmup_steps"):
        TrainConfig(tokenizer_warmup_steps=-1)
    with pytest.raises(ConfigError, match="life_start_share must be in"):
        TrainConfig(life_start_share=-0.1)
