"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from jowa_core import games
from jowa_core.data import token_cache
from jowa_core.walkthrough import walkthrough


def _write_token_cache(path: Path, game: str, *, seed: int = 0, n_episodes: int = 6, lengths: tuple[int, int] = (6, 16),
                       vocab: int = 32, tokenizer_hash: str = "synthetic") -> Path:
    """A token cache whose frames are predictable: token k of step t is (base + t + k) mod vocab;
    rewards depend on the action, half the episodes end in a terminal, half are truncated."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(*lengths, n_episodes)
    n = int(lens.sum())
    t = np.concatenate([np.arange(k) for k in lens])
    base = np.repeat(rng.integers(0, vocab, n_episodes), lens)
    tokens = ((base + t)[:, None] + np.arange(36)[None]) % vocab
    actions = rng.choice(np.flatnonzero(games.legal_mask(game)), n)
    last = np.cumsum(lens) - 1
    terminals, truncations = np.zeros(n, bool), np.zeros(n, bool)
    terminals[last[::2]], truncations[last[1::2]] = True, True
    with h5py.File(path, "w") as f:
        f["tokens"] = tokens.astype(np.uint16)
        f["actions"] = actions.astype(np.uint8)
        f["rewards"] = np.where(actions % 2 == 0, 1.0, 0.0).astype(np.float32)
        f["terminals"], f["truncations"] = terminals, truncations
        f["episode_starts"] = np.r_[0, np.cumsum(lens)[:-1]].astype(np.int64)
        f["episode_returns"] = np.zeros(n_episodes, np.float32)
        a = f.attrs
        a["cache_format_version"] = token_cache.CACHE_FORMAT_VERSION
        a.update(tokenizer_hash=tokenizer_hash, game=game, task_id=games.task_id(game), source="synthetic")
        a.update(source_path="none", source_num_transitions=n, vocab_size=vocab)
    return path


@pytest.fixture(scope="session")
def write_token_cache():
    """Factory for synthetic token caches (see ``_write_token_cache``)."""
    return _write_token_cache


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: oversubscribing 2 busy cores was many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_error(capsys):
    """Run ``jowa ARGV`` expecting the CLI's one-line error: exit status 2, no traceback; returns stderr."""
    from jowa_core.cli import main

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    return run


@pytest.fixture
def clock_events(monkeypatch):
    """``record(module, **wrapped)``: the list of events a training loop in ``module`` leaves, in order:
    "clock" for each of its ``time.perf_counter`` reads, "sync" for each ``synchronize`` call, and each name
    in ``wrapped`` (a function of the module) for each call of it; every call still does its work."""
    import time
    import types

    def record(module, **wrapped: str) -> list[str]:
        events: list[str] = []
        clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        clock.perf_counter = lambda: events.append("clock") or time.perf_counter()
        monkeypatch.setattr(module, "time", clock)
        for fn, event in {"synchronize": "sync", **wrapped}.items():
            real = getattr(module, fn)
            monkeypatch.setattr(module, fn, lambda *a, _r=real, _e=event, **k: events.append(_e) or _r(*a, **k))
        return events

    return record


class SmokeRun:
    """One smoke run folder: ``ensure(names)`` runs (or resumes up to) the named notebooks, all six by
    default; ``run_dir`` is known before anything ran (the browser tests open Lab on it meanwhile)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def ensure(self, names: list[str] | None = None) -> Path:
        walkthrough(self.run_dir, {"smoke": True}, resume=True, only=names)
        return self.run_dir


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> SmokeRun:
    """The session's smoke run, shared by the notebook and browser tests whichever runs first."""
    return SmokeRun(tmp_path_factory.mktemp("smoke_run"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Browser tests: on failure (always with JOWA_BROWSER_ARTIFACTS=DIR) save a screenshot, the console
    log and the Lab server log of every notebook page the test used, and name the files in the report."""
    report = yield
    keep = os.environ.get("JOWA_BROWSER_ARTIFACTS")
    if report.when != "call" or "browser" not in item.keywords or not (report.failed or keep):
        return report
    from browser_support import artifacts_dir

    folder = artifacts_dir() / item.name.replace("/", "_")
    lines = [str(p) for name, value in item.funcargs.items() if hasattr(value, "save_artifacts")
             for p in value.save_artifacts(folder / name)]  # fmt: skip
    if lines:
        report.sections.append(("browser artefacts", "\n".join(lines)))
    return report
