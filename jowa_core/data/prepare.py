"""Dataset preparation as notebook 01 and the walkthrough run it: collect or import, reuse, summarise."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jowa_core import games
from jowa_core.data.format import DatasetError, dataset_path, open_dataset

SMOKE_TRANSITIONS = 600


@dataclass(frozen=True)
class DatasetSpec:
    """What notebook 01 produces: one HDF5 file per game in ``out_dir``."""

    games: tuple[str, ...]
    transitions: int
    policy: str
    num_envs: int
    seed: int
    out_dir: Path
    dqn_replay_root: str | None = None
    fraction: float = 0.1
    overwrite: bool = False
    repeat_action_probability: float = 0.0
    """Sticky actions while collecting (DQN-Replay was recorded with 0.25); evaluation protocols are separate."""

    def __post_init__(self) -> None:
        if not self.games:
            raise ValueError("games is empty: name at least one game, e.g. games = ['Breakout'].")
        object.__setattr__(self, "games", tuple(games.canonical_name(g) for g in self.games))
        if self.transitions < 1:
            raise ValueError(f"transitions must be >= 1 per game, got {self.transitions}.")
        if not 1 <= self.num_envs <= 256:
            raise ValueError(f"num_envs must be in [1, 256], got {self.num_envs}.")
        if not 0.0 <= self.repeat_action_probability < 1.0:
            raise ValueError(f"repeat_action_probability must be in [0, 1), got {self.repeat_action_probability} "
                             "(0.25 collects with sticky actions as DQN-Replay did, 0 without).")  # fmt: skip
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}.")
        if self.dqn_replay_root and not Path(self.dqn_replay_root).is_dir():
            raise ValueError(f"dqn_replay_root {self.dqn_replay_root!r} is not a folder; give the folder that "
                             "holds <Game>/<run>/replay_logs/, or leave it empty to collect from ALE.")

    def paths(self) -> list[Path]:
        return [dataset_path(self.out_dir, g) for g in self.games]


def dataset_spec(run_dir: str, games: list[str], transitions: int, policy: str, num_envs: int, seed: int,
                 dataset_dir: str = "", dqn_replay_root: str = "", fraction: float = 0.1, overwrite: bool = False,
                 smoke: bool = False, repeat_action_probability: float = 0.0) -> DatasetSpec:
    """Build the spec from notebook parameters; ``smoke`` shrinks it, ``dataset_dir`` '' means ``run_dir/data``."""
    out_dir = Path(dataset_dir) if dataset_dir else Path(run_dir) / "data"
    if smoke:
        transitions, num_envs = min(transitions, SMOKE_TRANSITIONS), min(num_envs, 2)
    return DatasetSpec(tuple(games), int(transitions), str(policy), int(num_envs), int(seed), out_dir,
                       dqn_replay_root or None, float(fraction), bool(overwrite), float(repeat_action_probability))


def _recipes_path(spec: DatasetSpec) -> Path:
    return spec.out_dir / "prepare_recipes.json"


def _matches(path: Path, spec: DatasetSpec) -> bool:
    """An existing valid file is reused when the same recipe made it (recorded beside it)."""
    recipes = _recipes_path(spec)
    if not recipes.exists() or json.loads(recipes.read_text()).get(path.name) != _recipe(spec):
        return False
    try:
        open_dataset(path).close()
        return True
    except DatasetError:
        return False


def _recipe(spec: DatasetSpec) -> str:
    d = asdict(spec)
    d.pop("out_dir"), d.pop("overwrite"), d.pop("games")
    if not d["repeat_action_probability"]:  # files collected before the field existed keep matching
        d.pop("repeat_action_probability")
    return json.dumps(d, sort_keys=True, default=str)


def prepare_datasets(spec: DatasetSpec, progress: bool = True) -> list[Path]:
    """Collect (or import) every game of ``spec``; files made earlier by the same recipe are reused."""
    from jowa_core.data.collect import collect
    from jowa_core.data.dqn_replay import import_dqn_replay
    from jowa_core.envs import EnvConfig

    paths = []
    for game, path in zip(spec.games, spec.paths()):
        if not spec.overwrite and path.exists() and _matches(path, spec):
            print(f"{game}: reusing {path}")
        elif spec.dqn_replay_root:
            import_dqn_replay(spec.dqn_replay_root, game, path, fraction=spec.fraction, seed=spec.seed,
                              progress=progress)
        else:
            p = spec.repeat_action_probability
            collect(game, spec.transitions, path, spec.policy, num_envs=spec.num_envs, seed=spec.seed,
                    config=EnvConfig.sticky(p) if p else None, progress=progress)  # fmt: skip
        recipes = _recipes_path(spec)
        known = json.loads(recipes.read_text()) if recipes.exists() else {}
        known[path.name] = _recipe(spec)
        tmp = recipes.with_suffix(".json.partial")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, recipes)
        paths.append(path)
    return paths


def dataset_summary(paths: list[str | os.PathLike], max_steps: int | None = None) -> pd.DataFrame:
    """One row per game and behaviour policy: episodes, transitions, mean / std / max episode return.

    Unfinished (truncated) last episodes are excluded from the return statistics. With ``max_steps``,
    ``mean_return_capped`` is the mean return over the first ``max_steps`` steps of those episodes: the
    data's score under the same episode cap as an evaluation run with ``max_steps``.
    """
    rows = []
    for path in paths:
        with open_dataset(path) as f:
            game = str(f.attrs["game"])
            returns = f["episode_returns"][:]
            starts = f["episode_starts"][:]
            n = f["actions"].shape[0]
            lengths = np.diff(np.append(starts, n))
            complete = f["terminals"][starts + lengths - 1]
            capped = None
            if max_steps is not None:
                cum = np.concatenate([[0.0], np.cumsum(f["rewards"][:], dtype=np.float64)])
                capped = cum[starts + np.minimum(lengths, max_steps)] - cum[starts]
            labels = f["episode_policy"][:] if "episode_policy" in f else np.zeros(len(starts), int)
            names = json.loads(f.attrs.get("episode_policy_names", '["all"]'))
        groups = [("all", np.ones(len(starts), bool))]
        if len(names) > 1:
            groups += [(names[i], labels == i) for i in range(len(names))]
        for name, sel in groups:
            done = returns[sel & complete]
            rows.append({
                "game": game, "policy": name, "episodes": int(sel.sum()), "complete": int(len(done)),
                "transitions": int(lengths[sel].sum()),
                "mean_return": float(done.mean()) if len(done) else float("nan"),
                "std_return": float(done.std()) if len(done) else float("nan"),
                "max_return": float(done.max()) if len(done) else float("nan"),
            })
            if capped is not None:
                sel_done = capped[sel & complete]
                rows[-1]["mean_return_capped"] = float(sel_done.mean()) if len(sel_done) else float("nan")
    return pd.DataFrame(rows)
