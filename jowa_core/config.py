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
    """VQ-VAE frame tokenizer (spec section 4). Defaults are the official architecture.

    Encoder: conv_in at 84 / ``stem_stride``, then one level per ``ch_mult`` entry; every level but the
    last ends with a downsampling conv (pad right/bottom by 1, kernel ``down_kernels[i]``, stride
    ``down_strides[i]``); the last level must be 6x6 (36 tokens). Decoder: the mirror, with nearest
    upsampling by ``up_factors`` (from the 6x6 level up; official 6 -> 42 -> 84) and, when
    ``stem_stride`` > 1, a transposed-conv conv_out by ``stem_stride``.
    """

    in_channels: int = 1
    resolution: int = FRAME_SIZE
    ch: int = 64
    """Channels of every conv (official ch_mult [1,1,1])."""
    ch_mult: tuple[int, ...] = (1, 1, 1)
    num_res_blocks: int = 2
    """Residual blocks per encoder level; the decoder uses one more per level (official)."""
    attn_resolutions: tuple[int, ...] = (6, 12)
    """Encoder levels whose resolution is listed get one attention block per ResBlock. The decoder's
    up path never has attention (official quirk Q4, the released weights rely on it)."""
    mid_attention: bool = True
    """Attention block between the two mid ResBlocks of encoder and decoder (official: always on)."""
    down_kernels: tuple[int, ...] = (8, 3)
    """Kernel of each encoder downsampling conv, one per level but the last (official 84 -> 12 -> 6)."""
    down_strides: tuple[int, ...] = (7, 2)
    up_factors: tuple[int, ...] = (7, 2)
    """Nearest-upsampling factor of each decoder level, lowest resolution first (official 6 -> 42 -> 84)."""
    z_channels: int = 512
    embed_dim: int = 512
    vocab_size: int = 2048
    dropout: float = 0.0
    stem_stride: int = 1
    """Ours: >1 makes conv_in a kernel = stride = ``stem_stride`` patchify conv (84 -> 84/s) and the
    decoder's conv_out a transposed conv (kernel s + 2, stride s) back to 84, so that every level is
    cheap (tiny preset: 7 -> 12x12)."""
    beta: float = 1.0
    """Commitment weight of the VQ loss (official 1.0)."""
    perceptual_weight: float = 1.0
    """LPIPS weight; used only when ``perceptual_weights_path`` names a local LPIPS weights file."""
    perceptual_weights_path: str | None = None
    """Local file with LPIPS (VGG16) weights in the taming layout, e.g. the official tokenizer.pt
    (its ``lpips.*`` entries). Never downloaded; None turns the perceptual loss off."""
    changed_pixel_weight: float = 0.0
    """Ours: extra L1 weight on pixels that change between consecutive frames (keeps small objects)."""
    dilate_frames: int = 0
    """Ours: odd max-filter size applied to frames before encoding (0 = off; 3 = 3x3 dilation)."""
    clamped_loss: bool = False
    """Ours: the reconstruction losses see the decoder output clamped to [-1, 1], as decoding for use does,
    with a straight-through gradient: an output already beyond black or white costs nothing, so the decoder
    spends no capacity on matching -1 exactly on the background (official: the raw output)."""
    local_encoder: bool = False
    """Ours: every encoder layer after the stem sees one token's cell only (1x1 convs, a per-position
    LayerNorm instead of GroupNorm, no attention, downsampling kernels equal to their strides), so a token is a
    function of its 84/6 = 14-pixel cell and keeps its code while that cell's pixels do. With the default
    encoder a ball moving elsewhere re-codes about half of Breakout's tokens between steps (issue 9), which the
    world model must then predict. The decoder is unchanged."""
    dead_code_restart: bool = False
    """Ours: restart codes unused for ``dead_code_window`` steps at the worst-quantised latents."""
    dead_code_window: int = 100
    """Ours: training steps over which a code must be chosen at least once to count as alive."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"Unknown TokenizerConfig field(s) {sorted(unknown)}; written by another version?")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def latent_resolution(self) -> int:
        """Side of the encoder's output grid implied by the geometry fields (must be 6)."""
        r = self.resolution // self.stem_stride
        for k, s in zip(self.down_kernels, self.down_strides):
            r = (r + 1 - k) // s + 1
        return r

    def __post_init__(self) -> None:
        _check(self.vocab_size <= 65536, f"vocab_size {self.vocab_size} > 65536 cannot be cached as uint16; use less.")
        _check(self.ch > 0 and self.z_channels > 0, "ch and z_channels must be positive.")
        _check(self.embed_dim > 0 and self.vocab_size > 1, "embed_dim must be positive and vocab_size > 1.")
        _check(self.num_res_blocks >= 0 and len(self.ch_mult) >= 1, "need num_res_blocks >= 0 and >= 1 ch_mult level.")
        n_down = len(self.ch_mult) - 1
        _check(
            len(self.down_kernels) == n_down and len(self.down_strides) == n_down and len(self.up_factors) == n_down,
            f"down_kernels, down_strides and up_factors need one entry per level but the last "
            f"({n_down} for ch_mult {self.ch_mult}); got {self.down_kernels}, {self.down_strides}, {self.up_factors}.",
        )
        _check(
            self.stem_stride >= 1 and self.resolution % self.stem_stride == 0,
            f"stem_stride {self.stem_stride} must divide the frame size {self.resolution} (e.g. 1, 2, 7 or 14).",
        )
        side = round(OBS_TOKENS**0.5)
        _check(
            self.latent_resolution == side,
            f"the encoder geometry ends at {self.latent_resolution}x{self.latent_resolution}, but the token layout "
            f"needs {side}x{side}; adjust stem_stride / down_kernels / down_strides.",
        )
        up = side
        for f in self.up_factors:
            up *= f
        _check(
            up * self.stem_stride == self.resolution,
            f"the decoder reaches {up}x{up} then x{self.stem_stride} (stem) = {up * self.stem_stride}, not "
            f"{self.resolution}; choose up_factors whose product times {side} times stem_stride is {self.resolution}.",
        )
        k = self.dilate_frames
        _check(k == 0 or (k > 0 and k % 2 == 1), f"dilate_frames must be 0 (off) or odd, got {k}.")
        _check(
            not self.local_encoder or tuple(self.down_kernels) == tuple(self.down_strides),
            f"local_encoder needs down_kernels equal to down_strides (cells that do not overlap); got kernels "
            f"{self.down_kernels} and strides {self.down_strides}.",
        )
        _check(self.beta >= 0 and self.changed_pixel_weight >= 0, "beta and changed_pixel_weight must be >= 0.")
        _check(self.dead_code_window >= 1, "dead_code_window must be >= 1 step.")


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
    q_init_mean: float | None = None
    """Ours (None in the paper presets): start every action's C51 distribution as a narrow bump at this value
    (the output bias; official: zero bias, a near-uniform distribution whose mean is the support's middle,
    (v_min + v_max) / 2 = 10). A short offline run leaves the values of states whose data never scored near
    where they started; 0 starts them at what those states are worth."""
    q_loss_backwards_wm: bool = True
    """False: the Q head reads detached features (ablation)."""
    td_loss: str = "c51"
    """"c51" (official) or "mse" (ablation)."""
    q_penalty: str = "cql"
    """"cql" (official), "combo" (positive CQL term on real rows only) or "null" (no penalty)."""
    use_rem: bool = False
    """Ablation: random convex weights over the Q ensemble (REM) in the TD loss (official default False)."""
    cql_legal_only: bool = False
    """Ours: CQL logsumexp over the game's legal actions only. False = official (all 18, quirk Q8)."""
    bc_head: bool = False
    """Ours: add ``head_bc`` (18-way action classifier at the last obs token) for the MTBC baseline."""

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.tokens_per_block

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def q_output_dim(self) -> int:
        """Outputs of one Q-ensemble member: 18 x atoms (C51, action-major) or 18 scalars (MSE)."""
        return self.num_actions * (self.num_atoms if self.td_loss == "c51" else 1)

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Closed-form parameter count of ``WorldActionModel`` (tested against the built model).

        ``trainable_only`` leaves out the frozen target Q head, as the official
        ``num_parameters_trainable`` does (40M: 17,416,091; 70M: 50,567,579; 150M: 109,045,447).
        """
        d, m, v = self.embed_dim, self.q_mlp_dim, self.obs_vocab_size
        block = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        embeddings = self.max_tokens * d + (self.num_actions + v) * d
        embeddings += 2 * self.max_tasks * d if self.use_task_embed else 0
        world_heads = sum(d * d + d + d * out + out for out in (v, 3, 2))
        q_member = (d * m + m) + 2 * m + (m * m + m) + 2 * m + (m * self.q_output_dim + self.q_output_dim)
        bc = d * d + d + d * self.num_actions + self.num_actions if self.bc_head else 0
        n = self.num_layers * block + 2 * d + embeddings + world_heads + self.num_q * q_member + bc
        return n if trainable_only else n + self.num_q * q_member

    def __post_init__(self) -> None:
        _check(self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}.")
        _check(self.tokens_per_block >= 2, f"tokens_per_block must be >= 2 (obs tokens + action), got {self.tokens_per_block}.")
        _check(self.max_blocks >= 1 and self.num_layers >= 1 and self.num_q >= 1, "max_blocks, num_layers and num_q must be >= 1.")
        _check(self.td_loss in ("c51", "mse"), f"td_loss must be 'c51' or 'mse', got {self.td_loss!r}.")
        _check(self.q_penalty in ("cql", "combo", "null"), f"q_penalty must be 'cql', 'combo' or 'null', got {self.q_penalty!r}.")
        _check(self.num_atoms >= 2 and self.v_max > self.v_min, "need num_atoms >= 2 and v_max > v_min.")
        if self.q_init_mean is not None:
            _check(self.td_loss == "c51" and self.v_min <= self.q_init_mean <= self.v_max,
                   f"q_init_mean is for td_loss='c51' and must lie in [v_min, v_max] = [{self.v_min}, {self.v_max}], "
                   f"got {self.q_init_mean} with td_loss={self.td_loss!r}; set it to None for the official init.")
        for name in ("embed_pdrop", "resid_pdrop", "attn_pdrop", "q_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}.")


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
    td_steps: int = 1
    """n of the TD target, inside a segment (official 1). Ours: > 1 carries delayed rewards back faster in
    short runs, e.g. Breakout's FIRE after a lost life (``losses.n_step_targets``)."""
    td_max_over_n: bool = False
    """Ours (off in every preset): each TD row takes the highest of its k-step targets, k = 1..``td_steps``, each
    a lower bound of the optimal value (He et al. 2017), so that a noisy player's next actions do not drag
    the target down as a fixed n does (``losses.best_n_step_targets``). Needs ``td_steps`` > 1."""
    mc_anchor: bool = False
    """Ours (off in the paper presets): anchor the C51 critic on the data's discounted returns-to-go, a floor
    under each bootstrap value and the target of a segment's last step (``losses.c51_td_loss``)."""
    next_step_target: bool = False
    """Ours (off in the paper presets): sample segments one step longer and read the target head at that
    extra step with a second, gradient-free pass over the window one step later, so that a segment's last
    step, which greedy acting reads once the context is full, gets a TD target too (officially it has only
    the CQL term, and every TD target bootstraps from it directly or through its neighbours). Costs one
    forward pass per step."""
    changed_token_weight: float = 1.0
    """Ours (1 in the paper presets): weight, in the next-obs-token cross-entropy, of tokens that differ from the
    previous step's token at the same position (``losses.world_losses``): small moving objects are a few of
    the frame's tokens, and argmax imagination drops them when the model is unsure."""
    life_loss_terminal: bool = False
    """Ours (off in the paper presets): a lost life ends the critic's TD targets as a game over does (DQN's
    training rule, Mnih et al. 2015), so that missing the ball costs the value of the life's remaining play
    at once instead of a few bootstrapped steps later. The world model still learns the real episode ends.
    Needs the data's lives counter; pretraining only (fine-tuning's imagined rows carry no lives)."""
    lr_schedule_stage2: str = "constant"
    """"constant" (official) or "cosine" (ours): stage 2's world and critic learning rates decay along a
    half cosine to 0 at the last step, so that a short run ends on settled weights rather than wherever the
    last constant-rate steps left them (``training.stage2_lr_factor``)."""
    life_start_share: float = 0.0
    """Ours (0 in the paper presets): expected share of each batch drawn from segments that hold the first
    step of a life (``data.segments.SegmentSampler``); needs data with ALE's lives counter."""
    supervised_weight_stage1: float = 1.0
    supervised_weight_stage2: float = 0.1
    """World-loss weight lambda (paper Eq. 9): 1.0 in stage 1, 0.1 in stage 2, 0.5 in fine-tuning."""
    supervised_weight_finetune: float = 0.5
    bc_weight: float = 1.0
    """Weight of the MTBC loss; used only when the model has ``head_bc`` (WorldActionConfig.bc_head)."""
    target_update_every: int = 1000
    stage1_steps: int = 250_000
    stage2_steps: int = 1_500_000
    tokenizer_batch_size: int = 2048
    tokenizer_lr: float = 1e-4
    tokenizer_steps: int = 250_000
    tokenizer_lr_schedule: str = "constant"
    """"constant" (official) or "cosine" (ours: decays to 0 at ``tokenizer_steps``, see
    ``training_tokenizer.tokenizer_lr``)."""
    tokenizer_warmup_steps: int = 0
    """Ours: linear learning-rate warm-up steps before the schedule (official: none)."""
    log_every: int = 1000
    save_every: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.batch_size > 0 and self.grad_accum > 0, f"batch_size ({self.batch_size}) and grad_accum ({self.grad_accum}) must be positive integers.")
        _check(self.batch_size % self.grad_accum == 0, f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}.")
        _check(0.0 < self.gamma <= 1.0, f"gamma must be in (0, 1], got {self.gamma}.")
        _check(self.td_steps == 1 or 1 < self.td_steps < self.segment_length,
               f"td_steps must be >= 1 and shorter than segment_length {self.segment_length}, got {self.td_steps}.")
        _check(not self.td_max_over_n or self.td_steps > 1,
               "td_max_over_n picks the best of the 1..td_steps-step targets; set td_steps > 1 or turn it off.")
        _check(
            self.tokenizer_lr_schedule in ("constant", "cosine"),
            f"tokenizer_lr_schedule must be 'constant' or 'cosine', got {self.tokenizer_lr_schedule!r}.",
        )
        _check(
            self.lr_schedule_stage2 in ("constant", "cosine"),
            f"lr_schedule_stage2 must be 'constant' or 'cosine', got {self.lr_schedule_stage2!r}.",
        )
        _check(self.changed_token_weight > 0, f"changed_token_weight must be > 0, got {self.changed_token_weight}.")
        _check(0.0 <= self.life_start_share <= 1.0, f"life_start_share must be in [0, 1], got {self.life_start_share}.")
        warmup = self.tokenizer_warmup_steps
        _check(warmup >= 0, f"tokenizer_warmup_steps must be >= 0, got {warmup}.")


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
        tokenizer=TokenizerConfig(  # 84 -(patchify s7)-> 12 -(k3 s2)-> 6; decoder 6 -(x2)-> 12 -(shuffle x7)-> 84
            ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), down_kernels=(3,), down_strides=(2,),
            up_factors=(2,), z_channels=64, embed_dim=64, vocab_size=512,
            stem_stride=7, changed_pixel_weight=500.0, dilate_frames=3, dead_code_restart=True, clamped_loss=True,
        ),
        # 2 layers x 64 wide: about 0.23 s per step of 16 8-step segments on one core, so that JOWA and its MTBC
        # baseline train side by side within notebook 03's budget (issue 9). In single Breakout runs of 2000 steps,
        # 128 wide x 16 segments of 4 steps played worse (3.1) than 64 wide x 32 of 4 steps (6.9), and 16 segments
        # of 8 steps with 7-step returns played best (10.1 over 1000 agent steps; data mean 14.5).
        # The C51 head starts every value at 0, not at the support's middle (10): in 2,000 steps the values of
        # states whose data never scored (the lazy player's) stayed near where they began, above the trackers'
        # life starts, and greedy Q followed them on some seeds (issue 9, session 12).
        model=WorldActionConfig(
            num_layers=2, num_heads=4, embed_dim=64, q_mlp_dim=128, obs_vocab_size=512,
            embed_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, q_init_mean=0.0,
        ),
        train=TrainConfig(
            # 2000 steps in all; higher learning rates than the paper's (short run, small model); the target
            # head copied every 100 steps (session 12, with values starting at 0: official 10.4 and sticky 7.2 on
            # average over seeds 0-4, against 9.5 and 6.3 every 200 steps; with values starting at 10, every 50, or
            # every 100 with CQL 3, had played worse in single runs); n-step returns inside the segment and CQL 1.0
            # (officially 1-step and 0.1; 0.5 played worse on seeds 0 and 1) so that the critic learns from rewards
            # several steps away within this budget.
            batch_size=16, stage1_steps=300, stage2_steps=1700, target_update_every=100,
            lr_stage1=1e-3, lr_stage2=3e-4, critic_lr=3e-4, cql_weight=1.0, td_steps=7,
            # 30 % of each batch from segments that hold a life's first step (7 % of Breakout's segments): drawn
            # uniformly, the rare FIRE-to-launch frames left greedy Q stalling without a ball on most seeds (issue 9)
            life_start_share=0.3,
            # tokenizer (ours, issue 4): 2000 steps of 32 frames, cosine from 4e-3; about 3.7 min on 2 cores (~64k frames)
            tokenizer_batch_size=32, tokenizer_steps=2000, tokenizer_lr=4e-3, tokenizer_lr_schedule="cosine",
            tokenizer_warmup_steps=100, log_every=50, save_every=500,
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
