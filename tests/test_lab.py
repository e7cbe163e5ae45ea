"""`jowa lab`: parameterised notebook copies and the JupyterLab command (the browser tests drive the result)."""

import os
import sys

import nbformat
import pytest

from jowa_core import lab
from jowa_core.cli import main
from jowa_core.walkthrough import notebooks


def _injected(path):
    nb = nbformat.read(path, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    i = next(k for k, t in enumerate(tags) if "injected-parameters" in t)
    assert "parameters" in tags[i - 1], "the injected cell follows the notebook's own parameters cell"
    return nb.cells[i].source


def test_copies_get_the_run_folder_and_only_the_parameters_they_declare(tmp_path):
    out = lab.parameterised_copies("runs/x", tmp_path / "lab", {"smoke": True, "agents": ["greedy"]},
                                   names=["04", "06"])  # fmt: skip
    assert [p.name for p in out] == [p.name for p in notebooks(["04", "06"])]
    src04, src06 = _injected(out[0]), _injected(out[1])
    assert f'run_dir = "{os.path.abspath("runs/x")}"' in src04 and "smoke = True" in src04
    assert "agents" not in src04, "notebook 04 has no `agents` parameter"
    assert 'agents = ["greedy"]' in src06
    nb = nbformat.read(out[0], as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "copies are not executed"


def test_unknown_parameter_is_an_error_not_ignored(tmp_path):
    with pytest.raises(ValueError, match=r"no notebook declares the parameter\(s\) \['smok'\]"):
        lab.parameterised_copies(tmp_path, tmp_path / "lab", {"smok": True})


def test_existing_copies_are_kept_unless_overwrite(tmp_path):
    (path,) = lab.parameterised_copies(tmp_path / "a", tmp_path / "lab", names=["02"])
    lab.parameterised_copies(tmp_path / "b", tmp_path / "lab", names=["02"])
    assert str(tmp_path / "a") in _injected(path)
    lab.parameterised_copies(tmp_path / "b", tmp_path / "lab", names=["02"], overwrite=True)
    assert str(tmp_path / "b") in _injected(path)


def test_lab_argv_uses_this_interpreter_and_allows_root_only_as_root(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = lab.lab_argv(tmp_path, port=9999, token="t", open_browser=False, extra=["--x=1"])
    assert argv[:4] == [sys.executable, "-m", "jupyter", "lab"] and argv[-1] == "--x=1"
    assert f"--ServerApp.root_dir={tmp_path.resolve()}" in argv and "--ServerApp.port=9999" in argv
    assert "--no-browser" in argv and "--IdentityProvider.token=t" in argv and "--allow-root" not in argv
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "--allow-root" in lab.lab_argv(tmp_path)


def test_jowa_lab_writes_copies_and_starts_lab_there(tmp_path, monkeypatch, capsys):
    pytest.importorskip("jupyterlab")
    started = []
    monkeypatch.setattr(os, "execv", lambda path, argv: started.append(argv))
    main(["lab", "--run-dir", str(tmp_path / "run"), "--no-smoke", "--no-browser", "--", "--ServerApp.ip=0.0.0.0"])
    root = tmp_path / "run" / lab.LAB_FOLDER
    assert sorted(p.name for p in root.glob("*.ipynb")) == [p.name for p in notebooks()]
    assert "smoke = False" in _injected(root / notebooks()[0].name)
    (argv,) = started
    assert f"--ServerApp.root_dir={root}" in argv and argv[-1] == "--ServerApp.ip=0.0.0.0"
    assert str(root) in capsys.readouterr().out
