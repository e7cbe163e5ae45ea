"""The notebooks as people use them: JupyterLab in the system Chromium, Run All, then the widgets.

Papermill (test_notebooks.py) proves the notebooks execute; these tests prove the widgets render in Lab
and that moving a control redraws what it should. Each notebook is a parameterised copy (smoke sizes,
the session's smoke run folder) opened in a real JupyterLab; assertions compare what the page shows
before and after an action, never timings. Select or skip them with ``-m browser`` / ``-m "not browser"``;
``JOWA_BROWSER_ARTIFACTS=DIR`` keeps a screenshot and the console log of every test, failed or not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from browser_support import LabNotebook, LabServer, artifacts_dir, find_chromium

from jowa_core.lab import parameterised_copies
from jowa_core.walkthrough import notebooks

pytestmark = pytest.mark.browser

BROWSER_NOTEBOOKS = ["02", "04", "06"]
UPSTREAM = ["01", "02", "03"]  # what notebooks 02, 04 and 06 read


# --- JS readers: functions of the notebook panel element --------------------------------------------------


def src(css: str) -> str:
    return f"p => p.querySelector('img{css}').src"


def text(css: str) -> str:
    return f"p => p.querySelector('{css}').innerText"


def figure(css: str) -> str:
    """The plotly figure inside ``css`` as {title, traces: [{name, points}], data}: what the user sees drawn."""
    return f"""p => {{ const e = p.querySelector('{css} .js-plotly-plot');
        return e && {{title: (e.layout.title || {{}}).text || '',
                      traces: e.data.map(d => ({{name: d.name || '', points: (d.x || d.y || []).length}})),
                      data: JSON.stringify(e.data)}}; }}"""


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        path = find_chromium()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    if path is None:
        pytest.skip("no Chromium on this machine: `apt-get install chromium` (.ci/run does) or set JOWA_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def run_dir(executed, smoke_pipeline) -> Path:
    """The session's smoke run folder, notebooks 01-03 done."""
    return smoke_pipeline.ensure(UPSTREAM)


@pytest.fixture(scope="module")
def lab(chromium, smoke_pipeline, tmp_path_factory) -> Iterator[LabServer]:
    """JupyterLab on a temporary root holding smoke-parameterised copies of notebooks 02, 04 and 06 that
    point at the session's smoke run folder. Run All with smoke=True is what the smoke pipeline runs, so
    what the copies write into the folder is what the pipeline writes there (the notebook tests see no
    difference)."""
    root = tmp_path_factory.mktemp("lab_root")
    parameterised_copies(smoke_pipeline.run_dir, root, {"smoke": True}, names=BROWSER_NOTEBOOKS)
    server = LabServer(root, tmp_path_factory.mktemp("lab_home")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(chromium):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('Playwright is not installed: pip install -e ".[dev]" (it drives the system Chromium)')
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def executed(lab, browser, smoke_pipeline) -> Iterator[dict[str, LabNotebook | AssertionError]]:
    """Notebooks 02, 04 and 06 open as tabs of one Lab page while the smoke pipeline makes what they read
    (01-03), then Run All in each, awaited together: the three kernels run side by side. A notebook whose
    run did not finish maps to the error (with its screenshot and console log saved), which fails only
    that notebook's tests."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = LabNotebook.open_all(lab, context.new_page(), [notebooks([n])[0].name for n in BROWSER_NOTEBOOKS])
    pages = dict(zip(BROWSER_NOTEBOOKS, opened, strict=True))
    smoke_pipeline.ensure(UPSTREAM)
    results: dict[str, LabNotebook | AssertionError] = {}
    for step in ("start_run_all", "wait_run_done"):
        for n, nb in pages.items():
            if n in results:
                continue
            try:
                getattr(nb, step)()
            except Exception as e:
                saved = nb.save_artifacts(artifacts_dir() / f"run_all_{n}")
                results[n] = AssertionError(f"Run All of {nb.path} did not finish ({step}): {e}\n"
                                            f"artefacts: {', '.join(map(str, saved))}")  # fmt: skip
    results.update({n: nb for n, nb in pages.items() if n not in results})
    yield results
    context.close()


def _executed(executed: dict, number: str) -> LabNotebook:
    """The notebook's tab, in front; its failed Run All fails the test that needs it."""
    result = executed[number]
    if isinstance(result, AssertionError):
        raise result
    return result.activate()


@pytest.fixture
def nb04(executed) -> LabNotebook:
    """Notebook 04 after Run All, shared by the tests of its widgets (each leaves the others' widgets alone)."""
    return _executed(executed, "04")


@pytest.fixture
def nb02(executed) -> LabNotebook:
    return _executed(executed, "02")


@pytest.fixture
def nb06(executed) -> LabNotebook:
    return _executed(executed, "06")


# --- notebook 04: planning ------------------------------------------------------------------------------


def test_04_runs_clean_and_shows_the_viewers(nb04):
    nb04.assert_ran_clean()
    page, panel = nb04.page, nb04.panel
    for css in (".jowa-beam-viewer", ".jowa-beam-step .noUi-handle", ".jowa-beam-width .noUi-handle",
                ".jowa-beam-horizon select", "button.jowa-beam-replan", "img.jowa-beam-frame", "img.jowa-beam-imagined",
                ".jowa-dream-viewer", "button.jowa-dream-agent", "img.jowa-dream-imagined"):  # fmt: skip
        assert page.locator(f"{panel} {css}").count() >= 1, f"notebook 04 shows no {css}"
    assert page.locator(f"{panel} button.jowa-beam-replan").is_enabled(), "re-plan is disabled, yet the model is loaded"
    assert page.locator(f"{panel} button.jowa-dream-action").count() >= 2, "dream mode shows under 2 action buttons"
    sizes = page.locator(f"{panel} img.jowa-beam-frame, {panel} img.jowa-beam-imagined, {panel} img.jowa-dream-film")
    for size in sizes.evaluate_all("es => es.map(e => [e.className, e.clientWidth, e.naturalWidth])"):
        assert 0 < size[1] <= size[2], f"image shown {size[1]} px wide for {size[2]} px of pixels: {size[0]}"
    tree = nb04.read(figure(".jowa-beam-tree"))
    assert tree, "the beam tree figure is not drawn"
    kept = next((t for t in tree["traces"] if t["name"] == "kept"), None)
    assert kept and kept["points"] >= 1, f"the beam tree has no kept nodes: {tree['traces']}"
    assert tree["title"].startswith("step 0:"), tree["title"]


def test_04_step_slider_redraws_the_beam_tree_and_imagined_frames(nb04):
    readout = nb04.read(text(".jowa-beam-readout"))
    last = int(re.search(r"step (\d+) / (\d+)", readout).group(2))
    assert last >= 1, f"the recorded episode has one step only: {readout!r}"
    target = last if int(nb04.read(text(".jowa-beam-step .widget-readout"))) != last else 0
    tree, imagined = nb04.read(figure(".jowa-beam-tree")), nb04.read(src(".jowa-beam-imagined"))
    nb04.set_slider(".jowa-beam-step", target)
    nb04.wait_changed(figure(".jowa-beam-tree"), tree, "the beam tree")
    nb04.wait_changed(src(".jowa-beam-imagined"), imagined, "the imagined frames")
    new_tree = nb04.read(figure(".jowa-beam-tree"))
    assert new_tree["title"].startswith(f"step {target}:"), new_tree["title"]
    assert f"step {target} / {last}" in nb04.read(text(".jowa-beam-readout"))


def test_04_replan_uses_the_chosen_width_and_horizon(nb04):
    nb04.set_slider(".jowa-beam-width", 1)
    nb04.page.locator(f"{nb04.panel} .jowa-beam-horizon select").select_option("1")
    tree = nb04.read(figure(".jowa-beam-tree"))
    nb04.page.locator(f"{nb04.panel} button.jowa-beam-replan").click()
    nb04.wait_changed(figure(".jowa-beam-tree"), tree, "the beam tree after re-plan")
    new_tree = nb04.read(figure(".jowa-beam-tree"))
    assert "re-planned: width 1, horizon 1" in new_tree["title"], new_tree["title"]
    kept = next(t for t in new_tree["traces"] if t["name"] == "kept")
    assert kept["points"] == 2, f"width 1, horizon 1 keeps the root and one child, not {kept['points']} nodes"


def test_04_dream_buttons_advance_the_imagined_frame_and_readout(nb04):
    button = nb04.page.locator(f"{nb04.panel} button.jowa-dream-action").nth(1)
    action = button.inner_text().strip()
    readers = {"imagined": src(".jowa-dream-imagined"), "film": src(".jowa-dream-film"),
               "readout": text(".jowa-dream-readout")}
    before = {k: nb04.read(js) for k, js in readers.items()}
    button.scroll_into_view_if_needed()
    button.click()
    for part, js in readers.items():
        nb04.wait_changed(js, before[part], f"the dream's {part}")
    readout = nb04.read(text(".jowa-dream-readout"))
    assert "dream step 1" in readout and f"action {action}" in readout, readout
    assert "predicted reward" in readout and "E[Q]" in readout, readout
    nb04.page.locator(f"{nb04.panel} button.jowa-dream-agent").click()
    nb04.wait_changed(text(".jowa-dream-readout"), readout, "the dream readout after the agent acted")
    assert "dream step 2" in nb04.read(text(".jowa-dream-readout"))


# --- notebook 02: tokenizer -----------------------------------------------------------------------------


def _first_different_frame(run_dir, max_frames: int = 500) -> int:
    """The first frame of the viewer's dataset (notebook 01's first game) that differs from frame 0, so
    that the viewer's picture must change when the slider moves there."""
    games = json.loads((run_dir / "01_summary.json").read_text())["games"]
    with h5py.File(next(iter(games.values()))["path"]) as f:
        frames = f["observations"][:max_frames]
    differ = np.flatnonzero((frames != frames[0]).reshape(len(frames), -1).any(1))
    assert differ.size, "all viewer frames equal frame 0: the smoke dataset cannot show a redraw"
    return int(differ[0])


def test_02_token_grid_slider_redraws_the_frame(nb02, run_dir):
    nb02.assert_ran_clean()
    assert nb02.page.locator(f"{nb02.panel} .jowa-token-viewer").count() == 1, "notebook 02 shows no token-grid viewer"
    target = _first_different_frame(run_dir)
    frame = nb02.read(src(".jowa-token-frame"))
    nb02.set_slider(".jowa-token-step", target)
    nb02.wait_changed(src(".jowa-token-frame"), frame, "the token-grid frame")
    assert f"frame {target}:" in nb02.read(text(".jowa-token-label"))


# --- notebook 06: evaluation ----------------------------------------------------------------------------


def test_06_score_figures_render(nb06):
    nb06.assert_ran_clean()
    figures = nb06.page.locator(f"{nb06.panel} .js-plotly-plot")
    assert figures.count() >= 1, "notebook 06 draws no plotly figure"
    figures.first.scroll_into_view_if_needed()  # what a failure screenshot should show
    scores = figures.evaluate_all("es => es.map(e => ({title: (e.layout.title || {}).text || '', "
                                  "bars: e.data.filter(d => d.type === 'bar').length}))")  # fmt: skip
    bars = [f for f in scores if f["title"].startswith("Scores per game")]
    assert bars and bars[0]["bars"] >= 2, f"no score bars drawn: {scores}"
    drawn = nb06.page.locator(f"{nb06.panel} .js-plotly-plot .trace.bars").count()
    assert drawn >= 1, "the bars are in the figure's data but plotly drew none"
