import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jowa_core.checkpoints import load_official_tokenizer, load_tokenizer, official_tokenizer_name_map, save_tokenizer
from jowa_core.config import ConfigError, TokenizerConfig, preset
from jowa_core.data.format import DatasetWriter
from jowa_core.models.tokenizer import (
    LPIPS,
    AttnBlock,
    Tokenizer,
    TokenizerOutput,
    changed_pixel_mask,
    codebook_stats,
    dilate,
    reconstruction_losses,
    restart_dead_codes,
    tokenizer_loss,
    vq_loss,
)
from jowa_core.training_tokenizer import (
    QUALITY_TARGETS,
    evaluate_reconstruction,
    holdout_start,
    read_metrics,
    token_probe,
    tokenizer_lr,
    tokenizer_report,
    train_tokenizer,
)

MANIFEST = Path("/work/shared/reference/official_jowa_state_dict_manifest.json")
TINY = preset("tiny").tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(seed=0, **over):
    torch.manual_seed(seed)
    return Tokenizer(dataclasses.replace(TINY, **over)).eval()


def _frames(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, 84, 84), dtype=np.uint8))


def _dot_episode(rng, t, size=6):
    """A square moving inside the frame; the action (0..3) picks its direction at every step."""
    moves = np.array([[0, 3], [0, -3], [3, 0], [-3, 0]])
    pos = rng.integers(10, 70, 2)
    obs, actions = np.zeros((t, 84, 84), np.uint8), rng.integers(0, 4, t)
    for i in range(t):
        obs[i, 20:24, :] = 90  # a static wall, so frames are not all black
        obs[i, pos[0] : pos[0] + size, pos[1] : pos[1] + size] = 255
        pos = np.clip(pos + moves[actions[i]], 0, 84 - size)
    return {
        "observations": obs,
        "actions": actions,
        "rewards": np.zeros(t, np.float32),
        "terminals": np.r_[np.zeros(t - 1, bool), True],
    }


def _dot_dataset(path, episodes=4, t=60, game="Breakout", seed=0):
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, game, source="collected") as w:
        for _ in range(episodes):
            w.add_episode(**_dot_episode(rng, t))
    return path


# ---------------------------------------------------------------------------------------------
# Official layout


def test_paper_size_matches_official_manifest():
    manifest = json.loads(MANIFEST.read_text())["tokenizer"]
    with torch.device("meta"):
        tok = Tokenizer(TokenizerConfig())
    sd = {k: list(v.shape) for k, v in tok.state_dict().items()}
    assert sd == manifest  # every official entry, same shapes, nothing extra (no buffers either)
    assert sum(p.numel() for p in tok.parameters()) == 4_047_489  # spec section 4
    assert all(v.requires_grad for v in tok.parameters())
    assert not any("attn" in k for k in sd if k.startswith("decoder.up."))  # quirk Q4
    assert official_tokenizer_name_map() == {k: k for k in manifest}


def test_geometry_validation_names_the_fix():
    assert TokenizerConfig().latent_resolution == 6 and TINY.latent_resolution == 6
    with pytest.raises(ConfigError, match="stem_stride"):
        TokenizerConfig(stem_stride=4)  # 84 / 4 = 21 cannot reach 6 with these convs
    with pytest.raises(ConfigError, match="up_factors"):
        TokenizerConfig(up_factors=(2, 2))
    with pytest.raises(ConfigError, match="one entry per level"):
        TokenizerConfig(ch_mult=(1, 1))


def test_init_is_the_official_one():
    tok = _tiny()
    w = tok.encoder.down[0].block[0].conv1.weight.detach().reshape(TINY.ch, -1)
    torch.testing.assert_close(w @ w.t(), 2.0 * torch.eye(TINY.ch), atol=1e-4, rtol=0)  # orthogonal, gain sqrt 2
    assert tok.encoder.down[0].block[0].conv1.bias.abs().max() == 0
    assert tok.embedding.weight.abs().max() <= 1.0 / TINY.vocab_size


# ---------------------------------------------------------------------------------------------
# API, shapes, determinism


def test_shapes_and_input_forms():
    tok = _tiny()
    x = _frames(5)
    tokens = tok.encode(x)
    assert tokens.shape == (5, 36) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < TINY.vocab_size
    assert torch.equal(tok.encode(x[:, 0]), tokens)  # (B, 84, 84)
    assert torch.equal(tok.encode(x.float() / 255.0), tokens)  # float in [0, 1]
    y = tok.decode(tokens)
    assert y.shape == (5, 1, 84, 84) and y.dtype == torch.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert torch.equal(tok.decode(tokens.reshape(5, 6, 6)), y)
    out = tok(x)
    assert out.z.shape == out.z_quantized.shape == (5, TINY.embed_dim, 6, 6)
    assert torch.equal(out.tokens, tokens) and out.reconstruction.shape == (5, 1, 84, 84)


def test_bad_inputs_raise_clear_errors():
    tok = _tiny()
    with pytest.raises(ValueError, match=r"\(B, 1, 84, 84\)"):
        tok.encode(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(torch.zeros(2, 1, 84, 84, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.encode(torch.full((2, 1, 84, 84), 255.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tok.encode(np.zeros((2, 84, 84), np.uint8))
    with pytest.raises(ValueError, match="token ids must be in"):
        tok.decode(torch.full((1, 36), TINY.vocab_size))
    with pytest.raises(ValueError, match=r"\(B, 36\)"):
        tok.decode(torch.zeros(1, 35, dtype=torch.long))


@pytest.mark.parametrize(
    "cfg", [TINY, TokenizerConfig(ch=8, z_channels=16, embed_dim=16, vocab_size=64)], ids=["tiny", "official-geometry"]
)
def test_encoding_is_deterministic_and_batch_independent(cfg):
    torch.manual_seed(0)
    tok = Tokenizer(cfg).eval()
    x = _frames(6, seed=1)
    batched = tok.encode(x)
    singles = torch.cat([tok.encode(x[i : i + 1]) for i in range(6)])
    assert torch.equal(batched, singles)
    assert torch.equal(tok.encode(x), batched)
    assert len(batched.unique()) > 1  # not a degenerate constant code


def test_quantize_is_row_major_argmin():
    tok = _tiny()
    e = TINY.embed_dim
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(TINY.vocab_size, e, generator=g)
    with torch.no_grad():
        tok.embedding.weight.copy_(codebook)
    order = torch.randperm(TINY.vocab_size, generator=g)[:36]
    z = codebook[order].reshape(6, 6, e).permute(2, 0, 1)[None] + 0.01 * torch.randn(1, e, 6, 6, generator=g)
    tokens, z_q = tok.quantize(z)
    assert torch.equal(tokens[0], order)  # token k is the latent at row k // 6, column k % 6
    flat = z[0].permute(1, 2, 0).reshape(36, e)
    assert torch.equal(tokens[0], torch.cdist(flat, codebook).argmin(1))  # brute-force nearest code
    torch.testing.assert_close(z_q[0, :, 2, 5], codebook[order[2 * 6 + 5]])


@pytest.mark.parametrize("stride,in_channels", [(7, 1), (7, 3), (14, 1)])
def test_patchify_stem_fast_paths_equal_the_plain_convs(stride, in_channels):
    """conv_in runs as pixel_unshuffle + 1x1 conv and conv_out as 3x3 conv + pixel_shuffle; both must
    give what the stored Conv2d / ConvTranspose2d modules give, so weights and checkpoints keep their meaning."""
    if stride == 14:  # 84 -(s14)-> 6, one level
        over = {"ch_mult": (1,), "down_kernels": (), "down_strides": (), "up_factors": ()}
    else:
        over = {}
    tok = _tiny(in_channels=in_channels, stem_stride=stride, **over)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero biases, so that their handling is checked too
        tok.encoder.conv_in.bias.normal_(generator=g)
        tok.decoder.conv_out.bias.normal_(generator=g)
    x = torch.rand(2, in_channels, 84, 84, generator=g) * 2 - 1
    seen = {}
    tok.encoder.down[0].block[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("stem", a[0]))
    tok.encoder(x)
    torch.testing.assert_close(seen["stem"], tok.encoder.conv_in(x), atol=1e-5, rtol=1e-5)
    tok.decoder.norm_out.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))
    y = tok.decoder(torch.randn(2, TINY.z_channels, 6, 6, generator=g))
    assert y.shape == (2, in_channels, 84, 84)
    torch.testing.assert_close(y, tok.decoder.conv_out(F.silu(seen["h"])), atol=1e-5, rtol=1e-5)
    assert not any("scatter" in k for k in tok.state_dict())  # a constant, not part of the weights


def test_dilation_changes_the_encoder_input_only():
    tok = _tiny(dilate_frames=3)
    x = torch.zeros(1, 1, 84, 84)
    x[0, 0, 40, 40] = 1.0
    inp = tok.encoder_input(x)
    assert ((inp + 1) / 2).sum() == 9 and inp[0, 0, 39:42, 39:42].eq(1).all()
    assert tok.encoder_input(x).shape == x.shape
    r = torch.rand(3, 1, 84, 84)
    for k in (3, 5):
        torch.testing.assert_close(dilate(r, k), F.max_pool2d(r, k, stride=1, padding=k // 2), rtol=0, atol=0)


def test_local_encoder_codes_each_cell_from_its_own_pixels():
    """``local_encoder``: changing pixels inside one 14x14 cell changes that cell's latent and no other (the
    default encoder's 3x3 convs, GroupNorm and attention spread the change over the grid); overlapping
    downsampling kernels are refused."""
    local = _tiny(local_encoder=True, down_kernels=(2,), dilate_frames=3)
    x = _frames(2, seed=3).float() / 127.5 - 1
    y = x.clone()
    y[:, 0, 14 * 2 + 4 : 14 * 2 + 9, 14 * 4 + 3 : 14 * 4 + 10] = 1.0  # inside cell (2, 4), 2+ pixels from its edges
    with torch.no_grad():
        changed = (local.encode_latents((x + 1) / 2) != local.encode_latents((y + 1) / 2)).any(1)  # (2, 6, 6)
        plain = _tiny(dilate_frames=3)
        spread = (plain.encode_latents((x + 1) / 2) != plain.encode_latents((y + 1) / 2)).any(1)
    want = torch.zeros(2, 6, 6, dtype=torch.bool)
    want[:, 2, 4] = True
    assert torch.equal(changed, want)
    assert spread.sum() > 2 * 9
    assert not any(isinstance(m, AttnBlock) for m in local.encoder.modules())
    assert any(isinstance(m, AttnBlock) for m in local.decoder.modules()) == TINY.mid_attention
    assert local.content_hash() != _tiny(dilate_frames=3).content_hash()
    # the default (False) is left out of the hash, so caches written before the field existed still match
    plain = _tiny()
    arch = {k: v for k, v in dataclasses.asdict(plain.cfg).items() if k not in (
        "dropout", "beta", "perceptual_weight", "perceptual_weights_path", "changed_pixel_weight", "clamped_loss",
        "dead_code_restart", "dead_code_window", "local_encoder")}  # fmt: skip
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name, t in sorted(plain.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert plain.content_hash() == h.hexdigest()
    with pytest.raises(ConfigError, match="local_encoder needs down_kernels equal to down_strides"):
        dataclasses.replace(TINY, local_encoder=True)


# ---------------------------------------------------------------------------------------------
# Gradients and losses


def test_straight_through_gradient_reaches_the_encoder():
    tok = _tiny().train()
    out = tok(_frames(2))
    out.reconstruction.abs().mean().backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # through z + sg(z_q - z)
    assert tok.pre_quant_conv.weight.grad.abs().sum() > 0
    assert tok.embedding.weight.grad is None  # the decoder path never reaches the codebook
    tok.zero_grad()
    out = tok(_frames(2))
    codebook, _ = vq_loss(out.z, out.z_quantized, 1.0)
    codebook.backward()
    assert tok.embedding.weight.grad.abs().sum() > 0 and tok.encoder.conv_in.weight.grad is None


def test_vq_loss_matches_hand_computation():
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    z_q = torch.tensor([[0.0, 4.0]], requires_grad=True)
    codebook, commitment = vq_loss(z, z_q, beta=0.25)
    assert codebook.item() == pytest.approx((1 + 4) / 2)
    assert commitment.item() == pytest.approx(0.25 * (1 + 4) / 2)
    (codebook + commitment).backward()
    torch.testing.assert_close(z_q.grad, torch.tensor([[-1.0, 2.0]]))  # 2 (z_q - z) / 2, codebook term only
    torch.testing.assert_close(z.grad, torch.tensor([[0.25, -0.5]]))  # beta * 2 (z - z_q) / 2


def test_changed_pixel_mask_and_weighted_l1():
    prev = torch.zeros(2, 1, 84, 84, dtype=torch.uint8)
    cur = prev.clone()
    cur[0, 0, 3, 4] = 7
    cur[1, 0, 10, 10] = 200
    mask = changed_pixel_mask(cur, prev, torch.tensor([True, False]))
    assert mask.dtype == torch.bool and mask.sum() == 1 and mask[0, 0, 3, 4]  # frame 1 starts an episode
    assert changed_pixel_mask(cur[:, 0], prev[:, 0]).shape == (2, 1, 84, 84)

    g = torch.Generator().manual_seed(0)
    target, rec = torch.rand(2, 1, 84, 84, generator=g), torch.rand(2, 1, 84, 84, generator=g)
    terms = reconstruction_losses(target, rec, mask, changed_pixel_weight=500.0)
    err = np.abs(target.numpy() - rec.numpy())
    assert terms["l1"].item() == pytest.approx(err.mean(), rel=1e-5)
    weighted = (err * (1 + 500.0 * mask.numpy())).mean()
    assert (terms["l1"] + terms["changed_l1"]).item() == pytest.approx(weighted, rel=1e-5)
    assert "changed_l1" not in reconstruction_losses(target, rec, mask, 0.0)


def test_clamped_loss_sees_what_decode_returns_with_a_straight_through_gradient():
    target01 = torch.tensor([0.0, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    z = torch.zeros(1, 4, 6, 6)
    raw = torch.tensor([-1.5, 0.2, 1.4, -1.5]).reshape(1, 1, 2, 2).requires_grad_(True)
    out = TokenizerOutput(z=z, z_quantized=z, tokens=torch.zeros(1, 36, dtype=torch.long), reconstruction=raw)
    on = tokenizer_loss(out, target01, dataclasses.replace(TINY, clamped_loss=True, changed_pixel_weight=0.0))
    off = tokenizer_loss(out, target01, dataclasses.replace(TINY, clamped_loss=False, changed_pixel_weight=0.0))
    # black and white targets already passed cost nothing; the others count as clamped
    assert on["l1"].item() == pytest.approx((0 + 1.2 + 0 + 1.0) / 4)
    assert off["l1"].item() == pytest.approx((0.5 + 1.2 + 0.4 + 1.5) / 4)
    on["l1"].backward()
    # no push where the clamped output is right; the pixel below black but meant to be grey is pushed up
    assert raw.grad.flatten().tolist() == pytest.approx([0.0, 0.25, 0.0, -0.25])


def test_codebook_stats_and_dead_code_restart():
    usage, perplexity = codebook_stats(torch.tensor([[0, 0, 1, 1]]), vocab_size=4)
    assert usage.item() == 0.5 and perplexity.item() == pytest.approx(2.0)
    usage, perplexity = codebook_stats(torch.arange(8), vocab_size=8)
    assert usage.item() == 1.0 and perplexity.item() == pytest.approx(8.0)

    codebook = torch.zeros(4, 2)
    z = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    rows = restart_dead_codes(codebook, torch.tensor([5, 0, 3, 0]), z, errors=torch.tensor([0.1, 0.9, 0.5]))
    assert rows.tolist() == [1, 3]
    torch.testing.assert_close(codebook, torch.tensor([[0.0, 0.0], [2.0, 2.0], [0.0, 0.0], [3.0, 3.0]]))


def test_lpips_loads_only_local_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LPIPS.from_file(tmp_path / "vgg.pth")
    lin_only = {f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin_only, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="VGG16 backbone"):
        LPIPS.from_file(tmp_path / "vgg.pth")
    torch.manual_seed(0)
    ref = LPIPS()
    torch.save({f"module.lpips.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "tokenizer.pt")
    loaded = LPIPS.from_file(tmp_path / "tokenizer.pt")
    a, b = torch.rand(1, 1, 32, 32) * 2 - 1, torch.rand(1, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(a, b), ref(a, b))
    assert loaded(a, a).abs().max() == 0 and not loaded.training


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_fake_official_file_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    ours = Tokenizer(TokenizerConfig()).eval()
    with torch.no_grad():  # make the codebook spread out so tokens are informative
        ours.embedding.weight.normal_()
    fake = {f"module.{k}": v.clone() for k, v in ours.state_dict().items()}
    fake["module.lpips.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    fake["module.lpips.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save(fake, tmp_path / "tokenizer.pt")
    loaded = load_official_tokenizer(tmp_path / "tokenizer.pt")
    x = _frames(2, seed=3)
    assert torch.equal(loaded.encode(x), ours.encode(x))
    assert torch.equal(loaded.decode(ours.encode(x)), ours.decode(ours.encode(x)))
    assert loaded.content_hash() == ours.content_hash() and not loaded.training

    torch.save({f"_orig_mod.{k}": v for k, v in ours.state_dict().items()}, tmp_path / "compiled.pt")
    assert load_official_tokenizer(tmp_path / "compiled.pt").content_hash() == ours.content_hash()
    bad = {k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.up.0")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing"):
        load_official_tokenizer(tmp_path / "bad.pt")


def test_save_load_round_trip_and_content_hash(tmp_path):
    tok = _tiny(seed=1)
    save_tokenizer(tmp_path / "tok", tok)
    back = load_tokenizer(tmp_path / "tok")
    assert back.cfg == tok.cfg and back.content_hash() == tok.content_hash()
    x = _frames(3)
    assert torch.equal(back.encode(x), tok.encode(x))
    # training-only fields do not change the hash; weights and architecture fields do
    assert Tokenizer(dataclasses.replace(TINY, beta=0.5)).content_hash() != tok.content_hash()  # other weights
    same_weights = Tokenizer(dataclasses.replace(TINY, beta=0.5, changed_pixel_weight=1.0))
    same_weights.load_state_dict(tok.state_dict())
    assert same_weights.content_hash() == tok.content_hash()
    with torch.no_grad():
        back.embedding.weight[0, 0] += 1e-3
    assert back.content_hash() != tok.content_hash()


# ---------------------------------------------------------------------------------------------
# Training, evaluation, probe


def test_short_training_run_reduces_the_loss(tmp_path):
    path = _dot_dataset(tmp_path / "Breakout.h5", episodes=4, t=80)
    tok = train_tokenizer(
        [path],
        TINY,
        steps=100,
        batch_size=16,
        lr=2e-3,
        run_dir=tmp_path / "run",
        device="cpu",
        progress=False,
        log_every=10,
        save_every=100,
        eval_frames=32,
    )
    recs = [r for r in read_metrics(tmp_path / "run") if "loss/total" in r]
    assert [r["step"] for r in recs] == list(range(10, 101, 10))
    # the changed-pixel term (the dot, weight 500) falls slowly; the frame's L1 and MAE fall fast
    assert np.mean([r["loss/total"] for r in recs[-3:]]) < 0.9 * recs[0]["loss/total"]
    assert recs[-1]["loss/l1"] < 0.4 * recs[0]["loss/l1"]
    assert recs[-1]["mae"] < 0.4 * recs[0]["mae"]
    assert all(k in recs[-1] for k in ("usage", "perplexity", "changed_mae", "mae/Breakout", "loss/changed_l1"))
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/mae" in r]
    assert len(evals) == 1 and evals[0]["step"] == 100
    assert load_tokenizer(tmp_path / "run" / "tokenizer").content_hash() == tok.content_hash()


def test_frames_per_s_is_read_after_the_device_ran_the_interval(tmp_path, clock_events):
    """frames_per_s: synchronize, then read the clock (as the world-action loop: a CUDA host runs ahead)."""
    from jowa_core import training_tokenizer as tt

    events = clock_events(tt)
    path = _dot_dataset(tmp_path / "Breakout.h5", episodes=2, t=40)
    train_tokenizer([path], TINY, steps=4, batch_size=4, run_dir=tmp_path / "run", device="cpu", progress=False,
                    log_every=2, save_every=100, eval_frames=0)  # fmt: skip
    syncs = [i for i, e in enumerate(events) if e == "sync"]
    assert len(syncs) == 2 and all(events[i + 1] == "clock" for i in syncs), events
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4]


def test_lr_schedules():
    assert [tokenizer_lr(s, 10, 1e-3) for s in (0, 9)] == [1e-3, 1e-3]  # official: constant
    warm = [tokenizer_lr(s, 100, 2e-3, "cosine", warmup_steps=4) for s in range(100)]
    assert warm[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])  # linear warm-up, reaching lr
    assert warm[4] == pytest.approx(2e-3) and warm[52] == pytest.approx(1e-3)  # half way: half lr
    assert all(a > b for a, b in itertools.pairwise(warm[4:])) and 0 < warm[-1] < 1e-6
    assert tokenizer_lr(7, 10, 1e-3, "constant", warmup_steps=4) == 1e-3
    with pytest.raises(ValueError, match="cosine"):
        tokenizer_lr(0, 10, 1e-3, "linear")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_exactly(tmp_path, schedule):
    path = _dot_dataset(tmp_path / "Breakout.h5", episodes=2, t=40)
    cfg = dataclasses.replace(TINY, dead_code_window=3)
    kw = {
        "batch_size": 4,
        "lr": 1e-3,
        "device": "cpu",
        "progress": False,
        "log_every": 2,
        "save_every": 4,
        "eval_frames": 0,
        "lr_schedule": schedule,
        "warmup_steps": 3,
    }
    straight = train_tokenizer([path], cfg, steps=8, run_dir=tmp_path / "a", **kw)
    train_tokenizer([path], cfg, steps=4, run_dir=tmp_path / "b", **kw)
    resumed = train_tokenizer([path], cfg, steps=8, run_dir=tmp_path / "b", **kw)
    assert resumed.content_hash() == straight.content_hash()
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="another TokenizerConfig"):
        train_tokenizer([path], dataclasses.replace(cfg, beta=0.5), steps=9, run_dir=tmp_path / "b", **kw)


def test_evaluate_reconstruction_on_held_out_frames(tmp_path):
    path = _dot_dataset(tmp_path / "Breakout.h5", episodes=3, t=50)
    tok = _tiny()
    res = evaluate_reconstruction(tok, [path], n_frames=100)
    with h5py.File(path) as f:  # independent computation from the raw file
        obs = f["observations"][:]
    start = holdout_start(len(obs))
    assert start == 150 - 7
    held = torch.from_numpy(obs[start:])
    rec = tok.decode(tok.encode(held))
    mae = (rec[:, 0] - held.float() / 255).abs().mean().item()
    changed = held != torch.from_numpy(obs[start - 1 : -1])  # one episode: every frame has a predecessor
    chg = ((rec[:, 0] - held.float() / 255).abs()[changed]).mean().item()
    g = res["games"]["Breakout"]
    assert g["n_frames"] == 7
    assert g["mae"] == pytest.approx(mae, rel=1e-5) and res["mae"] == pytest.approx(mae, rel=1e-5)
    assert g["changed_mae"] == pytest.approx(chg, rel=1e-5)
    used, perplexity = codebook_stats(tok.encode(held), TINY.vocab_size)
    assert g["usage"] == res["usage"] == pytest.approx(float(used))
    assert g["perplexity"] == pytest.approx(float(perplexity), rel=1e-5)


def test_tokenizer_report_checks_the_targets():
    t = QUALITY_TARGETS
    recon = {
        "games": {
            "Breakout": {"mae": t["mae"] / 2, "changed_mae": t["changed_mae"] / 2, "usage": 0.3, "perplexity": 90.0},
            "Pong": {"mae": t["mae"] / 2, "changed_mae": 2 * t["changed_mae"], "usage": 0.4, "perplexity": 80.0},
        },
        "mae": t["mae"] / 2,
        "changed_mae": 1.25 * t["changed_mae"],
        "usage": 0.6,
        "perplexity": 150.0,
    }
    probe = {
        "games": {"Breakout": {"accuracy": 0.8, "baseline": 0.3}, "Pong": {"accuracy": 0.4, "baseline": 0.2}},
        "accuracy": 0.6,
        "baseline": 0.25,
    }
    df = tokenizer_report(recon, probe)
    assert list(df.index) == ["Breakout", "Pong", "all"]
    assert list(df.columns) == ["mae", "changed_mae", "usage", "perplexity", "probe", "probe_baseline", "meets_targets"]
    # Breakout's own usage (0.3) is below target, but usage is judged on the shared codebook ("all")
    assert df.meets_targets.tolist() == [True, False, False]  # Pong's changed-pixel error fails, so "all" fails
    recon["games"]["Pong"]["changed_mae"] = t["changed_mae"] / 2
    assert tokenizer_report(recon, probe).meets_targets.tolist() == [True, True, True]
    recon["usage"] = t["usage"] / 2
    assert tokenizer_report(recon, probe).meets_targets.tolist() == [True, True, False]
    probe["games"]["Pong"]["accuracy"] = 0.1
    assert tokenizer_report(recon, probe).meets_targets.tolist()[1] is False


class _ConstTokenizer(torch.nn.Module):
    """Stub whose tokens are the frame's top-left pixel / 10 (so they carry exactly what we put there)."""

    cfg = dataclasses.replace(TINY, vocab_size=32)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, frames):
        return (frames.reshape(len(frames), -1)[:, :1].long() // 10).expand(-1, 36)


def test_token_probe_finds_information_and_reports_the_baseline(tmp_path):
    rng = np.random.default_rng(0)
    t = 400
    actions = rng.choice([0, 1, 2], size=t, p=[0.5, 0.3, 0.2])
    with DatasetWriter(tmp_path / "Pong.h5", "Pong", source="collected") as w:
        # frame t + 1 shows the action taken at t (as a pixel value), so (t, t + 1) tokens predict a_t
        obs = np.zeros((t, 84, 84), np.uint8)
        obs[1:, 0, 0] = actions[:-1] * 10 + 5
        w.add_episode(obs, actions, np.zeros(t), np.r_[np.zeros(t - 1, bool), True])
    res = token_probe(_ConstTokenizer(), [tmp_path / "Pong.h5"], n_frames=t, epochs=100)
    g = res["games"]["Pong"]
    test_actions = actions[: t - 1][g["n_train"] :]
    majority = np.bincount(actions[: g["n_train"]]).argmax()
    assert g["baseline"] == pytest.approx(float(np.mean(test_actions == majority)))
    assert g["accuracy"] == 1.0 and g["baseline"] < 0.7
    assert not math.isnan(res["accuracy"])
