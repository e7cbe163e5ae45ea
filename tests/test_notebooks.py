"""Notebooks: committed clean, thin, and executed headlessly in order by papermill with smoke parameters."""

import json

import nbformat
import pytest

from jowa_core.walkthrough import NotebookFailed, notebooks, walkthrough

NOTEBOOKS = notebooks()


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "01_dataset.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean_and_thin(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is code[1], "the second code cell is the only `parameters` cell"
    for name in ("run_dir", "smoke"):
        assert any(line.startswith(f"{name} = ") for line in params[0].source.splitlines())
    for line in params[0].source.splitlines():
        assert "#" in line, f"parameter line without a help comment: {line!r}"
    for c in code:
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in c.source.splitlines())


@pytest.fixture(scope="session")
def smoke_run(smoke_pipeline):
    return smoke_pipeline.ensure()


@pytest.mark.slow
def test_pipeline_smoke_run(smoke_run):
    for nb in NOTEBOOKS:
        executed = nbformat.read(smoke_run / "notebooks" / nb.name, as_version=4)
        errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
    summary = json.loads((smoke_run / "01_summary.json").read_text())
    assert summary["games"] and all(g["num_transitions"] > 0 for g in summary["games"].values())
    pretrain = json.loads((smoke_run / "03_summary.json").read_text())
    assert (smoke_run / "mtbc" / "checkpoints").is_dir() and pretrain["mtbc_dir"].endswith("mtbc")
    results = json.loads((smoke_run / "06_summary.json").read_text())
    table = (smoke_run / "06_results.md").read_text()
    for row in ("| data: all policies |", "| random |", "| constant_FIRE |", "| mtbc |", "| jowa_greedy |", "| jowa_beam |"):
        assert row in table
    assert "Breakout (official)" in table and "Breakout (sticky)" in table and "IQM HNS (official)" in table
    assert results["targets"] > 0 and 0 <= results["targets_passed"] <= results["targets"]
    assert set(results["no_ball_share"]) == {"jowa_greedy", "mtbc"}
    assert all(0.0 <= share <= 1.0 for share in results["no_ball_share"].values())
    agreement = results["tracker_agreement"]
    assert set(agreement) == {"moving", "far", "no_ball"} and agreement["no_ball"]["majority"] == 1.0
    assert all(set(row) == {"windows", "jowa_greedy", "mtbc", "data", "majority"} for row in agreement.values())


@pytest.mark.slow
def test_resume_skips_done_notebooks(smoke_run, capsys):
    walkthrough(smoke_run, {"smoke": True}, resume=True)
    out = capsys.readouterr().out
    assert out.count("[skip]") == len(NOTEBOOKS) and "[run ]" not in out


def test_failure_names_notebook_and_cell(tmp_path):
    with pytest.raises(NotebookFailed, match=r"01_dataset.ipynb failed in cell .*UnknownGameError"):
        walkthrough(tmp_path, {"smoke": True, "games": ["Pongg"]}, only=["01"])
