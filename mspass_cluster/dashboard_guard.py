"""A token in front of the scheduler's HTTP server (the Dask dashboard and its ``/info`` pages).

Dask's dashboard has no login and serves the scheduler's and workers' logs.
On loopback (the default with ``security``) it is still reachable by every
user of the machine running the notebook, such as a shared login node. The
guard lets a request through only with the cluster's token: in the link
the cluster prints (``.../status?token=...``), which sets a cookie for this
browser and redirects to the same page without the token, or in that
cookie. Everything else gets 403 with a message saying whose it is and
where the link is. Websockets (Bokeh's) pass the same check on upgrade.
"""

from __future__ import annotations

import hmac
import urllib.parse

from tornado import web

__all__ = ["guard", "with_token"]

#: Query parameter and cookie name.
TOKEN = "token"


class _Refused(web.RequestHandler):
    def prepare(self):
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(
            "403: this Dask dashboard belongs to an mspass_cluster cluster and needs its token. Open the link "
            "the cluster printed (cluster.dashboard_link, with ?token=...) in the notebook that owns it.\n"
        )


class _Admit(web.RequestHandler):
    """A request with the token in its URL: remember it in a cookie, then the same page without it."""

    def initialize(self, token: str, cookie: str):
        self.token, self.cookie = token, cookie

    def prepare(self):
        self.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")
        query = [(k, v) for k, v in urllib.parse.parse_qsl(self.request.query, keep_blank_values=True) if k != TOKEN]
        # Relative (the last segment): behind a proxy (``/proxy/8787/status``) the page stays under its prefix.
        page = self.request.path.rpartition("/")[2] or "./"
        self.redirect(page + ("?" + urllib.parse.urlencode(query) if query else ""))


def _given(request, name: str) -> tuple[str | None, str | None]:
    """The token in the request's query, and in its cookie."""
    query = urllib.parse.parse_qs(request.query).get(TOKEN, [None])[0]
    morsel = request.cookies.get(name)
    return query, morsel.value if morsel is not None else None


def guard(application, token: str, port: int) -> None:
    """Make ``application`` (the scheduler's ``http_application``) refuse every request without ``token``.

    Parameters
    ----------
    application : tornado.web.Application
    token : str
        The secret of this cluster's dashboard links.
    port : int
        The port it listens on: the cookie is named after it, so two
        clusters' dashboards on one host do not overwrite each other's.
    """
    cookie = f"mspass_cluster_dashboard_{port}"
    find_handler = application.find_handler

    def guarded_find_handler(request, **kwargs):
        query, cookied = _given(request, cookie)
        if cookied is not None and hmac.compare_digest(cookied, token):
            return find_handler(request, **kwargs)
        if query is not None and hmac.compare_digest(query, token):
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return find_handler(request, **kwargs)
            return application.get_handler_delegate(request, _Admit, {"token": token, "cookie": cookie})
        return application.get_handler_delegate(request, _Refused)

    application.find_handler = guarded_find_handler


def with_token(link: str, token: str) -> str:
    """``link`` with ``?token=...`` (or ``&token=...``) added."""
    return link + ("&" if "?" in link else "?") + urllib.parse.urlencode({TOKEN: token})
