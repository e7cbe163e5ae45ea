"""The walkthrough's HTML report: every executed notebook, in order, outputs included."""

import nbformat
import pytest

from jowa_core.walkthrough import write_report


def _executed(path, marker: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('x')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{marker}\n")]
    nb.cells = [nbformat.v4.new_markdown_cell(f"intro {marker}"), cell]
    nbformat.write(nb, path)


def test_report_holds_every_notebook_in_order(tmp_path):
    paths = [tmp_path / "01_dataset.ipynb", tmp_path / "02_tokenizer.ipynb"]
    _executed(paths[0], "output-of-one")
    _executed(paths[1], "output-of-two")
    report = write_report(tmp_path, paths)
    html = report.read_text()
    assert report == tmp_path / "report.html"
    assert html.index("01_dataset") < html.index("output-of-one") < html.index("02_tokenizer") < html.index("output-of-two")
    assert not list(tmp_path.glob("*.partial"))


def test_report_names_a_missing_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="--only 03"):
        write_report(tmp_path, [tmp_path / "03_pretrain.ipynb"])
