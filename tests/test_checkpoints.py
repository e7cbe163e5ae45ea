"""Run checkpoints (our format: atomic folders, keep-last-k, damaged files explained) and the import of
the official release files (``load_official``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jowa_core import checkpoints
from jowa_core.config import PRESETS, Preset, TrainConfig, WorldActionConfig, preset
from jowa_core.models.tokenizer import Tokenizer
from jowa_core.models.world_action import WorldActionModel
from jowa_core.training import rng_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_preset() -> Preset:
    model = WorldActionConfig(num_layers=1, num_heads=2, embed_dim=32, q_mlp_dim=32, obs_vocab_size=32, max_blocks=2)
    return Preset("small", model=model, train=TrainConfig(batch_size=4))


def outputs(model: WorldActionModel, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    length = min(cfg.max_tokens, 2 * cfg.tokens_per_block)  # two steps: every head, little compute
    tokens = torch.randint(0, min(cfg.obs_vocab_size, cfg.num_actions), (2, length), generator=g)
    with torch.no_grad():
        out = model(tokens, torch.tensor([0, 5]))
        target = model.q_target_logits(out.q_hidden)
    return [out.obs_logits, out.reward_logits, out.end_logits, out.q_logits, target]


def trained_like(cfg: WorldActionConfig, seed: int = 0) -> WorldActionModel:
    """A model whose target head differs from its online head (so saving the target is visible)."""
    torch.manual_seed(seed)
    model = WorldActionModel(cfg)
    with torch.no_grad():
        for p in model.head_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Our format


def test_save_then_load_round_trips_weights_config_and_training_state(tmp_path):
    p = small_preset()
    model = trained_like(p.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.randint(0, 18, (2, p.model.max_tokens)), torch.tensor([0, 1]))
    (out.obs_logits.sum() + out.q_logits.sum()).backward()
    opt.step()
    state = {"step": 7, "stage": 2, "optimizer": opt.state_dict(), "sampler": {"next_batch": 7}, "rng": [rng_state()]}
    folder = checkpoints.save(tmp_path, model, p, step=7, training_state=state, options={"stride": 4})
    assert folder == tmp_path / "checkpoints" / "step_000000007"
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "model.safetensors", "training_state.pt"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["kind"] == "world_action_run" and meta["step"] == 7 and meta["options"] == {"stride": 4}
    assert meta["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size

    ckpt = checkpoints.load(tmp_path, training_state=True)  # a run folder: its newest checkpoint
    assert ckpt.path == folder and ckpt.step == 7 and ckpt.preset == p and not ckpt.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v), k
    assert not torch.equal(ckpt.model.head_q_target.head_module.params[0], ckpt.model.head_q.head_module.params[0])
    for a, b in zip(outputs(ckpt.model), outputs(model)):
        assert torch.equal(a, b)
    ts = ckpt.training_state
    assert ts["step"] == 7 and ts["sampler"] == {"next_batch": 7}
    assert torch.equal(ts["rng"][0]["torch"], state["rng"][0]["torch"])
    opt2 = torch.optim.AdamW(ckpt.model.parameters(), lr=1e-3)
    opt2.load_state_dict(ts["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert checkpoints.load(folder).step == 7 and checkpoints.load(folder).training_state is None


def test_keep_last_resave_and_leftovers_of_killed_saves(tmp_path):
    p = small_preset()
    model = trained_like(p.model)
    for step in range(1, 6):
        checkpoints.save(tmp_path, model, p, step=step, keep_last=2)
    assert [f.name for f in checkpoints.list_checkpoints(tmp_path)] == ["step_000000004", "step_000000005"]
    leftover = tmp_path / "checkpoints" / ".tmp-step_000000009-123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_000000005"
    assert checkpoints.remove_incomplete(tmp_path) == [leftover] and not leftover.exists()

    other = trained_like(p.model, seed=1)
    checkpoints.save(tmp_path, other, p, step=5, keep_last=2)  # the same step again replaces the folder
    loaded = checkpoints.load(tmp_path).model
    assert torch.equal(loaded.pos_emb.weight, other.pos_emb.weight)
    assert sorted(f.name for f in (tmp_path / "checkpoints").iterdir()) == ["step_000000004", "step_000000005"]


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("model.safetensors", "truncate", r"model\.safetensors is truncated or corrupted"),
        ("model.safetensors", "scramble", r"model\.safetensors cannot be read"),
        ("training_state.pt", "truncate", r"training_state\.pt is truncated or corrupted"),
        ("training_state.pt", "scramble", r"training_state\.pt cannot be read"),
        ("config.json", "scramble", r"config\.json cannot be read as JSON"),
        ("model.safetensors", "delete", r"model\.safetensors is missing"),
    ],
)
def test_damaged_checkpoint_files_are_named_with_the_fix(tmp_path, name, damage, message):
    p = small_preset()
    folder = checkpoints.save(tmp_path, trained_like(p.model), p, step=3, training_state={"step": 3})
    f = folder / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "scramble":  # same size, garbage content
        f.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    else:
        f.unlink()
    with pytest.raises(checkpoints.CheckpointError, match=message) as err:
        checkpoints.load(tmp_path, training_state=True)
    if name != "config.json":
        assert "Delete the damaged folder" in str(err.value) and str(folder) in str(err.value)


def test_load_of_a_folder_without_checkpoints_is_explained(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="holds no checkpoint"):
        checkpoints.load(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name):
    p = preset(name)
    assert checkpoints.preset_from_dict(json.loads(p.to_json())) == p


def test_preset_with_unknown_fields_is_refused():
    d = json.loads(small_preset().to_json())
    d["model"]["wings"] = 2
    with pytest.raises(checkpoints.CheckpointError, match=r"'model' has unknown field\(s\) \['wings'\]"):
        checkpoints.preset_from_dict(d)


# ---------------------------------------------------------------------------------------------
# Official release files


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """``tokenizer.pt`` and ``JOWA_40M.pt`` written the way the official trainer saved them: the DDP
    ``module.`` prefix, LPIPS weights in the tokenizer file, ``head_*.indices`` but no ``attn.mask``."""
    d = tmp_path_factory.mktemp("official")
    p = preset("jowa_40m")
    torch.manual_seed(0)
    tok = Tokenizer(p.tokenizer).eval()
    raw_tok = {"module." + k: v for k, v in tok.state_dict().items()}
    raw_tok["module.lpips.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    raw_tok["module.lpips.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    torch.save(raw_tok, d / "tokenizer.pt")
    model = trained_like(p.model)
    torch.save(checkpoints.ours_to_official(model.state_dict(), p.model), d / "JOWA_40M.pt")
    return d / "tokenizer.pt", d / "JOWA_40M.pt", tok, model


def test_load_official_round_trip_gives_identical_outputs(official_files):
    tok_pt, model_pt, tok, model = official_files
    tok2, model2 = checkpoints.load_official(tok_pt, model_pt, "40M")
    assert not tok2.training and not model2.training
    assert model2.num_parameters() == 17_416_091
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    for a, b in zip(outputs(model2), outputs(model)):
        assert torch.equal(a, b)
    frames = torch.randint(0, 256, (2, 1, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(tok2.encode(frames), tok.encode(frames))
        assert torch.equal(tok2.decode(tok.encode(frames)), tok.decode(tok.encode(frames)))


def test_load_official_refuses_a_size_mismatch_with_a_clear_message(official_files):
    tok_pt, model_pt, _, _ = official_files
    with pytest.raises(ValueError, match=r"is not the official 150M model: it looks like the official 40M model"):
        checkpoints.load_official(tok_pt, model_pt, "150M")
    with pytest.raises(ValueError, match=r"size must be one of 40M, 70M, 150M"):
        checkpoints.load_official(tok_pt, model_pt, "40m")
    with pytest.raises(FileNotFoundError, match="JOWA_70M.pt"):
        checkpoints.load_official(tok_pt, model_pt.with_name("missing.pt"), "70M")


def test_load_official_refuses_a_truncated_file(official_files, tmp_path):
    tok_pt, model_pt, _, _ = official_files
    cut = tmp_path / "JOWA_40M.pt"
    cut.write_bytes(model_pt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="is not a readable torch state dict"):
        checkpoints.load_official(tok_pt, cut, "40M")
