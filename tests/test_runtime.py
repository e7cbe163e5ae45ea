"""runtime.run_pair: the keywords each run gets, sequential and in a spawned process, and the side run's error."""

import functools

import pytest

from jowa_core.runtime import run_pair


def _run(value: int, *, progress: bool = True, num_threads: int | None = None) -> tuple[int, bool, int | None]:
    if value < 0:
        raise ValueError(f"run {value} failed")
    return value, progress, num_threads


def test_sequential_runs_keep_their_keywords():
    main, side = functools.partial(_run, 1), functools.partial(_run, 2, num_threads=3)
    assert run_pair(main, side, device="cpu", parallel=False) == ((1, True, None), (2, True, 3))


def test_parallel_side_runs_quietly_on_one_thread_in_another_process():
    main, side = functools.partial(_run, 1), functools.partial(_run, 2, num_threads=3)
    assert run_pair(main, side, device="cpu", parallel=True) == ((1, True, 1), (2, False, 1))
    assert run_pair(main, side, device="cpu", num_threads=2, parallel=True)[0] == (1, True, 2)


def test_the_side_runs_error_comes_back():
    with pytest.raises(ValueError, match="run -2 failed"):
        run_pair(functools.partial(_run, 1), functools.partial(_run, -2), device="cpu", parallel=True)
