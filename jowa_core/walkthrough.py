"""Run the numbered notebooks in order through papermill, each writing into one run folder."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


class NotebookFailed(RuntimeError):
    pass


def notebooks(names: Sequence[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_*.ipynb``) in order, optionally only those whose prefix is in ``names``."""
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if names:
        wanted = {n.split("_")[0].zfill(2) for n in names}
        found = [p for p in found if p.name[:2] in wanted]
    return found


def run_notebook(path: Path, run_dir: Path, parameters: dict[str, Any], kernel: str = "python3") -> Path:
    """Execute one notebook with papermill; the executed copy goes to ``run_dir/notebooks``."""
    import papermill as pm

    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    params = {"run_dir": str(run_dir), **parameters}
    try:
        pm.execute_notebook(
            str(path), str(out), parameters=params, kernel_name=kernel, cwd=str(REPO_ROOT), progress_bar=False
        )
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(
            f"Notebook {path.name} failed in cell {e.exec_count} with {e.ename}: {e.evalue}\n"
            f"The executed copy with the traceback is {out}. Fix the cause and rerun with --resume."
        ) from None
    return out


def walkthrough(
    run_dir: str | os.PathLike,
    parameters: dict[str, Any] | None = None,
    resume: bool = False,
    only: Sequence[str] | None = None,
) -> list[Path]:
    """Run the notebooks in order; with ``resume`` skip those recorded as done in ``run_dir/walkthrough.json``."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "walkthrough.json"
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {"done": {}}
    outputs = []
    for nb in notebooks(only):
        if resume and nb.name in state["done"]:
            print(f"[skip] {nb.name} (done in an earlier run)")
            outputs.append(run_dir / "notebooks" / nb.name)
            continue
        print(f"[run ] {nb.name} ...", flush=True)
        t0 = time.time()
        outputs.append(run_notebook(nb, run_dir, parameters or {}))
        state["done"][nb.name] = {"seconds": round(time.time() - t0, 1)}
        tmp = state_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, state_path)
        print(f"[done] {nb.name} in {time.time() - t0:.0f}s", flush=True)
    return outputs


def write_report(run_dir: str | os.PathLike, executed: Sequence[Path]) -> Path:
    """One HTML page of the executed notebooks, in order, each under its own heading: the walkthrough's
    report (``run_dir/report.html``, written atomically). Plotly figures keep their embedded JavaScript."""
    import nbformat
    from nbconvert import HTMLExporter

    merged = nbformat.v4.new_notebook()
    merged.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    for path in executed:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: rerun its notebook (`jowa walkthrough --only {path.name[:2]}`)."
            )
        nb = nbformat.read(path, as_version=4)
        merged.cells.append(nbformat.v4.new_markdown_cell(f"# {path.stem}"))
        merged.cells.extend(nb.cells)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(merged)
    out = Path(run_dir) / "report.html"
    tmp = out.with_suffix(".html.partial")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out)
    return out


def write_summary(run_dir: str | os.PathLike, name: str, data: dict[str, Any]) -> Path:
    """Write ``run_dir/<name>_summary.json`` atomically: how notebooks hand results to each other."""
    path = Path(run_dir) / f"{name}_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=str, allow_nan=False))
    os.replace(tmp, path)
    return path


def _finite(x: Any) -> Any:
    """NaN/inf become null so the summary stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def read_summary(run_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """Read an earlier notebook's summary; a clear error says which notebook to run first."""
    path = Path(run_dir) / f"{name}_summary.json"
    if not path.exists():
        matches = notebooks([name])
        nb = matches[0].name if matches else f"notebook {name}"
        raise FileNotFoundError(
            f"{path} does not exist: run {nb} with run_dir={str(run_dir)!r} first "
            f"(or `jowa walkthrough --run-dir {run_dir}`)."
        )
    return json.loads(path.read_text())
