"""The game table: task ids, the 18-action full set, legal-action masks and reference scores.

One place for these facts (the official release keeps them in two files that drifted apart). The
table is generated from the official release's facts and shipped as ``assets/games.json``.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

NUM_ACTIONS = 18
NUM_TASKS = 60


@cache
def _table() -> dict:
    return json.loads(resources.files("jowa_core").joinpath("assets/games.json").read_text())


FULL_ACTION_SET: tuple[str, ...] = tuple(_table()["full_action_set"])
GAMES: tuple[str, ...] = tuple(_table()["games"])
PRETRAINING_GAMES: tuple[str, ...] = tuple(_table()["pretraining_games"])
HELD_OUT_GAMES: tuple[str, ...] = tuple(_table()["held_out_games"])
ABLATION_GAMES: tuple[str, ...] = tuple(_table()["ablation_games"])
HELD_OUT_TASK_ALIAS: dict[str, str] = dict(_table()["held_out_task_id_alias"])


class UnknownGameError(ValueError):
    pass


def canonical_name(game: str) -> str:
    """Accept 'Pong', 'pong', 'ms_pacman', 'MsPacman-v5' or 'ALE/Pong-v5'; return the table's name."""
    g = game.strip()
    g = re.sub(r"^ALE/", "", g)
    g = re.sub(r"(NoFrameskip)?-v\d+$", "", g)
    key = g.replace("_", "").replace("-", "").lower()
    for name in GAMES:
        if name.lower() == key:
            return name
    close = difflib.get_close_matches(g, GAMES, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownGameError(
        f"Unknown Atari game {game!r}.{hint} Use one of the 60 names in jowa_core.games.GAMES "
        f"(CamelCase as in the JOWA paper, e.g. 'Pong', 'MsPacman', 'SpaceInvaders')."
    )


def rom_id(game: str) -> str:
    """ale-py's snake_case ROM id, e.g. 'MsPacman' -> 'ms_pacman'."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", canonical_name(game)).lower()


def task_id(game: str, *, alias_held_out: bool = False) -> int:
    """Row of the task embedding for ``game`` (its index in the alphabetical 60-game list).

    With ``alias_held_out`` the held-out games reuse a similar pretraining game's row, as the
    official fine-tuning code does (Robotank->Phoenix, YarsRevenge->ChopperCommand,
    Gravitar->TimePilot, MsPacman->Berzerk; Pong keeps its own).
    """
    name = canonical_name(game)
    if alias_held_out:
        name = HELD_OUT_TASK_ALIAS.get(name, name)
    return GAMES.index(name)


def action_index(action: int | str) -> int:
    """A full-set action index from its index or its name ("FIRE"), with an error that lists the names."""
    if isinstance(action, str):
        if action not in FULL_ACTION_SET:
            raise ValueError(f"unknown action {action!r}; use one of {', '.join(FULL_ACTION_SET)}.")
        return FULL_ACTION_SET.index(action)
    if not 0 <= int(action) < NUM_ACTIONS:
        raise ValueError(f"action must be a full-set index in [0, {NUM_ACTIONS}) or a name; got {action}.")
    return int(action)


def legal_actions(game: str) -> tuple[int, ...]:
    """Full-set indices of the game's minimal ALE action set, in ALE's order."""
    names = _table()["legal_actions"][canonical_name(game)]
    return tuple(FULL_ACTION_SET.index(n) for n in names)


def legal_mask(game: str) -> np.ndarray:
    """(18,) bool, True where the full-set action is legal in ``game``."""
    mask = np.zeros(NUM_ACTIONS, dtype=bool)
    mask[list(legal_actions(game))] = True
    return mask


@cache
def action_masks() -> np.ndarray:
    """(60, 18) bool legal-action masks indexed by task id."""
    return np.stack([legal_mask(g) for g in GAMES])


def full_to_minimal(game: str) -> np.ndarray:
    """(18,) int lookup: full-set action -> index in the game's minimal set, -1 where illegal."""
    table = np.full(NUM_ACTIONS, -1, dtype=np.int64)
    for i, a in enumerate(legal_actions(game)):
        table[a] = i
    return table


def minimal_to_full(game: str) -> np.ndarray:
    """(n_legal,) int lookup: minimal-set index -> full-set action."""
    return np.asarray(legal_actions(game), dtype=np.int64)


@dataclass(frozen=True)
class ReferenceScores:
    random: float
    human: float
    dqn: float | None


def reference_scores(game: str, *, dqn_source: str = "results_file") -> ReferenceScores:
    """Random / human / DQN scores (raw returns) for the 20 paper games, and random / human for Breakout
    (the walkthrough's demo game; Mnih et al. 2015, see ``reference_notes`` in the game table).

    ``dqn_source``: "results_file" (official ``results/base_scores.py``) or "paper_table18"
    (the paper's held-out DQN column; only the 5 held-out games).
    """
    t = _table()
    name = canonical_name(game)
    if name not in t["random"]:
        raise UnknownGameError(
            f"No reference scores for {name!r}: they exist for the 20 paper games "
            f"({', '.join(PRETRAINING_GAMES + HELD_OUT_GAMES)}) and Breakout."
        )
    dqn_table = {"results_file": t["dqn"], "paper_table18": t["dqn_paper_table18"]}[dqn_source]
    return ReferenceScores(float(t["random"][name]), float(t["human"][name]), dqn_table.get(name))


def planning_settings(game: str, size: str = "150M") -> dict:
    """Official per-game beam width, horizon and context length (spec section 2)."""
    name = canonical_name(game)
    p = _table()["planning"].get(name)
    if p is None:
        return {"beam_width": 2, "horizon": 2, "buffer_size": 8}
    return {"beam_width": p["beam_width"], "horizon": p["horizon"], "buffer_size": p["buffer_size"][size]}


def paper_scores(table: str = "paper_table2_pretraining_scores") -> dict:
    """The paper's reported scores (Table 2 pretraining, Table 3 fine-tuning)."""
    return _table()[table]
