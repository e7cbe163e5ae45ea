"""The frame pipeline against gymnasium's AtariPreprocessing and raw ALE, and the episode rules."""

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import pytest
from ale_py import roms
from gymnasium.wrappers import AtariPreprocessing

from jowa_core import games
from jowa_core.config import ConfigError
from jowa_core.envs import FIRE, NOOP, AtariVecEnv, EnvConfig, IllegalActionError

gym.register_envs(ale_py)


def _random_actions(game, n_steps, n_envs, seed=0):
    legal = np.array(games.legal_actions(game))
    return legal[np.random.default_rng(seed).integers(0, len(legal), (n_steps, n_envs))]


def _gym_env(game):
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=False)
    return AtariPreprocessing(
        env, noop_max=0, frame_skip=4, screen_size=84, terminal_on_life_loss=False, grayscale_obs=True
    )


@pytest.mark.parametrize("game", ["Pong", "Breakout"])
def test_frames_match_gymnasium_atari_preprocessing(game):
    """Same emulator states, same actions: our frames equal gymnasium's wrapper pixel for pixel."""
    to_min = games.full_to_minimal(game)
    actions = _random_actions(game, 200, 1, seed=3)
    ref = _gym_env(game)
    ref_obs, _ = ref.reset(seed=0)
    with AtariVecEnv(game, 1, seed=0) as env:
        obs = env.reset()
        np.testing.assert_array_equal(obs[0], ref_obs)
        episodes = 0
        for t in range(len(actions)):
            obs, rew, term, trunc, info = env.step(actions[t])
            ref_obs, ref_rew, ref_term, ref_trunc, _ = ref.step(int(to_min[actions[t, 0]]))
            assert (rew[0], term[0], trunc[0]) == (ref_rew, ref_term, ref_trunc), f"step {t}"
            if term[0]:  # SAME_STEP autoreset: the last frame is in final_obs, obs starts the next episode
                np.testing.assert_array_equal(info["final_obs"][0], ref_obs, err_msg=f"final frame at step {t}")
                ref_obs, _ = ref.reset()
                episodes += 1
            np.testing.assert_array_equal(obs[0], ref_obs, err_msg=f"frame at step {t}")
    ref.close()
    if game == "Breakout":  # random Breakout ends within 200 steps: the autoreset path was exercised
        assert episodes >= 1


def test_reset_obs_is_raw_first_frame():
    """Dopamine zeroes the second pooling buffer on reset: the first obs is the first frame, resized."""
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", 0)
    ale.loadROM(roms.get_rom_path("breakout"))
    ale.reset_game()
    expected = cv2.resize(ale.getScreenGrayscale(), (84, 84), interpolation=cv2.INTER_AREA)
    for backend in ("native", "python"):
        with AtariVecEnv("Breakout", 2, seed=0, backend=backend) as env:
            obs = env.reset()
            assert obs.shape == (2, 84, 84) and obs.dtype == np.uint8
            np.testing.assert_array_equal(obs[0], expected)
            np.testing.assert_array_equal(obs[1], expected)


CONFIGS = {
    "official": EnvConfig.official(),
    "sticky": EnvConfig.sticky(),
    # FIRE on reset, and a frame cap that ends episodes in the middle of a step (202 = 50 * 4 + 2)
    "fire_reset_frame_cap": EnvConfig(fire_on_reset=True, max_episode_steps=None, max_episode_frames=202),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_python_backend_equals_native(name):
    """The RAM-capable backend reproduces the native one: frames, rewards, ends, lives, final frames."""
    config = CONFIGS[name]
    actions = _random_actions("Breakout", 250, 2, seed=1)
    with (
        AtariVecEnv("Breakout", 2, config, seed=7) as a,
        AtariVecEnv("Breakout", 2, config, seed=7, backend="python") as b,
    ):
        np.testing.assert_array_equal(a.reset(), b.reset())
        ends = 0
        for t in range(len(actions)):
            ra, rb = a.step(actions[t]), b.step(actions[t])
            for x, y, what in zip(ra[:4], rb[:4], ("obs", "rewards", "terminated", "truncated")):
                np.testing.assert_array_equal(x, y, err_msg=f"{what} at step {t}")
            for key in ("final_obs", "lives", "actions", "episode_step"):
                np.testing.assert_array_equal(ra[4][key], rb[4][key], err_msg=f"{key} at step {t}")
            ends += int((ra[2] | ra[3]).sum())
        assert ends >= 2  # episode boundaries were compared too
        assert b.ram().shape == (2, 128)


def test_rewards_are_raw_not_clipped():
    """Space Invaders pays 5..30 points per alien: random play must see rewards above 1."""
    actions = _random_actions("SpaceInvaders", 150, 2)
    with AtariVecEnv("SpaceInvaders", 2, seed=0) as env:
        env.reset()
        rewards = np.concatenate([env.step(a)[1] for a in actions])
    assert rewards.dtype == np.float32 and rewards.max() >= 5


def test_pong_random_play_loses_points():
    actions = _random_actions("Pong", 200, 1)
    with AtariVecEnv("Pong", 1, seed=0) as env:
        env.reset()
        rewards = np.concatenate([env.step(a)[1] for a in actions])
    assert rewards.min() == -1.0 and set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("backend", ["native", "python"])
def test_step_cap_truncates_and_autoresets(backend):
    with AtariVecEnv("Pong", 2, EnvConfig(max_episode_steps=10), seed=0, backend=backend) as env:
        first = env.reset()
        for t in range(10):
            obs, _, term, trunc, info = env.step(np.array([3, 4]))
            assert not term.any()
            assert trunc.all() == (t == 9), f"step {t}"
            assert (info["episode_step"] == (0 if t == 9 else t + 1)).all()
        # Pong has no randomness without sticky actions: the new episode starts like the first one
        np.testing.assert_array_equal(obs, first)
        assert not (info["final_obs"] == first).all()


@pytest.mark.parametrize("backend", ["native", "python"])
def test_frame_cap_counts_emulator_frames(backend):
    """A 42-frame cap ends the episode during the 11th agent step (frames 41-42)."""
    with AtariVecEnv("Pong", 1, EnvConfig.frame_cap(42), seed=0, backend=backend) as env:
        env.reset()
        truncs = [env.step(np.array([0]))[3][0] for _ in range(12)]
    assert np.flatnonzero(truncs).tolist() == [10]
    assert EnvConfig(max_episode_steps=100, max_episode_frames=300).effective_frame_cap == 300
    assert EnvConfig.official().effective_frame_cap == 108_000 * 4


def _trajectory(config, seed, actions, game="Breakout"):
    with AtariVecEnv(game, 1, config, seed=seed) as env:
        frames = [env.reset()]
        frames += [env.step(a)[0] for a in actions]
    return np.concatenate(frames)


def test_sticky_actions_change_trajectories_reproducibly():
    actions = _random_actions("Breakout", 80, 1, seed=2)
    plain = _trajectory(EnvConfig.official(), 0, actions)
    sticky = _trajectory(EnvConfig.sticky(), 0, actions)
    assert not np.array_equal(plain, sticky)
    np.testing.assert_array_equal(sticky, _trajectory(EnvConfig.sticky(), 0, actions))  # same seed, same run
    assert not np.array_equal(sticky, _trajectory(EnvConfig.sticky(), 1, actions))  # the seed matters
    # without sticky actions the seed does not matter (ALE is deterministic)
    np.testing.assert_array_equal(plain, _trajectory(EnvConfig.official(), 1, actions))


def test_illegal_action_is_reported_or_mapped():
    with AtariVecEnv("Pong", 2, seed=0) as env:
        env.reset()
        with pytest.raises(IllegalActionError, match=r"env 1: action 2 \(UP\) is not legal in Pong"):
            env.step(np.array([0, 2]))
        with pytest.raises(ValueError, match="full-set indices"):
            env.step(np.array([0, 18]))
        with pytest.raises(ValueError, match="shape"):
            env.step(np.array([0, 0, 0]))
    noop_cfg = EnvConfig(illegal_action="noop")
    with AtariVecEnv("Pong", 1, noop_cfg, seed=0) as env, AtariVecEnv("Pong", 1, seed=0) as ref:
        env.reset(), ref.reset()
        for _ in range(30):
            obs, _, _, _, info = env.step(np.array([2]))  # UP is illegal in Pong -> NOOP
            assert info["actions"].tolist() == [NOOP]
            np.testing.assert_array_equal(obs, ref.step(np.array([NOOP]))[0])


def test_fire_on_life_loss_overrides_next_action():
    with AtariVecEnv("Breakout", 1, EnvConfig(fire_on_life_loss=True), seed=0) as env:
        env.reset()
        env.step(np.array([FIRE]))  # launch the ball, then let it drop
        lives = env.lives
        for _ in range(300):
            _, _, term, _, info = env.step(np.array([NOOP]))
            assert info["actions"][0] == NOOP
            if (info["lives"] < lives).any():
                break
        assert (env.lives < lives).all() and not term.any()
        _, _, _, _, info = env.step(np.array([NOOP]))
        assert info["actions"].tolist() == [FIRE]


def test_native_backend_has_no_ram_and_says_so():
    with AtariVecEnv("Pong", 1, seed=0) as env:
        assert not env.has_ram
        with pytest.raises(NotImplementedError, match="backend='python'"):
            env.ram()


def test_env_config_checks_and_round_trip():
    cfg = EnvConfig(repeat_action_probability=0.25, noop_max=30, max_episode_steps=None, max_episode_frames=1000)
    assert EnvConfig.from_dict(cfg.to_dict()) == cfg
    assert EnvConfig.official() == EnvConfig() and EnvConfig.sticky().repeat_action_probability == 0.25
    with pytest.raises(ConfigError, match="repeat_action_probability"):
        EnvConfig(repeat_action_probability=1.5)
    with pytest.raises(ConfigError, match="illegal_action"):
        EnvConfig(illegal_action="ignore")
    with pytest.raises(ConfigError, match="Unknown EnvConfig"):
        EnvConfig.from_dict({"frameskip": 4})
    with pytest.raises(ValueError, match="backend"):
        AtariVecEnv("Pong", 1, backend="gym")
    with pytest.raises(games.UnknownGameError):
        AtariVecEnv("Pongg", 1)
