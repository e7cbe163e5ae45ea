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
    """``n`` frames from the held-out tail of a dataset, preferring frames where several small objects move.

    A frame's score is the number of separate regions (8-connected, at most 4 counted) of pixels that
    differ from the previous frame; frames where more than 5% of the pixels change (flashes, resets)
    score 0. The ``n`` best are taken, at random among equal scores. Small moving objects are what a tokenizer drops
    first: in Breakout's held-out frames with 3 or more such regions the ball is in play about 80% of the time.
    """
    import cv2

    from jowa_core.training_tokenizer import holdout_start

    with open_dataset(path) as f:
        total = f["actions"].shape[0]
        start = holdout_start(total)
        frames = f["observations"][max(start - 1, 0):]
        game = str(f.attrs["game"])
    changed = frames[1:] != frames[:-1]
    small = changed.reshape(len(changed), -1).mean(1) <= 0.05
    regions = np.array([cv2.connectedComponents(c.astype(np.uint8), connectivity=8)[0] - 1 for c in changed])
    score = np.minimum(regions, 4) * small
    shuffled = np.random.default_rng(seed).permutation(len(score))  # random among equal scores
    idx = np.sort(shuffled[np.argsort(-score[shuffled], kind="stable")][:n]) + 1
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


def _image():
    """A PNG ``ipywidgets.Image`` shown at its own size: in a VBox, JupyterLab would otherwise stretch it to
    the box's width (a blurred, distorted frame), which the browser tests caught."""
    import ipywidgets as widgets

    return widgets.Image(format="png", layout=widgets.Layout(align_self="flex-start"))


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
    original, decoded = _image(), _image()
    label = widgets.Label()

    def show(change=None) -> None:
        t = slider.value
        original.value = _token_grid_png(frames[t], tokens[t])
        decoded.value = _token_grid_png(recon[t], tokens[t])
        label.value = f"{game} frame {t}: {len(np.unique(tokens[t]))} distinct codes"

    slider.observe(show, names="value")
    show()
    _tag(slider, "jowa-token-step")
    _tag(original, "jowa-token-frame")
    _tag(decoded, "jowa-token-decoded")
    _tag(label, "jowa-token-label")
    return _tag(widgets.VBox([slider, label, widgets.HBox([original, decoded])]), "jowa-token-viewer")


# --- planning views (notebook 04) and score views (notebook 06) ----------------------------------
#
# Widgets are plain ipywidgets: frames are PNG bytes in ``widgets.Image`` and plotly figures are put
# into a ``widgets.Output`` as a plotly mime bundle (rendered offline by the jupyterlab-plotly
# extension that ships with plotly; ``FigureWidget`` would need anywidget). Every control change
# replaces the image bytes and the output's figure data, so the page visibly changes. The viewers
# keep the current ``go.Figure`` and widgets as attributes, which the tests read; every part also
# carries a stable CSS class (``jowa-beam-*``, ``jowa-dream-*``, ``jowa-token-*``) by which the
# browser tests (tests/test_browser.py) find it in JupyterLab.


def _tag(widget, css_class: str):
    """Give a widget a stable CSS class: the browser tests (and user CSS) find it by that, not by layout."""
    widget.add_class(css_class)
    return widget


def _tag_parts(viewer, prefix: str, parts: Mapping[str, str]) -> None:
    """Tag ``viewer.widget`` as ``<prefix>-viewer`` and each attribute ``name`` as ``<prefix>-<parts[name]>``."""
    _tag(viewer.widget, f"{prefix}-viewer")
    for name, suffix in parts.items():
        _tag(getattr(viewer, name), f"{prefix}-{suffix}")


def _short(action: int) -> str:
    return "root" if action < 0 else games.FULL_ACTION_SET[action]


def _uint8(frames) -> np.ndarray:
    """Decoder output (n, 1, H, W) float in [0, 1] (tensor or array) -> (n, H, W) uint8."""
    a = frames.detach().float().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames, np.float32)
    return (np.clip(a[:, 0], 0, 1) * 255).round().astype(np.uint8)


def _png(frame: np.ndarray, scale: int = 3) -> bytes:
    import cv2

    h, w = frame.shape
    _, png = cv2.imencode(".png", cv2.resize(frame, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST))
    return png.tobytes()


def _strip_png(rows: Sequence[Sequence[tuple[np.ndarray, str]]], scale: int = 2, highlight_first: bool = False) -> bytes:
    """Rows of (frame, caption) cells as one PNG; ``highlight_first`` frames the first row in orange."""
    import cv2

    side, band, pad = 84 * scale, 16, 4
    cols = max(len(r) for r in rows)
    img = np.full((len(rows) * (side + band + pad) + pad, cols * (side + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        y = pad + i * (side + band + pad)
        for j, (frame, caption) in enumerate(row):
            x = pad + j * (side + pad)
            cell = cv2.resize(frame, (side, side), interpolation=cv2.INTER_NEAREST)
            img[y + band : y + band + side, x : x + side] = cell[..., None]
            cv2.putText(img, caption[:30], (x + 2, y + band - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1,
                        cv2.LINE_AA)  # fmt: skip
        if highlight_first and i == 0:
            cv2.rectangle(img, (1, y - 2), (img.shape[1] - 2, y + band + side + 1), (0, 140, 255), 2)
    _, png = cv2.imencode(".png", img)
    return png.tobytes()


def _show_figure(out, fig: go.Figure) -> None:
    """Replace what an ``ipywidgets.Output`` shows with ``fig`` (a plotly mime bundle, no kernel round trip)."""
    import plotly.io as pio

    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    bundle["text/plain"] = f"<plotly figure: {fig.layout.title.text or ''}>"
    out.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)


def _q_summary(q: np.ndarray, legal: Sequence[int]) -> str:
    v = np.asarray([q[a] for a in legal], np.float64)
    return f"max {v.max():.3f}, mean {v.mean():.3f}, spread {v.max() - v.min():.3f}"


def _node_hover(trace, n: int, legal: Sequence[int]) -> str:
    q = trace.q[n].float().numpy()
    best = sorted(legal, key=lambda a: -q[a])
    qs = "<br>".join(f"&nbsp;&nbsp;{_short(a)}: {q[a]:.3f}" for a in best)
    return (
        f"node {n} (depth {int(trace.depth[n])}, {'kept' if bool(trace.kept[n]) else 'pruned'})<br>"
        f"action: {_short(int(trace.action[n]))}<br>predicted reward: {float(trace.reward[n]):+.0f}<br>"
        f"return to date: {float(trace.return_to_date[n]):.3f}<br>score: {float(trace.score[n]):.3f}<br>"
        f"E[Q] per action ({_q_summary(q, legal)}):<br>{qs}"
    )


def _tree_layout(trace, nodes: list[int]) -> dict[int, tuple[float, float]]:
    """x = depth; y spreads each depth's nodes over [0, 1] top down, by the parent's y, then by score."""
    pos: dict[int, tuple[float, float]] = {}
    by_depth: dict[int, list[int]] = {}
    for n in nodes:
        by_depth.setdefault(int(trace.depth[n]), []).append(n)
    for d in sorted(by_depth):
        ns = by_depth[d]
        ns.sort(key=lambda n: (-pos.get(int(trace.parent[n]), (0, 0.0))[1], -float(trace.score[n])))  # top down
        for i, n in enumerate(ns):
            pos[n] = (float(d), 0.5 if len(ns) == 1 else 1.0 - i / (len(ns) - 1))
    return pos


def beam_tree_figure(trace, game: str, env: int = 0, title: str = "") -> go.Figure:
    """The beam search tree of one env: nodes are trace nodes (x = depth), edges parent -> child;
    kept nodes are large and coloured by score, pruned ones small and grey, the chosen path is
    drawn thick. Hover shows the action, predicted reward, return, score and E[Q] per legal action."""
    nodes = [n for n in range(trace.num_nodes) if int(trace.env[n]) == env]
    legal = games.legal_actions(game)
    pos = _tree_layout(trace, nodes)
    best = set(trace.path(env))
    fig = go.Figure()
    ex, ey, bx, by = [], [], [], []
    for n in nodes:
        p = int(trace.parent[n])
        if p >= 0:
            xs, ys = (bx, by) if n in best and p in best else (ex, ey)
            xs += [pos[p][0], pos[n][0], None]
            ys += [pos[p][1], pos[n][1], None]
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color="#bbbbbb", width=1), hoverinfo="skip",
                             name="expanded"))
    fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", line=dict(color="#ff8c00", width=4), hoverinfo="skip",
                             name="chosen path"))  # fmt: skip
    for kept, name in ((False, "pruned"), (True, "kept")):
        sel = [n for n in nodes if bool(trace.kept[n]) == kept]
        fig.add_trace(go.Scatter(
            x=[pos[n][0] for n in sel], y=[pos[n][1] for n in sel], mode="markers+text", name=name,
            text=[_short(int(trace.action[n])) for n in sel], textposition="top center",
            hovertext=[_node_hover(trace, n, legal) for n in sel], hoverinfo="text",
            customdata=sel,
            marker=dict(size=18 if kept else 10, color=[float(trace.score[n]) for n in sel] if kept else "#cccccc",
                        colorscale="Viridis", showscale=kept, colorbar=dict(title="score") if kept else None,
                        line=dict(width=[3 if n in best else 1 for n in sel], color="#ff8c00" if kept else "#999")),
        ))  # fmt: skip
    fig.update_layout(
        title=title or f"Beam search: width {trace.beam_width}, horizon {trace.horizon}, chose "
        f"{_short(int(trace.actions[env]))}",
        xaxis=dict(title="depth (imagined steps)", dtick=1, range=[-0.3, max(trace.horizon, 1) + 0.3]),
        yaxis=dict(visible=False, range=[-0.15, 1.15]), height=360, margin=dict(l=10, r=10, t=40, b=30),
        legend=dict(orientation="h", y=-0.2),
    )  # fmt: skip
    return fig


def beam_frames(trace, tokenizer, real_frame: np.ndarray, env: int = 0,
                real_caption: str = "real now") -> list[list[tuple[np.ndarray, str]]]:  # fmt: skip
    """The imagined frames along each surviving beam, best first: one row per kept leaf, starting with
    the real frame (captioned ``real_caption``), then each node's decoded frame with its action,
    predicted reward and score."""
    import torch

    from jowa_core.planning import decode_trace_frames

    if trace.horizon == 0:
        return [[(real_frame, f"{real_caption} (greedy: no imagination)")]]
    leaves = [n for n in range(trace.num_nodes)
              if int(trace.env[n]) == env and int(trace.depth[n]) == trace.horizon and bool(trace.kept[n])]  # fmt: skip
    best = int(trace.best_leaf[env])
    leaves.sort(key=lambda n: (n != best, -float(trace.score[n])))
    paths = []
    for leaf in leaves:
        path, n = [], leaf
        while int(trace.parent[n]) >= 0:
            path.append(n)
            n = int(trace.parent[n])
        paths.append(path[::-1])
    need = sorted({n for p in paths for n in p})
    with torch.no_grad():
        decoded = dict(zip(need, _uint8(decode_trace_frames(trace, tokenizer, need))))
    rows = []
    for path in paths:
        row = [(real_frame, real_caption)]
        for n in path:
            caption = f"{_short(int(trace.action[n]))} r{float(trace.reward[n]):+.0f} s{float(trace.score[n]):.2f}"
            row.append((decoded[n], caption))
        rows.append(row)
    return rows


def _q_table_html(q: np.ndarray, legal: Sequence[int], marks: Mapping[int, str]) -> str:
    order = sorted(legal, key=lambda a: -q[a])
    cells = "".join(
        f"<tr><td>{_short(a)}</td><td style='text-align:right'>{q[a]:.3f}</td><td>{marks.get(a, '')}</td></tr>"
        for a in order
    )
    return f"<table><tr><th>action</th><th>E[Q]</th><th></th></tr>{cells}</table>"


class BeamViewer:
    """A recorded episode step by step: the real frame, the beam tree, the imagined frames along each
    beam, and re-planning with another beam width / horizon (needs the model).

    Attributes (read by tests and by code driving the viewer): ``widget`` (the VBox shown),
    ``step``, ``beam_width``, ``horizon``, ``replan_button``, ``frame`` and ``imagined`` (Image),
    ``tree`` (Output holding the figure), ``figure`` (the current ``go.Figure``), ``readout`` (HTML),
    ``trace`` (the ``PlanTrace`` shown).
    """

    def __init__(self, record, tokenizer, model=None, scale: int = 3) -> None:
        import ipywidgets as widgets

        if len(record) == 0:
            raise ValueError("the record has no steps; record_episode(..., max_steps >= 1) first.")
        self.record, self.tokenizer, self.model, self.scale = record, tokenizer, model, scale
        max_h = (model.cfg.max_blocks - 1) if model is not None else max(record.horizon, 0)
        self.step = widgets.IntSlider(value=0, min=0, max=len(record) - 1, description="step",
                                      continuous_update=False)  # fmt: skip
        self.beam_width = widgets.IntSlider(value=max(record.beam_width, 1), min=1, max=8, description="beam width")
        self.horizon = widgets.Dropdown(options=list(range(max_h + 1)), value=record.horizon, description="horizon")
        self.replan_button = widgets.Button(description="re-plan", disabled=model is None,
                                            tooltip="plan this step again with the chosen beam width and horizon")
        self.frame, self.imagined = _image(), _image()
        self.tree = widgets.Output(layout=widgets.Layout(min_width="480px"))
        self.readout = widgets.HTML()
        self.figure: go.Figure | None = None
        self.trace = None
        self._replans: dict[tuple[int, int, int], object] = {}
        self.step.observe(lambda change: self.show(), names="value")
        self.replan_button.on_click(lambda button: self.replan())
        controls = widgets.HBox([self.step, self.beam_width, self.horizon, self.replan_button])
        left = widgets.VBox([widgets.HTML("<b>real frame</b>"), self.frame, self.readout])
        right = widgets.VBox([self.tree, widgets.HTML("<b>imagined frames along each beam</b> (best first)"),
                              self.imagined])  # fmt: skip
        self.widget = widgets.VBox([controls, widgets.HBox([left, right])])
        _tag_parts(self, "jowa-beam", {"step": "step", "beam_width": "width", "horizon": "horizon",
                                       "replan_button": "replan", "frame": "frame", "imagined": "imagined",
                                       "tree": "tree", "readout": "readout"})  # fmt: skip
        self.show()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def replan(self) -> None:
        """Plan the current step again with the controls' beam width and horizon, and show it."""
        from jowa_core.inspection import replan

        t, bw, h = self.step.value, self.beam_width.value, self.horizon.value
        if (t, bw, h) not in self._replans:
            self._replans[(t, bw, h)] = replan(self.model, self.record, t, bw, h)
        self.show(self._replans[(t, bw, h)], label=f"re-planned: width {bw}, horizon {h}")

    def show(self, trace=None, label: str | None = None) -> None:
        """Show step ``self.step.value`` with its recorded plan (or ``trace``)."""
        import plotly.graph_objects as go_

        t = self.step.value
        s = self.record.steps[t]
        trace = trace if trace is not None else s.trace
        label = label or f"recorded plan: width {self.record.beam_width}, horizon {self.record.horizon}"
        self.trace = trace
        self.frame.value = _png(s.frame, self.scale)
        legal = games.legal_actions(self.record.game)
        head = (f"<b>{self.record.game}</b> step {t} / {len(self.record) - 1}: planned <b>{_short(s.planned)}</b>, "
                f"greedy <b>{_short(s.greedy)}</b>, executed {_short(s.executed)}, real reward {s.reward:+g}<br>"
                f"<i>{label}</i>")  # fmt: skip
        if trace is None:
            self.figure = go_.Figure().update_layout(title=f"step {t}: epsilon chose a random action (no plan)")
            self.imagined.value = _strip_png([[(s.frame, f"step {t}: no plan")]], scale=2)
            self.readout.value = head
        else:
            chosen = int(trace.actions[0])
            self.figure = beam_tree_figure(trace, self.record.game, 0, title=f"step {t}: {label}, chose "
                                           f"{_short(chosen)}")  # fmt: skip
            rows = beam_frames(trace, self.tokenizer, s.frame, real_caption=f"real, step {t}")
            self.imagined.value = _strip_png(rows, scale=2, highlight_first=trace.horizon > 0)
            q = trace.q[0].float().numpy()
            marks = {chosen: "plan"} | ({s.greedy: "greedy"} if s.greedy != chosen else {})
            self.readout.value = head + "<br>E[Q] at the real frame:" + _q_table_html(q, legal, marks)
        _show_figure(self.tree, self.figure)


def beam_viewer(record, tokenizer, model=None, scale: int = 3) -> BeamViewer:
    """ipywidgets viewer of a recorded episode's plans (``BeamViewer``); pass ``model`` to re-plan."""
    return BeamViewer(record, tokenizer, model, scale)


def plan_vs_greedy(record) -> go.Figure:
    """Planned vs greedy action per step of a recorded episode, with the agreement rate."""
    t = np.arange(len(record))
    legal = games.legal_actions(record.game)
    names = [_short(a) for a in legal]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=t, y=[_short(a) for a in record.greedy], mode="markers", name="greedy Q",
                             marker=dict(symbol="circle-open", size=12)))  # fmt: skip
    fig.add_trace(go.Scatter(x=t, y=[_short(a) for a in record.planned], mode="markers", name="beam search",
                             marker=dict(symbol="x", size=7)))  # fmt: skip
    differ = t[record.planned != record.greedy]
    fig.add_trace(go.Scatter(x=differ, y=[_short(a) for a in record.planned[differ]], mode="markers",
                             name="disagree", marker=dict(color="red", size=14, opacity=0.25)))  # fmt: skip
    fig.update_layout(
        title=f"{record.game}: planned vs greedy action, agreement {record.agreement:.0%} over {len(record)} steps "
        f"(width {record.beam_width}, horizon {record.horizon})",
        xaxis_title="step", yaxis=dict(categoryorder="array", categoryarray=names, title="action"), height=340,
    )  # fmt: skip
    return fig


class DreamViewer:
    """Dream from a real history: one button per legal action (and "let the agent act") steps the
    world model and, beside it, the real emulator from the same state with the same action.

    Attributes: ``session`` (the ``DreamSession``), ``widget``, ``action_buttons`` (action -> Button),
    ``agent_button``, ``restart_button``, ``branch`` (IntSlider: the step to branch from),
    ``imagined`` and ``real`` (Image), ``film`` (Image: the dream so far), ``readout`` (HTML).
    """

    def __init__(self, model, tokenizer, record, t: int = 0, *, beam_width: int = 1, horizon: int = 0,
                 scale: int = 3) -> None:  # fmt: skip
        import ipywidgets as widgets

        from jowa_core.inspection import DreamSession

        self.scale = scale
        self.session = DreamSession(model, tokenizer, record, t, beam_width=beam_width, horizon=horizon)
        self.action_buttons = {
            a: widgets.Button(description=_short(a), layout=widgets.Layout(width="110px"))
            for a in self.session.legal_actions
        }
        for a, b in self.action_buttons.items():
            b.on_click(lambda button, a=a: self.act(a))
        self.agent_button = widgets.Button(description="let the agent act", button_style="info")
        self.agent_button.on_click(lambda button: self.act(None))
        self.branch = widgets.IntSlider(value=t, min=0, max=len(record) - 1, description="branch at",
                                        continuous_update=False)  # fmt: skip
        self.restart_button = widgets.Button(description="restart here", button_style="warning")
        self.restart_button.on_click(lambda button: self.restart())
        self.imagined, self.real, self.film = _image(), _image(), _image()
        self.readout = widgets.HTML()
        self.widget = widgets.VBox([
            widgets.HBox([self.branch, self.restart_button]),
            widgets.HBox([*self.action_buttons.values(), self.agent_button], layout=widgets.Layout(flex_flow="wrap")),
            widgets.HBox([widgets.VBox([widgets.HTML("<b>imagined (world model)</b>"), self.imagined]),
                          widgets.VBox([widgets.HTML("<b>real (emulator)</b>"), self.real]), self.readout]),
            widgets.HTML("<b>the dream so far</b>: imagined (top) vs real (bottom), last 8 steps"), self.film,
        ])  # fmt: skip
        for b in self.action_buttons.values():
            _tag(b, "jowa-dream-action")
        _tag_parts(self, "jowa-dream", {"agent_button": "agent", "branch": "branch", "restart_button": "restart",
                                        "imagined": "imagined", "real": "real", "film": "film",
                                        "readout": "readout"})  # fmt: skip
        self.render()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def act(self, action: int | None) -> None:
        """Step with ``action`` (None: the agent's choice in the imagined state) and redraw."""
        self.session.step(self.session.agent_action() if action is None else action)
        self.render()

    def restart(self) -> None:
        """Start again from the real history at the ``branch`` step."""
        self.session.reset(self.branch.value)
        self.render()

    def render(self) -> None:
        s = self.session
        legal = s.legal_actions
        self.imagined.value = _png(s.imagined, self.scale)
        self.real.value = _png(s.real if s.real is not None else np.zeros((84, 84), np.uint8), self.scale)
        n = len(s.steps)
        if n == 0:
            text = f"<b>{s.record.game}</b>: at real step {s.t}; choose an action.<br>"
        else:
            d = s.steps[-1]
            p = d.reward_probs
            text = (f"<b>{s.record.game}</b>: dream step {n} from real step {s.t}, action <b>{_short(d.action)}</b><br>"
                    f"predicted reward {d.predicted_reward:+d} (P(-1, 0, +1) = {p[0]:.2f}, {p[1]:.2f}, {p[2]:.2f}); "
                    f"real reward {d.real_reward:+g}<br>predicted P(end) {d.end_prob:.2f}; real episode "
                    f"{'over' if d.real_done else 'running'}<br>")  # fmt: skip
        plan = s.agent_action()
        self.readout.value = (text + f"context {s.context_steps} steps; the agent would choose <b>{_short(plan)}</b>"
                              + _q_table_html(s.q, legal, {plan: "agent"}))  # fmt: skip
        recent = s.steps[-8:]
        if recent:
            top = [(d.imagined, f"{n - len(recent) + i + 1}: {_short(d.action)}") for i, d in enumerate(recent)]
            blank = np.zeros((84, 84), np.uint8)
            bottom = [(d.real if d.real is not None else blank, f"real r{d.real_reward:+g}") for d in recent]
            self.film.value = _strip_png([top, bottom], scale=1)
        else:
            self.film.value = _strip_png([[(s.imagined, "branch point")]], scale=1)


def dream_viewer(model, tokenizer, record, t: int = 0, *, beam_width: int = 1, horizon: int = 0) -> DreamViewer:
    """ipywidgets dream mode from step ``t`` of a recorded episode (``DreamViewer``)."""
    return DreamViewer(model, tokenizer, record, t, beam_width=beam_width, horizon=horizon)


def score_bars(table, confidence: float = 0.95) -> go.Figure:
    """Per game, each agent's human-normalised score (HNS) with a bootstrap CI of the mean; games
    without reference scores (e.g. Breakout, not a JOWA paper game) get a second panel in raw return."""
    from jowa_core.evaluation import normalize

    ref, raw = [], []
    for g in table.games:
        try:
            normalize(0.0, g, "hns")
            ref.append(g)
        except games.UnknownGameError:
            raw.append(g)
    panels = [(gs, m) for gs, m in ((ref, "hns"), (raw, "raw")) if gs]
    titles = ["human-normalised score" if m == "hns" else "raw return (no reference scores)" for _, m in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles,
                        column_widths=[len(gs) for gs, _ in panels])  # fmt: skip
    colors = px.colors.qualitative.Plotly
    for col, (gs, metric) in enumerate(panels, start=1):
        for i, a in enumerate(table.agents):
            have = [g for g in gs if g in table.returns[a]]
            ys, lo, hi = [], [], []
            for g in have:
                m = float(normalize(table.mean(g, a), g, metric))
                low, high = (float(normalize(v, g, metric)) for v in table.ci(g, a, confidence=confidence))
                ys.append(m)
                lo.append(m - low)
                hi.append(high - m)
            fig.add_trace(go.Bar(x=have, y=ys, name=a, legendgroup=a, showlegend=col == 1,
                                 marker_color=colors[i % len(colors)],
                                 error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)),
                          row=1, col=col)  # fmt: skip
    fig.update_layout(barmode="group", title=f"Scores per game ({round(confidence * 100)}% bootstrap CI of the mean)",
                      height=420)  # fmt: skip
    return fig
