"""Typed configs and named presets.

Presets are functions returning the base config with a few fields changed (never copied files):
``tiny`` (ours, learns on 2 CPU cores in minutes), ``jowa_40m``, ``jowa_70m``, ``jowa_150m`` (the
official release's sizes and the paper's hyperparameters).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable

# ---------------------------------------------------------------------------------------------
# Token layout: one place. A step (block) is 36 observation tokens followed by one action token.
OBS_TOKENS = 36
TOKENS_PER_BLOCK = OBS_TOKENS + 1
MAX_BLOCKS = 8
NUM_ACTIONS = 18
NUM_TASKS = 60
FRAME_SIZE = 84


class ConfigError(ValueError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TokenizerConfig:
    """VQ-VAE frame tokenizer (spec section 4). Defaults are the official architecture."""

    in_channels: int = 1
    resolution: int = FRAME_SIZE
    ch: int = 64
    """Channels of every conv (official ch_mult [1,1,1])."""
    ch_mult: tuple[int, ...] = (1, 1, 1)
    num_res_blocks: int = 2
    """Residual blocks per encoder level; the decoder uses one more per level (official)."""
    attn_resolutions: tuple[int, ...] = (6, 12)
    z_channels: int = 512
    embed_dim: int = 512
    vocab_size: int = 2048
    dropout: float = 0.0
    stem_stride: int = 1
    """Ours: >1 downsamples the 84x84 input with a strided conv first (tiny preset: 4 -> 21x21)."""
    beta: float = 1.0
    """Commitment weight of the VQ loss (official 1.0)."""
    perceptual_weight: float = 1.0
    """LPIPS weight; used only when ``perceptual_weights_path`` names a local VGG16 file."""
    perceptual_weights_path: str | None = None
    changed_pixel_weight: float = 0.0
    """Ours: extra L1 weight on pixels that change between consecutive frames (keeps small objects)."""
    dilate_frames: int = 0
    """Ours: max-filter size applied to frames before encoding (0 = off; 3 = 3x3 dilation)."""
    dead_code_restart: bool = False
    """Ours: restart unused codes at the worst-quantised latents."""

    def __post_init__(self) -> None:
        _check(self.vocab_size <= 65536, f"vocab_size {self.vocab_size} > 65536 cannot be cached as uint16; use <= 65536.")
        _check(self.ch > 0 and self.z_channels > 0, "ch and z_channels must be positive.")


@dataclass(frozen=True)
class WorldActionConfig:
    """World-action transformer (spec section 5). Defaults are the official 40M model."""

    num_layers: int = 4
    num_heads: int = 8
    embed_dim: int = 512
    max_blocks: int = MAX_BLOCKS
    tokens_per_block: int = TOKENS_PER_BLOCK
    obs_vocab_size: int = 2048
    num_actions: int = NUM_ACTIONS
    max_tasks: int = NUM_TASKS
    embed_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    q_mlp_dim: int = 768
    num_q: int = 1
    q_dropout: float = 0.01
    num_atoms: int = 51
    v_min: float = -10.0
    v_max: float = 30.0
    use_task_embed: bool = True
    q_loss_backwards_wm: bool = True
    """False: the Q head reads detached features (ablation)."""
    td_loss: str = "c51"
    """"c51" (official) or "mse" (ablation)."""
    q_penalty: str = "cql"
    """"cql" (official), "combo" or "null"."""

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.tokens_per_block

    def __post_init__(self) -> None:
        _check(self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}.")
        _check(self.td_loss in ("c51", "mse"), f"td_loss must be 'c51' or 'mse', got {self.td_loss!r}.")
        _check(self.q_penalty in ("cql", "combo", "null"), f"q_penalty must be 'cql', 'combo' or 'null', got {self.q_penalty!r}.")
        _check(self.num_atoms >= 2 and self.v_max > self.v_min, "need num_atoms >= 2 and v_max > v_min.")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the training loops. Defaults are the paper's."""

    batch_size: int = 512
    """Segments per optimizer step (global, over all ranks and accumulation steps)."""
    grad_accum: int = 1
    segment_length: int = MAX_BLOCKS
    lr_stage1: float = 1e-4
    lr_stage2: float = 5e-5
    critic_lr: float = 5e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gamma: float = 0.99
    cql_weight: float = 0.1
    supervised_weight_stage1: float = 1.0
    supervised_weight_stage2: float = 0.1
    target_update_every: int = 1000
    stage1_steps: int = 250_000
    stage2_steps: int = 1_500_000
    tokenizer_batch_size: int = 2048
    tokenizer_lr: float = 1e-4
    tokenizer_steps: int = 250_000
    log_every: int = 1000
    save_every: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive.")
        _check(self.batch_size % self.grad_accum == 0, f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}.")
        _check(0.0 < self.gamma <= 1.0, f"gamma must be in (0, 1], got {self.gamma}.")


@dataclass(frozen=True)
class Preset:
    name: str
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: WorldActionConfig = field(default_factory=WorldActionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def size(self) -> str | None:
        """Official size label ("40M", "70M", "150M") or None for our own presets."""
        return {"jowa_40m": "40M", "jowa_70m": "70M", "jowa_150m": "150M"}.get(self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def jowa_40m() -> Preset:
    return Preset("jowa_40m")


def jowa_70m() -> Preset:
    return Preset("jowa_70m", model=WorldActionConfig(num_layers=6, num_heads=12, embed_dim=768, q_mlp_dim=1024))


def jowa_150m() -> Preset:
    return Preset("jowa_150m", model=WorldActionConfig(num_layers=12, num_heads=12, embed_dim=768, q_mlp_dim=1792, num_q=3))


def tiny() -> Preset:
    """Ours: learns something on 2 CPU cores in minutes."""
    return Preset(
        "tiny",
        tokenizer=TokenizerConfig(
            ch=32, num_res_blocks=1, attn_resolutions=(), z_channels=64, embed_dim=64, vocab_size=512,
            stem_stride=4, changed_pixel_weight=500.0, dilate_frames=3, dead_code_restart=True,
        ),
        model=WorldActionConfig(
            num_layers=2, num_heads=4, embed_dim=128, q_mlp_dim=128, obs_vocab_size=512,
            embed_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
        ),
        train=TrainConfig(
            batch_size=32, stage1_steps=1000, stage2_steps=3000, target_update_every=250,
            tokenizer_batch_size=64, tokenizer_steps=1500, log_every=50, save_every=500,
        ),
    )


PRESETS: dict[str, Callable[[], Preset]] = {"tiny": tiny, "jowa_40m": jowa_40m, "jowa_70m": jowa_70m, "jowa_150m": jowa_150m}


def preset(name: str, **overrides: dict[str, Any]) -> Preset:
    """Named preset, optionally with per-section overrides: ``preset("tiny", train={"batch_size": 8})``."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    p = PRESETS[name]()
    for section, values in overrides.items():
        if section not in ("tokenizer", "model", "train"):
            raise ConfigError(f"Unknown config section {section!r}; use tokenizer, model or train.")
        current = getattr(p, section)
        unknown = set(values) - {f.name for f in dataclasses.fields(current)}
        if unknown:
            raise ConfigError(f"Unknown {section} field(s) {sorted(unknown)}; see jowa_core.config.{type(current).__name__}.")
        p = replace(p, **{section: replace(current, **values)})
    return p
