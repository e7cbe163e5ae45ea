"""JupyterLab on the notebooks: parameterised copies that point at one run folder (``jowa lab`` and the
browser tests use the same functions, so what the tests open is what a user opens)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat

from jowa_core.walkthrough import notebooks, walkthrough

LAB_FOLDER = "lab"  # parameterised notebook copies live in <run_dir>/lab, beside papermill's <run_dir>/notebooks


def declared_parameters(nb: nbformat.NotebookNode) -> set[str]:
    """Names assigned in the cell tagged ``parameters`` (one literal per line, as STYLE.md asks)."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ValueError("the notebook has no cell tagged `parameters`")
    return {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line}


def parameterised_copies(run_dir: str | os.PathLike, dest: str | os.PathLike,
                         parameters: Mapping[str, Any] | None = None, names: Sequence[str] | None = None,
                         overwrite: bool = False) -> list[Path]:  # fmt: skip
    """Copy the numbered notebooks into ``dest`` with ``run_dir`` (made absolute) and ``parameters`` injected
    after the parameters cell, without executing, so that Run All in Lab uses them (papermill's
    ``injected-parameters`` cell). Each notebook gets only the parameters it declares; a name no notebook
    declares is an error, not a silent no-op. Existing copies are kept (they may hold the user's edits)
    unless ``overwrite``."""
    from papermill.iorw import load_notebook_node  # adds the empty `tags` papermill expects on every cell
    from papermill.parameterize import parameterize_notebook

    params = {"run_dir": str(Path(run_dir).resolve()), **(parameters or {})}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sources = notebooks(names)
    declared = {p: declared_parameters(nbformat.read(p, as_version=4)) for p in sources}
    unknown = set(params) - set().union(*declared.values())
    if unknown:
        raise ValueError(f"no notebook declares the parameter(s) {sorted(unknown)}; see each notebook's "
                         f"`parameters` cell (or `papermill --help-notebook`).")  # fmt: skip
    out = []
    for path in sources:
        target = dest / path.name
        if overwrite or not target.exists():
            own = {k: v for k, v in params.items() if k in declared[path]}
            nb = parameterize_notebook(load_notebook_node(str(path)), own)
            nbformat.write(nb, target)
        out.append(target)
    return out


def prepare_lab(run_dir: str | os.PathLike, smoke: bool = True, fresh: bool = False) -> Path:
    """Make ``run_dir`` ready for Lab: with ``smoke``, run (or resume) the smoke pipeline into it so every
    notebook has the results of the earlier ones; then write the parameterised copies into
    ``run_dir/lab`` and return that folder."""
    run_dir = Path(run_dir).resolve()
    if smoke:
        walkthrough(run_dir, {"smoke": True}, resume=True)
    parameterised_copies(run_dir, run_dir / LAB_FOLDER, {"smoke": smoke}, overwrite=fresh)
    return run_dir / LAB_FOLDER


def lab_argv(root: str | os.PathLike, port: int | None = None, token: str | None = None, open_browser: bool = True,
             extra: Sequence[str] = ()) -> list[str]:
    """The command that starts JupyterLab on ``root`` with this interpreter (so its kernel imports this
    ``jowa_core``); ``--allow-root`` only where we run as root (containers, CI), where Lab refuses otherwise."""
    argv = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={Path(root).resolve()}"]
    if port is not None:
        argv += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    if not open_browser:
        argv.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    return argv + list(extra)
