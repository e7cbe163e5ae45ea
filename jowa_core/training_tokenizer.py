"""Tokenizer training on frames from the HDF5 datasets, its evaluation, and a token probe.

Frames are sampled from an in-memory pool: HDF5 observations are gzip chunks of 256 frames, so
reading single random frames would decompress a whole chunk per frame. The pool holds whole
chunk-aligned blocks drawn at random from each game's training region (``pool_frames`` in total,
split evenly over games; a game with fewer frames is loaded entirely), and is redrawn every
``pool_refresh_every`` steps when that is set. Each sampled frame comes with its previous frame of
the same episode for the changed-pixel mask (none at episode and block starts).

The last ``HOLDOUT_FRACTION`` of every file's transitions is never trained on;
``evaluate_reconstruction`` and ``token_probe`` read it.

A run directory holds ``tokenizer/model.safetensors`` + ``config.json`` (the exported tokenizer),
``tokenizer/training_state.pt`` (weights, optimizer, step, RNG and code-usage state, written
atomically so that resume continues exactly) and ``tokenizer/metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from jowa_core.checkpoints import load_tokenizer, save_tokenizer
from jowa_core.config import OBS_TOKENS, TokenizerConfig
from jowa_core.data.format import open_dataset
from jowa_core.models.tokenizer import (
    LPIPS,
    Tokenizer,
    changed_pixel_mask,
    codebook_stats_from_counts,
    restart_dead_codes,
    tokenizer_loss,
)
from jowa_core.runtime import atomic_path, resolve_device, synchronize, truncate_jsonl

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.05
TOKENIZER_SUBDIR = "tokenizer"
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"


def holdout_start(n: int) -> int:
    """First held-out transition of a file with ``n`` transitions (the last 5%, at least 1 frame)."""
    if n < 2:
        return n
    return n - max(1, int(n * HOLDOUT_FRACTION))


# ---------------------------------------------------------------------------------------------
# Frame pool


@dataclass
class FramePool:
    """Frames in memory. ``has_prev[i]``: frame i - 1 of the pool is frame i's predecessor in its episode."""

    frames: np.ndarray  # (M, 84, 84) uint8
    has_prev: np.ndarray  # (M,) bool
    game_index: np.ndarray  # (M,) int64, index into ``games``
    games: list[str]

    def sample(
        self, rng: np.random.Generator, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """frames (B, 84, 84), previous frames (B, 84, 84), has_prev (B,), game index (B,)."""
        idx = rng.integers(len(self.frames), size=batch_size)
        prev = np.where(self.has_prev[idx], idx - 1, idx)
        return self.frames[idx], self.frames[prev], self.has_prev[idx], self.game_index[idx]


def _read_range(f, start: int, stop: int, episode_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames = f["observations"][start:stop]
    t = np.arange(start, stop)
    has_prev = (t > start) & ~np.isin(t, episode_starts)
    return frames, has_prev


def load_frame_pool(paths: Sequence[str | os.PathLike], pool_frames: int, rng: np.random.Generator) -> FramePool:
    """Random chunk-aligned blocks from each file's training region, ``pool_frames // len(paths)`` per game."""
    if not paths:
        raise ValueError("train_tokenizer needs at least one dataset path (one <Game>.h5 per game).")
    per_game = max(1, pool_frames // len(paths))
    frames, has_prev, game_index, names = [], [], [], []
    for gi, path in enumerate(paths):
        with open_dataset(path) as f:
            names.append(str(f.attrs["game"]))
            stop = holdout_start(f["observations"].shape[0])
            if stop == 0:
                raise ValueError(f"Dataset {path} has no training frames; collect more transitions.")
            starts = f["episode_starts"][:]
            if stop <= per_game:
                ranges = [(0, stop)]
            else:
                block = f["observations"].chunks[0] if f["observations"].chunks else 256
                n_blocks = math.ceil(stop / block)
                order = rng.permutation(n_blocks)
                ranges, total = [], 0
                for b in order:
                    a, z = int(b) * block, min(stop, (int(b) + 1) * block)
                    ranges.append((a, z))
                    total += z - a
                    if total >= per_game:
                        break
                ranges.sort()
            for a, z in ranges:
                fr, hp = _read_range(f, a, z, starts)
                frames.append(fr)
                has_prev.append(hp)
                game_index.append(np.full(len(fr), gi, dtype=np.int64))
    return FramePool(np.concatenate(frames), np.concatenate(has_prev), np.concatenate(game_index), names)


# ---------------------------------------------------------------------------------------------
# Training


def _fresh_or_resumed(state_path: Path, cfg: TokenizerConfig, resume: bool) -> dict | None:
    if not (resume and state_path.is_file()):
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    saved = TokenizerConfig.from_dict(json.loads(state["config"]))
    if saved != cfg:
        diff = {k: (v, getattr(cfg, k)) for k, v in asdict(saved).items() if getattr(cfg, k) != v}
        raise ValueError(
            f"{state_path} was trained with another TokenizerConfig (saved vs given: {diff}). "
            "Use a new run_dir, pass the saved config, or resume=False to start over."
        )
    return state


def _reset_adam_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    state = optimizer.state.get(param)
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows] = 0


def tokenizer_lr(step: int, steps: int, lr: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``steps``: a linear warm-up over ``warmup_steps``,
    then ``lr`` ("constant", official) or a cosine decay from ``lr`` to 0 at ``steps`` ("cosine", ours)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}.")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_tokenizer(
    datasets: Sequence[str | os.PathLike],
    cfg: TokenizerConfig,
    steps: int,
    batch_size: int,
    lr: float = 1e-4,
    run_dir: str | os.PathLike = "runs/default",
    device: str | torch.device = "auto",
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    *,
    log_every: int = 50,
    save_every: int = 500,
    pool_frames: int = 50_000,
    pool_refresh_every: int = 0,
    eval_frames: int = 256,
    compile: bool = False,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
) -> Tokenizer:
    """Train (or resume) a tokenizer on frames of all ``datasets``; returns it in eval mode.

    Adam (no weight decay), grad clip 1.0, bf16 autocast on CUDA (spec section 4). The learning rate
    follows ``tokenizer_lr(step, steps, lr, lr_schedule, warmup_steps)``: constant ``lr`` by default
    (official); "cosine" with a warm-up (ours) learns more in a short CPU run.
    Every ``save_every`` steps and at the end: checkpoint + held-out reconstruction metrics.
    ``pool_frames`` frames are kept in memory (see the module docstring); ``pool_refresh_every`` > 0
    redraws them that often. ``compile`` wraps the model in ``torch.compile`` (CUDA runs).
    """
    if steps < 0 or batch_size < 1 or log_every < 1 or save_every < 1 or warmup_steps < 0:
        raise ValueError("need steps >= 0, batch_size >= 1, log_every >= 1, save_every >= 1 and warmup_steps >= 0.")
    tokenizer_lr(0, steps, lr, lr_schedule, warmup_steps)  # validates the schedule before any work
    dev = resolve_device(device)
    out_dir = Path(run_dir) / TOKENIZER_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = out_dir / STATE_FILE, out_dir / METRICS_FILE
    datasets = [str(p) for p in datasets]

    torch.manual_seed(seed)
    tok = Tokenizer(cfg).to(dev)
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    sample_rng = np.random.default_rng([seed, 1])
    code_counts = torch.zeros(cfg.vocab_size, dtype=torch.long, device=dev)
    step = 0
    state = _fresh_or_resumed(state_path, cfg, resume)
    if state is not None:
        tok.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        sample_rng.bit_generator.state = state["sample_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        code_counts = state["code_counts"].to(dev)
        truncate_jsonl(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    if step >= steps:
        return tok.eval()

    perceptual = None
    if cfg.perceptual_weights_path and cfg.perceptual_weight > 0:
        perceptual = LPIPS.from_file(cfg.perceptual_weights_path).to(dev)
    else:
        msg = "Perceptual (LPIPS) loss off: TokenizerConfig.perceptual_weights_path is not set (never downloaded)."
        if progress:
            tqdm.write(msg)
        else:
            logger.info(msg)

    pool_index = step // pool_refresh_every if pool_refresh_every else 0
    pool = load_frame_pool(datasets, pool_frames, np.random.default_rng([seed, 2, pool_index]))
    game_names = pool.games
    model = torch.compile(tok) if compile else tok
    use_amp = dev.type == "cuda"

    def should_log(s: int) -> bool:
        return s % log_every == 0 or s == steps

    def should_save(s: int) -> bool:
        return s % save_every == 0 or s == steps

    def save(s: int) -> None:
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "config": json.dumps(asdict(cfg)),
                    "model": tok.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": s,
                    "sample_rng": sample_rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "code_counts": code_counts.cpu(),
                },
                tmp,
            )
        save_tokenizer(out_dir, tok)

    def log(record: dict) -> None:
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    n_games = len(game_names)
    acc: dict[str, torch.Tensor] = {}
    g_abs = torch.zeros(n_games, device=dev)
    g_n = torch.zeros(n_games, device=dev)
    g_chg = torch.zeros(n_games, device=dev)
    g_chg_n = torch.zeros(n_games, device=dev)
    log_counts = torch.zeros(cfg.vocab_size, dtype=torch.long, device=dev)
    restarted = 0
    n_acc, t_log = 0, time.perf_counter()

    tok.train()
    bar = tqdm(total=steps, initial=step, desc="tokenizer", disable=not progress)
    while step < steps:
        if pool_refresh_every and step > 0 and step % pool_refresh_every == 0:
            pool = load_frame_pool(datasets, pool_frames, np.random.default_rng([seed, 2, step // pool_refresh_every]))
        fr, pv, hp, gi = pool.sample(sample_rng, batch_size)
        frames = torch.from_numpy(fr).to(dev, non_blocking=True).unsqueeze(1)
        prev = torch.from_numpy(pv).to(dev, non_blocking=True).unsqueeze(1)
        mask = changed_pixel_mask(frames, prev, torch.from_numpy(hp).to(dev))
        game_idx = torch.from_numpy(gi).to(dev)
        x01 = frames.float() / 255.0

        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(frames)
        terms = tokenizer_loss(out, x01, cfg, mask if cfg.changed_pixel_weight > 0 else None, perceptual)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        step_lr = tokenizer_lr(step, steps, lr, lr_schedule, warmup_steps)
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.step()
        step += 1

        with torch.no_grad():  # metrics stay on device until log time
            counts = torch.bincount(out.tokens.reshape(-1), minlength=cfg.vocab_size)
            code_counts += counts
            log_counts += counts
            for k, v in terms.items():
                acc[f"loss/{k}"] = acc.get(f"loss/{k}", 0.0) + v.detach()
            acc["grad_norm"] = acc.get("grad_norm", 0.0) + grad_norm.detach()
            err = ((out.reconstruction.float().clamp(-1, 1) + 1) / 2 - x01).abs()
            g_abs.index_add_(0, game_idx, err.mean((1, 2, 3)))
            g_n.index_add_(0, game_idx, torch.ones_like(game_idx, dtype=torch.float))
            g_chg.index_add_(0, game_idx, (err * mask).sum((1, 2, 3)))
            g_chg_n.index_add_(0, game_idx, mask.sum((1, 2, 3)).float())
            n_acc += 1
            if cfg.dead_code_restart and (step % cfg.dead_code_window == 0 or step == 1):  # step 1: data init
                z = out.z.detach().float().permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
                zq = out.z_quantized.detach().float().permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
                rows = restart_dead_codes(tok.embedding.weight.data, code_counts, z, (z - zq).pow(2).sum(1))
                _reset_adam_rows(opt, tok.embedding.weight, rows)
                restarted += len(rows)
                code_counts.zero_()

        if should_log(step):
            usage, perplexity = codebook_stats_from_counts(log_counts)
            synchronize(dev)  # the interval ends when the GPU has run its steps, not when they were queued
            dt = time.perf_counter() - t_log
            rec = {"step": step, "frames_per_s": n_acc * batch_size / max(dt, 1e-9), "lr": step_lr}
            rec.update({k: float(v) / n_acc for k, v in acc.items()})
            rec["usage"], rec["perplexity"] = float(usage), float(perplexity)
            rec["mae"] = float(g_abs.sum() / g_n.sum())
            rec["changed_mae"] = float(g_chg.sum() / g_chg_n.sum().clamp_min(1))
            rec["restarted_codes"] = restarted
            for i, g in enumerate(game_names):
                if g_n[i] > 0:
                    rec[f"mae/{g}"] = float(g_abs[i] / g_n[i])
                    rec[f"changed_mae/{g}"] = float(g_chg[i] / g_chg_n[i].clamp_min(1))
            log(rec)
            bar.set_postfix(loss=f"{rec['loss/total']:.4f}", mae=f"{rec['mae']:.4f}", usage=f"{rec['usage']:.2f}")
            acc = {}
            for t in (g_abs, g_n, g_chg, g_chg_n, log_counts):
                t.zero_()
            restarted, n_acc, t_log = 0, 0, time.perf_counter()
        if should_save(step):
            save(step)
            if eval_frames > 0:
                tok.eval()
                ev = evaluate_reconstruction(tok, datasets, eval_frames)
                tok.train()
                rec = {"step": step, "eval/mae": ev["mae"], "eval/changed_mae": ev["changed_mae"]}
                for g, m in ev["games"].items():
                    rec[f"eval/mae/{g}"], rec[f"eval/changed_mae/{g}"] = m["mae"], m["changed_mae"]
                log(rec)
            t_log = time.perf_counter()
        bar.update(1)
    bar.close()
    return tok.eval()


def load_trained_tokenizer(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Tokenizer:
    """The tokenizer exported by ``train_tokenizer`` into ``run_dir``."""
    return load_tokenizer(Path(run_dir) / TOKENIZER_SUBDIR, device=device)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``run_dir``'s tokenizer metrics JSONL (training and eval lines)."""
    path = Path(run_dir) / TOKENIZER_SUBDIR / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Evaluation


def _heldout_block(path: str, n_frames: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Game, frames, previous frames, has_prev for the first ``n_frames`` held-out frames of a file."""
    with open_dataset(path) as f:
        n = f["observations"].shape[0]
        start = holdout_start(n)
        if start >= n:
            start = max(0, n - n_frames)
        stop = min(n, start + n_frames)
        a = max(0, start - 1)
        frames, has_prev = _read_range(f, a, stop, f["episode_starts"][:])
        game = str(f.attrs["game"])
    off = start - a  # 1 when we read one extra frame in front, for the first frame's predecessor
    prev_idx = np.arange(off, len(frames)) - 1
    hp = has_prev[off:]
    prev = frames[np.where(hp, prev_idx, prev_idx + 1)]
    return game, frames[off:], prev, hp


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: Tokenizer,
    dataset_paths: Sequence[str | os.PathLike],
    n_frames: int = 512,
    batch_size: int = 256,
) -> dict:
    """Reconstruction error and code use on each game's held-out frames (the last 5% of its file).

    Per game: ``mae`` and ``changed_mae`` in [0, 1] pixel units (``changed_mae`` is NaN for a game with no
    changed pixel), ``usage`` (fraction of the codebook chosen at least once on these frames) and
    ``perplexity`` (exp of the entropy of the code histogram). Returns ``{"games": {game: {"mae",
    "changed_mae", "changed_fraction", "usage", "perplexity", "n_frames"}}, "mae", "changed_mae", "usage",
    "perplexity"}``: errors averaged over games, usage and perplexity of all games' tokens together.
    Runs on the tokenizer's device.
    """
    dev = next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()
    result: dict = {"games": {}}
    all_counts = torch.zeros(tokenizer.cfg.vocab_size, dtype=torch.long, device=dev)
    for path in dataset_paths:
        game, frames, prev, hp = _heldout_block(str(path), n_frames)
        abs_sum = chg_sum = chg_n = 0.0
        counts = torch.zeros_like(all_counts)
        for i in range(0, len(frames), batch_size):
            x = torch.from_numpy(frames[i : i + batch_size]).to(dev).unsqueeze(1)
            p = torch.from_numpy(prev[i : i + batch_size]).to(dev).unsqueeze(1)
            mask = changed_pixel_mask(x, p, torch.from_numpy(hp[i : i + batch_size]).to(dev))
            tokens = tokenizer.encode(x)
            counts += torch.bincount(tokens.reshape(-1), minlength=len(counts))
            err = (tokenizer.decode(tokens) - x.float() / 255.0).abs()
            abs_sum += float(err.sum())
            chg_sum += float((err * mask).sum())
            chg_n += float(mask.sum())
        n_pix = len(frames) * frames.shape[1] * frames.shape[2]
        usage, perplexity = codebook_stats_from_counts(counts)
        all_counts += counts
        result["games"][game] = {
            "mae": abs_sum / max(n_pix, 1),
            "changed_mae": chg_sum / chg_n if chg_n else float("nan"),
            "changed_fraction": chg_n / max(n_pix, 1),
            "usage": float(usage),
            "perplexity": float(perplexity),
            "n_frames": len(frames),
        }
    per = list(result["games"].values())
    result["mae"] = float(np.mean([m["mae"] for m in per])) if per else float("nan")
    chg = [m["changed_mae"] for m in per if not math.isnan(m["changed_mae"])]
    result["changed_mae"] = float(np.mean(chg)) if chg else float("nan")
    usage, perplexity = codebook_stats_from_counts(all_counts)
    result["usage"], result["perplexity"] = float(usage), float(perplexity)
    tokenizer.train(was_training)
    return result


QUALITY_TARGETS = {"mae": 0.03, "changed_mae": 0.035, "usage": 0.5}
"""Ours (issue 4): what the tiny tokenizer must reach on the held-out frames: both errors on every game
(in [0, 1] pixel units), usage of the shared codebook over all games' frames, and a token probe above
its majority baseline on every game."""


def tokenizer_report(recon: dict, probe: dict):
    """One row per game, then "all": the figures of ``evaluate_reconstruction`` and ``token_probe`` side by side.

    Columns: mae, changed_mae, usage, perplexity, probe, probe_baseline and ``meets_targets``
    (``QUALITY_TARGETS`` and probe > baseline; the usage target is checked on the "all" row only, since
    one game alone need not use most of a shared codebook). The "all" row averages the errors and probe
    over games and gives usage and perplexity of all games' held-out tokens together; it meets the
    targets when every game does and the shared codebook's usage is above target. Returns a DataFrame.
    """
    import pandas as pd

    rows = {}
    for game, m in recon["games"].items():
        p = probe["games"].get(game, {})
        rows[game] = {
            "mae": m["mae"],
            "changed_mae": m["changed_mae"],
            "usage": m["usage"],
            "perplexity": m["perplexity"],
            "probe": p.get("accuracy", float("nan")),
            "probe_baseline": p.get("baseline", float("nan")),
        }
    rows["all"] = {
        "mae": recon["mae"],
        "changed_mae": recon["changed_mae"],
        "usage": recon["usage"],
        "perplexity": recon["perplexity"],
        "probe": probe["accuracy"],
        "probe_baseline": probe["baseline"],
    }
    df = pd.DataFrame.from_dict(rows, orient="index")
    t = QUALITY_TARGETS
    ok = (df.mae < t["mae"]) & (df.changed_mae < t["changed_mae"]) & (df.probe > df.probe_baseline)
    ok["all"] = bool(ok.drop("all").all()) and df.usage["all"] > t["usage"]
    df["meets_targets"] = ok
    return df


@torch.no_grad()
def _encode_all(tokenizer: Tokenizer, frames: np.ndarray, batch_size: int, dev: torch.device) -> torch.Tensor:
    out = [
        tokenizer.encode(torch.from_numpy(frames[i : i + batch_size]).to(dev))
        for i in range(0, len(frames), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, OBS_TOKENS, dtype=torch.long, device=dev)


def token_probe(
    tokenizer: Tokenizer,
    dataset_paths: Sequence[str | os.PathLike],
    target: str = "action",
    n_frames: int = 4000,
    epochs: int = 300,
    lr: float = 0.05,
    test_fraction: float = 0.2,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Does the information a world model needs survive tokenization? A linear probe on tokens.

    For each game, the first ``n_frames`` transitions (t, t + 1 in the same episode) become features:
    the one-hot tokens of frames t and t + 1 (2 x 36 positions x vocab). ``target`` "action": the
    behaviour action a_t (its effect shows in frame t + 1); "reward": the sign class of r_t.
    A multinomial logistic regression (full batch Adam, ``epochs`` steps) is fit on the first
    ``1 - test_fraction`` of the pairs in time order and scored on the rest, against the trivial
    baseline that always predicts the training majority class. Encodes on the tokenizer's device; the
    probe itself is fit on the CPU.

    Returns ``{"games": {game: {"accuracy", "baseline", "n_train", "n_test"}}, "accuracy", "baseline"}``.
    """
    if target not in ("action", "reward"):
        raise ValueError(f"target must be 'action' or 'reward', got {target!r}.")
    dev = next(tokenizer.parameters()).device
    vocab = tokenizer.cfg.vocab_size
    was_training = tokenizer.training
    tokenizer.eval()
    gen = torch.Generator().manual_seed(seed)
    result: dict = {"games": {}}
    for path in dataset_paths:
        with open_dataset(path) as f:
            game = str(f.attrs["game"])
            n = min(f["observations"].shape[0], n_frames + 1)
            frames = f["observations"][:n]
            labels = f["actions"][:n] if target == "action" else np.sign(f["rewards"][:n]).astype(np.int64) + 1
            starts = f["episode_starts"][:]
        t = np.arange(n - 1)
        valid = ~np.isin(t + 1, starts)  # t and t + 1 in the same episode
        tokens = _encode_all(tokenizer, frames, batch_size, dev).cpu()
        feats = torch.cat([tokens[t[valid]], tokens[t[valid] + 1]], dim=1)  # (P, 72)
        feats = feats + torch.arange(2 * OBS_TOKENS) * vocab  # one id per (position, token)
        y = torch.as_tensor(np.asarray(labels)[t[valid]].astype(np.int64))
        n_test = max(1, int(len(y) * test_fraction))
        n_train = len(y) - n_test
        if n_train < 2:
            raise ValueError(f"{path}: only {len(y)} usable transition pairs; the probe needs more data.")
        n_cls = int(y.max()) + 1
        probe = torch.nn.EmbeddingBag(2 * OBS_TOKENS * vocab, n_cls, mode="sum")
        torch.nn.init.normal_(probe.weight, std=0.01, generator=gen)
        bias = torch.zeros(n_cls, requires_grad=True)
        opt = torch.optim.Adam([*probe.parameters(), bias], lr=lr)
        xtr, ytr = feats[:n_train], y[:n_train]
        for _ in range(epochs):
            loss = F.cross_entropy(probe(xtr) + bias, ytr) + 1e-4 * probe.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = (probe(feats[n_train:]) + bias).argmax(1)
        majority = int(torch.bincount(ytr).argmax())
        yte = y[n_train:]
        result["games"][game] = {
            "accuracy": float((pred == yte).float().mean()),
            "baseline": float((yte == majority).float().mean()),
            "n_train": n_train,
            "n_test": len(yte),
        }
    per = list(result["games"].values())
    result["accuracy"] = float(np.mean([m["accuracy"] for m in per]))
    result["baseline"] = float(np.mean([m["baseline"] for m in per]))
    tokenizer.train(was_training)
    return result
