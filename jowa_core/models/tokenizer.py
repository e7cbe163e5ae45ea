"""VQ-VAE frame tokenizer: 84x84 grey frames <-> 36 tokens (spec section 4).

Module and parameter names are the official release's (``encoder.down.0.block.0.norm1.weight``,
``pre_quant_conv``, ``embedding``, ``post_quant_conv``, ``decoder.up.2.upsample.conv`` ...), so the
official ``tokenizer.pt`` loads with no renaming (see ``jowa_core.checkpoints.load_official_tokenizer``).

Official behaviour kept because the released weights depend on it: GroupNorm with 2 groups, the
k8/s7 then k3/s2 downsampling, the decoder's 6 -> 42 -> 84 upsampling and no attention in the
decoder's up path (quirk Q4). Ours, all off in the official configuration: a patchify stem
(``stem_stride``: a kernel = stride conv in, a kernel = stride + 2 transposed conv out; the tiny
preset's levels then run at 12x12 and 6x6 only), frame dilation before encoding, a changed-pixel
weighted L1 term, losses on the clamped output and dead-code restarts. Unlike the official code (quirk Q21), the codebook search
always runs in fp32, so tokens do not depend on autocast.

Losses are pure functions at the end of this file: ``vq_loss``, ``reconstruction_losses``,
``tokenizer_loss`` (the named-weights sum), plus ``LPIPS`` for the optional perceptual term.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jowa_core.config import OBS_TOKENS, TokenizerConfig

GRID = round(math.sqrt(OBS_TOKENS))  # 6: tokens are the 6x6 latent grid, row-major (token k = 6 * row + col)

# Fields that change neither the weights' meaning nor encode/decode; left out of ``content_hash``.
_TRAINING_ONLY_FIELDS = (
    "dropout",
    "beta",
    "perceptual_weight",
    "perceptual_weights_path",
    "changed_pixel_weight",
    "clamped_loss",
    "dead_code_restart",
    "dead_code_window",
)
# Fields added after token caches were first written, hashed only when they differ from these values, so
# that the caches of earlier tokenizers keep their hash.
_LATER_FIELDS = {"local_encoder": False}


# ---------------------------------------------------------------------------------------------
# Building blocks (taming-transformers layout, as in the official release)


def _norm(channels: int, local: bool = False) -> nn.Module:
    return PositionNorm(channels) if local else nn.GroupNorm(num_groups=2, num_channels=channels, eps=1e-6, affine=True)


class PositionNorm(nn.LayerNorm):
    """LayerNorm over the channels at each position of (B, C, H, W) (ours, ``TokenizerConfig.local_encoder``):
    GroupNorm's statistics span the whole frame, so every token would depend on every pixel."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1 if needed) skip; with
    ``local`` the convs are 1x1 and the norms per position."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, local: bool = False) -> None:
        super().__init__()
        k = 1 if local else 3
        self.norm1 = _norm(in_channels, local)
        self.conv1 = nn.Conv2d(in_channels, out_channels, k, padding=k // 2)
        self.norm2 = _norm(out_channels, local)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, k, padding=k // 2)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions, residual (1x1 q/k/v/proj_out convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, as the official bmm code
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right and bottom by 1, then a strided conv (official: k8 s7 84 -> 12, k3 s2 12 -> 6)."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest upsampling by an integer factor, then conv3x3."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=float(self.factor), mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, attention: bool, local: bool = False) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, local)
        self.attn_1 = AttnBlock(channels) if attention and not local else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, local)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def dilate(x: Tensor, k: int) -> Tensor:
    """k x k max filter (k odd, zero padding; frames are >= 0), separable: 8x faster than max_pool2d on CPU."""
    r = k // 2
    h, w = x.shape[-2:]
    p = F.pad(x, (r, r, 0, 0))
    x = p[..., :, 0:w]
    for d in range(1, k):
        x = torch.maximum(x, p[..., :, d : d + w])
    p = F.pad(x, (0, 0, r, r))
    x = p[..., 0:h, :]
    for d in range(1, k):
        x = torch.maximum(x, p[..., d : d + h, :])
    return x


def _transposed_as_conv3x3(s: int) -> Tensor:
    """0/1 matrix (k*k, s*s*9), k = s + 2: kernel tap (ky, kx) of a transposed conv (stride s, padding 1) ->
    the 3x3 conv weight (sub-pixel (ry, rx), neighbour (dy, dx)) that computes the same output before
    ``pixel_shuffle(s)``. Output row s*I + ry takes input row I + dy through tap ky = ry + 1 - s*dy."""
    k = s + 2
    m = torch.zeros(k * k, s * s * 9)
    for ry in range(s):
        for dy in (-1, 0, 1):
            ky = ry + 1 - s * dy
            for rx in range(s):
                for dx in (-1, 0, 1):
                    kx = rx + 1 - s * dx
                    if 0 <= ky < k and 0 <= kx < k:
                        m[ky * k + kx, (ry * s + rx) * 9 + (dy + 1) * 3 + (dx + 1)] = 1.0
    return m


class Encoder(nn.Module):
    """(B, 1, 84, 84) in [-1, 1] -> (B, z_channels, 6, 6)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        s = self.stem_stride = cfg.stem_stride
        if s == 1:
            self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        else:  # ours: patchify stem, 84 -> 84 / s
            self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, s, stride=s)
        res = cfg.resolution // s
        in_mult = (1, *cfg.ch_mult)
        local = cfg.local_encoder
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[level], cfg.ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(c_in, c_out, cfg.dropout, local))
                c_in = c_out
                if res in cfg.attn_resolutions and not local:
                    down.attn.append(AttnBlock(c_out))
            if level < len(cfg.ch_mult) - 1:
                k, st = cfg.down_kernels[level], cfg.down_strides[level]
                down.downsample = Downsample(c_out, k, st)
                res = (res + 1 - k) // st + 1
            self.down.append(down)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(c, cfg.dropout, cfg.mid_attention, local)
        self.norm_out = _norm(c, local)
        k = 1 if local else 3
        self.conv_out = nn.Conv2d(c, cfg.z_channels, k, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem_stride
        if s == 1:
            h = self.conv_in(x)
        else:  # the kernel = stride conv as pixel_unshuffle + 1x1 conv: same weights and result, 2-3x faster on CPU
            w = self.conv_in.weight
            h = F.conv2d(F.pixel_unshuffle(x, s), w.reshape(w.shape[0], -1, 1, 1), self.conv_in.bias)
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, 6, 6) -> (B, 1, 84, 84) in about [-1, 1] (not squashed)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg.dropout, cfg.mid_attention)
        ups: list[nn.Module] = []
        for level in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(c, c_out, cfg.dropout))
                c = c_out
            up.attn = nn.ModuleList()  # quirk Q4: never attention in the up path
            if level > 0:
                up.upsample = Upsample(c, cfg.up_factors[n - 1 - level])
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)  # index = level, as the official names
        self.norm_out = _norm(c)
        s = cfg.stem_stride
        if s == 1:
            self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        else:  # ours, mirrors the patchify stem: overlapping (kernel s + 2) transposed conv, 84 / s -> 84
            self.conv_out = nn.ConvTranspose2d(c, cfg.in_channels, s + 2, stride=s, padding=1)
            self.register_buffer("conv_out_scatter", _transposed_as_conv3x3(s), persistent=False)
        self.stem_stride = s

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        h = F.silu(self.norm_out(h))
        s = self.stem_stride
        if s == 1:
            return self.conv_out(h)
        # The transposed conv (kernel s + 2, stride s, padding 1) as a 3x3 conv to s*s sub-pixels per output
        # channel, then pixel_shuffle: the same weights and result, about 2x faster on CPU.
        wt = self.conv_out.weight  # (C, O, s + 2, s + 2)
        c, o = wt.shape[:2]
        w = (wt.reshape(c * o, -1) @ self.conv_out_scatter).reshape(c, o * s * s, 3, 3).transpose(0, 1)
        return F.pixel_shuffle(F.conv2d(h, w, padding=1), s) + self.conv_out.bias.reshape(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# The tokenizer


@dataclass
class TokenizerOutput:
    """What a training step needs.

    z: (B, E, 6, 6) encoder latents after pre_quant_conv.
    z_quantized: (B, E, 6, 6) the chosen codebook vectors (gradients reach the codebook; the decoder
        received the straight-through value z + sg(z_quantized - z) instead).
    tokens: (B, 36) long, row-major.
    reconstruction: (B, 1, 84, 84) decoder output in [-1, 1] space, not clamped.
    """

    z: Tensor
    z_quantized: Tensor
    tokens: Tensor
    reconstruction: Tensor


class Tokenizer(nn.Module):
    """Frames (uint8 or float in [0, 1]) <-> 36 tokens of ``cfg.vocab_size``."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pre_quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: encoder/decoder convs orthogonal (gain sqrt 2), bias 0; codebook U(+-1/vocab);
        the quant convs keep PyTorch's default."""
        for m in (*self.encoder.modules(), *self.decoder.modules()):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.orthogonal_(m.weight, gain=math.sqrt(2.0))
                nn.init.zeros_(m.bias)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.cfg.vocab_size, 1.0 / self.cfg.vocab_size)

    # -- input handling ----------------------------------------------------------------------

    def preprocess(self, frames: Tensor) -> Tensor:
        """Validate frames and map them to float (B, 1, 84, 84) in [0, 1] on the model's device."""
        if not isinstance(frames, Tensor):
            raise TypeError(
                f"frames must be a torch.Tensor, got {type(frames).__name__}; wrap numpy with torch.from_numpy."
            )
        c, r = self.cfg.in_channels, self.cfg.resolution
        if frames.ndim == 3 and c == 1:
            frames = frames.unsqueeze(1)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (c, r, r):
            raise ValueError(
                f"frames must be (B, {c}, {r}, {r}) or (B, {r}, {r}); got {tuple(frames.shape)}. "
                "Stack frames along the first dimension; for one frame use frames[None]."
            )
        param = self.embedding.weight
        if frames.dtype == torch.uint8:
            return frames.to(param.device).float().div_(255.0)
        if not frames.is_floating_point():
            raise ValueError(f"frames must be uint8 (0..255) or float in [0, 1]; got {frames.dtype}.")
        x = frames.to(param.device).float()
        lo, hi = torch.aminmax(x)
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"float frames must lie in [0, 1]; got values in [{lo.item():.3g}, {hi.item():.3g}]. "
                "Pass uint8 frames, or divide 0..255 floats by 255."
            )
        return x

    def encoder_input(self, x01: Tensor) -> Tensor:
        """[0, 1] frames -> the encoder's input: optional dilation (ours), then 2x - 1."""
        k = self.cfg.dilate_frames
        if k > 1:
            x01 = dilate(x01, k)
        return x01 * 2.0 - 1.0

    # -- the three steps ---------------------------------------------------------------------

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, E, 6, 6) latents -> tokens (B, 36) long and codebook vectors (B, E, 6, 6).

        argmin_k ||z - e_k||^2 = argmin_k ||e_k||^2 - 2 z.e_k (||z||^2 is the same for every k), one fused
        addmm, computed in fp32 even under autocast.
        """
        b, e, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, e)  # (B*36, E), row-major positions
            codebook = self.embedding.weight.float()
            tokens = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0).argmin(dim=1)
        z_q = self.embedding(tokens).reshape(b, h, w, e).permute(0, 3, 1, 2)  # codebook dtype (fp32)
        return tokens.reshape(b, h * w), z_q

    def encode_latents(self, x01: Tensor) -> Tensor:
        return self.pre_quant_conv(self.encoder(self.encoder_input(x01)))

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """(B, E, 6, 6) -> reconstruction in [-1, 1] space, not clamped."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, frames: Tensor) -> TokenizerOutput:
        """Training pass with the straight-through estimator."""
        z = self.encode_latents(self.preprocess(frames))
        tokens, z_q = self.quantize(z)
        z_st = z + (z_q - z).detach()
        return TokenizerOutput(z=z, z_quantized=z_q, tokens=tokens, reconstruction=self.decode_latents(z_st))

    # -- public inference API ----------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """uint8 (B, 1, 84, 84) / (B, 84, 84), or float in [0, 1] -> tokens (B, 36) long."""
        z = self.encode_latents(self.preprocess(frames))
        return self.quantize(z)[0]

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """tokens (B, 36) (or (B, 6, 6)) -> frames float (B, 1, 84, 84) in [0, 1]."""
        if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(
                f"tokens must be an integer tensor (B, {OBS_TOKENS}); got {getattr(tokens, 'dtype', type(tokens))}."
            )
        if tokens.ndim == 3 and tuple(tokens.shape[1:]) == (GRID, GRID):
            tokens = tokens.reshape(len(tokens), OBS_TOKENS)
        if tokens.ndim != 2 or tokens.shape[1] != OBS_TOKENS:
            raise ValueError(f"tokens must be (B, {OBS_TOKENS}); got {tuple(tokens.shape)}.")
        tokens = tokens.to(self.embedding.weight.device).long()
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.cfg.vocab_size}); got [{tokens.min().item()}, {tokens.max().item()}]. "
                "Were they made by a tokenizer with another vocabulary?"
            )
        z_q = self.embedding(tokens).reshape(len(tokens), GRID, GRID, -1).permute(0, 3, 1, 2)
        y = self.decode_latents(z_q)
        return ((y.float() + 1.0) / 2.0).clamp_(0.0, 1.0)

    def content_hash(self) -> str:
        """sha256 of the encode/decode-relevant config fields and every weight (name, dtype, shape, bytes).

        Token caches store it, so a cache made by other weights is refused.
        """
        h = hashlib.sha256()
        arch = {k: v for k, v in asdict(self.cfg).items()
                if k not in _TRAINING_ONLY_FIELDS and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}  # fmt: skip
        h.update(json.dumps(arch, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Losses and metrics (pure functions)


def vq_loss(z: Tensor, z_quantized: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Codebook term mean (sg z - z_q)^2 and commitment term beta * mean (z - sg z_q)^2 (official beta 1)."""
    if z.shape != z_quantized.shape:
        raise ValueError(f"z {tuple(z.shape)} and z_quantized {tuple(z_quantized.shape)} differ in shape.")
    codebook = (z.detach() - z_quantized).pow(2).mean()
    commitment = beta * (z - z_quantized.detach()).pow(2).mean()
    return codebook, commitment


def changed_pixel_mask(frames: Tensor, previous: Tensor, has_previous: Tensor | None = None) -> Tensor:
    """Ours: bool (B, 1, 84, 84), True where a pixel differs from the previous frame of the same episode.

    ``has_previous`` (B,) bool is False at episode starts (no previous frame: nothing counts as changed).
    """
    if frames.shape != previous.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and previous {tuple(previous.shape)} differ in shape.")
    mask = frames != previous
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if has_previous is not None:
        mask = mask & has_previous.to(mask.device).bool().reshape(-1, 1, 1, 1)
    return mask


def reconstruction_losses(
    target: Tensor, reconstruction: Tensor, changed_mask: Tensor | None = None, changed_pixel_weight: float = 0.0
) -> dict[str, Tensor]:
    """L1 in [-1, 1] space (official), plus ours: ``changed_pixel_weight * mean(mask * |err|)``.

    Together they equal mean((1 + w * mask) * |err|): a changed pixel counts 1 + w times.
    """
    if target.shape != reconstruction.shape:
        raise ValueError(
            f"target {tuple(target.shape)} and reconstruction {tuple(reconstruction.shape)} differ in shape."
        )
    err = (target - reconstruction.float()).abs()
    out = {"l1": err.mean()}
    if changed_mask is not None and changed_pixel_weight > 0:
        out["changed_l1"] = changed_pixel_weight * (err * changed_mask.to(err.dtype)).mean()
    return out


def tokenizer_loss(
    out: TokenizerOutput,
    target01: Tensor,
    cfg: TokenizerConfig,
    changed_mask: Tensor | None = None,
    perceptual: nn.Module | None = None,
) -> dict[str, Tensor]:
    """All loss terms (named) and ``total``, their weighted sum. ``target01``: undilated frames in [0, 1]."""
    target = target01 * 2.0 - 1.0
    rec = out.reconstruction
    if cfg.clamped_loss:  # ours: what decode() returns, gradient straight through the clamp
        rec = rec.float()
        rec = rec + (rec.clamp(-1.0, 1.0) - rec).detach()
    terms = reconstruction_losses(target, rec, changed_mask, cfg.changed_pixel_weight)
    terms["codebook"], terms["commitment"] = vq_loss(out.z.float(), out.z_quantized.float(), cfg.beta)
    if perceptual is not None and cfg.perceptual_weight > 0:
        terms["perceptual"] = cfg.perceptual_weight * perceptual(target, out.reconstruction.float()).mean()
    terms["total"] = sum(terms.values())
    return terms


def codebook_stats(tokens: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Fraction of codes used and perplexity exp(H(code histogram)) of a batch of tokens (on device)."""
    return codebook_stats_from_counts(torch.bincount(tokens.reshape(-1), minlength=vocab_size))


def codebook_stats_from_counts(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Same as ``codebook_stats`` from a (V,) histogram of code choices."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


@torch.no_grad()
def restart_dead_codes(codebook: Tensor, counts: Tensor, z_flat: Tensor, errors: Tensor) -> Tensor:
    """Ours: overwrite codes never chosen (``counts == 0``) with the worst-quantised latents, in place.

    codebook (V, E); counts (V,); z_flat (N, E) latents; errors (N,) their squared quantisation
    error. Returns the indices of the restarted codes (at most N).
    """
    dead = (counts == 0).nonzero().squeeze(1)
    n = min(len(dead), len(z_flat))
    if n == 0:
        return dead[:0]
    worst = errors.topk(n).indices
    codebook[dead[:n]] = z_flat[worst].to(codebook.dtype)
    return dead[:n]


# ---------------------------------------------------------------------------------------------
# LPIPS (VGG16) perceptual loss, taming layout; weights only from a local file, never downloaded

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision features indices -> relu1_2..relu5_3


class _VGG16Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        for i, (a, b) in enumerate(_VGG16_SLICES, start=1):
            s = nn.Sequential()
            for j in range(a, b):
                s.add_module(str(j), layers[j])
            setattr(self, f"slice{i}", s)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats


class _NetLin(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) as in taming-transformers, for grey frames.

    Inputs in [-1, 1], (B, 1, H, W) (repeated to 3 channels) -> (B, 1, 1, 1). Frozen. The official code
    leaves its dropout live during training (quirk Q5); we keep the module in eval mode (no dropout).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1), persistent=False)
        self.net = _VGG16Features()
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", _NetLin(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = (((t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t) - self.shift) / self.scale for t in (a, b))
        total = 0.0
        for i, (fa, fb) in enumerate(zip(self.net(a), self.net(b))):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((fa - fb).pow(2)).mean((2, 3), keepdim=True)
        return total

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LPIPS:
        """Load weights from a local file: an LPIPS state dict (``net.sliceN.*``, ``linN.model.1.weight``),
        possibly under ``lpips.`` and wrapper prefixes, e.g. the official tokenizer.pt."""
        from jowa_core.checkpoints import strip_wrapper_prefix

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"perceptual_weights_path {str(path)!r} is not a file. LPIPS weights are never downloaded; "
                "point it at a local file (e.g. the official tokenizer.pt) or set it to None to train without LPIPS."
            )
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
        sd = {strip_wrapper_prefix(k): v for k, v in raw.items()}
        if any(k.startswith("lpips.") for k in sd):
            sd = {k[len("lpips.") :]: v for k, v in sd.items() if k.startswith("lpips.")}
        sd = {k: v for k, v in sd.items() if k.split(".")[-1] not in ("shift", "scale")}  # constants, rebuilt
        model = cls()
        expected = set(model.state_dict())
        missing = sorted(expected - set(sd))
        if missing:
            only_lin = all(k.startswith("net.") for k in missing)
            hint = (
                " The file has only the linear layers (like taming's vgg.pth); the VGG16 backbone (net.sliceN.*) "
                "is missing. Use a file with both, e.g. the official tokenizer.pt."
                if only_lin
                else ""
            )
            raise ValueError(
                f"{path}: not an LPIPS weights file; missing {len(missing)} entries such as {missing[:3]}.{hint}"
            )
        model.load_state_dict({k: sd[k] for k in expected})
        return model
