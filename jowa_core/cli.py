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

    paths = collect_many(
        args.games, args.transitions, args.out, policy=args.policy, num_envs=args.num_envs, seed=args.seed
    )
    for p in paths:
        print(p)


def _cmd_import(args: argparse.Namespace) -> None:
    from jowa_core.data.dqn_replay import import_dqn_replay
    from jowa_core.games import canonical_name

    for game in args.games:
        out = Path(args.out) / f"{canonical_name(game)}.h5"
        print(
            import_dqn_replay(
                args.root,
                game,
                out,
                runs=args.runs,
                num_runs=args.num_runs,
                checkpoints=args.checkpoints,
                fraction=args.fraction,
                seed=args.seed,
            )
        )


def _cmd_walkthrough(args: argparse.Namespace) -> None:
    from jowa_core.walkthrough import walkthrough, write_report

    params = {k: _literal(v) for k, v in (args.parameters or [])}
    outputs = walkthrough(args.run_dir, params, resume=args.resume, only=args.only)  # NotebookFailed: exit 2
    print("\n".join(str(p) for p in outputs))
    print(f"report: {write_report(args.run_dir, outputs)}")


def _cmd_lab(args: argparse.Namespace) -> None:
    import importlib.util
    import os

    from jowa_core.lab import lab_argv, prepare_lab
    from jowa_core.walkthrough import NotebookFailed

    if importlib.util.find_spec("jupyterlab") is None:
        sys.exit('jowa lab: JupyterLab is not installed; pip install -e ".[lab]" (or ".[dev]").')
    try:
        root = prepare_lab(args.run_dir, smoke=args.smoke, fresh=args.fresh)
    except NotebookFailed as e:
        sys.exit(str(e))
    extra = args.lab_args[1:] if args.lab_args[:1] == ["--"] else args.lab_args
    argv = lab_argv(root, port=args.port, open_browser=not args.no_browser, extra=extra)
    print(f"notebooks for {Path(args.run_dir).resolve()} are in {root}\n$ {' '.join(argv)}", flush=True)
    os.execv(argv[0], argv)  # Lab replaces this process: Ctrl-C stops it as usual


def _cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from jowa_core.config import preset
    from jowa_core.data.token_cache import build_token_cache
    from jowa_core.training_tokenizer import train_tokenizer

    cfg = preset(args.preset)
    tok = train_tokenizer(args.datasets, cfg.tokenizer, args.steps or cfg.train.tokenizer_steps,
                          args.batch_size or cfg.train.tokenizer_batch_size, args.lr or cfg.train.tokenizer_lr,
                          args.run_dir, args.device, not args.no_resume, args.seed,
                          lr_schedule=cfg.train.tokenizer_lr_schedule, warmup_steps=cfg.train.tokenizer_warmup_steps)
    if args.cache:
        for path in args.datasets:
            print(build_token_cache(path, tok, device=args.device))


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from jowa_core.training import mtbc_preset, resolve_preset, train_world_action

    steps = {"stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps, "batch_size": args.batch_size,
             "mc_anchor": True if args.mc_anchor else None, "life_start_share": args.life_start_share}  # fmt: skip
    cfg = resolve_preset(args.preset, steps)
    if args.objective == "mtbc":  # the baseline: the same steps and batch, all spent on its BC head
        cfg = mtbc_preset(cfg)
    train_world_action(
        cfg,
        args.caches,
        args.run_dir,
        grad_accum=args.grad_accum,
        seed=args.seed,
        device=args.device,
        resume=not args.no_resume,
        compile=args.compile,
    )


def _load_run(args: argparse.Namespace):
    """The run of --run-dir; a missing or mismatched folder ends in ``main``'s one-line error."""
    from jowa_core.runs import load_run

    return load_run(args.run_dir, model_dir=args.model_dir, device=args.device)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from jowa_core.runs import evaluate_run, paper_comparison

    run = _load_run(args)
    agents = ["greedy", "beam", "mtbc"]
    if args.planning is not None:  # --planning: beam search only; --no-planning: greedy only
        agents = ["beam" if args.planning else "greedy"] + (["mtbc"] if args.mtbc else [])
    elif not args.mtbc:
        agents.remove("mtbc")
    if args.controls:
        agents += ["random", "constant"]
    table = evaluate_run(
        run,
        args.games,
        episodes=args.episodes,
        protocols=args.protocol,
        agents=agents,
        beam_width=args.beam_width,
        horizon=args.horizon,
        history_steps=args.history_steps,
        epsilon=args.epsilon,
        max_steps=args.max_steps,
        seed=args.seed,
        num_envs=args.num_envs,
    )
    out = Path(args.out) if args.out else Path(args.run_dir) / "scores.json"
    table.save(out)
    print(table.to_markdown())
    print(paper_comparison(table).to_string())
    print(f"\nscore table written to {out}")


def _cmd_play(args: argparse.Namespace) -> None:
    import json

    from jowa_core.inspection import episode_video, record_episode
    from jowa_core.runs import make_agent

    run = _load_run(args)
    game = args.game or run.games[0]
    agent = make_agent(
        run,
        beam_width=args.beam_width,
        horizon=args.horizon,
        history_steps=args.history_steps,
        epsilon=args.epsilon,
        seed=args.seed,
    )
    record = record_episode(agent, game, args.steps, env_config=args.protocol, seed=args.seed)
    summary = record.summary()
    if args.video:
        video = episode_video(record, args.video, None if args.real_only else run.tokenizer, fps=args.fps)
        summary["video"] = str(video) if video else None
        if video is None:
            print("no video written: this OpenCV build has no mp4 encoder", file=sys.stderr)
    print(json.dumps(summary, indent=2))


def _cmd_finetune(args: argparse.Namespace) -> None:
    import json

    from jowa_core.checkpoints import load_official
    from jowa_core.finetune import finetune, finetune_scores

    official = (args.official_tokenizer, args.official_model)
    if (args.pretrained is None) == all(x is None for x in official):
        raise ValueError("give --pretrained RUN_DIR or --official-tokenizer/--official-model/--size, not both.")
    overrides = {k: v for k, v in {
        "transitions": args.transitions, "data_slice": args.data_slice, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "imagination": args.imagination,
        "imagination_start": args.imagination_start, "scratch": args.scratch, "eval_every": args.eval_every,
        "eval_episodes": args.eval_episodes, "eval_max_steps": args.eval_max_steps, "seed": args.seed,
    }.items() if v is not None}  # fmt: skip
    if args.pretrained is not None:
        pretrained = args.pretrained
    else:
        if None in official or args.size is None:
            raise ValueError("--official-tokenizer, --official-model and --size go together.")
        pretrained = load_official(args.official_tokenizer, args.official_model, args.size)
    result = finetune(
        pretrained,
        args.game,
        args.dataset,
        args.out,
        tokenizer=args.tokenizer,
        device=args.device,
        resume=args.resume,
        **overrides,
    )  # errors: main's one-line exit 2
    row = finetune_scores({"scratch" if result.scratch else "pretrained": result}).iloc[0].to_dict()
    print(json.dumps(row, indent=2, default=str))


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="runs/default", help="run folder of notebooks 01-03 (default runs/default)")
    p.add_argument(
        "--model-dir", default=None, help="folder holding checkpoints/ (default: the run's model, e.g. RUN_DIR/model)"
    )
    p.add_argument(
        "--beam-width",
        type=int,
        default=0,
        help="beams kept per depth; 0 means the official per-game width (default 0)",
    )
    p.add_argument("--horizon", type=int, default=2, help="imagined steps per decision, paper 2 (default 2)")
    p.add_argument(
        "--history-steps",
        type=int,
        default=0,
        help="context steps; 0 means official per-game values or the model's window (default 0)",
    )
    p.add_argument("--epsilon", type=float, default=0.001, help="random-action probability (official 0.001)")
    p.add_argument("--seed", type=int, default=0, help="env j of a game is seeded SEED + j (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jowa", description="JOWA workbench: offline model-based RL on Atari.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "collect",
        help="collect an offline dataset from ALE with a behaviour policy",
        description="Run a behaviour policy in vectorised ALE environments (official JOWA protocol) "
        "and write one HDF5 file per game to OUT/<Game>.h5.",
        epilog="example: jowa collect --games Pong Breakout --transitions 20000 --policy random",
    )
    p.add_argument("--games", nargs="+", required=True, help="game names, e.g. Pong Breakout SpaceInvaders")
    p.add_argument("--transitions", type=int, default=20_000, help="transitions per game (default 20000)")
    p.add_argument(
        "--policy",
        default="random",
        help="behaviour policy: random, mixed (several policies of different quality), "
        "tracker (Breakout RAM ball tracker) (default random)",
    )
    p.add_argument("--out", default="data/default", help="output folder (default data/default)")
    p.add_argument("--num-envs", type=int, default=8, help="parallel environments per game (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser(
        "import-dqn-replay",
        help="convert DQN-Replay (Dopamine) checkpoints into our format",
        description="Read <root>/<Game>/<run>/replay_logs/$store$_*_ckpt.<i>.gz files, rebuild "
        "episodes across the circular buffer, subsample as the JOWA paper does (10%% of 2 of 5 runs) "
        "and write OUT/<Game>.h5.",
        epilog="example: jowa import-dqn-replay --root /data/dqn_replay --games Pong --out data/dqn",
    )
    p.add_argument("--root", required=True, help="folder holding <Game>/<run>/replay_logs/")
    p.add_argument("--games", nargs="+", required=True)
    p.add_argument("--out", default="data/dqn_replay")
    p.add_argument("--runs", nargs="*", type=int, default=None, help="run numbers to use (default: draw --num-runs)")
    p.add_argument("--num-runs", type=int, default=2)
    p.add_argument("--checkpoints", nargs="*", type=int, default=None, help="checkpoint indices (default: all)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of transitions kept (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser(
        "evaluate",
        help="score a trained run with and without planning, beside the controls",
        description="Evaluate a run's JOWA agent greedily and with beam search, plus the random and "
        "best-constant-action controls (and MTBC when the model has a BC head), under the given "
        "protocols; print per-game scores with bootstrap CIs, HNS aggregates and the paper's numbers, "
        "and write the score table as JSON. Same function as notebook 06 (runs.evaluate_run).",
        epilog="example: jowa evaluate --run-dir runs/default --episodes 16 --max-steps 4500 "
        "--protocol official sticky --out runs/default/scores.json",
    )
    _add_run_args(p)
    p.add_argument("--games", nargs="+", default=None, help="games to evaluate (default: the run's games)")
    p.add_argument("--episodes", type=int, default=16, help="episodes per game and agent (official 16)")
    p.add_argument(
        "--protocol",
        nargs="+",
        default=["official"],
        choices=["official", "sticky", "fire", "sticky_fire"],
        help="evaluation protocols: official (no sticky actions), sticky (repeat probability 0.25), fire "
        "(FIRE after reset and life loss); several run one after the other (default official)",
    )
    p.add_argument(
        "--planning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--planning: only beam search; --no-planning: only greedy Q (default: both)",
    )
    p.add_argument(
        "--mtbc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the behaviour-cloning head when the model has one (default yes)",
    )
    p.add_argument(
        "--controls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the random and best-constant-action controls (default yes)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=108_000,
        help="episode cap in agent steps (official 108000; a few thousand on CPU)",
    )
    p.add_argument("--num-envs", type=int, default=None, help="parallel envs per game (default: one per episode)")
    p.add_argument("--out", default=None, help="score table JSON (default RUN_DIR/scores.json)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "play",
        help="play one episode with a trained run and save a video",
        description="Play one episode of GAME with the run's agent (beam search unless --horizon 0), "
        "print a JSON summary (return, steps, planned-vs-greedy agreement) and write an mp4 with the "
        "real frame and the imagined next frame side by side. Same function as notebook 04.",
        epilog="example: jowa play --run-dir runs/default --game Pong --steps 1000 --video pong.mp4",
    )
    _add_run_args(p)
    p.add_argument("--game", default=None, help="game to play (default: the run's first game)")
    p.add_argument("--steps", type=int, default=1000, help="agent steps at most; stops at game over (default 1000)")
    p.add_argument(
        "--protocol",
        default="official",
        choices=["official", "sticky", "fire", "sticky_fire"],
        help="evaluation protocol of the env (default official)",
    )
    p.add_argument("--video", default=None, help="write the episode as this .mp4 file")
    p.add_argument("--fps", type=int, default=15, help="video frames per second (default 15)")
    p.add_argument("--real-only", action="store_true", help="video of the real frames only (no imagined frame)")
    p.set_defaults(func=_cmd_play)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model on a held-out game from few transitions",
        description="Draw --transitions transitions of GAME from DATASET (blocks of 8 consecutive "
        "steps, uniformly), train the stage-2 joint loss (C51 + CQL + 0.5 x world loss) from step 0, "
        "optionally with imagined segments from beam search, evaluate periodically and keep the best "
        "snapshot in OUT/best. --scratch trains the same config from a random initialisation (the "
        "baseline). Resumes a killed run in OUT. Same function as notebook 05 (finetune.finetune).",
        epilog="example: jowa finetune --pretrained runs/default --game MsPacman --dataset "
        "data/dqn/MsPacman.h5 --data-slice expert --transitions 5000 --steps 50000 --out runs/ft_mspacman",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="our pretrained run: a notebook run folder (with model/ and tokenizer/) or a model folder",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --pretrained (default: beside the model)")
    p.add_argument("--official-tokenizer", default=None, help="the official release's tokenizer.pt")
    p.add_argument("--official-model", default=None, help="the official release's JOWA_<size>.pt")
    p.add_argument("--size", default=None, choices=["40M", "70M", "150M"], help="size of --official-model")
    p.add_argument("--game", required=True, help="game to fine-tune on, e.g. MsPacman")
    p.add_argument("--dataset", required=True, help="our HDF5 dataset of GAME (or its .tokens.h5 cache)")
    p.add_argument("--out", required=True, help="run folder of the fine-tuning (checkpoints, best/, metrics)")
    p.add_argument("--transitions", type=int, default=None, help="transitions drawn (default 5000, the paper's)")
    p.add_argument(
        "--data-slice",
        default=None,
        choices=["all", "expert", "suboptimal", "highly_suboptimal"],
        help="part of the file to draw from: all, expert (last 20%%), suboptimal (first 20%%), "
        "highly_suboptimal (first 5%%) (default all)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50000, official)")
    p.add_argument("--batch-size", type=int, default=None, help="segments per step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-5)")
    p.add_argument(
        "--imagination",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add imagined segments from beam search (width 2, horizon 2) (default off)",
    )
    p.add_argument("--imagination-start", type=int, default=None, help="first imagination step (default 20000)")
    p.add_argument(
        "--scratch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random initialisation with the pretrained config: the baseline (default off)",
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: one epoch)")
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation (default 8)")
    p.add_argument("--eval-max-steps", type=int, default=None, help="episode cap in agent steps (default 10000)")
    p.add_argument("--seed", type=int, default=None, help="seeds the draw, initialisation and sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the run found in OUT (default); --no-resume starts over",
    )
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "train-tokenizer",
        help="train the VQ-VAE frame tokenizer and build token caches",
        description="Train (or resume) the tokenizer on the frames of the given datasets; with "
        "--cache, encode every dataset into <Game>.tokens.h5 beside it. Same function as notebook 02.",
        epilog="example: jowa train-tokenizer --datasets data/default/*.h5 --run-dir runs/x --cache",
    )
    p.add_argument("--datasets", nargs="+", required=True, help="dataset files (<Game>.h5)")
    p.add_argument("--preset", default="tiny", help="tiny, jowa_40m, jowa_70m or jowa_150m (default tiny)")
    p.add_argument("--run-dir", default="runs/default", help="the tokenizer goes to RUN_DIR/tokenizer")
    p.add_argument("--steps", type=int, default=0, help="0 means the preset's")
    p.add_argument("--batch-size", type=int, default=0, help="frames per step; 0 means the preset's")
    p.add_argument("--lr", type=float, default=0.0, help="0 means the preset's")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start afresh instead of resuming")
    p.add_argument("--cache", action="store_true", help="build the token caches afterwards")
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser(
        "pretrain",
        help="train the world-action model (stage 1, then stage 2)",
        description="Stage 1 (world model) then stage 2 (joint C51 + CQL) on token caches. Run it under "
        "torchrun for several GPUs: torchrun --nproc_per_node 8 -m jowa_core.cli pretrain ... "
        "Same function as notebook 03.",
        epilog="example: jowa pretrain --preset tiny --caches runs/x/data/*.tokens.h5 --run-dir runs/x/model",
    )
    p.add_argument("--caches", nargs="+", required=True, help="token caches (<Game>.tokens.h5)")
    p.add_argument("--preset", default="tiny", help="tiny, jowa_40m, jowa_70m or jowa_150m (default tiny)")
    p.add_argument("--run-dir", default="runs/default/model")
    p.add_argument("--stage1-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--stage2-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=None, help="global segments per step; default: the preset's")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model and its loss (GPU)")
    p.add_argument("--no-resume", action="store_true", help="start afresh instead of resuming")
    p.add_argument(
        "--mc-anchor",
        action="store_true",
        help="anchor the critic on the data's discounted returns-to-go (TrainConfig.mc_anchor)",
    )
    p.add_argument("--life-start-share", type=float, default=None,
                   help="share of each batch from segments holding a life's first step (TrainConfig.life_start_share)")
    p.add_argument("--objective", choices=("jowa", "mtbc"), default="jowa",
                   help="jowa (both stages) or mtbc: the behaviour-cloning baseline with the same steps and batch")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "walkthrough",
        help="run notebooks 01-06 in order through papermill",
        description="Execute the numbered notebooks into RUN_DIR/notebooks, stopping at the first "
        "failure; --resume skips notebooks already completed.",
    )
    p.add_argument("--run-dir", default="runs/default")
    p.add_argument(
        "-p",
        "--parameter",
        dest="parameters",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        help="override a parameter of every notebook (papermill style)",
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. 01 02")
    p.set_defaults(func=_cmd_walkthrough)

    p = sub.add_parser("lab", help="open JupyterLab on the notebooks with a run folder ready",
                       description="Run (or resume) the smoke pipeline into RUN_DIR so every notebook has the results "
                       "of the earlier ones, write copies of the notebooks with run_dir and smoke filled in to "
                       "RUN_DIR/lab, and start JupyterLab there. Run All in any notebook then works at once; the "
                       "widgets (beam viewer, dream mode, token grid) are live. --no-smoke skips the pipeline and "
                       "opens copies with smoke=False on a run you made yourself (e.g. by jowa walkthrough).",
                       epilog="example: jowa lab --run-dir runs/lab -- --ServerApp.ip=0.0.0.0")
    p.add_argument("--run-dir", default="runs/lab", help="run folder the notebooks use (default runs/lab)")
    p.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=True,
                   help="run the smoke pipeline first and open smoke-size copies (default yes)")
    p.add_argument("--fresh", action="store_true", help="rewrite the copies in RUN_DIR/lab (default: keep your edits)")
    p.add_argument("--port", type=int, default=None, help="port of the Lab server (default: Jupyter's, 8888)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    p.add_argument("lab_args", nargs=argparse.REMAINDER, help="after --: more options for jupyter lab")
    p.set_defaults(func=_cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # our errors name the problem and the fix; a traceback from deep inside would hide that
        parser.exit(2, f"jowa {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
