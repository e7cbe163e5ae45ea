"""Bad input ends in one message that names the problem and the fix (issue 9's robustness list).

Covered elsewhere: a wrong game name (test_cli, test_games), a truncated or wrong-schema dataset
(test_format), a token cache made by another tokenizer (test_token_cache), a truncated or mismatched
official checkpoint (test_checkpoints), a killed walkthrough resumed (test_notebooks).
"""

import pytest
import torch

from jowa_core import checkpoints
from jowa_core.config import ConfigError, preset
from jowa_core.models.world_action import WorldActionModel


def test_missing_run_folder(tmp_path, cli_error):
    err = cli_error(["evaluate", "--run-dir", str(tmp_path / "nope")])
    assert "does not exist" in err and "run_dir" in err


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("train", "batch_size", -3), ("train", "gamma", 1.5), ("model", "num_heads", 3)],
)
def test_out_of_range_parameter_names_the_field(section, field, value):
    with pytest.raises(ConfigError, match=field):
        preset("tiny", **{section: {field: value}})


def test_truncated_run_checkpoint_names_the_folder_and_the_fallback(tmp_path):
    p = preset("tiny")
    torch.manual_seed(0)
    model = WorldActionModel(p.model)
    for step in (10, 20):
        checkpoints.save(tmp_path, model, p, step=step)
    newest = checkpoints.latest_checkpoint(tmp_path)
    weights = next(newest.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="truncated or corrupted") as exc:
        checkpoints.load(tmp_path)
    assert str(newest) in str(exc.value) and "previous checkpoint" in str(exc.value)
