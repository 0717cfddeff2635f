"""The laptop's side of tests/test_lab.py: a real headless chromium and Jupyter's kernel API, through the tunnel.

Run inside the laptop network namespace (``nsenter --net=/run/netns/laptop``), where the only
way to the cluster is ``mspass-cluster lab``'s tunnel on 127.0.0.1. Prints one JSON object.

    python lab_laptop.py page URL                       JupyterLab's page loads in chromium
    python lab_laptop.py kernel URL                     start a kernel: {"kernel": id}
    python lab_laptop.py run URL KERNEL CODE            run CODE: {"status", "stdout", "error"}
    python lab_laptop.py dashboard URL KERNEL LINK CODE run CODE (a computation) and, while it runs, load
                                                        LINK in chromium until its task stream shows tasks
    python lab_laptop.py status URL                     Jupyter's /api/status through the tunnel

The browser is driven through the DevTools protocol (``--remote-debugging-port``) with
websocket-client, which JupyterLab's server already depends on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import websocket

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _split(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    token = urllib.parse.parse_qs(parts.query)["token"][0]
    return f"{parts.scheme}://{parts.netloc}", token


class Browser:
    """Headless chromium over the DevTools protocol: navigate, evaluate JavaScript."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="lab-chromium-")
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1400,1000",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=60)
        self.ids = 0

    def call(self, method: str, **params):
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def go(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                value = self.evaluate(expression)
                if value:
                    return value
            time.sleep(0.25)
        text = self.evaluate("document.title + ' | ' + (document.body ? document.body.innerText.slice(0, 300) : '')")
        raise AssertionError(f"{what} not seen within {timeout:g} s; the page shows: {text!r}")

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def page(url: str) -> dict:
    browser = Browser()
    try:
        browser.go(url)
        shell = browser.wait_for(
            "document.querySelector('#jp-main-dock-panel') !== null && document.title", 60, "JupyterLab's main area"
        )
        launcher = browser.wait_for(
            "(document.querySelector('.jp-Launcher') || document.querySelector('.jp-DirListing')) !== null",
            30,
            "the launcher or the file browser",
        )
        return {"title": shell, "launcher": launcher, "location": browser.evaluate("location.pathname")}
    finally:
        browser.close()


def _api(url: str, path: str, method: str = "GET", body=None):
    base, token = _split(url)
    request = urllib.request.Request(
        f"{base}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read() or b"null")


def kernel(url: str) -> dict:
    _, info = _api(url, "/api/kernels", "POST", {"name": "python3"})
    return {"kernel": info["id"]}


def _execute(url: str, kernel_id: str, code: str, timeout: float) -> dict:
    return _collect(*_send(url, kernel_id, code, timeout), timeout)


def _send(url: str, kernel_id: str, code: str, timeout: float):
    """Send an execute_request on a kernel's channels; its replies wait on the socket until collected."""
    base, token = _split(url)
    ws = websocket.create_connection(
        f"{base.replace('http', 'ws', 1)}/api/kernels/{kernel_id}/channels?token={token}",
        suppress_origin=True,
        timeout=timeout,
    )
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            }
        )
    )
    return ws, msg_id


def _collect(ws, msg_id: str, timeout: float) -> dict:
    stdout, error, status, idle = [], None, None, False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(ws.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "stream":
            stdout.append(content["text"])
        elif kind == "error":
            error = f"{content['ename']}: {content['evalue']}\n" + "\n".join(content["traceback"])
        elif kind == "execute_reply":
            status = content["status"]
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
        if idle and status is not None:  # the reply (shell) and idle (iopub) come in either order
            break
    ws.close()
    return {"status": status, "stdout": "".join(stdout), "error": error}


def run(url: str, kernel_id: str, code: str) -> dict:
    return _execute(url, kernel_id, code, 600)


#: The task stream's data source holds one row per task run: its ``duration`` and ``worker`` columns.
TASKS_SHOWN = """
(() => {
  if (!window.Bokeh || !Bokeh.documents || !Bokeh.documents.length) return 0;
  let most = 0;
  for (const doc of Bokeh.documents) {
    for (const model of doc._all_models.values()) {
      const data = model.data;
      if (data && data.duration && data.worker) most = Math.max(most, data.duration.length);
    }
  }
  return most;
})()
"""


def dashboard(url: str, kernel_id: str, link: str, code: str) -> dict:
    running = _send(url, kernel_id, code, 240)
    browser = Browser()
    try:
        # As a user does: the lab's URL first (its token becomes the session's cookie), then the link.
        browser.go(url)
        browser.wait_for("document.querySelector('#jp-main-dock-panel') !== null", 60, "JupyterLab's main area")
        browser.go(urllib.parse.urljoin(url, link))
        tasks = browser.wait_for(TASKS_SHOWN, 90, "tasks in the dashboard's task stream")
        page_text = browser.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        title = browser.evaluate("document.title")
    finally:
        browser.close()
    return {"tasks": tasks, "title": title, "text": page_text, "computation": _collect(*running, 240)}


def status(url: str) -> dict:
    code, info = _api(url, "/api/status")
    return {"code": code, "info": info}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    print(
        json.dumps(
            {"page": page, "kernel": kernel, "run": run, "dashboard": dashboard, "status": status}[command](*args)
        )
    )
