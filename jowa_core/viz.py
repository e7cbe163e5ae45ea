"""Plotly figures and ipywidgets viewers used by the notebooks (kept here so notebooks stay thin)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from jowa_core import games
from jowa_core.data.format import open_dataset


def frame_grid(frames: np.ndarray, titles: Sequence[str] | None = None, cols: int = 4, title: str = "") -> go.Figure:
    """Grayscale frames (N, 84, 84) uint8 or float in [0, 1] as a grid of images."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).astype(np.uint8)
    fig = px.imshow(frames, facet_col=0, facet_col_wrap=min(cols, len(frames)), binary_string=True,
                    labels={"facet_col": "frame"})
    if titles is not None:
        for ann, t in zip(fig.layout.annotations, titles):
            ann.text = t
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def dataset_sample_frames(paths: Sequence[str | os.PathLike], per_game: int = 4, seed: int = 0) -> go.Figure:
    """A row of evenly spread frames from each dataset file."""
    frames, titles = [], []
    rng = np.random.default_rng(seed)
    for path in paths:
        with open_dataset(path) as f:
            n = f["actions"].shape[0]
            idx = np.sort(rng.choice(n, size=min(per_game, n), replace=False))
            frames.append(f["observations"][idx])
            titles += [f"{f.attrs['game']} t={i}" for i in idx]
    return frame_grid(np.concatenate(frames), titles, cols=per_game, title="Sample frames")


def episode_return_histograms(paths: Sequence[str | os.PathLike]) -> go.Figure:
    """Episode returns per game (one subplot each); truncated last episodes are included."""
    fig = make_subplots(rows=1, cols=len(paths), subplot_titles=[os.path.basename(str(p)) for p in paths])
    for i, path in enumerate(paths, start=1):
        with open_dataset(path) as f:
            returns = f["episode_returns"][:]
            fig.add_trace(go.Histogram(x=returns, name=str(f.attrs["game"]), showlegend=False), row=1, col=i)
    fig.update_layout(title="Episode returns", bargap=0.05)
    return fig


def action_distribution(paths: Sequence[str | os.PathLike]) -> go.Figure:
    """Share of each full-set action per game, legal actions only."""
    fig = go.Figure()
    for path in paths:
        with open_dataset(path) as f:
            game = str(f.attrs["game"])
            counts = np.bincount(f["actions"][:], minlength=games.NUM_ACTIONS)
        legal = list(games.legal_actions(game))
        fig.add_trace(go.Bar(x=[games.FULL_ACTION_SET[a] for a in legal], y=counts[legal] / counts.sum(), name=game))
    fig.update_layout(title="Action distribution", barmode="group", yaxis_title="share of transitions")
    return fig


def metric_curves(records: Sequence[Mapping], keys: Sequence[str], x: str = "step", title: str = "") -> go.Figure:
    """Line plot of metrics (e.g. read from a metrics JSONL) against ``x``."""
    fig = go.Figure()
    for key in keys:
        pts = [(r[x], r[key]) for r in records if key in r and x in r]
        if pts:
            xs, ys = zip(*pts)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=key))
    fig.update_layout(title=title, xaxis_title=x)
    return fig


# --- tokenizer views (notebook 02) ---------------------------------------------------------------


def _held_out_frames(path: str | os.PathLike, n: int, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """``n`` frames from the held-out tail of a dataset, preferring frames that differ from their predecessor."""
    from jowa_core.training_tokenizer import holdout_start

    with open_dataset(path) as f:
        total = f["actions"].shape[0]
        start = holdout_start(total)
        frames = f["observations"][max(start - 1, 0):]
        game = str(f.attrs["game"])
    changed = (frames[1:] != frames[:-1]).reshape(len(frames) - 1, -1).sum(1)
    order = np.argsort(-changed, kind="stable")[: max(n * 4, n)]
    idx = np.sort(np.random.default_rng(seed).choice(order, size=min(n, len(order)), replace=False)) + 1
    return game, frames[idx], idx + max(start - 1, 0)


def reconstruction_grid(tokenizer, paths: Sequence[str | os.PathLike], per_game: int = 3) -> go.Figure:
    """Original / reconstruction / |difference| (x4) on held-out frames with motion, one row per frame."""
    import torch

    frames, titles = [], []
    for path in paths:
        game, originals, idx = _held_out_frames(path, per_game)
        with torch.no_grad():
            recon = tokenizer.decode(tokenizer.encode(torch.from_numpy(originals)))[:, 0].float().cpu().numpy()
        orig = originals.astype(np.float32) / 255.0
        for o, r, i in zip(orig, recon, idx):
            frames += [o, r, np.clip(np.abs(o - r) * 4, 0, 1)]
            titles += [f"{game} t={i}", "reconstruction", f"|diff| x4 (MAE {np.abs(o - r).mean():.3f})"]
    return frame_grid(np.stack(frames), titles, cols=3, title="Held-out frames: original, reconstruction, error")


def codebook_usage(tokenizer, paths: Sequence[str | os.PathLike], frames_per_game: int = 2000) -> go.Figure:
    """How often each code is used on the datasets' frames, sorted; dead codes show as zeros."""
    import torch

    vocab = tokenizer.cfg.vocab_size
    counts = np.zeros(vocab, np.int64)
    for path in paths:
        with open_dataset(path) as f:
            n = f["actions"].shape[0]
            frames = f["observations"][: min(n, frames_per_game)]
        with torch.no_grad():
            tokens = tokenizer.encode(torch.from_numpy(frames)).cpu().numpy()
        counts += np.bincount(tokens.ravel(), minlength=vocab)
    used = int((counts > 0).sum())
    p = counts / counts.sum()
    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    fig = go.Figure(go.Bar(y=np.sort(counts)[::-1], marker_line_width=0))
    fig.update_layout(title=f"Codebook usage: {used}/{vocab} codes used ({used / vocab:.0%}), perplexity {perplexity:.0f}",
                      xaxis_title="code (sorted by use)", yaxis_title="count", yaxis_type="log")
    return fig


def _token_grid_png(frame: np.ndarray, tokens: np.ndarray, scale: int = 5) -> bytes:
    """A frame enlarged ``scale`` times with the 6x6 token cells and their code ids drawn on it."""
    import cv2

    size = frame.shape[-1] * scale
    img = cv2.resize(frame, (size, size), interpolation=cv2.INTER_NEAREST)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    cell = size / 6
    for k in range(1, 6):
        p = int(round(k * cell))
        cv2.line(img, (p, 0), (p, size), (0, 200, 255), 1)
        cv2.line(img, (0, p), (size, p), (0, 200, 255), 1)
    for k, tok in enumerate(tokens):
        r, c = divmod(k, 6)  # row-major: token k = 6 * row + col
        cv2.putText(img, str(int(tok)), (int(c * cell) + 3, int(r * cell) + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 255, 0), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", img)
    return png.tobytes()


def token_grid_viewer(tokenizer, path: str | os.PathLike, max_frames: int = 500):
    """ipywidgets: a slider over a dataset's frames showing the frame with its 6x6 token grid and the decoding."""
    import ipywidgets as widgets
    import torch

    with open_dataset(path) as f:
        frames = f["observations"][: min(max_frames, f["actions"].shape[0])]
        game = str(f.attrs["game"])
    with torch.no_grad():
        tokens = tokenizer.encode(torch.from_numpy(frames)).cpu().numpy()
        recon = (tokenizer.decode(torch.as_tensor(tokens))[:, 0].float().cpu().numpy() * 255).astype(np.uint8)
    slider = widgets.IntSlider(value=0, min=0, max=len(frames) - 1, description="frame", continuous_update=False)
    original = widgets.Image(format="png")
    decoded = widgets.Image(format="png")
    label = widgets.Label()

    def show(change=None) -> None:
        t = slider.value
        original.value = _token_grid_png(frames[t], tokens[t])
        decoded.value = _token_grid_png(recon[t], tokens[t])
        label.value = f"{game} frame {t}: {len(np.unique(tokens[t]))} distinct codes"

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, label, widgets.HBox([original, decoded])])
