"""The dashboard's link that works where the notebook is.

The scheduler runs in the notebook's process and its dashboard listens on
loopback (with ``security``), so ``http://127.0.0.1:8787/status`` works
only for a browser on that same machine. Where the browser reaches the
notebook through something else, the dashboard is reached the same way:

==========================================  ==============================================
where the notebook runs                     link
==========================================  ==============================================
``distributed.dashboard.link`` set          that template (``{host}``, ``{port}``,
(dask config, explicit)                     ``{scheme}`` and environment variables), as Dask
a tunnel to the dashboard's own port        ``http://127.0.0.1:<local port>/status``
``MSPASS_JUPYTER_URL`` set (e.g. by         ``<that URL>proxy/<port>/status``
``mspass-cluster lab``: where the browser
reaches this Jupyter server)
JupyterHub (``JUPYTERHUB_SERVICE_PREFIX``)  ``<prefix>proxy/<port>/status``
a Jupyter server with jupyter-server-proxy  ``<its base_url>proxy/<port>/status``
(Open OnDemand's ``/node/<host>/<port>/``
base URL included)
Open OnDemand, no jupyter-server-proxy,     ``/rnode/<host>/<port>/status``
dashboard on the node's interface
anything else                               ``http://<host>:<port>/status``
==========================================  ==============================================

``proxy/<port>/`` is jupyter-server-proxy's (extra ``jupyter``), as
dask-labextension expects; it forwards to ``localhost:<port>`` of the
Jupyter server's machine, the notebook's. The links are paths from the
browser's own origin, so they work through whatever brought the browser to
Jupyter (a tunnel, OnDemand, JupyterHub). The dashboard's token is added
last; the guard (:mod:`.dashboard_guard`) sets its cookie and redirects
relatively, so the page stays under the proxy's prefix.

:func:`link_for` is pure; :func:`find_notebook_server` (reading the Jupyter
server's runtime file) is the one place that looks at the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import dashboard_guard
from .errors import ConfigError

__all__ = ["NotebookServer", "link_for", "find_notebook_server", "explicit_template", "DASK_DEFAULT_LINK"]

#: Dask's own default of ``distributed.dashboard.link``: anything else was set by the user and wins.
DASK_DEFAULT_LINK = "{scheme}://{host}:{port}/status"

#: Where the browser reaches this notebook's Jupyter server (``http://127.0.0.1:8899/``, ``/node/c1/8888/``).
JUPYTER_URL_VARIABLE = "MSPASS_JUPYTER_URL"

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_WILDCARD = {"", "0.0.0.0", "::"}
#: Open OnDemand's reverse proxy: ``/node/<host>/<port>/...`` keeps the prefix, ``/rnode/`` strips it.
_ONDEMAND = re.compile(r"^/r?node/[^/]+/\d+/")


@dataclass(frozen=True)
class NotebookServer:
    """The Jupyter server whose kernel runs this process.

    Attributes
    ----------
    base_url : str
        Its ``base_url``, with the trailing slash (``/``, ``/node/c401-012/8888/``).
    server_proxy : bool
        Whether jupyter-server-proxy is installed where the server runs, so
        ``<base_url>proxy/<port>/`` reaches a port of this machine.
    """

    base_url: str = "/"
    server_proxy: bool = True


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"dashboard address {address!r}: expected host:port, e.g. '127.0.0.1:8787'") from None


def _slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _through_proxy(base_url: str, host: str, port: int) -> str:
    # jupyter-server-proxy's /proxy/<port>/ is localhost; another host needs its host_allowlist.
    target = str(port) if host in _LOOPBACK | _WILDCARD else f"{host}:{port}"
    return f"{_slash(base_url)}proxy/{target}/status"


def link_for(
    address: str,
    environ: Mapping[str, str] | None = None,
    *,
    token: str | None = None,
    template: str | None = None,
    server: NotebookServer | None = None,
    local_port: int | None = None,
    reachable_host: str | None = None,
    scheme: str = "http",
) -> str:
    """The dashboard's link for a browser wherever the notebook is (pure).

    Parameters
    ----------
    address : str
        Where the dashboard listens, ``host:port`` (``127.0.0.1:8787``;
        ``:8787`` or ``0.0.0.0:8787`` for every interface), with its real port.
    environ : mapping, optional
        The notebook's environment (``os.environ``): ``MSPASS_JUPYTER_URL``,
        ``JUPYTERHUB_SERVICE_PREFIX``, and the variables a template names.
    token : str, optional
        The dashboard guard's token, added as ``?token=...``.
    template : str, optional
        An explicit ``distributed.dashboard.link`` (see :func:`explicit_template`); it wins.
    server : NotebookServer, optional
        The Jupyter server running this notebook (:func:`find_notebook_server`).
    local_port : int, optional
        A port on the user's machine forwarded to the dashboard (a tunnel).
    reachable_host : str, optional
        The host a direct link names when the dashboard listens on every
        interface (the scheduler's address).
    scheme : str
        ``http`` (``https`` if the dashboard serves TLS).

    Returns
    -------
    str
        An absolute URL, or a path from the browser's origin (``/proxy/8787/status?token=...``).

    Raises
    ------
    ConfigError
        ``address`` is not ``host:port``, or ``template`` names something it cannot be filled with.

    Examples
    --------
    >>> link_for("127.0.0.1:8787", {"JUPYTERHUB_SERVICE_PREFIX": "/user/ana/"}, token="t")
    '/user/ana/proxy/8787/status?token=t'
    >>> link_for("127.0.0.1:8787", {}, local_port=9999)
    'http://127.0.0.1:9999/status'
    >>> link_for("127.0.0.1:8787", {})
    'http://127.0.0.1:8787/status'
    """
    environ = {} if environ is None else environ
    host, port = _split(address)
    node = reachable_host if host in _WILDCARD else host  # the host a browser's side can name
    if template is not None:
        try:
            link = template.format(
                **{
                    **environ,
                    "scheme": scheme,
                    "host": node or host,
                    "port": port,
                }
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"dask config distributed.dashboard.link = {template!r} cannot be filled in ({exc!r}): it may "
                "name {scheme}, {host}, {port} and environment variables of the notebook. Fix or unset it."
            ) from exc
    elif local_port is not None:
        link = f"{scheme}://127.0.0.1:{local_port}/status"
    elif environ.get(JUPYTER_URL_VARIABLE):
        link = _through_proxy(environ[JUPYTER_URL_VARIABLE], host, port)
    elif environ.get("JUPYTERHUB_SERVICE_PREFIX"):
        link = _through_proxy(environ["JUPYTERHUB_SERVICE_PREFIX"], host, port)
    elif server is not None and server.server_proxy:
        link = _through_proxy(server.base_url, host, port)
    elif server is not None and _ONDEMAND.match(server.base_url) and host not in _LOOPBACK and node:
        link = f"/rnode/{node}/{port}/status"  # OnDemand's proxy reaches the node's interface, not its loopback
    else:
        node = node or "127.0.0.1"
        link = f"{scheme}://{f'[{node}]' if ':' in node else node}:{port}/status"
    return dashboard_guard.with_token(link, token) if token else link


def explicit_template(config_value: str | None) -> str | None:
    """``distributed.dashboard.link`` if the user set it (not Dask's default), else None."""
    return config_value if config_value and config_value != DASK_DEFAULT_LINK else None


def find_notebook_server(environ: Mapping[str, str] | None = None) -> NotebookServer | None:
    """The Jupyter server whose kernel this process is, or None outside one.

    A kernel started by a Jupyter server has its PID in ``JPY_PARENT_PID``;
    the server describes itself (``base_url``) in ``jpserver-<pid>.json``
    in Jupyter's runtime directory.
    """
    environ = os.environ if environ is None else environ
    pid = environ.get("JPY_PARENT_PID", "")
    if not pid.isdigit():
        return None
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime = environ.get("JUPYTER_RUNTIME_DIR") or jupyter_runtime_dir()
        with open(os.path.join(runtime, f"jpserver-{pid}.json"), encoding="utf-8") as file:
            base_url = json.load(file).get("base_url") or "/"
    except (ImportError, OSError, ValueError, AttributeError):
        return None  # a kernel of something else (nbclient, VS Code, an old notebook server)
    return NotebookServer(
        base_url=_slash(base_url), server_proxy=importlib.util.find_spec("jupyter_server_proxy") is not None
    )
