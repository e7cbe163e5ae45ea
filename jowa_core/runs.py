"""A run folder as a whole: load its tokenizer, model and games, build agents, and evaluate the run
against the controls and the paper (notebooks 04 and 06, ``jowa evaluate`` and ``jowa play``).

A run folder is what notebooks 01-03 (or the CLI) write: ``<run_dir>/tokenizer`` (the VQ-VAE),
``<run_dir>/model/checkpoints/step_*`` (the world-action model) and the ``NN_summary.json`` files
that name them. ``load_run`` also accepts a folder that holds ``checkpoints/`` itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jowa_core import games as games_mod
from jowa_core.agent import Agent, MTBCAgent, PolicyAgent
from jowa_core.evaluation import ScoreTable, control_scores, evaluate

__all__ = [
    "AGENT_KINDS",
    "DEFAULT_AGENTS",
    "Run",
    "best_constant",
    "evaluate_run",
    "load_mtbc",
    "load_run",
    "make_agent",
    "paper_comparison",
    "reference_games",
    "results_frame",
    "results_markdown",
    "score_aggregates",
    "scores_summary",
    "target_checks",
]

DEFAULT_AGENTS = ("greedy", "beam", "mtbc", "random", "constant")
"""What ``evaluate_run`` evaluates by default: JOWA greedy Q, JOWA beam search, the run's behaviour-cloning
head (only when the model has one), uniform random, and the best constant action per game."""
AGENT_KINDS = (*DEFAULT_AGENTS, "behaviour")
"""What ``evaluate_run`` can score; "behaviour" (ours) reruns the players that collected the data (``PolicyAgent``)."""


@dataclass(frozen=True)
class Run:
    """The parts of a trained run. ``games`` are the games it was trained on (canonical names)."""

    run_dir: Path
    tokenizer: Any
    model: Any
    preset: Any
    games: tuple[str, ...]
    model_dir: Path
    step: int

    @property
    def has_bc_head(self) -> bool:
        return getattr(self.model, "head_bc", None) is not None


def _summary(run_dir: Path, name: str) -> dict[str, Any]:
    from jowa_core.walkthrough import read_summary

    try:
        return read_summary(run_dir, name)
    except FileNotFoundError:
        return {}


def _model_dir(run_dir: Path) -> Path:
    from jowa_core.checkpoints import RUN_CHECKPOINTS_DIR

    named = _summary(run_dir, "03").get("model_dir")
    for cand in ([Path(named)] if named else []) + [run_dir / "model", run_dir]:
        if (cand / RUN_CHECKPOINTS_DIR).is_dir():
            return cand
    raise FileNotFoundError(
        f"{run_dir} holds no trained model (looked for {run_dir / 'model' / RUN_CHECKPOINTS_DIR} and "
        f"{run_dir / RUN_CHECKPOINTS_DIR}); run notebook 03 (or `jowa walkthrough --run-dir {run_dir}`) first."
    )


def _cache_attrs(paths: Sequence[str]) -> list[dict[str, Any]]:
    import h5py

    out = []
    for p in paths:
        if Path(p).is_file():
            with h5py.File(p, "r") as f:
                out.append({k: f.attrs[k] for k in ("game", "tokenizer_hash") if k in f.attrs})
    return out


def load_run(
    run_dir: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    device: str = "cpu",
) -> Run:
    """Load a run's tokenizer, newest model checkpoint and game list.

    Args:
        run_dir: the run folder of notebooks 01-03.
        model_dir: a folder with ``checkpoints/`` (default: notebook 03's ``model_dir``, else
            ``<run_dir>/model``, else ``run_dir``), e.g. a fine-tuned model's folder.
        tokenizer_dir: default: notebook 02's ``tokenizer_dir``, else ``<run_dir>/tokenizer``.
        device: where both modules go ("cpu", "cuda", "auto").
    The games are those of the token caches the model was trained on (else notebook 01's). The
    tokenizer must be the one those caches were made with (checked by content hash).
    """
    from jowa_core.checkpoints import load, load_tokenizer
    from jowa_core.runtime import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass the run_dir notebooks 01-03 wrote.")
    dev = resolve_device(device)
    mdir = Path(model_dir) if model_dir is not None else _model_dir(run_dir)
    ckpt = load(mdir, device=dev)
    tdir = Path(tokenizer_dir or _summary(run_dir, "02").get("tokenizer_dir") or run_dir / "tokenizer")
    if not tdir.is_dir():
        raise FileNotFoundError(f"no tokenizer at {tdir}; run notebook 02 first or pass tokenizer_dir.")
    tokenizer = load_tokenizer(tdir, device=dev)
    caches = _cache_attrs(ckpt.options.get("token_caches", []))
    hashes = {str(c["tokenizer_hash"]) for c in caches if "tokenizer_hash" in c}
    if hashes and tokenizer.content_hash() not in hashes:
        raise ValueError(
            f"the tokenizer in {tdir} is not the one the model in {mdir} was trained with (its token caches name "
            "another tokenizer hash); pass the matching tokenizer_dir."
        )
    names = [str(c["game"]) for c in caches if "game" in c] or list(_summary(run_dir, "01").get("games", {}))
    if not names:
        raise ValueError(f"cannot tell which games {run_dir} was trained on; pass the games explicitly.")
    run_games = tuple(dict.fromkeys(games_mod.canonical_name(g) for g in names))
    return Run(run_dir, tokenizer, ckpt.model, ckpt.preset, run_games, Path(ckpt.path), ckpt.step)


def make_agent(
    run: Run,
    *,
    beam_width: int = 0,
    horizon: int = 2,
    history_steps: int = 0,
    epsilon: float = 0.001,
    name: str | None = None,
    seed: int = 0,
    use_mean: bool = False,
    anchor_q: bool = False,
) -> Agent:
    """A JOWA agent over the run's model.

    Args:
        beam_width: beams per env; 0 takes the official per-game table (``games.planning_settings``).
        horizon: imagined steps (0 = greedy Q, no planning).
        history_steps: context steps; 0 means the official per-game value for official model sizes
            and the model's whole window (``max_blocks``) otherwise.
        epsilon: probability of a random legal action (official 0.001; 0 for inspection).
        anchor_q: the beam ranks paths by the root's Q(s, a0) plus the imagined change after the first step
            (``planning.beam_search``).
        use_mean: the beam values imagined states by the mean of Q over legal actions, not the max
            (``planning.state_value``).

    The beam score discounts with the run's training gamma, so the planner values the future as the
    critic was trained to.
    """
    if beam_width < 0 or horizon < 0 or history_steps < 0:
        raise ValueError(f"beam_width, horizon and history_steps must be >= 0 (0 = default); got "
                         f"{beam_width}, {horizon}, {history_steps}.")  # fmt: skip
    size = run.preset.size
    all_games = games_mod.GAMES
    bw: Any = beam_width or {g: games_mod.planning_settings(g)["beam_width"] for g in all_games}
    if history_steps:
        hist: Any = history_steps
    elif size is not None:
        hist = {g: games_mod.planning_settings(g, size)["buffer_size"] for g in all_games}
    else:
        hist = run.model.cfg.max_blocks
    label = name or ("jowa_greedy" if horizon == 0 else "jowa_beam")
    return Agent(run.tokenizer, run.model, history_steps=hist, beam_width=bw if horizon else 0, horizon=horizon,
                 epsilon=epsilon, name=label, seed=seed, gamma=run.preset.train.gamma, use_mean=use_mean,
                 anchor_q=anchor_q)  # fmt: skip


def make_mtbc_agent(
    run: Run, mtbc_model: Any = None, *, history_steps: int = 0, epsilon: float = 0.001, seed: int = 0
) -> MTBCAgent | None:
    """The MTBC agent of a run: ``mtbc_model`` (``load_mtbc``) when given, else the run's own model when it
    has a BC head, else None. ``history_steps`` 0 means the model's whole window (``max_blocks``)."""
    bc_model = mtbc_model if mtbc_model is not None else (run.model if run.has_bc_head else None)
    if bc_model is None:
        return None
    hist = history_steps or bc_model.cfg.max_blocks
    return MTBCAgent(run.tokenizer, bc_model, history_steps=hist, epsilon=epsilon, seed=seed)


def load_mtbc(run: Run) -> Any | None:
    """The MTBC baseline trained beside the run (notebook 03's ``mtbc_dir``), in eval mode on the run's
    device, or None when the run has none. It must read the run's tokens (same vocabulary)."""
    from jowa_core.training import load_agent_model

    named = _summary(run.run_dir, "03").get("mtbc_dir")
    if not named or not Path(named).is_dir():
        return None
    model, _ = load_agent_model(named, device=next(run.model.parameters()).device)
    if getattr(model, "head_bc", None) is None:
        raise ValueError(f"{named} holds no behaviour-cloning head; it is not an MTBC run (retrain notebook 03).")
    if model.cfg.obs_vocab_size != run.model.cfg.obs_vocab_size:
        raise ValueError(f"the MTBC model in {named} reads another token vocabulary than the run's model.")
    return model


def best_constant(table: ScoreTable, name: str = "constant_best") -> ScoreTable:
    """One agent holding, per game, the returns of the constant action with the best mean score
    (``meta[name]["actions"]`` names it per game): the strongest trivial control."""
    consts = [a for a in table.agents if a.startswith("constant_")]
    out = ScoreTable()
    if not consts:
        return out
    best = table.best(consts)
    out.returns[name] = {g: list(table.returns[a][g]) for g, (a, _) in best.items()}
    out.lengths[name] = {g: list(table.lengths.get(a, {}).get(g, [])) for g, (a, _) in best.items()}
    out.meta[name] = {**table.meta[best[next(iter(best))][0]], "agent": {"name": name},
                      "actions": {g: a.removeprefix("constant_") for g, (a, _) in best.items()}}  # fmt: skip
    return out


def _rename(table: ScoreTable, suffix: str) -> ScoreTable:
    if not suffix:
        return table
    return ScoreTable(
        returns={f"{a}{suffix}": v for a, v in table.returns.items()},
        lengths={f"{a}{suffix}": v for a, v in table.lengths.items()},
        meta={f"{a}{suffix}": v for a, v in table.meta.items()},
    )


def evaluate_run(
    run: Run,
    games: Sequence[str] | None = None,
    *,
    episodes: int = 16,
    protocols: Sequence[str] = ("official",),
    agents: Sequence[str] = DEFAULT_AGENTS,
    beam_width: int = 0,
    horizon: int = 2,
    history_steps: int = 0,
    epsilon: float = 0.001,
    max_steps: int | None = 108_000,
    seed: int = 0,
    num_envs: int | None = None,
    progress: bool = True,
    mtbc_model: Any = None,
    all_constants: bool = False,
    use_mean: bool = False,
    anchor_q: bool = False,
    behaviour_policy: str | None = None,
) -> ScoreTable:
    """Evaluate a run with and without planning, beside the controls, under each protocol.

    Args:
        run: ``load_run(...)``.
        games: default: the run's games.
        episodes: per game and agent (official 16).
        protocols: ``evaluation.protocol`` names; agents of protocols other than "official" get an
            ``@<protocol>`` suffix (e.g. ``jowa_beam@sticky``).
        agents: a subset of ``AGENT_KINDS``; "mtbc" is skipped when the model has no BC head; "behaviour" runs the
            data's behaviour policy (``behaviour_policy``) as an agent under each protocol.
        beam_width, horizon, history_steps, epsilon, use_mean, anchor_q: as in ``make_agent`` ("beam" uses ``horizon``,
            at least 1; "greedy" horizon 0).
        max_steps: episode cap in agent steps (official 108,000).
        seed, num_envs, progress: as in ``evaluation.evaluate``.
        mtbc_model: a separately trained MTBC model (``load_mtbc``) for the "mtbc" agent; default the
            run model's own ``head_bc`` when it has one.
        all_constants: keep every constant action's returns (``constant_<ACTION>``) beside ``constant_best``.
        behaviour_policy: the "behaviour" agent's ``data.collect`` policy name; None reads it from the run's data
            files (notebook 01's), which must agree.
    Returns:
        One ``ScoreTable``: jowa_greedy, jowa_beam, mtbc, random and constant_best (the best
        constant action per game, see ``best_constant``), for each protocol.
    """
    unknown = set(agents) - set(AGENT_KINDS)
    if unknown:
        raise ValueError(f"unknown agent kind(s) {sorted(unknown)}; choose from {', '.join(AGENT_KINDS)}.")
    if "beam" in agents and horizon < 1:
        raise ValueError("the 'beam' agent needs horizon >= 1 (horizon 0 is the 'greedy' agent).")
    game_list = [games_mod.canonical_name(g) for g in (games or run.games)]
    kw = {"max_steps": max_steps, "seed": seed, "num_envs": num_envs, "progress": progress}
    if "behaviour" in agents and behaviour_policy is None:
        behaviour_policy = data_behaviour_policy(run, game_list)
    tables = []
    for proto in protocols:
        suffix = "" if proto == "official" else f"@{proto}"
        jobs = []
        if "greedy" in agents:
            jobs.append(make_agent(run, horizon=0, history_steps=history_steps, epsilon=epsilon, seed=seed))
        if "beam" in agents:
            jobs.append(make_agent(run, beam_width=beam_width, horizon=horizon, history_steps=history_steps,
                                   epsilon=epsilon, seed=seed, use_mean=use_mean,
                                   anchor_q=anchor_q))  # fmt: skip
        if "mtbc" in agents:
            mtbc_agent = make_mtbc_agent(run, mtbc_model, history_steps=history_steps, epsilon=epsilon, seed=seed)
            jobs += [mtbc_agent] if mtbc_agent is not None else []
        if "behaviour" in agents:
            jobs.append(PolicyAgent(behaviour_policy, seed=seed))
        for agent in jobs:
            tables.append(_rename(evaluate(agent, game_list, episodes, env_config=proto, **kw), suffix))
        if "random" in agents or "constant" in agents:
            ctl = control_scores(game_list, episodes, include_random="random" in agents,
                                 actions=None if "constant" in agents else [], env_config=proto,
                                 **(kw | {"progress": False}))  # fmt: skip  # quick; one bar per action is noise
            kept = [a for a in ctl.agents if all_constants or not a.startswith("constant_")]
            keep = ScoreTable(
                returns={a: ctl.returns[a] for a in kept},
                lengths={a: ctl.lengths[a] for a in kept},
                meta={a: ctl.meta[a] for a in kept},
            )
            tables.append(_rename(keep.merge(best_constant(ctl)), suffix))
    if not tables:
        raise ValueError("nothing to evaluate: agents is empty (or only 'mtbc' without an MTBC model or BC head).")
    return tables[0].merge(*tables[1:])


def data_behaviour_policy(run: Run, game_list: Sequence[str]) -> str:
    """The ``data.collect`` policy name that collected the run's data for these games (notebook 01's files)."""
    import json

    import h5py

    from jowa_core.data.collect import POLICY_NAMES

    files = _summary(run.run_dir, "01").get("games", {})
    names = set()
    for game in game_list:
        path = files.get(game, {}).get("path")
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"the 'behaviour' agent reruns the players that collected {game}'s data, but notebook 01's summary in "
                f"{run.run_dir} names no data file for it; run notebook 01 there, or pass behaviour_policy."
            )
        with h5py.File(path, "r") as f:
            names.add(json.loads(f.attrs.get("behaviour_policy", "{}")).get("name"))
    if len(names) != 1 or next(iter(names)) not in POLICY_NAMES:
        raise ValueError(
            f"the data files of {list(game_list)} were not all collected by one of {POLICY_NAMES} (found {sorted(map(str, names))}"
            "; DQN-Replay imports have no behaviour to rerun); pass behaviour_policy, or leave 'behaviour' out of agents."
        )
    return next(iter(names))


# ---------------------------------------------------------------------------------------------
# Reading a table against the references


def reference_games(game_list: Sequence[str]) -> list[str]:
    """The games with human/random reference scores (the paper's 20), so HNS is defined."""
    out = []
    for g in game_list:
        try:
            games_mod.reference_scores(g)
        except games_mod.UnknownGameError:
            continue
        out.append(games_mod.canonical_name(g))
    return out


def score_aggregates(table: ScoreTable, reps: int = 2000, seed: int = 0) -> Any:
    """Mean, median and IQM of HNS per agent over the table's games that have reference scores,
    with stratified bootstrap CIs (pandas DataFrame; empty when no game has reference scores)."""
    ref = reference_games(table.games)
    if not ref:
        import pandas as pd

        return pd.DataFrame(columns=["agent", "metric", "stat", "value", "ci_low", "ci_high", "games"])
    return table.aggregates("hns", games=ref, reps=reps, seed=seed)


def paper_comparison(table: ScoreTable) -> Any:
    """Our mean raw scores per game beside the paper's (pandas DataFrame, one row per game).

    Pretraining games get the paper's Table 2 scores (JOWA-150M/70M/40M, MGDT, MTBC, raw returns);
    held-out games the fine-tuned Table 3 numbers (a different setting, named in ``note``); other
    games (e.g. Breakout, not a JOWA paper game) have none, which ``note`` says.
    """
    import pandas as pd

    t2 = games_mod.paper_scores()
    t3 = games_mod.paper_scores("paper_table3_finetune_dns")
    rows = []
    for g in table.games:
        row: dict[str, Any] = {"game": g}
        for a in table.agents:
            row[a] = table.mean(g, a) if g in table.returns[a] else math.nan
        if g in games_mod.PRETRAINING_GAMES:
            note = "paper Table 2 (pretraining, raw score)"
            for model, scores in t2.items():
                row[f"paper {model}"] = scores.get(g, math.nan)
        elif g in games_mod.HELD_OUT_GAMES:
            note = f"held-out game: paper Table 3 after fine-tuning ({t3.get('metric', '')})"
            for model, scores in t3.items():
                if isinstance(scores, dict):
                    row[f"paper {model} (fine-tuned)"] = scores.get(g, math.nan)
        else:
            note = "not a JOWA paper game: no reference numbers"
        row["note"] = note
        rows.append(row)
    return pd.DataFrame(rows).set_index("game")


def scores_summary(table: ScoreTable) -> dict[str, Any]:
    """JSON-able per-agent, per-game means and HNS IQMs for a notebook summary."""
    means = {a: {g: table.mean(g, a) for g in table.returns[a]} for a in table.agents}
    agg = score_aggregates(table, reps=500)
    iqm = {r.agent: r.value for r in agg.itertuples() if r.stat == "iqm"}
    return {"mean_return": means, "hns_iqm": iqm, "hns_games": reference_games(table.games)}


# ---------------------------------------------------------------------------------------------
# The walkthrough's results table: data, controls, MTBC and JOWA side by side


AGENT_ORDER = ("random", "constant_best", "behaviour", "mtbc", "jowa_greedy", "jowa_beam")


def _protocol_of(agent: str) -> tuple[str, str]:
    base, _, proto = agent.partition("@")
    return base, proto or "official"


def results_frame(table: ScoreTable, data: Any = None, *, reps: int = 2000, seed: int = 0) -> Any:
    """Long table of everything the walkthrough compares (pandas): one row per (row label, game,
    protocol) with mean return, 95% bootstrap CI and episodes, then the IQM of HNS over the games with
    reference scores as game ``"IQM HNS"``. ``data`` is ``data.prepare.dataset_summary`` of the
    training files: its mean returns per behaviour policy come first (protocol "data", no CI); when it
    was made with the evaluation's ``max_steps``, ``mean`` is the return within that cap (what the
    agents could score) and ``full_mean`` the whole episodes'."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    if data is not None:
        for r in data.to_dict("records"):
            label = "data: all policies" if r["policy"] == "all" else f"data: {r['policy']}"
            mean = r.get("mean_return_capped", r["mean_return"])
            rows.append({"row": label, "game": r["game"], "protocol": "data", "mean": mean, "ci_low": math.nan,
                         "ci_high": math.nan, "episodes": r["complete"], "full_mean": r["mean_return"]})  # fmt: skip
    ref = reference_games(table.games)
    for a in table.agents:
        base, proto = _protocol_of(a)
        for g in table.returns[a]:
            lo, hi = table.ci(g, a, reps=reps, seed=seed)
            rows.append({"row": base, "game": g, "protocol": proto, "mean": table.mean(g, a), "ci_low": lo,
                         "ci_high": hi, "episodes": len(table.returns[a][g])})  # fmt: skip
        games_a = [g for g in ref if g in table.returns[a]]
        if games_a:
            agg = table.aggregate("hns", "iqm", agent=a, games=games_a, reps=reps, seed=seed)
            rows.append({"row": base, "game": "IQM HNS", "protocol": proto, "mean": agg.value, "ci_low": agg.low,
                         "ci_high": agg.high, "episodes": sum(len(table.returns[a][g]) for g in games_a)})  # fmt: skip
    cols = ["row", "game", "protocol", "mean", "ci_low", "ci_high", "episodes", "full_mean"]
    return pd.DataFrame(rows, columns=cols)


def _row_rank(label: str) -> tuple[int, str]:
    if label.startswith("data"):
        return (0 if label == "data: all policies" else 1, label)
    if label.startswith("constant_") and label != "constant_best":
        return (3, label)
    return (2 if label == "random" else 4 + (AGENT_ORDER.index(label) if label in AGENT_ORDER else 9), label)


def results_markdown(frame: Any, digits: int = 1) -> str:
    """``results_frame`` as one markdown table: a row per data policy / agent, a column per game and
    protocol (mean [95% CI]; protocols in the order evaluated), IQM HNS columns last."""
    frame = frame.copy()
    frame["column"] = [g if p == "data" else f"{g} ({p})" for g, p in zip(frame.game, frame.protocol)]
    cols = [c for c in dict.fromkeys(frame.column) if "(" in c]
    games_cols = sorted((c for c in cols if not c.startswith("IQM")), key=lambda c: c.split(" (")[0])  # stable sort
    iqm_cols = [c for c in cols if c.startswith("IQM")]
    data_games = list(dict.fromkeys(frame[frame.protocol == "data"].game))
    header = ["", *games_cols, *iqm_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in sorted(dict.fromkeys(frame.row), key=_row_rank):
        sub = frame[frame.row == label]
        cells = []
        for c in games_cols + iqm_cols:
            hit = sub[sub.column == c]
            if hit.empty and label.startswith("data"):  # data rows: one value per game, in every protocol column
                game = c.split(" (")[0]
                hit = sub[sub.game == game] if game in data_games else hit
            if hit.empty:
                cells.append("")
                continue
            r = hit.iloc[0]
            f = f"{{:.{digits if 'IQM' not in c else 2}f}}"
            if math.isnan(r["mean"]):
                cells.append("-")  # e.g. a policy without a complete episode
                continue
            cell = f.format(r["mean"])
            if not math.isnan(r["ci_low"]):
                cell += f" [{f.format(r['ci_low'])}, {f.format(r['ci_high'])}]"
            full = r.get("full_mean", math.nan)
            if label.startswith("data") and not math.isnan(full) and full != r["mean"]:
                cell += f" (whole episodes {f.format(full)})"
            cells.append(cell)
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def target_checks(frame: Any, protocol: str = "official") -> Any:
    """The walkthrough's targets on ``results_frame`` (pandas, one row per target with ``passed``):
    per game JOWA (greedy and beam) above the data mean and above every control; on the IQM of HNS,
    JOWA's CI above MTBC's and every control's (non-overlapping); beam search at least as good as greedy."""
    import pandas as pd

    f = frame[(frame.protocol == protocol) | (frame.protocol == "data")]
    rows: list[dict[str, Any]] = []

    def get(label: str, game: str) -> Any:
        hit = f[(f.row == label) & (f.game == game) & (f.protocol != "data")]
        return None if hit.empty else hit.iloc[0]

    games_ = [g for g in dict.fromkeys(f[f.protocol != "data"].game) if g != "IQM HNS"]
    controls = [r for r in dict.fromkeys(f.row) if r == "random" or r.startswith("constant_")]
    for jowa in ("jowa_greedy", "jowa_beam"):
        for g in games_:
            j = get(jowa, g)
            if j is None:
                continue
            data = f[(f.row == "data: all policies") & (f.game == g)]
            if not data.empty:
                d = float(data.iloc[0]["mean"])
                rows.append({"target": f"{jowa} > data mean", "game": g, "passed": bool(j["mean"] > d),
                             "detail": f"{j['mean']:.2f} vs {d:.2f}"})  # fmt: skip
            for c in controls:
                r = get(c, g)
                if r is not None:
                    rows.append({"target": f"{jowa} > {c}", "game": g, "passed": bool(j["mean"] > r["mean"]),
                                 "detail": f"{j['mean']:.2f} vs {r['mean']:.2f}"})  # fmt: skip
        j = get(jowa, "IQM HNS")
        if j is None:
            continue
        for other in ["mtbc", *controls]:
            r = get(other, "IQM HNS")
            if r is not None:
                rows.append({"target": f"{jowa} IQM HNS CI above {other}'s", "game": "IQM HNS",
                             "passed": bool(j["ci_low"] > r["ci_high"]),
                             "detail": f"[{j['ci_low']:.2f}, {j['ci_high']:.2f}] vs [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"})  # fmt: skip
    for g in games_ + ["IQM HNS"]:
        b, gr = get("jowa_beam", g), get("jowa_greedy", g)
        if b is not None and gr is not None:
            rows.append({"target": "jowa_beam >= jowa_greedy", "game": g, "passed": bool(b["mean"] >= gr["mean"]),
                         "detail": f"{b['mean']:.2f} vs {gr['mean']:.2f}"})  # fmt: skip
    out = pd.DataFrame(rows, columns=["target", "game", "passed", "detail"])
    out.insert(0, "protocol", protocol)
    return out
