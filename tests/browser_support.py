"""Driving JupyterLab in a real Chromium for the browser tests: a Lab server on a temporary root and one
notebook page with the few actions a person takes (open, Run All, move a slider, click a button).

Waits are on what the page shows (prompts, figure data, image sources), never on sleeps."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jowa_core.lab import lab_argv

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # default folder of failure artefacts (git-ignored)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Lab settings for a test session: every cell in the DOM (no virtual scrolling), no news or update pop-ups.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

# An output is an error when Lab renders a traceback (or a bare `SomethingError:` line) as stderr.
ERRORS_JS = r"""panel => [...panel.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.textContent)
    .filter(t => /Traceback \(most recent call last\)|^\s*\w*(Error|Exception)\b/m.test(t))"""
PROMPTS_JS = "panel => [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim())"
# Run All is finished when something ran and nothing is queued or running (`[*]:`); an error stops the queue.
RUN_DONE_JS = f"""panel => {{ const ps = ({PROMPTS_JS})(panel);
    return ps.some(p => /\\[\\d+\\]/.test(p)) && !ps.some(p => p.includes('*')); }}"""


def artifacts_dir() -> Path:
    """Where screenshots and logs go: ``JOWA_BROWSER_ARTIFACTS`` (then kept for passing tests too) or
    ``tests/artifacts`` (failures only)."""
    return Path(os.environ.get("JOWA_BROWSER_ARTIFACTS") or ARTIFACTS)


def find_chromium() -> str | None:
    """The system Chromium (``JOWA_CHROMIUM`` first, then the usual names on PATH); None when there is none.
    A ``JOWA_CHROMIUM`` that does not exist is a mistake to report, not a reason to skip."""
    explicit = os.environ.get("JOWA_CHROMIUM")
    if explicit:
        if not Path(explicit).exists():
            raise FileNotFoundError(f"JOWA_CHROMIUM={explicit} does not exist")
        return explicit
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    """A JupyterLab server on ``root`` with its own settings, workspace and runtime folders under ``home``."""

    root: Path
    home: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "lab.log"

    def start(self, timeout_s: float = 90.0) -> LabServer:
        """Start Lab and return once ``/api/status`` answers with the token; a server that dies or never
        answers fails with the tail of its log."""
        settings = self.home / "settings"
        for name, value in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(value))
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(self.home / "config"),
               "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
               # the kernel imports the jowa_core under test, whatever is installed
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               # several kernels run at once on few cores: one torch thread each (DESIGN.md section 7)
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        argv = lab_argv(self.root, port=self.port, token=self.token, open_browser=False, extra=[
            "--ServerApp.ip=127.0.0.1", f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.home / 'workspaces'}", "--ServerApp.terminals_enabled=False",
            "--LabApp.news_url=", "--ServerApp.open_browser=False",
        ])  # fmt: skip
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                        start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("status")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"JupyterLab did not answer on {self.url}/api/status within {timeout_s:.0f}s:\n"
                           f"{self.log_tail()}")  # fmt: skip

    def api(self, path: str, method: str = "GET"):
        """One REST call to the server (JSON answer, or None for an empty one)."""
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def session(self, path: str) -> dict | None:
        return next((s for s in self.api("sessions") if s.get("path") == path), None)

    def stop(self) -> None:
        """Terminate the server (it shuts its kernels down), then kill what is left of its process group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


@dataclass
class LabNotebook:
    """One notebook open as a tab of a JupyterLab page; ``panel`` is the CSS of its own panel, so it can be
    read while another tab is in front. ``console`` is the page's console log (shared by its tabs)."""

    server: LabServer = field(repr=False)
    page: object = field(repr=False)  # playwright.sync_api.Page
    path: str
    panel: str
    console: list[str] = field(repr=False)

    @classmethod
    def open_all(cls, server: LabServer, page, paths: list[str], timeout_s: float = 60.0) -> list[LabNotebook]:
        """Open JupyterLab in ``page`` on the first notebook (a fresh workspace: nothing else restored), then
        the others from the file browser as a person would; one Lab app, one tab per notebook."""
        console: list[str] = []
        page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
        page.set_default_timeout(timeout_s * 1000)
        page.goto(f"{server.url}/lab/workspaces/browser-tests/tree/{paths[0]}?reset&token={server.token}")
        out = []
        for i, path in enumerate(paths):
            if i:
                page.locator(".jp-DirListing-content").get_by_text(path, exact=True).dblclick()
            tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab", has_text=path)
            tab.wait_for()
            panel = f"#{tab.get_attribute('data-id')}"
            page.wait_for_selector(f"{panel} .jp-CodeCell", state="attached")
            out.append(cls(server, page, path, panel, console))
        return out

    def activate(self) -> LabNotebook:
        """Bring this notebook's tab to the front (widgets and figures are drawn only when shown)."""
        self.page.locator(f'#jp-main-dock-panel .lm-TabBar-tab[data-id="{self.panel[1:]}"]').click()
        self.page.wait_for_selector(f"{self.panel}:not(.lm-mod-hidden)")
        return self

    def _eval(self, js: str):
        return self.page.locator(self.panel).evaluate(js)

    def prompts(self) -> list[str]:
        return self._eval(PROMPTS_JS)

    def errors(self) -> list[str]:
        return self._eval(ERRORS_JS)

    def wait_kernel_idle(self, timeout_s: float = 60.0) -> None:
        """Wait until the server reports this notebook's kernel idle (Run All before that asks for a kernel)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = self.server.session(self.path)
            if s and s["kernel"]["execution_state"] == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"the kernel of {self.path} did not start within {timeout_s:.0f}s "
                             f"(session {self.server.session(self.path)}):\n{self.server.log_tail()}")  # fmt: skip

    def start_run_all(self) -> None:
        """Menu Run > Run All Cells once the notebook is drawn and its kernel idle; returns when the first
        cell is queued. A "Select Kernel" dialog (the page not yet attached to its kernel) is answered as a
        person would: Select."""
        self.activate()
        self.wait_kernel_idle()
        self.page.get_by_role("menuitem", name="Run", exact=True).click()
        self.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        dialog = self.page.locator(".jp-Dialog", has_text="Select Kernel")
        started = f"""() => document.querySelector('.jp-Dialog') !== null ||
            ({PROMPTS_JS})(document.querySelector('{self.panel}')).some(p => /\\[(\\d+|\\*)\\]/.test(p))"""
        self.page.wait_for_function(started)
        if dialog.count():
            dialog.get_by_role("button", name="Select", exact=True).click()

    def wait_run_done(self, timeout_s: float = 300.0) -> None:
        """Wait until no cell is queued or running (Run All finished or stopped at an error). Notebook 06 took
        over 150 s once when one of the two cores was busy elsewhere (a local CI run, 2026-11-26), hence 300 s."""
        self.page.wait_for_function(f"() => ({RUN_DONE_JS})(document.querySelector('{self.panel}'))",
                                    timeout=timeout_s * 1000, polling=500)  # fmt: skip

    def assert_ran_clean(self) -> None:
        """No cell shows an error and every code cell ran (Run All stops at the first error)."""
        errors = self.errors()
        shown = "\n---\n".join(e[-2000:] for e in errors)
        assert not errors, f"{self.path}: {len(errors)} cell(s) show an error:\n{shown}"
        prompts = self.prompts()
        missing = [i for i, p in enumerate(prompts) if not any(c.isdigit() for c in p)]
        assert not missing, f"{self.path}: code cells {missing} did not run (prompts {prompts})"

    # --- reading and changing widgets ------------------------------------------------------------------

    def read(self, js: str):
        """``js`` (a function of the notebook panel element, e.g. ``p => p.querySelector(...).src``) evaluated."""
        return self._eval(js)

    def set_slider(self, css: str, value: int) -> None:
        """Type ``value`` into an ipywidgets slider's readout and press Enter, as a person can."""
        readout = self.page.locator(f"{self.panel} {css} .widget-readout").first
        readout.scroll_into_view_if_needed()
        readout.click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.type(str(value))
        self.page.keyboard.press("Enter")

    def wait_changed(self, read_js: str, old, what: str, timeout_s: float = 60.0) -> None:
        """Wait until ``read_js`` (a function of the notebook panel) returns something other than ``old``."""
        try:
            self.page.wait_for_function(
                f"([old]) => JSON.stringify(({read_js})(document.querySelector('{self.panel}')))"
                " !== JSON.stringify(old)",
                arg=[old], timeout=timeout_s * 1000, polling=250)  # fmt: skip
        except Exception as e:  # playwright's TimeoutError: say what did not change
            raise AssertionError(f"{self.path}: {what} did not change within {timeout_s:.0f}s "
                                 f"(still {json.dumps(old)[:300]})") from e  # fmt: skip

    # --- artefacts -------------------------------------------------------------------------------------

    def save_artifacts(self, folder: Path) -> list[Path | str]:
        """A screenshot of this notebook's tab, the page's console log and the Lab server's log, for a failed
        (or kept) test; a page that cannot be photographed (crashed) gives a line saying so instead of hiding
        the failure."""
        folder.mkdir(parents=True, exist_ok=True)
        shot, console, server = folder / "screenshot.png", folder / "console.log", folder / "lab-server.log"
        console.write_text("\n".join(self.console) + "\n")
        server.write_text(self.server.log_tail(400) + "\n")
        try:
            self.activate()
            self.page.screenshot(path=str(shot))
        except Exception as e:
            return [f"no screenshot: {e!r}", console, server]
        return [shot, console, server]
