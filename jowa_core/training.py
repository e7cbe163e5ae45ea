"""World-action training: stage 1 (world model) then stage 2 (world model + C51/CQL critic), spec 6-7.

One linear loop in the style of nanoGPT's ``train.py`` and dreamerv3's ``run/train.py``: factories
(data, model, optimizer), schedule predicates (``should_log``, ``should_save``), then the loop.
``train_world_action`` runs as one process (CPU or one GPU) or as one process per device under
``torchrun`` (DDP). The tokenizer's loop lives in ``training_tokenizer``; here the observation
tokens come from the token caches (the official README's recommended stage-2 path).

Run directory::

    <run_dir>/checkpoints/step_<step>/{model.safetensors, config.json, training_state.pt}
    <run_dir>/metrics.jsonl        one JSON record per log interval (notebooks plot it)
    <run_dir>/tensorboard/         when TensorBoard is installed

Where we differ from the official trainer (spec 7 and 11), by design:

- Q1: the DDP forward is called, so gradients really are all-reduced (official: never synced).
- Q2: stage 2 trains the world part at ``lr_stage2`` (5e-5, the paper); ``official_stage2_lr=True``
  keeps ``lr_stage1`` as the official off-by-one does.
- Q7: in the Q-head groups (critic lr) only the three stacked weight matrices get weight decay, as
  for every other Linear weight; the Q head's biases and LayerNorm parameters get none.
  ``official_q_weight_decay=True`` decays the whole Q head (official).
- Stage switch: steps ``[0, stage1_steps)`` are stage 1, the next ``stage2_steps`` stage 2 (official:
  250,001 stage-1 steps, Q2). At the switch the optimizer is re-created (Adam state resets), as
  officially. The Q head is frozen in stage 1 (it gets no gradient there anyway).
- The target Q head is hard-copied when the global step (completed optimizer steps, both stages)
  is a multiple of ``target_update_every``, as officially; resuming restores the saved target head
  instead of copying the online one.
- No in-training evaluation and no "best" checkpoint (``jowa_core.evaluation`` scores checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from jowa_core import checkpoints
from jowa_core.config import Preset, TrainConfig, WorldActionConfig, preset
from jowa_core.data.segments import SegmentSampler, SegmentSource, require_lives
from jowa_core.data.token_cache import open_token_cache
from jowa_core.games import action_masks
from jowa_core.losses import LossTerms, joint_loss
from jowa_core.models import fused_ln
from jowa_core.models.fused_attention import takes_head_size
from jowa_core.models.world_action import WorldActionModel
from jowa_core.runtime import (
    available_cores,
    configure_threads,
    resolve_device,
    run_pair,
    seed_everything,
    synchronize,
    truncate_jsonl,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DATA_SPLITS = ("per_rank", "global")

# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``owns_group``: we created the process group (and end it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device = "auto") -> tuple[DistInfo, torch.device]:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (NCCL on CUDA, gloo
    on CPU); a plain single process gets rank 0 of 1. A group the caller already created is used."""
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        owns = world > 1
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set; launch with torchrun (it sets both).")
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, local_world, owns), dev


def _broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (one small pickle; used at start-up and resume only)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# RNG state as plain tensors and lists (loads with torch.load(weights_only=True))


def rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch (CPU and every CUDA device) generator states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_seed(seed: int, rank: int) -> int:
    """Independent dropout/REM streams per rank, derived from the run seed."""
    return int(np.random.SeedSequence([seed, 7, rank]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Data


class GlobalBatchSlices(IterableDataset):
    """Every rank draws the same global batch and keeps its own contiguous slice of rows.

    Rank r of W gets rows [r G/W, (r+1) G/W) of global batch i, so the data of a step does not
    depend on the world size: W ranks x 1 accumulation step see exactly the rows that 1 rank x W
    accumulation steps sees (tests use this to compare DDP against one process). Costs W times
    the (cheap, in-memory) token gathering of the ``per_rank`` split.
    """

    def __init__(self, sampler: SegmentSampler, rank: int, world_size: int) -> None:
        super().__init__()
        if sampler.world_size != 1 or sampler.batch_size % world_size:
            raise ValueError("GlobalBatchSlices needs a world_size-1 sampler whose batch divides by the world size.")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = self.sampler.batch_size // self.world_size
        for batch in self.sampler:
            out = {k: v[self.rank * n : (self.rank + 1) * n] for k, v in batch.items() if k != "batch_index"}
            out["batch_index"] = batch["batch_index"]
            yield out


def make_sources(
    token_caches: Sequence[str | os.PathLike],
    model_cfg: WorldActionConfig,
    *,
    stride: int = 4,
    segment_length: int | None = None,
    returns_gamma: float | None = None,
) -> list[SegmentSource]:
    """One ``SegmentSource`` per token cache, validated (format, and the token vocabulary against the
    model's ``obs_vocab_size``) before any training starts."""
    if not token_caches:
        raise ValueError("train_world_action needs at least one token cache (<Game>.tokens.h5).")
    sources = []
    for path in token_caches:
        with open_token_cache(path) as f:
            vocab = int(f.attrs["vocab_size"]) if "vocab_size" in f.attrs else None
        if vocab is not None and vocab > model_cfg.obs_vocab_size:
            raise ValueError(
                f"{path} holds tokens of a {vocab}-code tokenizer but the model has obs_vocab_size "
                f"{model_cfg.obs_vocab_size}; use a preset whose model.obs_vocab_size equals the tokenizer's "
                "vocab_size."
            )
        sources.append(
            SegmentSource(
                None,
                tokens_path=path,
                segment_length=segment_length or model_cfg.max_blocks,
                stride=stride,
                returns_gamma=returns_gamma,
            )
        )
    games_seen = [s.game for s in sources]
    if len(set(games_seen)) != len(games_seen):
        raise ValueError(f"two token caches are for the same game ({games_seen}); pass one cache per game.")
    return sources


@dataclass
class Batch:
    """One micro-batch on the device: ``tokens`` (B, L * 37) model input, the rest (B, L) / (B,)."""

    tokens: torch.Tensor
    task_ids: torch.Tensor
    rewards: torch.Tensor
    ends: torch.Tensor
    mask: torch.Tensor
    legal: torch.Tensor
    returns_to_go: torch.Tensor | None = None
    """(B, L) the data's discounted returns-to-go, when the sources compute them (``TrainConfig.mc_anchor``)."""
    life_ends: torch.Tensor | None = None
    """(B, L) steps that lost a life with the episode going on (``TrainConfig.life_loss_terminal``)."""


def to_batches(
    raw: dict[str, torch.Tensor], n_micro: int, device: torch.device, legal_table: torch.Tensor
) -> list[Batch]:
    """Split a rank's rows into ``n_micro`` micro-batches and build the model input
    [36 obs tokens, action] x L per row (padding steps hold token 0 and action 0)."""
    obs, actions = raw["tokens"], raw["actions"]  # (B, L, 36), (B, L)
    B = actions.shape[0]
    tokens = torch.cat([obs, actions.unsqueeze(-1)], dim=-1).reshape(B, -1)  # (B, L * 37)
    out = []
    n = B // n_micro
    for k in range(n_micro):
        sl = slice(k * n, (k + 1) * n)
        task = raw["task_id"][sl].to(device, non_blocking=True)
        out.append(Batch(
            tokens=tokens[sl].to(device, non_blocking=True),
            task_ids=task,
            rewards=raw["rewards"][sl].to(device, non_blocking=True),
            ends=raw["ends"][sl].to(device, non_blocking=True),
            mask=raw["mask_padding"][sl].to(device, non_blocking=True),
            legal=legal_table[task],
            returns_to_go=raw["returns_to_go"][sl].to(device, non_blocking=True) if "returns_to_go" in raw else None,
            life_ends=raw["life_ends"][sl].to(device, non_blocking=True) if "life_ends" in raw else None,
        ))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Optimizer


def param_groups(
    model: WorldActionModel,
    stage: int,
    train_cfg: TrainConfig,
    *,
    official_stage2_lr: bool = False,
    official_q_weight_decay: bool = False,
) -> list[dict[str, Any]]:
    """AdamW parameter groups (spec 7), each with a ``name``.

    world_decay: Linear weights (wd 0.01); world_no_decay: biases, LayerNorm and Embedding weights;
    both at ``lr_stage1`` in stage 1 and ``lr_stage2`` in stage 2 (``lr_stage1`` with
    ``official_stage2_lr``, quirk Q2). Stage 2 adds critic_decay (the Q ensemble's stacked weight
    matrices) and critic_no_decay (its biases and LayerNorm parameters) at ``critic_lr``; with
    ``official_q_weight_decay`` (quirk Q7) the whole Q head is decayed. The target head is never
    optimized. Every trainable parameter lands in exactly one group (checked).
    """
    world_lr = train_cfg.lr_stage1 if stage == 1 or official_stage2_lr else train_cfg.lr_stage2
    wd = train_cfg.weight_decay
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    groups: dict[str, list[nn.Parameter]] = {n: [] for n in ("world_decay", "world_no_decay", "critic_decay",
                                                            "critic_no_decay")}  # fmt: skip
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("head_q_target."):
            continue
        if name.startswith("head_q."):
            decayed = official_q_weight_decay or p.ndim == 3  # stacked (num_q, out, in) weight matrices
            groups["critic_decay" if decayed else "critic_no_decay"].append(p)
        else:
            groups["world_decay" if id(p) in decay_ids else "world_no_decay"].append(p)
    settings = {
        "world_decay": (world_lr, wd),
        "world_no_decay": (world_lr, 0.0),
        "critic_decay": (train_cfg.critic_lr, wd),
        "critic_no_decay": (train_cfg.critic_lr, 0.0),
    }
    grouped = sum(len(v) for v in groups.values())
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if grouped != trainable:  # pragma: no cover - guards against new parameter kinds
        raise RuntimeError(f"{trainable - grouped} trainable parameters fell into no optimizer group.")
    return [{"params": ps, "name": n, "lr": settings[n][0], "weight_decay": settings[n][1]}
            for n, ps in groups.items() if ps]  # fmt: skip


def stage2_lr_factor(step: int, train_cfg: TrainConfig) -> float:
    """Multiplier of stage 2's learning rates for the optimizer step that starts with ``step`` steps done:
    1 throughout with the official "constant" schedule; with "cosine", a half cosine from 1 at the stage's
    first step to 0 after its last. A function of the step alone, so a resumed run repeats it exactly."""
    if train_cfg.lr_schedule_stage2 == "constant" or step < train_cfg.stage1_steps:
        return 1.0
    done = (step - train_cfg.stage1_steps) / max(train_cfg.stage2_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def clip_and_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_(params, max_norm)`` then ``opt.step()``; returns the gradients' total norm before clipping.

    A fused Adam or AdamW (``fused=True``, the CUDA default here) takes the clipping as its ``grad_scale``, the
    attribute ``torch.amp.GradScaler`` sets for it: the fused kernel divides each gradient by 1 / (clip
    coefficient) as it reads it, instead of a pass of ``_foreach_mul_`` that reads and writes every gradient first
    (jowa_150m: 0.6 GB of fp32 gradients each way a step). Same update, up to the rounding of that division;
    ``tests/test_training.py`` checks it against the plain clip, so a torch that stopped reading ``grad_scale``
    fails there rather than training unclipped."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if getattr(opt, "_step_supports_amp_scaling", False) and isinstance(opt, torch.optim.Adam):
        opt.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # 1 / clip_grad_norm_'s coefficient
        try:
            opt.step()
        finally:
            del opt.grad_scale
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        opt.step()
    return norm


class FusedSwitches(NamedTuple):
    """The training loop's implementation switches, resolved: same function, same parameters and checkpoints."""

    layer_norm: bool
    qkv: bool
    bias_gelu: bool
    branch_bias: bool
    attention: bool


def fused_switches(
    device: torch.device,
    fused_layer_norm: bool | None = None,
    fused_qkv: bool | None = None,
    fused_bias_gelu: bool | None = None,
    fused_branch_bias: bool | None = None,
    fused_attention: bool | None = None,
    *,
    head_size: int | None = None,
) -> FusedSwitches:
    """The loop's switches with None resolved: each on for CUDA, where each was a measured win for jowa_150m
    (README Performance), and off elsewhere. The Triton ops also need triton; the branch biases need the fused
    LayerNorm op they ride in; the attention op needs a ``head_size`` that is a power of two >= 16 (every
    preset's) and a GPU of compute capability 8.0 or newer (its bf16 tensor-core products). A given value wins."""
    cuda = device.type == "cuda"
    triton_ok = cuda and fused_ln.triton_available()
    ln = triton_ok if fused_layer_norm is None else fused_layer_norm
    attention_ok = (triton_ok and (head_size is None or takes_head_size(head_size))
                    and torch.cuda.get_device_capability(device) >= (8, 0))  # fmt: skip
    return FusedSwitches(
        layer_norm=ln,
        qkv=cuda if fused_qkv is None else fused_qkv,
        bias_gelu=triton_ok if fused_bias_gelu is None else fused_bias_gelu,
        branch_bias=(triton_ok and ln) if fused_branch_bias is None else fused_branch_bias,
        attention=attention_ok if fused_attention is None else fused_attention,
    )


def set_stage(model: WorldActionModel, stage: int) -> None:
    """Stage 1 freezes the online Q head (no critic loss yet); stage 2 trains it."""
    model.head_q.requires_grad_(stage == 2)
    model.head_q_target.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Loss through the (possibly DDP-wrapped) forward


def step_loss(
    forward: nn.Module,
    model: WorldActionModel,
    batch: Batch,
    *,
    stage: int,
    train_cfg: TrainConfig,
    clip_rewards: bool = True,
) -> LossTerms:
    """Joint loss of one micro-batch. ``forward`` is the module whose call runs the model (DDP or
    torch.compile wrapper, so that DDP prepares its gradient all-reduce); the target head and the
    support are read from the unwrapped ``model``. Stage 1: world loss only (lambda = 1); stage 2:
    C51 TD + CQL + lambda 0.1 world loss (spec 6.4)."""
    cfg = model.cfg
    critic = stage == 2
    tokens, rewards, ends, mask, mc = batch.tokens, batch.rewards, batch.ends, batch.mask, batch.returns_to_go
    critic_ends = None
    if train_cfg.life_loss_terminal:
        if batch.life_ends is None:
            raise ValueError("life_loss_terminal needs batches with life_ends (SegmentSource.fetch gives them).")
        critic_ends = ends | batch.life_ends
    next_logits = next_mask = None
    if train_cfg.next_step_target:  # the batch holds L + 1 steps: the online window is the first L
        tpb, L = cfg.tokens_per_block, cfg.max_blocks
        if tokens.shape[1] != (L + 1) * tpb:
            raise ValueError(f"next_step_target needs segments of {L + 1} steps, got {tokens.shape[1] // tpb}.")
        next_mask = mask[:, L]
        tokens, rewards, ends, mask = tokens[:, : L * tpb], rewards[:, :L], ends[:, :L], mask[:, :L]
        critic_ends = critic_ends[:, :L] if critic_ends is not None else None
        if critic:
            with torch.no_grad():  # the target head at step L, read from the window of steps 1..L
                later = forward(batch.tokens[:, tpb:], batch.task_ids)
                next_logits = model.q_target_logits(later.q_hidden[:, -1:])[:, :, 0]
    out = forward(tokens, batch.task_ids)
    rewards = rewards.clamp(-1.0, 1.0) if clip_rewards else rewards
    rem = None
    if critic and cfg.use_rem:
        rem = torch.rand(cfg.num_q, device=batch.tokens.device)
        rem = rem / rem.sum()
    target = model.q_target_logits(out.q_hidden) if critic else None
    return joint_loss(
        out, target, tokens, rewards, ends, mask, batch.legal, model.atoms,
        supervised_weight=train_cfg.supervised_weight_stage1 if stage == 1 else train_cfg.supervised_weight_stage2,
        train_critic=critic, gamma=train_cfg.gamma, cql_weight=train_cfg.cql_weight, td_loss=cfg.td_loss,
        q_penalty=cfg.q_penalty, cql_legal_only=cfg.cql_legal_only, rem_weights=rem, bc_weight=train_cfg.bc_weight,
        td_steps=train_cfg.td_steps, mc_returns=mc if critic and train_cfg.mc_anchor else None,
        next_target_logits=next_logits, next_mask=next_mask, changed_token_weight=train_cfg.changed_token_weight,
        critic_ends=critic_ends, td_max_over_n=train_cfg.td_max_over_n,
    )  # fmt: skip


LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def loss_and_metrics(
    forward: nn.Module,
    model: WorldActionModel,
    batch: Batch,
    *,
    stage: int,
    train_cfg: TrainConfig,
    clip_rewards: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``step_loss`` as (total, detached terms): plain tensors out, so it can be one compiled graph."""
    terms = step_loss(forward, model, batch, stage=stage, train_cfg=train_cfg, clip_rewards=clip_rewards)
    return terms.total, terms.metrics()


# ---------------------------------------------------------------------------------------------
# Metrics


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``<run_dir>/metrics.jsonl`` (world-action training)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def summarize_metrics(records: Sequence[dict], window: int = 3) -> dict[str, Any]:
    """First and last logged values of the main curves (means over ``window`` log lines) per stage."""
    out: dict[str, Any] = {}
    for stage, keys in ((1, ("loss/world", "loss/obs", "loss/reward", "loss/end")),
                        (2, ("loss/world", "loss/td", "loss/cql", "q/data", "q/logsumexp"))):
        recs = [r for r in records if r.get("stage") == stage]
        for key in keys:
            vals = [float(r[key]) for r in recs if key in r]
            if vals:
                out[f"stage{stage}/{key}/first"] = sum(vals[:window]) / len(vals[:window])
                out[f"stage{stage}/{key}/last"] = sum(vals[-window:]) / len(vals[-window:])
    if records:
        out["steps"] = int(records[-1]["step"])
    return out


def log_record(
    step: int,
    stage: int,
    means: dict[str, float],
    opt: torch.optim.Optimizer,
    samples_per_s: float,
    model_cfg: WorldActionConfig,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` line: step, stage, every loss term (``loss/*``, unweighted, plus
    ``loss/world`` = obs + reward + end), ``grad_norm``, the CQL sides as ``q/data`` and
    ``q/logsumexp`` (mean Q of the dataset action and mean logsumexp over actions), ``lr/<group>``,
    segments and tokens per second (all input tokens, padding included) and the wall-clock time."""
    rec: dict[str, Any] = {"step": step, "stage": stage, **means}
    for k in ("q_data", "q_logsumexp"):
        rec[f"q/{k[2:]}"] = rec.pop(f"loss/{k}")
    rec["loss/world"] = rec["loss/obs"] + rec["loss/reward"] + rec["loss/end"]
    for g in opt.param_groups:
        rec[f"lr/{g['name']}"] = g["lr"]
    rec["samples_per_s"] = samples_per_s
    rec["tokens_per_s"] = samples_per_s * model_cfg.max_blocks * model_cfg.tokens_per_block
    rec["time"] = time.time()
    return rec


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---------------------------------------------------------------------------------------------
# The loop


def resolve_preset(cfg: Preset | tuple[WorldActionConfig, TrainConfig] | str, overrides: dict[str, Any]) -> Preset:
    """The preset a run trains: a name or config pair made a ``Preset``, with the non-None ``TrainConfig``
    overrides applied (what checkpoints record)."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    if isinstance(cfg, tuple):
        model_cfg, train_cfg = cfg
        cfg = Preset("custom", model=model_cfg, train=train_cfg)
    if not isinstance(cfg, Preset):
        raise TypeError(f"cfg must be a Preset, a preset name or (WorldActionConfig, TrainConfig); got {type(cfg)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, train=replace(cfg.train, **given)) if given else cfg


def mtbc_preset(p: Preset | str) -> Preset:
    """The multi-task behaviour-cloning baseline (MTBC) of a preset: the same backbone with its
    18-way ``head_bc`` trained alone (world-loss weight 0, no critic) for the same number of steps
    and the same batch as JOWA's two stages together, so that both get the same compute and data."""
    p = resolve_preset(p, {})
    tc = p.train
    train = replace(tc, stage1_steps=tc.stage1_steps + tc.stage2_steps, stage2_steps=0, supervised_weight_stage1=0.0)
    return replace(p, name=f"{p.name}_mtbc", model=replace(p.model, bc_head=True), train=train)


def train_world_action(
    cfg: Preset | tuple[WorldActionConfig, TrainConfig] | str,
    token_caches: Sequence[str | os.PathLike],
    run_dir: str | os.PathLike = "runs/default",
    *,
    stage1_steps: int | None = None,
    stage2_steps: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    seed: int | None = None,
    log_every: int | None = None,
    save_every: int | None = None,
    device: str | torch.device = "auto",
    resume: bool = True,
    progress: bool = True,
    keep_last: int | None = 3,
    num_workers: int | None = None,
    num_threads: int | None = None,
    compile: bool = False,
    fused_layer_norm: bool | None = None,
    fused_qkv: bool | None = None,
    fused_bias_gelu: bool | None = None,
    fused_branch_bias: bool | None = None,
    fused_attention: bool | None = None,
    stride: int = 4,
    data_split: str = "per_rank",
    clip_rewards: bool = True,
    official_stage2_lr: bool = False,
    official_q_weight_decay: bool = False,
    stop_at_step: int | None = None,
) -> WorldActionModel:
    """Train (or resume) the world-action model on token caches; returns it (unwrapped, eval mode).

    Args:
        cfg: a ``Preset`` (or its name) or ``(WorldActionConfig, TrainConfig)``; the keyword
            overrides below replace ``TrainConfig`` fields (None keeps the config's value) and the
            resolved preset is written to every checkpoint's ``config.json``.
        token_caches: ``<Game>.tokens.h5`` files, one per game; games are sampled equally often.
        run_dir: folder for checkpoints and ``metrics.jsonl``.
        stage1_steps, stage2_steps: optimizer steps of each stage (paper: 250k, 1.5M).
        batch_size: global segments per optimizer step, over all ranks and accumulation steps; each
            rank's micro-batch is batch_size / world_size / grad_accum.
        grad_accum: micro-batches per optimizer step.
        device: "auto", "cpu", "cuda"; under torchrun each rank takes cuda:LOCAL_RANK.
        resume: continue from the newest checkpoint in ``run_dir``; False deletes the run's
            checkpoints and metrics and starts over.
        keep_last: checkpoint folders kept (newest first; None keeps all).
        num_workers: DataLoader workers (default: 0 on <= 2 cores per rank, else a quarter of the
            rank's cores, at most 4).
        num_threads: torch CPU threads (default: the rank's share of the cores minus the workers,
            ``runtime.configure_threads``).
        compile: ``torch.compile`` the forward and the loss as one graph (the forward alone under DDP;
            off by default; worth it on CUDA).
        fused_layer_norm: each residual add, its dropout and the next LayerNorm as one Triton op
            (``WorldActionModel.use_fused_layer_norm``); None: on for CUDA when triton imports (jowa_150m's
            step 258.5 -> 236.3 ms on an H100, README "Performance"), off on CPU, where it has no kernels.
        fused_qkv: one matrix product for each layer's queries, keys and values
            (``WorldActionModel.use_fused_qkv``); None: on for CUDA (jowa_150m's loop 1.0 % faster on an H200,
            1.3 % on an H100, README Performance), off on CPU, where it is not reliably faster.
        fused_bias_gelu: each MLP's first bias add and GELU as one op with a fused backward
            (``WorldActionModel.use_fused_bias_gelu``); None: on for CUDA when triton imports, off on CPU.
        fused_branch_bias: with the fused LayerNorm op, each residual branch's last bias added inside it, its
            gradient summed in the op's backward (``WorldActionModel.use_fused_branch_bias``); None: on with the
            fused LayerNorm op.
        fused_attention: the Triton flash-attention op on the packed QKV product
            (``WorldActionModel.use_fused_attention``); None: on for CUDA when triton imports. With the two
            above and the LayerNorm op's packed dropout mask, jowa_150m's loop went from 36.0 % to 39.0 % MFU on
            an H100 (README Performance, session 20).
        stride: distance between segment starts (4 for pretraining).
        data_split: "per_rank" (each rank draws its own batches) or "global" (each rank slices the
            same global batch, so results do not depend on the world size; ``GlobalBatchSlices``).
        clip_rewards: clamp rewards to [-1, 1] for the TD target (DQN-Replay convention).
        official_stage2_lr, official_q_weight_decay: reproduce quirks Q2 and Q7 (module docstring).
        stop_at_step: save and return once this many steps are done, without changing the
            schedule (split a run into pieces; tests use it for resume).
    """
    if data_split not in DATA_SPLITS:
        raise ValueError(f"data_split must be one of {DATA_SPLITS}, got {data_split!r}.")
    overrides = {
        "stage1_steps": stage1_steps,
        "stage2_steps": stage2_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "seed": seed,
        "log_every": log_every,
        "save_every": save_every,
    }
    p = resolve_preset(cfg, overrides)
    tc = p.train
    if tc.stage1_steps < 0 or tc.stage2_steps < 0 or tc.log_every < 1 or tc.save_every < 1:
        raise ValueError("need stage1_steps >= 0, stage2_steps >= 0, log_every >= 1 and save_every >= 1.")
    if tc.target_update_every < 1:
        raise ValueError(f"target_update_every must be >= 1, got {tc.target_update_every}.")
    total_steps = tc.stage1_steps + tc.stage2_steps
    options = {"stride": stride, "data_split": data_split, "clip_rewards": clip_rewards,
               "official_stage2_lr": official_stage2_lr, "official_q_weight_decay": official_q_weight_decay,
               "token_caches": [str(c) for c in token_caches]}  # fmt: skip

    info, dev = init_distributed(device)
    finished = False
    try:
        fused = fused_switches(dev, fused_layer_norm, fused_qkv, fused_bias_gelu, fused_branch_bias, fused_attention,
                               head_size=p.model.head_dim)  # fmt: skip
        model = _train(p, token_caches, Path(run_dir), info, dev, total_steps=total_steps, options=options,
                       resume=resume, progress=progress, keep_last=keep_last, num_workers=num_workers,
                       num_threads=num_threads, compile=compile, fused=fused, stop_at_step=stop_at_step)  # fmt: skip
        finished = True
        return model
    finally:
        if info.owns_group and dist.is_initialized():
            if finished and info.distributed:  # no rank tears its group down while a peer still talks to it
                dist.barrier()  # (gloo once aborted a rank at exit without this: "terminate called ...")
            dist.destroy_process_group()


def _train(
    p: Preset,
    token_caches: Sequence[str | os.PathLike],
    run_dir: Path,
    info: DistInfo,
    dev: torch.device,
    *,
    total_steps: int,
    options: dict[str, Any],
    resume: bool,
    progress: bool,
    keep_last: int | None,
    num_workers: int | None,
    num_threads: int | None,
    compile: bool,
    fused: FusedSwitches,
    stop_at_step: int | None,
) -> WorldActionModel:
    tc, mc = p.train, p.model
    W = info.world_size
    if tc.batch_size % (W * tc.grad_accum):
        raise ValueError(
            f"batch_size {tc.batch_size} must divide by world_size x grad_accum = {W} x {tc.grad_accum}; "
            "change batch_size or grad_accum."
        )
    rank_rows = tc.batch_size // W
    metrics_path = run_dir / METRICS_FILE

    # -- threads and data ---------------------------------------------------------------------
    share = max(1, available_cores() // max(1, info.local_world_size))
    if num_workers is None:
        num_workers = 0 if share <= 2 else min(4, share // 4)
    if num_threads is None:
        configure_threads(env_workers=available_cores() - share, loader_workers=num_workers)  # other ranks' cores
    else:
        torch.set_num_threads(max(1, num_threads))
    sources = make_sources(token_caches, mc, stride=options["stride"], returns_gamma=tc.gamma if tc.mc_anchor else None,
                           segment_length=mc.max_blocks + 1 if tc.next_step_target else None)  # fmt: skip
    if tc.life_loss_terminal:
        require_lives(sources, "life_loss_terminal", "life_loss_terminal to False")
    if options["data_split"] == "global":
        sampler = SegmentSampler(sources, tc.batch_size, seed=tc.seed, life_start_share=tc.life_start_share)
        dataset: IterableDataset = GlobalBatchSlices(sampler, info.rank, W)
    else:
        sampler = SegmentSampler(
            sources, rank_rows, seed=tc.seed, rank=info.rank, world_size=W, life_start_share=tc.life_start_share
        )
        dataset = sampler
    legal_table = torch.as_tensor(action_masks(), device=dev)

    # -- model, fresh or resumed --------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = WorldActionModel(mc)
    step, state = 0, None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_incomplete(run_dir)
        if not resume:
            shutil.rmtree(run_dir / checkpoints.RUN_CHECKPOINTS_DIR, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
    newest = checkpoints.latest_checkpoint(run_dir) if info.is_main and resume else None
    ckpt_path = _broadcast(None if newest is None else str(newest), info)  # every rank resumes rank 0's choice
    if ckpt_path is not None:
        ckpt = checkpoints.load(ckpt_path, training_state=True)
        if ckpt.preset.model != mc:
            raise ValueError(
                f"{ckpt.path} was trained with another model config than the one given; use a new run_dir, "
                "pass the saved preset (jowa_core.checkpoints.load(run_dir).preset) or resume=False."
            )
        if ckpt.training_state is None:
            raise checkpoints.CheckpointError(f"{ckpt.path} has no {checkpoints.RUN_STATE_FILE}; it cannot be resumed.")
        model.load_state_dict(ckpt.model.state_dict())
        state, step = ckpt.training_state, ckpt.step
        saved = dict(state["sampler"])
        if options["data_split"] == "per_rank":
            saved["rank"] = info.rank  # rank 0 saved its stream position; every rank is at the same one
        sampler.load_state_dict(saved)
        rngs = state["rng"]
        if len(rngs) == W:
            set_rng_state(rngs[info.rank])
        else:
            logger.warning("checkpoint has RNG states of %d ranks, this run has %d: reseeding.", len(rngs), W)
            seed_everything(_rank_seed(tc.seed + step, info.rank))
        if info.is_main:
            truncate_jsonl(metrics_path, step)
    else:
        seed_everything(_rank_seed(tc.seed, info.rank))
    model.to(dev).train().use_fused_layer_norm(fused.layer_norm).use_fused_qkv(fused.qkv)
    model.use_fused_bias_gelu(fused.bias_gelu).use_fused_branch_bias(fused.branch_bias)
    model.use_fused_attention(fused.attention)
    if step >= total_steps or (stop_at_step is not None and step >= stop_at_step):
        return model.eval()

    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(tc.seed),
    )  # own generator: global RNG untouched
    batches = iter(loader)

    # -- schedule predicates ------------------------------------------------------------------
    end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)

    def stage_of(s: int) -> int:  # stage of the step that starts with s steps done
        return 1 if s < tc.stage1_steps else 2

    def should_log(s: int) -> bool:
        return s % tc.log_every == 0 or s == end

    def should_save(s: int) -> bool:
        return s % tc.save_every == 0 or s == end

    def should_update_target(s: int) -> bool:
        return s % tc.target_update_every == 0

    # -- per-stage factories ------------------------------------------------------------------
    def groups_for(stage: int) -> list[dict[str, Any]]:
        return param_groups(model, stage, tc, official_stage2_lr=options["official_stage2_lr"],
                            official_q_weight_decay=options["official_q_weight_decay"])  # fmt: skip

    def build_stage(stage: int) -> tuple[LossFn, DistributedDataParallel | None, torch.optim.Optimizer]:
        set_stage(model, stage)
        ddp = None
        if info.distributed:  # a new wrapper per stage: DDP registers the parameters that need grad
            ids = [dev.index] if dev.type == "cuda" else None
            ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        fwd: nn.Module = ddp or model
        if compile and ddp is not None:  # DDP: compile its forward, whose graph DDP splits at its buckets
            fwd = torch.compile(fwd)
        loss_fn: LossFn = functools.partial(loss_and_metrics, fwd, model, stage=stage, train_cfg=tc,
                                            clip_rewards=options["clip_rewards"])  # fmt: skip
        if compile and ddp is None:  # one graph for the forward and the loss: the 2048-way CE fuses
            loss_fn = torch.compile(loss_fn)
        opt = torch.optim.AdamW(groups_for(stage), betas=(0.9, 0.999), eps=1e-8, fused=dev.type == "cuda")
        return loss_fn, ddp, opt

    def save(s: int, stage: int, opt: torch.optim.Optimizer) -> None:
        rngs = [rng_state()]
        if info.distributed:
            rngs = [None] * W
            dist.all_gather_object(rngs, rng_state())
        if info.is_main:
            training_state = {"step": s, "stage": stage, "optimizer": opt.state_dict(),
                              "sampler": sampler.state_dict(), "rng": rngs, "world_size": W}  # fmt: skip
            checkpoints.save(run_dir, model, p, step=s, training_state=training_state, options=options,
                             keep_last=keep_last)  # fmt: skip

    writer = _tensorboard(run_dir) if info.is_main else None
    use_amp = dev.type == "cuda"
    acc: dict[str, torch.Tensor] = {}
    n_acc, t_log = 0, time.perf_counter()
    stage, loss_fn, ddp, opt = 0, None, None, None
    bar = tqdm(total=end, initial=step, desc="world-action", disable=not (progress and info.is_main))
    while step < end:
        if stage_of(step) != stage:
            stage = stage_of(step)
            del loss_fn, ddp  # drop the previous stage's DDP wrapper before making the next
            loss_fn, ddp, opt = build_stage(stage)
            if state is not None and int(state["stage"]) == stage and state.get("optimizer") is not None:
                opt.load_state_dict(state["optimizer"])
                for g, fresh in zip(opt.param_groups, groups_for(stage)):  # settings may have changed
                    g["lr"], g["weight_decay"] = fresh["lr"], fresh["weight_decay"]
            state = None  # a later stage switch starts a fresh optimizer, as in an uninterrupted run
            base_lrs = [g["lr"] for g in opt.param_groups]

        raw = next(batches)
        micro = to_batches(raw, tc.grad_accum, dev, legal_table)
        opt.zero_grad(set_to_none=True)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            ctx = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            with ctx, torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                total, metrics = loss_fn(mb)
            (total / len(micro)).backward()
            with torch.no_grad():
                for name, v in metrics.items():
                    acc[f"loss/{name}"] = acc.get(f"loss/{name}", 0.0) + v.float() / len(micro)
        factor = stage2_lr_factor(step, tc)  # 1 except in stage 2 with the cosine schedule
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor
        grad_norm = clip_and_step(opt, [q for q in model.parameters() if q.requires_grad], tc.grad_clip)
        sampler.mark_consumed(raw)
        step += 1
        if should_update_target(step):
            model.update_target()
        acc["grad_norm"] = acc.get("grad_norm", 0.0) + grad_norm.detach().float()
        n_acc += 1

        if should_log(step):
            names = sorted(acc)
            values = torch.stack([acc[n] for n in names]) / n_acc
            if info.distributed:
                dist.all_reduce(values, op=dist.ReduceOp.SUM)
                values /= W
            if info.is_main:
                synchronize(dev)  # the interval ends when the GPU has run its steps, not when they were queued
                samples_per_s = n_acc * tc.batch_size / max(time.perf_counter() - t_log, 1e-9)
                rec = log_record(step, stage, dict(zip(names, values.tolist())), opt, samples_per_s, mc)
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if writer is not None:
                    for k, v in rec.items():
                        if k not in ("step", "time"):
                            writer.add_scalar(k, v, step)
                bar.set_postfix(stage=stage, loss=f"{rec['loss/total']:.4f}")
            acc, n_acc, t_log = {}, 0, time.perf_counter()
        if should_save(step):
            save(step, stage, opt)
            t_log = time.perf_counter()
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
    return model.eval()


def load_agent_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[WorldActionModel, Preset]:
    """The newest checkpoint of a world-action run: ``(model in eval mode, resolved preset)``."""
    ckpt = checkpoints.load(run_dir, device=resolve_device(device))
    return ckpt.model, ckpt.preset


def _train_quietly(*args: Any, **kwargs: Any) -> None:
    """``train_world_action`` returning nothing (for a spawned process: its result need not pickle back)."""
    train_world_action(*args, **kwargs)


def train_with_mtbc(
    cfg: Preset | str,
    token_caches: Sequence[str | os.PathLike],
    run_dir: str | os.PathLike,
    mtbc_dir: str | os.PathLike,
    *,
    stage1_steps: int | None = None,
    stage2_steps: int | None = None,
    batch_size: int | None = None,
    parallel: bool | None = None,
    **kwargs: Any,
) -> tuple[WorldActionModel, WorldActionModel]:
    """JOWA and its MTBC baseline (``mtbc_preset``) on the same caches with the same steps and batch.

    ``parallel`` (default: on a CPU with at least 2 free cores) trains the baseline in a spawned process
    beside JOWA, one torch thread each: on 2 cores that is faster than one after the other with 2 threads
    each. Both runs checkpoint and resume independently; other keyword arguments go to both calls.
    Returns ``(jowa_model, mtbc_model)`` in eval mode.
    """
    p = resolve_preset(cfg, {"stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "batch_size": batch_size})
    jowa = functools.partial(train_world_action, p, token_caches, run_dir, **kwargs)
    # the baseline's model comes back from its checkpoint, not through the pipe (a compiled one would not pickle)
    baseline = functools.partial(_train_quietly, mtbc_preset(p), list(map(str, token_caches)), str(mtbc_dir), **kwargs)
    model, _ = run_pair(jowa, baseline, device=kwargs.get("device", "auto"), num_threads=kwargs.get("num_threads"),
                        parallel=parallel)  # fmt: skip
    mtbc_model, _ = load_agent_model(mtbc_dir, device=next(model.parameters()).device)
    return model, mtbc_model
