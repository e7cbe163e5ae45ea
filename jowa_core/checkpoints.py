"""Checkpoints: our format (safetensors + JSON config + training state) and the official release import.

Sections: official tokenizer names and our tokenizer files; official world-action model names; run
checkpoints (our format) and the official release import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jowa_core.config import Preset, TokenizerConfig, TrainConfig, WorldActionConfig, preset
from jowa_core.runtime import atomic_path


def _load_official_file(path, what: str) -> dict:
    """``torch.load(weights_only=True)`` of an official release file, with errors that say what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Official {what} file {path} does not exist; download it from the JOWA release.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:  # not a state dict, truncated
        raise ValueError(f"{path} is not a readable torch state dict ({type(e).__name__}: {e}).") from None


def _state_dict_mismatch(file_shapes: dict[str, tuple], expected: dict[str, tuple]) -> str:
    """'' when names and shapes agree, else a short list of what is missing, extra or mis-shaped."""
    missing = sorted(set(expected) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(file_shapes) if file_shapes[k] != expected[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(", ".join(f"{k}: file {file_shapes[k]} vs expected {expected[k]}" for k in wrong[:3]))
    return "; ".join(parts)


# --- official tokenizer names -------------------------------------------------------------------

_WRAPPER_PREFIXES = ("_orig_mod.module.", "module._orig_mod.", "_orig_mod.", "module.")
TOKENIZER_WEIGHTS = "model.safetensors"
TOKENIZER_CONFIG = "config.json"


def strip_wrapper_prefix(key: str) -> str:
    """Drop one torch.compile / DDP wrapper prefix ('_orig_mod.', 'module.', '_orig_mod.module.')."""
    for p in _WRAPPER_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def official_tokenizer_name_map(cfg=None) -> dict[str, str]:
    """our name -> official name for every tokenizer tensor. Identity: our modules carry the official
    names (``encoder.down.0.block.0.norm1.weight`` ...); only the official ``lpips.*`` entries have no
    counterpart (the perceptual net is not part of our tokenizer)."""

    from jowa_core.models.tokenizer import Tokenizer

    with torch.device("meta"):
        names = Tokenizer(cfg or TokenizerConfig()).state_dict().keys()
    return {n: n for n in names}


def official_tokenizer_state_dict(raw: dict) -> dict:
    """Official tokenizer state dict -> ours: strip wrapper prefixes, drop ``lpips.*``, map names."""
    name_map = {official: ours for ours, official in official_tokenizer_name_map().items()}
    out = {}
    for key, value in raw.items():
        key = strip_wrapper_prefix(key)
        if key.startswith("lpips."):
            continue
        out[name_map.get(key, key)] = value
    return out


def load_official_tokenizer(path_pt, cfg=None, device="cpu"):
    """Load the official release's ``tokenizer.pt`` into our Tokenizer (eval mode), strictly.

    ``cfg`` defaults to the official architecture (``TokenizerConfig()``).
    """


    from jowa_core.models.tokenizer import Tokenizer

    path_pt = Path(path_pt)
    raw = _load_official_file(path_pt, "tokenizer.pt")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise TypeError(f"{path_pt} holds a {type(raw).__name__}, not a state dict.")
    sd = official_tokenizer_state_dict(raw)
    tok = Tokenizer(cfg or TokenizerConfig())
    problems = _state_dict_mismatch({k: tuple(v.shape) for k, v in sd.items()},
                                    {k: tuple(v.shape) for k, v in tok.state_dict().items()})
    if problems:
        raise ValueError(
            f"{path_pt} does not match the tokenizer architecture: {problems}. Is it the official tokenizer.pt "
            "(not a JOWA_*.pt world model)? For a non-default architecture pass its TokenizerConfig as cfg."
        )
    tok.load_state_dict(sd, strict=True)
    return tok.to(device).eval()


def save_tokenizer(path_dir, tokenizer):
    """Write ``model.safetensors`` + ``config.json`` into ``path_dir``, each atomically."""



    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    with atomic_path(path_dir / TOKENIZER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"content_hash": tokenizer.content_hash()})
    with atomic_path(path_dir / TOKENIZER_CONFIG) as tmp:
        tmp.write_text(json.dumps({"kind": "tokenizer", "config": asdict(tokenizer.cfg)}, indent=2))
    return path_dir


def load_tokenizer(path_dir, device="cpu"):
    """Inverse of ``save_tokenizer``; returns the Tokenizer in eval mode."""


    from jowa_core.models.tokenizer import Tokenizer

    path_dir = Path(path_dir)
    cfg_path, w_path = path_dir / TOKENIZER_CONFIG, path_dir / TOKENIZER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"{path_dir} is not a saved tokenizer (needs {TOKENIZER_CONFIG} and {TOKENIZER_WEIGHTS}); "
            "train one with train_tokenizer or save one with save_tokenizer."
        )
    meta = json.loads(cfg_path.read_text())
    tok = Tokenizer(TokenizerConfig.from_dict(meta["config"]))
    missing, unexpected = tok.load_state_dict(load_file(str(w_path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_path} does not match {cfg_path}: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return tok.to(device).eval()


# --- official world-action model names (owned by the world-action model work) ------------------

OFFICIAL_MODEL_PRESETS = {"40M": "jowa_40m", "70M": "jowa_70m", "150M": "jowa_150m"}
"""Official release size label (``JOWA_<size>.pt``) -> our preset name."""


def _is_official_only_buffer(key: str) -> bool:
    """``transformer.blocks.N.attn.mask`` and ``head_*.indices``: official buffers we do not keep
    (SDPA builds the causal mask; head positions come from unsaved index buffers)."""
    return key.endswith(".attn.mask") or (key.startswith("head_") and key.endswith(".indices"))


def _guess_official_size(shapes: dict) -> str:
    """Best guess of the official size of a world-action state dict, for error messages."""
    layers = 1 + max((int(k.split(".")[2]) for k in shapes if k.startswith("transformer.blocks.")), default=-1)
    d = shapes["pos_emb.weight"][-1] if "pos_emb.weight" in shapes else None
    num_q = shapes["head_q.head_module.params.0"][0] if "head_q.head_module.params.0" in shapes else None
    for size, name in OFFICIAL_MODEL_PRESETS.items():

        c = preset(name).model
        if (layers, d, num_q) == (c.num_layers, c.embed_dim, c.num_q):
            return f"it looks like the official {size} model (preset {name!r})"
    return f"it has {layers} layers, width {d} and {num_q} Q heads"


def official_model_state_dict_to_ours(sd: dict, cfg) -> dict:
    """Official ``JOWA_<size>.pt`` state dict -> ours, checked against ``cfg`` (a WorldActionConfig).

    Strips the '_orig_mod.' / 'module.' / '_orig_mod.module.' wrapper prefixes and drops the
    ``attn.mask`` and ``head_*.indices`` buffers (present or not, quirk Q16); names are otherwise
    identical because our modules carry the official names. Raises ValueError naming the missing,
    unexpected and mis-shaped entries (and the size the file looks like) instead of loading
    partially. The result loads with ``WorldActionModel(cfg).load_state_dict(..., strict=True)``.
    """

    from jowa_core.models.world_action import WorldActionModel

    ours = {}
    for key, value in sd.items():
        key = strip_wrapper_prefix(key)
        if not _is_official_only_buffer(key):
            ours[key] = value
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WorldActionModel(cfg).state_dict().items()}
    problems = _state_dict_mismatch({k: tuple(v.shape) for k, v in ours.items()}, expected)
    if problems:
        guess = _guess_official_size({k: tuple(v.shape) for k, v in ours.items()})
        raise ValueError(
            f"world-action state dict does not match the config: {problems}. {guess[0].upper() + guess[1:]}; "
            "build the config with the matching preset (jowa_40m / jowa_70m / jowa_150m), td_loss='c51' and "
            "bc_head=False."
        )
    return ours


def official_model_buffers(cfg) -> dict:
    """The non-learned buffers the official model saves: ``head_*.indices`` (positions each head reads,
    over the whole window) and, when built without flash-attn, ``transformer.blocks.N.attn.mask``
    (a max_tokens x max_tokens lower-triangular float mask)."""

    tpb, n = cfg.tokens_per_block, cfg.max_blocks

    def indices(kept: list[int]) -> torch.Tensor:
        return (torch.tensor(kept).repeat(n) + tpb * torch.arange(n).repeat_interleave(len(kept))).long()

    act, last_obs = [tpb - 1], [tpb - 2]
    out = {
        "head_observations.indices": indices([j for j in range(tpb) if j != tpb - 2]),
        "head_rewards.indices": indices(act),
        "head_ends.indices": indices(act),
        "head_q.indices": indices(last_obs),
        "head_q_target.indices": indices(last_obs),
    }
    mask = torch.tril(torch.ones(cfg.max_tokens, cfg.max_tokens))
    out.update({f"transformer.blocks.{i}.attn.mask": mask.clone() for i in range(cfg.num_layers)})
    return out


def ours_to_official(sd: dict, cfg, *, prefix: str = "module.", include_attn_mask: bool = False,
                     include_indices: bool = True) -> dict:
    """Our world-action state dict -> the official file layout (what ``torch.save`` wrote there).

    ``prefix`` 'module.' is what the official DDP training saved; the released files contain the
    ``head_*.indices`` buffers but no ``attn.mask`` (quirk Q16), hence the defaults. ``head_bc``
    (ours, MTBC baseline) has no official counterpart and is written under its own name.
    """
    out = {prefix + k: v for k, v in sd.items()}
    for key, value in official_model_buffers(cfg).items():
        if (include_attn_mask if key.endswith(".attn.mask") else include_indices):
            out[prefix + key] = value
    return out


# --- run checkpoints (our format) and official import ------------------------------------------
# One self-describing folder per save (STYLE.md #10): ``<run_dir>/checkpoints/step_<step>/`` with
# ``model.safetensors`` (every persistent tensor, the target Q head included), ``config.json`` (the
# resolved preset, the run options, the step and the byte size of every file) and, for training
# runs, ``training_state.pt`` (optimizer, sampler, RNG states; plain tensors/lists/dicts so that it
# loads with ``torch.load(weights_only=True)``). A folder is written under a hidden temporary name
# and renamed when complete, so a killed writer never leaves a folder that looks whole; the
# recorded sizes catch files truncated afterwards.


RUN_CHECKPOINTS_DIR = "checkpoints"
RUN_MODEL_FILE = "model.safetensors"
RUN_CONFIG_FILE = "config.json"
RUN_STATE_FILE = "training_state.pt"
RUN_FORMAT_VERSION = 1
_STEP_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A run checkpoint is missing, truncated or corrupted; the message names the file and the fix."""


@dataclass
class RunCheckpoint:
    """What ``load`` returns.

    Attributes:
        path: the checkpoint folder.
        step: optimizer steps completed when it was written.
        preset: the resolved ``Preset`` of the run.
        model: the ``WorldActionModel`` with the saved weights (target head included), eval mode.
        options: run options that are not part of the preset (``config.json`` "options").
        training_state: the ``training_state.pt`` dict when asked for (and present), else None.
    """

    path: Path
    step: int
    preset: Any
    model: Any
    options: dict = field(default_factory=dict)
    training_state: dict | None = None


def preset_from_dict(d: dict):
    """Inverse of ``Preset.to_dict`` after a JSON round trip (lists back to tuples); unknown fields
    are refused with the name of the section, since they mean another version wrote the file."""


    def build(cls, values: dict, section: str):
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CheckpointError(
                f"config section {section!r} has unknown field(s) {sorted(unknown)}; the checkpoint was written "
                "by another version of jowa_core."
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return Preset(
        name=d["name"],
        tokenizer=build(TokenizerConfig, d.get("tokenizer", {}), "tokenizer"),
        model=build(WorldActionConfig, d.get("model", {}), "model"),
        train=build(TrainConfig, d.get("train", {}), "train"),
    )


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_STEP_PREFIX) or not name[len(_STEP_PREFIX):].isdigit():
        return None
    return int(name[len(_STEP_PREFIX):])


def list_checkpoints(run_dir) -> list[Path]:
    """The run's checkpoint folders, oldest first (only completely written ones: temporary folders of
    an interrupted save are hidden and never listed)."""
    root = Path(run_dir) / RUN_CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint folder of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_incomplete(run_dir) -> list[Path]:
    """Delete temporary folders left by saves that were killed; returns what was removed."""
    root = Path(run_dir) / RUN_CHECKPOINTS_DIR
    gone = [p for p in root.glob(_TMP_PREFIX + "*")] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save(
    run_dir,
    model,
    preset,
    *,
    step: int,
    training_state: dict | None = None,
    options: dict | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically and keep the newest ``keep_last``.

    Args:
        run_dir: the run's folder.
        model: a ``WorldActionModel`` (unwrapped: not DDP / torch.compile).
        preset: the resolved ``Preset`` the model was built from.
        step: optimizer steps completed.
        training_state: optional dict for ``training_state.pt`` (tensors, numbers, strings, lists,
            dicts only, so that it loads with ``weights_only=True``).
        options: JSON-serialisable run options to record next to the preset.
        keep_last: older checkpoint folders beyond this many are deleted (None keeps all).
    Returns:
        The checkpoint folder.
    """

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}.")
    root = Path(run_dir) / RUN_CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{int(step):09d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / RUN_MODEL_FILE), metadata={"step": str(int(step))})
        if training_state is not None:
            torch.save(training_state, tmp / RUN_STATE_FILE)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta = {
            "kind": "world_action_run",
            "format_version": RUN_FORMAT_VERSION,
            "step": int(step),
            "preset": preset.to_dict(),
            "options": options or {},
            "files": files,
        }
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_folder(path) -> Path:
    """A checkpoint folder from itself or from its run folder (the newest one)."""
    path = Path(path)
    if (path / RUN_CONFIG_FILE).is_file() and _step_of(path) is not None:
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointError(
            f"{path} holds no checkpoint (expected {path / RUN_CHECKPOINTS_DIR}/step_*/ or a step_* folder); "
            "train one with jowa_core.training.train_world_action or pass the right run_dir."
        )
    return newest


def _fix_hint(folder: Path) -> str:
    return (
        f"Delete the damaged folder {folder} to fall back to the previous checkpoint of the run (resume picks the "
        "newest remaining one), or start over with resume=False."
    )


def read_checkpoint_config(path) -> dict:
    """``config.json`` of a checkpoint folder (or of a run's newest checkpoint), validated."""
    folder = _checkpoint_folder(path)
    cfg_path = folder / RUN_CONFIG_FILE
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{cfg_path} cannot be read as JSON ({e}); the checkpoint is damaged. {_fix_hint(folder)}"
        ) from None
    if not isinstance(meta, dict) or meta.get("kind") != "world_action_run":
        raise CheckpointError(f"{cfg_path} is not a world-action run checkpoint config (no kind 'world_action_run').")
    if int(meta.get("format_version", -1)) != RUN_FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version {meta.get('format_version')}; this code reads {RUN_FORMAT_VERSION}."
        )
    for name, size in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from the checkpoint. {_fix_hint(folder)}")
        if f.stat().st_size != int(size):
            raise CheckpointError(
                f"{f} is truncated or corrupted: {f.stat().st_size} bytes on disk, {size} when written. "
                f"{_fix_hint(folder)}"
            )
    return meta | {"path": str(folder)}


def load(path, *, device="cpu", training_state: bool = False) -> RunCheckpoint:
    """Load a run checkpoint: ``path`` is a checkpoint folder or a run folder (its newest checkpoint).

    Returns a ``RunCheckpoint`` whose model (target head included) is in eval mode on ``device``;
    ``training_state=True`` also reads ``training_state.pt`` (``torch.load(weights_only=True)``).
    Damaged files raise ``CheckpointError`` naming the file and the fix.
    """


    from jowa_core.models.world_action import WorldActionModel

    meta = read_checkpoint_config(path)
    folder = Path(meta["path"])
    preset = preset_from_dict(meta["preset"])
    w_path = folder / RUN_MODEL_FILE
    try:
        weights = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} cannot be read ({e}). {_fix_hint(folder)}") from None
    model = WorldActionModel(preset.model)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{w_path} does not match the model config in {folder / RUN_CONFIG_FILE}: {e}") from None
    state = None
    s_path = folder / RUN_STATE_FILE
    if training_state and s_path.is_file():
        try:
            state = torch.load(s_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{s_path} cannot be read ({type(e).__name__}: {e}). {_fix_hint(folder)}") from None
    return RunCheckpoint(folder, int(meta["step"]), preset, model.to(device).eval(), meta.get("options", {}), state)


def load_official(tokenizer_pt, model_pt, size: str, *, device="cpu"):
    """Load the official JOWA release files into our modules: ``(tokenizer, model)`` in eval mode.

    Args:
        tokenizer_pt: the release's ``tokenizer.pt`` (``lpips.*`` entries are dropped).
        model_pt: ``JOWA_<size>.pt``.
        size: "40M", "70M" or "150M" (as in the file names); picks the preset jowa_40m/70m/150m.
        device: where the modules go.
    Both files are read with ``torch.load(weights_only=True)``; a file of another size is refused
    with a message naming the size it looks like. The target Q head is the file's own.
    """


    from jowa_core.models.world_action import WorldActionModel

    if size not in OFFICIAL_MODEL_PRESETS:
        sizes = ", ".join(OFFICIAL_MODEL_PRESETS)
        raise ValueError(f"size must be one of {sizes} (as in JOWA_<size>.pt), got {size!r}.")
    p = preset(OFFICIAL_MODEL_PRESETS[size])
    model_pt = Path(model_pt)
    raw = _load_official_file(model_pt, f"JOWA_{size}.pt")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise TypeError(f"{model_pt} does not hold a state dict of tensors.")
    shapes = {strip_wrapper_prefix(k): tuple(v.shape) for k, v in raw.items()}
    try:
        sd = official_model_state_dict_to_ours(raw, p.model)
    except ValueError as e:
        raise ValueError(
            f"{model_pt} is not the official {size} model: {_guess_official_size(shapes)}. Pass the matching size "
            f"(load_official(..., size=...)) or the matching file. Details: {e}"
        ) from None
    model = WorldActionModel(p.model)
    model.load_state_dict(sd, strict=True)
    tokenizer = load_official_tokenizer(tokenizer_pt, p.tokenizer, device=device)
    return tokenizer, model.to(device).eval()
