"""The dashboard renders, and its link works where the notebook is.

The link patterns are pure (exact equality). The browser test is real:
Debian's chromium, headless, driven over its DevTools protocol, loads
``cluster.dashboard_link`` through a real Jupyter server on loopback with
jupyter-server-proxy while a computation runs, and must see the task
stream's live plot, not "Dask needs bokeh" nor an error page.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.cookiejar
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import dask
import pytest
from conftest import FAKE_MONGOD
from distributed import Client
from tornado import websocket

from mspass_cluster import ConfigError, MsPASSCluster, dashboard
from mspass_cluster.dashboard import NotebookServer, explicit_template, find_notebook_server, link_for

# ----------------------------------------------------------------- the link patterns (pure)


@pytest.mark.parametrize(
    ("address", "environ", "kwargs", "expected"),
    [
        # A browser on the notebook's machine: direct, as Dask prints it.
        ("127.0.0.1:8787", {}, {}, "http://127.0.0.1:8787/status"),
        (":8787", {}, {"reachable_host": "10.77.0.1"}, "http://10.77.0.1:8787/status"),
        ("[::1]:8787", {}, {}, "http://[::1]:8787/status"),
        # The guard's token goes last, whatever the pattern.
        ("127.0.0.1:8787", {}, {"token": "abc"}, "http://127.0.0.1:8787/status?token=abc"),
        # JupyterHub: its per-user prefix, then jupyter-server-proxy's path.
        ("127.0.0.1:40123", {"JUPYTERHUB_SERVICE_PREFIX": "/user/ana/"}, {}, "/user/ana/proxy/40123/status"),
        (
            "127.0.0.1:8787",
            {"JUPYTERHUB_SERVICE_PREFIX": "/user/ana"},
            {"token": "t"},
            "/user/ana/proxy/8787/status?token=t",
        ),
        # A plain Jupyter server with jupyter-server-proxy, at / or under a base_url.
        ("127.0.0.1:8787", {}, {"server": NotebookServer("/")}, "/proxy/8787/status"),
        ("0.0.0.0:8787", {}, {"server": NotebookServer("/jupyter/")}, "/jupyter/proxy/8787/status"),
        # A dashboard on one interface only: the proxy must name it (and allow it in host_allowlist).
        ("10.77.0.1:8787", {}, {"server": NotebookServer("/")}, "/proxy/10.77.0.1:8787/status"),
        # Open OnDemand: its /node/<host>/<port>/ base URL, through the proxy...
        (
            "127.0.0.1:8787",
            {},
            {"server": NotebookServer("/node/c401-012/31415/")},
            "/node/c401-012/31415/proxy/8787/status",
        ),
        # ... or, without jupyter-server-proxy, OnDemand's own /rnode/ to a dashboard on the node's interface.
        (
            ":8787",
            {},
            {"server": NotebookServer("/node/c401-012/31415/", server_proxy=False), "reachable_host": "c401-012"},
            "/rnode/c401-012/8787/status",
        ),
        (
            "10.77.0.3:8787",
            {},
            {"server": NotebookServer("/node/c3/1/", server_proxy=False)},
            "/rnode/10.77.0.3/8787/status",
        ),
        # A loopback dashboard, no proxy: nothing but the direct link can reach it.
        (
            "127.0.0.1:8787",
            {},
            {"server": NotebookServer("/node/c3/1/", server_proxy=False)},
            "http://127.0.0.1:8787/status",
        ),
        # mspass-cluster lab says where the browser reaches this Jupyter: a whole, clickable URL.
        (
            "127.0.0.1:8787",
            {"MSPASS_JUPYTER_URL": "http://127.0.0.1:8899/", "JUPYTERHUB_SERVICE_PREFIX": "/user/x/"},
            {"server": NotebookServer("/")},
            "http://127.0.0.1:8899/proxy/8787/status",
        ),
        # A tunnel to the dashboard's own port.
        (
            "127.0.0.1:8787",
            {"JUPYTERHUB_SERVICE_PREFIX": "/user/x/"},
            {"local_port": 9999},
            "http://127.0.0.1:9999/status",
        ),
        # An explicit distributed.dashboard.link wins over everything, formatted as Dask does.
        (
            "127.0.0.1:8787",
            {"JUPYTERHUB_SERVICE_PREFIX": "/user/ana/"},
            {"template": "https://hub.example/{JUPYTERHUB_SERVICE_PREFIX}x/{port}/{host}", "token": "t"},
            "https://hub.example//user/ana/x/8787/127.0.0.1?token=t",
        ),
        (":8787", {}, {"template": "{scheme}://{host}:{port}/x", "reachable_host": "n1"}, "http://n1:8787/x"),
    ],
)
def test_the_link_for_each_place_a_notebook_runs(address, environ, kwargs, expected):
    assert link_for(address, environ, **kwargs) == expected


def test_only_a_link_template_other_than_dasks_default_counts_as_explicit():
    assert explicit_template(dashboard.DASK_DEFAULT_LINK) is None and explicit_template(None) is None
    assert explicit_template("/proxy/{port}/status") == "/proxy/{port}/status"


def test_bad_input_says_what_was_wrong():
    with pytest.raises(ConfigError, match=r"dashboard address 'localhost': expected host:port"):
        link_for("localhost", {})
    with pytest.raises(ConfigError, match=r"distributed.dashboard.link = '\{NO_SUCH_VARIABLE\}/status'.*Fix or unset"):
        link_for("127.0.0.1:8787", {}, template="{NO_SUCH_VARIABLE}/status")


def test_the_notebook_server_is_found_from_the_kernels_parent(tmp_path):
    (tmp_path / "jpserver-4242.json").write_text(json.dumps({"base_url": "/node/c1/8888/", "port": 8888}))
    environ = {"JPY_PARENT_PID": "4242", "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    found = find_notebook_server(environ)
    assert found is not None and found.base_url == "/node/c1/8888/"
    assert find_notebook_server({**environ, "JPY_PARENT_PID": "4243"}) is None  # another process's kernel
    assert find_notebook_server({}) is None  # not a kernel


def test_the_package_itself_brings_bokeh_for_the_dashboards_pages():
    """dask[distributed] does not: without bokeh every page says "Dask needs bokeh>=3.1.0"."""
    from importlib.metadata import requires

    from distributed.versions import BOKEH_REQUIREMENT
    from packaging.requirements import Requirement

    ours = [Requirement(r) for r in requires("mspass-cluster") if "extra ==" not in r]
    bokeh = [r for r in ours if r.name == "bokeh"]
    assert bokeh, f"bokeh is not a dependency of mspass-cluster: {[str(r) for r in ours]}"
    # Whatever it allows, Dask accepts: its lowest version is Dask's own floor or above.
    floor = min(spec.version for spec in BOKEH_REQUIREMENT.specifier)
    assert all(spec.operator == ">=" and spec.version >= floor for spec in bokeh[0].specifier)


# ----------------------------------------------------------------- the real thing, in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_chromium():
    if CHROMIUM is None:
        message = "chromium is not installed (ci/setup installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, cookies: http.cookiejar.CookieJar | None = None) -> tuple[int, str]:
    opener = urllib.request.build_opener(
        *([urllib.request.HTTPCookieProcessor(cookies)] if cookies is not None else [])
    )
    try:
        with opener.open(url, timeout=10) as reply:
            return reply.status, reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except urllib.error.URLError as exc:  # nothing listens (yet)
        return 0, str(exc.reason)


@pytest.fixture
def jupyter_server(tmp_path):
    """A real Jupyter server on loopback under base_url /jupyter/, with jupyter-server-proxy.

    Yields its URL, its token, its PID and its runtime directory (where it
    describes itself, as a kernel's ``find_notebook_server`` reads it).
    """
    import jupyter_server_proxy  # noqa: F401  (extra "test"; without it /proxy/ is a 404, so say so first)

    port, token = _free_port(), secrets.token_hex(16)
    runtime = tmp_path / "jupyter-runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config")}
    with open(tmp_path / "jupyter.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
             "--ServerApp.allow_root=True",
             f"--ServerApp.root_dir={tmp_path}", "--ServerApp.base_url=/jupyter/"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/jupyter/"
    try:
        deadline = time.monotonic() + 30
        while _get(f"{url}api/status?token={token}")[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Jupyter server did not answer at {url}: {(tmp_path / 'jupyter.log').read_text()}")
            time.sleep(0.2)
        yield url, token, server.pid, runtime
    finally:
        server.terminate()
        server.wait(timeout=30)


class Chromium:
    """Headless chromium driven over its DevTools protocol (tornado's websocket client; no driver needed)."""

    def __init__(self, directory):
        profile = directory / "chromium-profile"
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.socket, self.loop = None, asyncio.new_event_loop()
        try:
            self._connect(profile)
        except BaseException:
            self.close()
            raise

    def _connect(self, profile) -> None:
        deadline = time.monotonic() + 30
        while not (profile / "DevToolsActivePort").is_file() or not (profile / "DevToolsActivePort").read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        pages = json.loads(_get(f"http://127.0.0.1:{port}/json/list")[1])
        self.endpoint = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")

        async def connect():
            return await websocket.websocket_connect(self.endpoint, max_message_size=1 << 26)

        self.socket = self.loop.run_until_complete(connect())
        self.calls = 0

    def call(self, method: str, **params):
        async def exchange():
            self.calls += 1
            await self.socket.write_message(json.dumps({"id": self.calls, "method": method, "params": params}))
            while True:
                message = await asyncio.wait_for(self.socket.read_message(), 30)
                if message is None:
                    raise AssertionError(f"chromium closed its DevTools connection during {method}")
                reply = json.loads(message)
                if reply.get("id") == self.calls:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]

        return self.loop.run_until_complete(exchange())

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.loop.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # the browser and every process it started
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


#: What the page shows: Bokeh's documents and roots, and the task stream's rectangles (its data source's rows).
PAGE_STATE = """(() => {
  const text = document.body ? document.body.innerText.slice(0, 400) : "";
  const state = {url: location.href, title: document.title, text: text, roots: 0, rects: -1, views: 0};
  if (!window.Bokeh || !Bokeh.documents) return state;
  for (const doc of Bokeh.documents) {
    state.roots += doc.roots().length;
    for (const model of doc._all_models.values()) {
      const data = model.data;
      if (data && "duration" in data && "worker_thread" in data) state.rects = Math.max(state.rects, data.duration.length);
    }
  }
  state.views = Bokeh.index ? Object.keys(Bokeh.index).length : 0;
  return state;
})()"""


def _wait_for(browser: Chromium, done, seconds: float = 30) -> dict:
    """The page's state (:data:`PAGE_STATE`) once ``done(state)``; the last one seen if it never is, or if it is
    an error page."""
    deadline = time.monotonic() + seconds
    while True:
        state = browser.evaluate(PAGE_STATE)
        if state and (done(state) or "needs bokeh" in state["text"]) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_the_dashboard_link_shows_the_live_task_stream_through_jupyters_server_proxy(
    tmp_path, jupyter_server, monkeypatch
):
    _need_chromium()
    url, jupyter_token, jupyter_pid, runtime = jupyter_server
    # What a kernel of that server has in its environment: its server's PID, and where it describes itself.
    monkeypatch.setenv("JPY_PARENT_PID", str(jupyter_pid))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    for name in ("JUPYTERHUB_SERVICE_PREFIX", "MSPASS_JUPYTER_URL"):
        monkeypatch.delenv(name, raising=False)
    with MsPASSCluster(
        backend="local",
        nodes=1,
        work_dir=str(tmp_path / "run"),
        db_command=FAKE_MONGOD,
        db_port=28400,
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        port = cluster.scheduler_info["services"]["dashboard"]
        link = cluster.dashboard_link
        assert link.startswith(f"/jupyter/proxy/{port}/status?token="), link
        assert f'href="{link}"' in cluster._repr_html_()
        with dask.config.set({"distributed.dashboard.link": "{scheme}://{host}:{port}/mine"}):  # explicit: it wins
            assert cluster.dashboard_link == f"http://127.0.0.1:{port}/mine?" + link.partition("?")[2]
        origin = url.split("/jupyter/")[0]

        # Nobody else: without the dashboard's token, neither directly nor through the proxy.
        jar = http.cookiejar.CookieJar()
        assert _get(f"{url}api/status?token={jupyter_token}", jar)[0] == 200  # logged in to Jupyter only
        for attempt in (f"http://127.0.0.1:{port}/status", f"{origin}/jupyter/proxy/{port}/status"):
            status, body = _get(attempt, jar)
            assert status == 403 and "needs its token" in body, (attempt, status, body[:300])

        # The guard's redirect (cookie set, token dropped) is relative: a proxy that strips its prefix and rewrites
        # no Location header (Open OnDemand's /rnode/) keeps the browser under that prefix.
        token = link.rpartition("token=")[2]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", f"/status?token={token}")
        reply = connection.getresponse()
        assert (reply.status, reply.getheader("Location")) == (302, "status"), reply.headers
        connection.close()

        client = Client(cluster)  # a plain Dask client: no MsPASS plugin to load, the dashboard is the point
        work = client.map(time.sleep, [0.5] * 200, pure=False)  # about a minute of work for the two threads
        browser = Chromium(tmp_path)
        try:
            browser.open(f"{url}api/status?token={jupyter_token}")  # the user's Jupyter login (its cookie)
            deadline = time.monotonic() + 20
            while '"started"' not in (browser.evaluate("document.body ? document.body.innerText : ''") or ""):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            browser.open(origin + link)
            first = _wait_for(browser, lambda state: state["roots"] > 0 and state["rects"] > 0)
            # Live: more rectangles arrive over Bokeh's websocket (through the proxy and the guard) as tasks end.
            later = _wait_for(browser, lambda state: state["rects"] > first["rects"])
            running = sum(not f.done() for f in work)
        finally:
            browser.close()
            client.cancel(work)
            client.close()
        for state in (first, later):
            assert "needs bokeh" not in state["text"] and "403" not in state["text"], state
            # Still under the proxy (the guard's redirect is relative), the token gone from the address bar.
            assert state["url"] == f"{url}proxy/{port}/status", state
        assert first["roots"] > 0 and 0 < first["rects"] < later["rects"], (first, later)
        assert running > 0, "the computation had finished before the task stream showed it"


def test_print_says_a_proxied_link_goes_after_jupyters_address_and_the_display_links_it():
    from mspass_cluster.status import ClusterView, render_html, render_text

    view = ClusterView("c", "local", "running", "mongodb://n1:27017/", "/user/ana/proxy/8787/status?token=t", 1, 1, 1)
    assert "  dashboard /user/ana/proxy/8787/status?token=t (after this Jupyter's address)" in render_text(view)
    assert '<a href="/user/ana/proxy/8787/status?token=t" target="_blank">' in render_html(view)
    direct = ClusterView("c", "local", "running", None, "http://127.0.0.1:8787/status", 1, 1, 1)
    assert "  dashboard http://127.0.0.1:8787/status\n" in render_text(direct) + "\n"
