import json
from pathlib import Path

import ale_py
import numpy as np
import pytest

from jowa_core import games

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def test_sixty_games_alphabetical_task_ids():
    assert len(games.GAMES) == 60
    assert list(games.GAMES) == sorted(games.GAMES, key=str.lower)
    expected = {"Assault": 3, "Atlantis": 6, "BeamRider": 9, "Berzerk": 10, "Carnival": 14, "Centipede": 15,
                "ChopperCommand": 16, "DemonAttack": 18, "NameThisGame": 36, "Phoenix": 37, "Seaquest": 46,
                "SpaceInvaders": 49, "StarGunner": 50, "TimePilot": 52, "Zaxxon": 59, "Gravitar": 26,
                "MsPacman": 35, "Pong": 39, "Robotank": 45, "YarsRevenge": 58}
    assert {g: games.task_id(g) for g in expected} == expected


def test_held_out_alias():
    assert games.task_id("Robotank", alias_held_out=True) == games.task_id("Phoenix")
    assert games.task_id("YarsRevenge", alias_held_out=True) == games.task_id("ChopperCommand")
    assert games.task_id("Gravitar", alias_held_out=True) == games.task_id("TimePilot")
    assert games.task_id("MsPacman", alias_held_out=True) == games.task_id("Berzerk")
    assert games.task_id("Pong", alias_held_out=True) == 39


@pytest.mark.parametrize("game", games.GAMES)
def test_legal_actions_match_ale_minimal_set(game):
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(ale_py.roms.get_rom_path(games.rom_id(game)))
    minimal = [a.value for a in ale.getMinimalActionSet()]
    assert list(games.legal_actions(game)) == minimal  # ALE's Action enum is the full-set index
    assert games.legal_mask(game).sum() == len(minimal)
    f2m, m2f = games.full_to_minimal(game), games.minimal_to_full(game)
    assert all(f2m[m2f[i]] == i for i in range(len(m2f)))


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference not beside the checkout")
def test_table_matches_reference_files():
    manifest = json.loads((REFERENCE / "official_jowa_state_dict_manifest.json").read_text())
    scores = json.loads((REFERENCE / "atari_scores.json").read_text())
    assert list(games.GAMES) == manifest["task_ids"]["games"]
    assert list(games.FULL_ACTION_SET) == manifest["actions"]["full_action_set"]
    for g, names in manifest["actions"]["legal_actions_per_game"].items():
        assert [games.FULL_ACTION_SET[a] for a in games.legal_actions(g)] == names
    for g in scores["random"]:
        ref = games.reference_scores(g)
        assert (ref.random, ref.human) == (scores["random"][g], scores["human"][g])
    assert list(games.PRETRAINING_GAMES) == scores["pretraining_games"]
    assert list(games.HELD_OUT_GAMES) == scores["held_out_games"]


def test_action_masks_rows_are_task_ids():
    masks = games.action_masks()
    assert masks.shape == (60, 18)
    assert np.array_equal(masks[games.task_id("Breakout")], games.legal_mask("Breakout"))


@pytest.mark.parametrize("alias", ["pong", "ALE/Pong-v5", "PongNoFrameskip-v4", "space_invaders", "MsPacman"])
def test_canonical_name_accepts_common_spellings(alias):
    assert games.canonical_name(alias) in games.GAMES


def test_unknown_game_suggests_fix():
    with pytest.raises(games.UnknownGameError, match="Did you mean Pong"):
        games.canonical_name("Pongg")


def test_planning_settings_from_spec_table():
    assert games.planning_settings("Seaquest", "150M") == {"beam_width": 4, "horizon": 2, "buffer_size": 6}
    assert games.planning_settings("Atlantis", "40M")["buffer_size"] == 4


def test_action_index_takes_names_and_indices():
    assert games.action_index("FIRE") == 1 and games.action_index(17) == 17
    assert games.action_index("DOWNLEFTFIRE") == games.FULL_ACTION_SET.index("DOWNLEFTFIRE")
    with pytest.raises(ValueError, match="unknown action 'JUMP'"):
        games.action_index("JUMP")
    with pytest.raises(ValueError, match="full-set index"):
        games.action_index(18)
