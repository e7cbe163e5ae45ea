"""Planning inspection and score views (notebooks 04 and 06): the episode record against a direct
forward and a replayed emulator, the beam viewer and dream viewer reacting to their controls (what
changed is checked against independently computed values), the dream's cached imagination against an
uncached greedy decode, score bars against hand-normalised scores, run loading and evaluation, the CLI."""

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from jowa_core import games, planning, viz
from jowa_core.checkpoints import save as save_checkpoint
from jowa_core.checkpoints import save_tokenizer
from jowa_core.cli import main
from jowa_core.config import preset
from jowa_core.envs import AtariVecEnv
from jowa_core.evaluation import ScoreTable, control_scores
from jowa_core.inspection import DreamSession, episode_video, record_episode, replan, write_video
from jowa_core.models import Tokenizer, WorldActionModel
from jowa_core.runs import Run, best_constant, evaluate_run, load_run, make_agent, paper_comparison
from jowa_core.walkthrough import write_summary

TPB = 37
GAME = "Pong"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nets():
    """Tiny random nets with a 3-step window, so a short record fills the window."""
    torch.manual_seed(0)
    p = preset("tiny", model={"num_layers": 1, "embed_dim": 32, "num_heads": 2, "q_mlp_dim": 32, "max_blocks": 3})
    return p, Tokenizer(p.tokenizer).eval(), WorldActionModel(p.model).eval()


@pytest.fixture(scope="module")
def run(nets, tmp_path_factory):
    p, tok, model = nets
    return Run(tmp_path_factory.mktemp("run"), tok, model, p, (GAME,), tmp_path_factory.mktemp("m"), 0)


@pytest.fixture(scope="module")
def record(run):
    agent = make_agent(run, beam_width=2, horizon=1, epsilon=0.0)
    return record_episode(agent, GAME, 5, seed=3, progress=False)


def _png_pixels(png: bytes, scale: int) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    return img[::scale, ::scale]


# --- the record -------------------------------------------------------------------------------------------


def test_record_holds_what_the_agent_saw_and_the_emulator_did(record, nets):
    _, tok, model = nets
    assert len(record) == 5 and not record.ended and record.horizon == 1 and record.beam_width == 2
    env = AtariVecEnv(GAME, 1, record.env_config, seed=3, backend="native")  # the other backend, same frames
    obs = env.reset()
    task = torch.tensor([games.task_id(GAME)])
    legal = torch.as_tensor(games.legal_mask(GAME))[None]
    for s in record.steps:
        assert np.array_equal(s.frame, obs[0])
        k = min(s.t + 1, 3)
        assert s.history.shape == (k * TPB - 1,)
        assert torch.equal(s.history[-36:], tok.encode(torch.from_numpy(s.frame[None]))[0])  # ends with this frame
        with torch.no_grad():  # greedy: argmax of a direct forward over the full context
            q = model.q_values(model(s.history[None], task).q_logits[:, :, -1], legal)
        assert s.greedy == int(q.argmax())
        assert s.planned == int(s.trace.actions[0]) == s.executed
        obs, r, *_ = env.step(np.array([s.executed]))
        assert s.reward == float(r[0])
    assert record.agreement == pytest.approx(np.mean([s.planned == s.greedy for s in record.steps]))


def test_replan_equals_a_direct_beam_search(record, nets):
    _, _, model = nets
    trace = replan(model, record, 2, beam_width=3, horizon=2)
    task = torch.tensor([games.task_id(GAME)])
    legal = torch.as_tensor(games.legal_mask(GAME))[None]
    acts, ref = planning.beam_search(model, record.steps[2].history[None], task, legal, 3, 2, trace=True)
    assert int(trace.actions[0]) == int(acts[0]) and trace.num_nodes == ref.num_nodes
    assert torch.equal(trace.obs_tokens, ref.obs_tokens)
    with pytest.raises(ValueError, match="horizon must be in"):
        replan(model, record, 2, 2, 3)
    # a record of a mean-valued planner re-plans with mean values too
    mean_record = dataclasses.replace(record, use_mean=True)
    trace = replan(model, mean_record, 2, beam_width=3, horizon=2)
    _, ref = planning.beam_search(model, record.steps[2].history[None], task, legal, 3, 2, trace=True, use_mean=True)
    assert trace.use_mean and torch.allclose(trace.score, ref.score)


# --- beam viewer ------------------------------------------------------------------------------------------


def test_beam_viewer_slider_changes_frame_tree_and_imagined_frames(record, nets):
    _, tok, model = nets
    v = viz.beam_viewer(record, tok, model)
    before = (v.figure.to_dict(), v.imagined.value, v.tree.outputs)
    v.step.value = 3
    trace = record.steps[3].trace
    assert v.trace is trace
    assert np.array_equal(_png_pixels(v.frame.value, v.scale), record.steps[3].frame)
    assert v.figure.to_dict() != before[0] and v.imagined.value != before[1] and v.tree.outputs != before[2]
    # the Output shows exactly the current figure, as a plotly mime bundle
    shown = v.tree.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    kept = next(d for d in shown["data"] if d.get("name") == "kept")
    assert sorted(kept["customdata"]) == [n for n in range(trace.num_nodes) if bool(trace.kept[n])]
    # hover of the root names its score; the readout names planned and greedy actions
    fig_kept = next(d for d in v.figure.data if d.name == "kept")
    root_hover = fig_kept.hovertext[list(fig_kept.customdata).index(0)]
    assert f"score: {float(trace.score[0]):.3f}" in root_hover
    s = record.steps[3]
    assert f"planned <b>{games.FULL_ACTION_SET[s.planned]}</b>" in v.readout.value
    assert f"greedy <b>{games.FULL_ACTION_SET[s.greedy]}</b>" in v.readout.value


def test_beam_tree_marks_kept_pruned_and_the_chosen_path(record, nets):
    _, _, model = nets
    trace = replan(model, record, 4, beam_width=2, horizon=2)  # width 2 of 6 legal: depth 2 prunes
    fig = viz.beam_tree_figure(trace, GAME)
    by_name = {d.name: d for d in fig.data}
    assert sorted(by_name["kept"].customdata) == [n for n in range(trace.num_nodes) if bool(trace.kept[n])]
    assert sorted(by_name["pruned"].customdata) == [n for n in range(trace.num_nodes) if not bool(trace.kept[n])]
    assert len(by_name["pruned"].customdata) > 0
    path = trace.path(0)
    assert len([x for x in by_name["chosen path"].x if x is not None]) == 2 * (len(path) - 1)  # one segment per edge
    assert [x for x in by_name["chosen path"].x if x is not None][-1] == trace.horizon


def test_replan_button_shows_a_plan_with_the_chosen_settings(record, nets):
    _, tok, model = nets
    v = viz.beam_viewer(record, tok, model)
    v.step.value = 2
    v.beam_width.value, v.horizon.value = 3, 1
    v.replan_button.click()
    assert v.trace.beam_width == 3 and v.trace.horizon == 1
    assert v.trace.num_nodes == 1 + 3  # the root and its top-3 legal actions
    nodes = [n for d in v.figure.data if d.name in ("kept", "pruned") for n in d.customdata]
    assert sorted(nodes) == [0, 1, 2, 3]
    assert "re-planned: width 3, horizon 1" in v.readout.value
    rows = viz.beam_frames(v.trace, tok, record.steps[2].frame)  # 3 kept leaves, each: real + 1 imagined frame
    assert len(rows) == 3 and all(len(r) == 2 for r in rows)


def test_plan_vs_greedy_marks_disagreements(record):
    fig = viz.plan_vs_greedy(record)
    differ = [s.t for s in record.steps if s.planned != s.greedy]
    assert list(next(d for d in fig.data if d.name == "disagree").x) == differ
    assert f"agreement {np.mean([s.planned == s.greedy for s in record.steps]):.0%}" in fig.layout.title.text


# --- dreaming -----------------------------------------------------------------------------------------------


def _uncached_dream(model, tokens, action, task):
    """Greedy decode of the next observation with full forwards, no cache (the sliding window by hand)."""
    if (tokens.shape[0] + 1) // TPB >= model.cfg.max_blocks:
        tokens = tokens[TPB:]
    seq = torch.cat([tokens, torch.tensor([action])])
    with torch.no_grad():
        reward = model(seq[None], task).reward_logits[0, -1].softmax(-1)
        for _ in range(36):
            nxt = model(seq[None], task).obs_logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
    return seq, reward


def test_dream_steps_match_an_uncached_decode_and_the_real_emulator(record, nets):
    _, tok, model = nets
    t = 3  # the context holds 3 steps = max_blocks: the first dream step slides the window
    session = DreamSession(model, tok, record, t)
    task = torch.tensor([games.task_id(GAME)])
    env = AtariVecEnv(GAME, 1, record.env_config, seed=3, backend="python")
    env.reset()
    for s in record.steps[:t]:
        env.step(np.array([s.executed]))
    tokens = record.steps[t].history.clone()
    for action in (games.legal_actions(GAME)[2], games.legal_actions(GAME)[4]):
        out = session.step(action)
        tokens, reward = _uncached_dream(model, tokens, action, task)
        assert np.array_equal(out.tokens, tokens[-36:].numpy())
        assert np.allclose(out.reward_probs, reward.numpy(), atol=1e-5)
        expect = (tok.decode(tokens[-36:][None])[0, 0].clamp(0, 1) * 255).round().byte().numpy()
        assert np.array_equal(out.imagined, expect)
        real, r, *_ = env.step(np.array([action]))
        assert np.array_equal(out.real, real[0]) and out.real_reward == float(r[0])
    assert session.context_steps == 3
    session.reset()
    assert session.steps == [] and torch.equal(session.tokens, record.steps[t].history)


def test_dream_refuses_illegal_actions_and_unreproducible_records(record, nets):
    _, tok, model = nets
    session = DreamSession(model, tok, record, 1)
    illegal = int(np.flatnonzero(~games.legal_mask(GAME))[0])
    with pytest.raises(ValueError, match="not legal in Pong"):
        session.step(illegal)
    import copy

    broken = copy.deepcopy(record)
    broken.steps[2].frame = 255 - broken.steps[2].frame
    with pytest.raises(RuntimeError, match="did not reproduce"):
        DreamSession(model, tok, broken, 2)


def test_dream_viewer_buttons_advance_the_imagined_frame_and_readout(record, nets):
    _, tok, model = nets
    v = viz.dream_viewer(model, tok, record, 1)
    assert np.array_equal(_png_pixels(v.imagined.value, v.scale), record.steps[1].frame)
    before = (v.imagined.value, v.readout.value, v.film.value, v.real.value)
    action = games.legal_actions(GAME)[3]
    v.action_buttons[action].click()
    assert len(v.session.steps) == 1 and v.session.steps[0].action == action
    assert np.array_equal(_png_pixels(v.imagined.value, v.scale), v.session.steps[0].imagined)
    assert v.imagined.value != before[0] and v.film.value != before[2]
    assert "dream step 1" in v.readout.value and f"<b>{games.FULL_ACTION_SET[action]}</b>" in v.readout.value
    assert np.array_equal(_png_pixels(v.real.value, v.scale), v.session.real)  # the emulator's frame (tested above)
    expected = v.session.agent_action()
    v.agent_button.click()
    assert v.session.steps[-1].action == expected and "dream step 2" in v.readout.value
    v.branch.value = 0
    v.restart_button.click()
    assert v.session.t == 0 and v.session.steps == []
    assert np.array_equal(_png_pixels(v.imagined.value, v.scale), record.steps[0].frame)


# --- videos ---------------------------------------------------------------------------------------------------


def test_write_video_round_trip(tmp_path, record, nets):
    frames = np.random.default_rng(0).integers(0, 255, (7, 84, 90), dtype=np.uint8)
    path = write_video(frames, tmp_path / "v.mp4", fps=10, scale=2)
    if path is None:
        pytest.skip("this OpenCV build has no mp4 encoder")
    cap = cv2.VideoCapture(str(path))
    n, size = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    cap.release()
    assert n == 7 and size == (180, 168)
    side = episode_video(record, tmp_path / "e.mp4", nets[1])
    cap = cv2.VideoCapture(str(side))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(record) and cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 3 * 170
    cap.release()


# --- scores ---------------------------------------------------------------------------------------------------


def _table() -> ScoreTable:
    return ScoreTable(
        returns={"a": {"Pong": [-20.0, -10.0], "Asterix": [3.0, 5.0]}, "b": {"Pong": [0.0, 2.0], "Asterix": [1.0, 1.0]}},
        lengths={"a": {"Pong": [9, 9], "Asterix": [9, 9]}, "b": {"Pong": [9, 9], "Asterix": [9, 9]}},
    )  # fmt: skip


def test_score_bars_plot_hns_where_defined_and_raw_elsewhere():
    fig = viz.score_bars(_table())
    ref = games.reference_scores("Pong")
    bars = {(d.name, d.xaxis): d for d in fig.data}
    a_hns = bars[("a", "x")]
    assert list(a_hns.x) == ["Pong"]
    assert a_hns.y[0] == pytest.approx((-15.0 - ref.random) / (ref.human - ref.random))
    a_raw = bars[("a", "x2")]
    assert list(a_raw.x) == ["Asterix"] and a_raw.y[0] == pytest.approx(4.0)
    assert "raw return" in fig.layout.annotations[1].text


def test_best_constant_and_paper_comparison():
    t = ScoreTable(
        returns={"constant_NOOP": {"Pong": [-21.0], "Assault": [300.0]}, "constant_FIRE": {"Pong": [-19.0],
                 "Assault": [100.0]}},
        lengths={"constant_NOOP": {"Pong": [1], "Assault": [1]}, "constant_FIRE": {"Pong": [1], "Assault": [1]}},
        meta={"constant_NOOP": {}, "constant_FIRE": {}},
    )  # fmt: skip
    best = best_constant(t)
    assert best.returns["constant_best"] == {"Pong": [-19.0], "Assault": [300.0]}
    assert best.meta["constant_best"]["actions"] == {"Pong": "FIRE", "Assault": "NOOP"}
    cmp = paper_comparison(_table().merge(best))
    assert "not a JOWA paper game" in cmp.loc["Asterix", "note"]
    assert cmp.loc["Assault", "paper JOWA-150M"] == games.paper_scores()["JOWA-150M"]["Assault"]
    assert cmp.loc["Pong", "paper JOWA-150M (fine-tuned)"] == games.paper_scores("paper_table3_finetune_dns")[
        "JOWA-150M"]["Pong"]  # fmt: skip
    assert cmp.loc["Pong", "a"] == pytest.approx(-15.0)


def test_evaluate_run_adds_the_best_constant_control(run):
    table = evaluate_run(run, episodes=1, agents=("greedy", "random", "constant", "mtbc"), max_steps=4,
                         progress=False)  # fmt: skip
    assert table.agents == ["jowa_greedy", "random", "constant_best"]  # no BC head: mtbc skipped
    ctl = control_scores([GAME], 1, max_steps=4, progress=False)
    consts = {a: ctl.mean(GAME, a) for a in ctl.agents if a.startswith("constant_")}
    assert table.mean(GAME, "constant_best") == max(consts.values())
    assert table.returns["random"] == ctl.returns["random"]
    with pytest.raises(ValueError, match="unknown agent kind"):
        evaluate_run(run, agents=("greedy", "dqn"))


def test_evaluate_run_reruns_the_data_behaviour_under_each_protocol(run, tmp_path):
    """"behaviour": the players that collected notebook 01's files (named in them) scored as an agent per
    protocol; missing or foreign data files are explained."""
    import dataclasses

    import h5py

    from jowa_core.data.collect import collect
    from jowa_core.runs import data_behaviour_policy
    from jowa_core.walkthrough import write_summary

    with pytest.raises(FileNotFoundError, match="names no data file"):
        evaluate_run(run, agents=("behaviour",), episodes=1, max_steps=4, progress=False)
    here = dataclasses.replace(run, run_dir=tmp_path)
    path = collect(GAME, 64, tmp_path / "Pong.h5", "mixed", num_envs=2, seed=0, progress=False)
    write_summary(tmp_path, "01", {"games": {GAME: {"path": str(path)}}})
    assert data_behaviour_policy(here, [GAME]) == "mixed"
    table = evaluate_run(here, agents=("behaviour",), protocols=("official", "sticky"), episodes=2, max_steps=6,
                         progress=False)  # fmt: skip
    assert table.agents == ["behaviour", "behaviour@sticky"]
    assert table.meta["behaviour"]["agent"]["policy"][GAME]["name"] == "mixed"
    with h5py.File(path, "a") as f:
        f.attrs["behaviour_policy"] = '{"name": "dqn_replay"}'
    with pytest.raises(ValueError, match="were not all collected by one of"):
        data_behaviour_policy(here, [GAME])


# --- run folders and the CLI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(nets, tmp_path_factory):
    p, tok, model = nets
    d = tmp_path_factory.mktemp("saved_run")
    save_checkpoint(d / "model", model, p, step=7)
    save_tokenizer(d / "tokenizer", tok)
    write_summary(d, "01", {"games": {GAME: {"path": "unused"}}})
    return d


def test_load_run_reads_model_tokenizer_and_games(run_dir, nets):
    _, tok, model = nets
    r = load_run(run_dir)
    assert r.games == (GAME,) and r.step == 7 and r.tokenizer.content_hash() == tok.content_hash()
    for (k, v), (k2, v2) in zip(r.model.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="run notebook 03"):
        load_run(run_dir / "tokenizer")


def test_load_run_refuses_a_tokenizer_the_model_was_not_trained_with(run_dir, nets, tmp_path):
    import h5py

    p, _, model = nets
    cache = tmp_path / "Pong.tokens.h5"
    with h5py.File(cache, "w") as f:
        f.attrs["game"], f.attrs["tokenizer_hash"] = GAME, "0" * 64
    save_checkpoint(tmp_path / "model", model, p, step=1, options={"token_caches": [str(cache)]})
    with pytest.raises(ValueError, match="not the one the model"):
        load_run(run_dir, model_dir=tmp_path / "model")


def test_cli_evaluate_and_play(run_dir, tmp_path, capsys, cli_error):
    out = tmp_path / "scores.json"
    main(["evaluate", "--run-dir", str(run_dir), "--episodes", "1", "--max-steps", "3", "--no-planning",
          "--no-controls", "--out", str(out)])  # fmt: skip
    saved = ScoreTable.load(out)
    assert saved.agents == ["jowa_greedy"] and len(saved.returns["jowa_greedy"][GAME]) == 1
    assert "jowa_greedy" in capsys.readouterr().out
    main(["play", "--run-dir", str(run_dir), "--steps", "3", "--horizon", "1", "--beam-width", "2", "--video",
          str(tmp_path / "p.mp4")])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["game"] == GAME and summary["horizon"] == 1
    assert "does not exist" in cli_error(["play", "--run-dir", str(tmp_path / "nope")])
