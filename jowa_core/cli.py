"""The `jowa` command. Each subcommand is a thin wrapper over the functions the notebooks call."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _cmd_collect(args: argparse.Namespace) -> None:
    from jowa_core.data.collect import collect_many

    paths = collect_many(args.games, args.transitions, args.out, policy=args.policy, num_envs=args.num_envs,
                         seed=args.seed)
    for p in paths:
        print(p)


def _cmd_import(args: argparse.Namespace) -> None:
    from jowa_core.data.dqn_replay import import_dqn_replay
    from jowa_core.games import canonical_name

    for game in args.games:
        out = Path(args.out) / f"{canonical_name(game)}.h5"
        print(import_dqn_replay(args.root, game, out, runs=args.runs, num_runs=args.num_runs,
                                checkpoints=args.checkpoints, fraction=args.fraction, seed=args.seed))


def _cmd_walkthrough(args: argparse.Namespace) -> None:
    from jowa_core.walkthrough import NotebookFailed, walkthrough

    params = {k: _literal(v) for k, v in (args.parameters or [])}
    try:
        outputs = walkthrough(args.run_dir, params, resume=args.resume, only=args.only)
    except NotebookFailed as e:
        sys.exit(str(e))
    print("\n".join(str(p) for p in outputs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jowa", description="JOWA workbench: offline model-based RL on Atari.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect an offline dataset from ALE with a behaviour policy",
                       description="Run a behaviour policy in vectorised ALE environments (official JOWA protocol) "
                       "and write one HDF5 file per game to OUT/<Game>.h5.",
                       epilog="example: jowa collect --games Pong Breakout --transitions 20000 --policy random")
    p.add_argument("--games", nargs="+", required=True, help="game names, e.g. Pong Breakout SpaceInvaders")
    p.add_argument("--transitions", type=int, default=20_000, help="transitions per game (default 20000)")
    p.add_argument("--policy", default="random",
                   help="behaviour policy: random, mixed (several policies of different quality), "
                   "tracker (Breakout RAM ball tracker) (default random)")
    p.add_argument("--out", default="data/default", help="output folder (default data/default)")
    p.add_argument("--num-envs", type=int, default=8, help="parallel environments per game (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("import-dqn-replay", help="convert DQN-Replay (Dopamine) checkpoints into our format",
                       description="Read <root>/<Game>/<run>/replay_logs/$store$_*_ckpt.<i>.gz files, rebuild "
                       "episodes across the circular buffer, subsample as the JOWA paper does (10%% of 2 of 5 runs) "
                       "and write OUT/<Game>.h5.",
                       epilog="example: jowa import-dqn-replay --root /data/dqn_replay --games Pong --out data/dqn")
    p.add_argument("--root", required=True, help="folder holding <Game>/<run>/replay_logs/")
    p.add_argument("--games", nargs="+", required=True)
    p.add_argument("--out", default="data/dqn_replay")
    p.add_argument("--runs", nargs="*", type=int, default=None, help="run numbers to use (default: draw --num-runs)")
    p.add_argument("--num-runs", type=int, default=2)
    p.add_argument("--checkpoints", nargs="*", type=int, default=None, help="checkpoint indices (default: all)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of transitions kept (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("walkthrough", help="run notebooks 01-06 in order through papermill",
                       description="Execute the numbered notebooks into RUN_DIR/notebooks, stopping at the first "
                       "failure; --resume skips notebooks already completed.")
    p.add_argument("--run-dir", default="runs/default")
    p.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a parameter of every notebook (papermill style)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. 01 02")
    p.set_defaults(func=_cmd_walkthrough)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
