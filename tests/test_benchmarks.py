"""The benchmark suite's output: figure records and the README table (the timings themselves are not tested)."""

import math

import pytest

from benchmarks.__main__ import SUITES, _figure, main, markdown_table


def test_figure_records_and_markdown_table():
    figs = [
        _figure("planner_beam_bw2_h2_envs16", 129.6049, "decisions/s", "jowa_150m", envs=16, cuda_graphs=True),
        _figure("train_stage2_mfu", 0.36331, "fraction", "jowa_150m", batch_size=512, flops_per_sample=1),
        _figure("collect_transitions_per_s", math.nan, "transitions/s", None, skipped="ale-py not installed"),
    ]
    assert figs[0] == {"name": "planner_beam_bw2_h2_envs16", "value": 129.6049, "unit": "decisions/s",
                       "preset": "jowa_150m", "envs": 16, "cuda_graphs": True}  # fmt: skip
    lines = markdown_table(figs).splitlines()
    assert lines[0] == "| figure | preset | value | unit | details |"
    assert lines[2] == "| planner_beam_bw2_h2_envs16 | jowa_150m | 130 | decisions/s | envs=16, cuda_graphs=True |"
    assert lines[3] == "| train_stage2_mfu | jowa_150m | 0.363 | fraction | batch_size=512 |"
    assert lines[4] == "| collect_transitions_per_s |  | n/a | transitions/s | skipped=ale-py not installed |"


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--suite", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert set(SUITES) == {"train", "planner", "tokenizer", "data"}
