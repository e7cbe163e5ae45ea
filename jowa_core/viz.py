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
