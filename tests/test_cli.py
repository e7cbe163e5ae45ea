import subprocess
import sys

import pytest

from jowa_core.cli import build_parser, main
from jowa_core.data.format import dataset_info

COMMANDS = ["collect", "import-dqn-replay", "train-tokenizer", "pretrain", "evaluate", "play", "finetune", "walkthrough",
            "lab"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_or_description(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: jowa {command}" in out and len(out) > 300


def test_collect_writes_valid_files(tmp_path):
    main(["collect", "--games", "pong", "--transitions", "300", "--num-envs", "2", "--out", str(tmp_path)])
    info = dataset_info(tmp_path / "Pong.h5")
    assert (info.game, info.num_transitions, info.source) == ("Pong", 300, "collected")


def test_bad_game_name_is_one_clear_line_not_a_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "jowa_core.cli", "collect", "--games", "Pongg", "--transitions", "10",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "Unknown Atari game 'Pongg'" in res.stderr and "Did you mean Pong" in res.stderr


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    assert all(c in text for c in COMMANDS)
