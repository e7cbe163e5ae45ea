"""Token cache: every frame of a dataset encoded once, as ``<Game>.tokens.h5`` (DESIGN.md section 5).

The cache is self-sufficient for world-model training: ``tokens`` uint16 (N, 36) plus the source
dataset's ``actions``, ``rewards``, ``terminals``, ``truncations``, ``episode_starts`` and
``episode_returns`` (and ``lives`` when the dataset has it). Root attributes name the tokenizer
(``tokenizer_hash``, from ``Tokenizer.content_hash``), the game and task id, and the source file and its length.
Readers refuse a cache made by another tokenizer. Encoding runs in fp32 (no autocast) so the cached
tokens equal ``tokenizer.encode`` on the same frames.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from jowa_core.config import OBS_TOKENS
from jowa_core.data.format import open_dataset
from jowa_core.runtime import atomic_path, resolve_device

CACHE_FORMAT_VERSION = 1
COPIED = ("actions", "rewards", "terminals", "truncations", "episode_starts", "episode_returns")
OPTIONAL_COPIED = ("lives",)  # copied when the dataset has them
REQUIRED_ATTRS = ("cache_format_version", "tokenizer_hash", "game", "task_id", "source_path", "source_num_transitions")
TOKEN_CHUNK = 4096


class TokenCacheError(ValueError):
    """A token cache is missing, malformed, or made by another tokenizer; the message names the fix."""


def token_cache_path(dataset_path: str | os.PathLike) -> Path:
    """``data/x/Pong.h5`` -> ``data/x/Pong.tokens.h5``."""
    p = Path(dataset_path)
    return p.with_name(p.name[: -len(".h5")] + ".tokens.h5" if p.name.endswith(".h5") else p.name + ".tokens.h5")


def _hash_of(expected) -> str:
    return expected.content_hash() if hasattr(expected, "content_hash") else str(expected)


def build_token_cache(
    dataset_path: str | os.PathLike,
    tokenizer,
    out_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> Path:
    """Encode every frame of ``dataset_path`` and write the cache atomically; returns its path.

    ``out_path`` defaults to ``<Game>.tokens.h5`` beside the dataset. The tokenizer is not modified
    (a copy is moved when it lives on another device).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if tokenizer.cfg.vocab_size > 65536:
        raise TokenCacheError(f"vocab_size {tokenizer.cfg.vocab_size} does not fit the cache's uint16 tokens.")
    src = Path(dataset_path)
    out = Path(out_path) if out_path is not None else token_cache_path(src)
    dev = resolve_device(device)
    model = tokenizer
    if next(tokenizer.parameters()).device != dev:
        model = copy.deepcopy(tokenizer).to(dev)
    was_training = model.training
    model.eval()
    digest = tokenizer.content_hash()
    with open_dataset(src) as f, atomic_path(out) as tmp:
        obs = f["observations"]
        n = obs.shape[0]
        chunk = obs.chunks[0] if obs.chunks else 256
        step = max(chunk, (batch_size // chunk) * chunk)  # read whole compressed chunks
        with h5py.File(tmp, "w") as g:
            tokens = g.create_dataset(
                "tokens", shape=(n, OBS_TOKENS), dtype=np.uint16, chunks=(max(1, min(n, TOKEN_CHUNK)), OBS_TOKENS)
            )
            with (
                torch.inference_mode(),
                tqdm(total=n, desc=f"tokens {src.stem}", unit="frame", disable=not progress) as bar,
            ):
                for a in range(0, n, step):
                    block = obs[a : a + step]
                    encoded = [
                        model.encode(torch.from_numpy(block[b : b + batch_size]).to(dev)).cpu()
                        for b in range(0, len(block), batch_size)
                    ]
                    tokens[a : a + len(block)] = torch.cat(encoded).numpy().astype(np.uint16)
                    bar.update(len(block))
            for name in COPIED + tuple(k for k in OPTIONAL_COPIED if k in f):
                g.create_dataset(name, data=f[name][:])
            attrs = g.attrs
            attrs["cache_format_version"] = CACHE_FORMAT_VERSION
            attrs["tokenizer_hash"] = digest
            attrs["tokenizer_config"] = json.dumps(asdict(tokenizer.cfg))
            attrs["vocab_size"] = tokenizer.cfg.vocab_size
            attrs["game"] = str(f.attrs["game"])
            attrs["task_id"] = int(f.attrs["task_id"])
            attrs["source"] = str(f.attrs["source"])
            attrs["source_path"] = str(src.resolve())
            attrs["source_num_transitions"] = n
    model.train(was_training)
    return out


def _fail(path: Path, problem: str, fix: str = "") -> TokenCacheError:
    fix = fix or "Rebuild it with jowa_core.data.token_cache.build_token_cache(<dataset.h5>, tokenizer)."
    return TokenCacheError(f"Token cache {path}: {problem} {fix}")


def open_token_cache(path: str | os.PathLike, expected_hash=None) -> h5py.File:
    """Open a cache read-only after validating it. ``expected_hash``: a hash string or a Tokenizer;
    when given, a cache made by another tokenizer is refused (the error names both hashes)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _fail(path, f"is not a readable HDF5 file ({e}).") from None
    try:
        _validate(f, path, expected_hash)
    except TokenCacheError:
        f.close()
        raise
    return f


def _validate(f: h5py.File, path: Path, expected_hash) -> None:
    for key in REQUIRED_ATTRS:
        if key not in f.attrs:
            raise _fail(path, f"has no attribute {key!r}; it is not a token cache (or was cut short).")
    version = int(f.attrs["cache_format_version"])
    if version != CACHE_FORMAT_VERSION:
        raise _fail(path, f"has cache_format_version {version}, this code reads {CACHE_FORMAT_VERSION}.")
    if "tokens" not in f or f["tokens"].dtype != np.uint16 or f["tokens"].shape[1:] != (OBS_TOKENS,):
        got = f"{f['tokens'].dtype} {f['tokens'].shape}" if "tokens" in f else "nothing"
        raise _fail(path, f"'tokens' must be uint16 (N, {OBS_TOKENS}); found {got}.")
    n = f["tokens"].shape[0]
    if n != int(f.attrs["source_num_transitions"]):
        raise _fail(
            path, f"has {n} token rows but its source had {int(f.attrs['source_num_transitions'])} transitions."
        )
    for name in COPIED:
        if name not in f:
            raise _fail(path, f"lacks {name!r}.")
        if name not in ("episode_starts", "episode_returns") and f[name].shape[0] != n:
            raise _fail(path, f"{name!r} has {f[name].shape[0]} rows, tokens has {n}.")
    for name in OPTIONAL_COPIED:
        if name in f and f[name].shape != (n,):
            raise _fail(path, f"{name!r} has shape {f[name].shape}, tokens has {n} rows.")
    if expected_hash is not None:
        want, have = _hash_of(expected_hash), str(f.attrs["tokenizer_hash"])
        if want != have:
            raise _fail(
                path,
                f"was built by tokenizer {have[:16]}..., but the current tokenizer is {want[:16]}... "
                "(tokens of different tokenizers mean different things).",
                f"Rebuild it with build_token_cache({str(f.attrs['source_path'])!r}, tokenizer), "
                "or load the tokenizer that built it.",
            )


def has_lives(path: str | os.PathLike) -> bool:
    """Whether a cache carries the lives counter that ``TrainConfig.life_start_share`` needs."""
    with open_token_cache(path) as f:
        return "lives" in f


def read_token_cache(path: str | os.PathLike, expected_hash=None) -> dict[str, np.ndarray]:
    """The whole cache in memory: ``tokens`` (N, 36) uint16 and the copied arrays; attrs under ``attrs``."""
    with open_token_cache(path, expected_hash) as f:
        out = {name: f[name][:] for name in ("tokens", *COPIED, *OPTIONAL_COPIED) if name in f}
        out["attrs"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    return out
