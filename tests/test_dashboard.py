"""The dashboard renders, and its link works where the notebook is.

The link patterns are pure (exact equality). The browser test is real:
Debian's chromium, headless, driven over its DevTools protocol, loads
``cluster.dashboard_link`` through a real Jupyter server on loopback with
jupyter-server-proxy while a computation runs, and must see the task
stream's live plot, not "Dask needs bokeh" nor an error page.
"""

from __future__ import annotations

import json

import pytest

from mspass_cluster import dashboard
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
    with pytest.raises(ValueError, match=r"dashboard address 'localhost': expected host:port"):
        link_for("localhost", {})
    with pytest.raises(ValueError, match=r"distributed.dashboard.link = '\{NO_SUCH_VARIABLE\}/status'.*Fix or unset"):
        link_for("127.0.0.1:8787", {}, template="{NO_SUCH_VARIABLE}/status")


def test_the_notebook_server_is_found_from_the_kernels_parent(tmp_path):
    (tmp_path / "jpserver-4242.json").write_text(json.dumps({"base_url": "/node/c1/8888/", "port": 8888}))
    environ = {"JPY_PARENT_PID": "4242", "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    found = find_notebook_server(environ)
    assert found is not None and found.base_url == "/node/c1/8888/"
    assert find_notebook_server({**environ, "JPY_PARENT_PID": "4243"}) is None  # another process's kernel
    assert find_notebook_server({}) is None  # not a kernel
