"""``mspass-cluster lab``: from a laptop to a JupyterLab on a compute node, in one command.

::

    mspass-cluster lab --via login.cluster.edu --walltime 04:00:00 --partition normal --account EAR12345
    # Jupyter is running on c401-012, job 123456; open http://127.0.0.1:8899/lab?token=...

On the login node, through one SSH connection (:class:`mspass_cluster.tunnel.Tunnel`):

1. checks that ``sbatch``, ``squeue`` and ``scancel`` are there;
2. finds your running frontend job, if any (``lab`` again after Ctrl-C reconnects to it),
   else writes the frontend job's script (:func:`mspass_cluster.roles.frontend_script`) to
   ``~/.mspass_cluster/lab/`` and submits it;
3. polls ``squeue`` and Jupyter's runtime file until the job runs and Jupyter, asked
   through the tunnel with its token, answers (a job that ends first is reported with its
   log's last lines, and nothing is left in the queue);
4. forwards ``127.0.0.1:PORT`` on this machine to Jupyter and prints the URL, then keeps the
   tunnel up until Ctrl-C, which closes the tunnel only; ``lab --stop`` ends the job.

The local port is taken before anything is submitted, so a taken port costs no job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shlex
import signal
import time
from dataclasses import dataclass, replace
from typing import Callable

from .errors import CommandError, ConfigError, JobFailedError, StartupTimeoutError, SubmitError
from .roles import FrontendSpec, frontend_script
from .slurm import build_scancel_argv, build_squeue_mine_argv, parse_sbatch_job_id, parse_squeue_mine
from .tunnel import Tunnel, http_get

__all__ = ["LabRequest", "Lab", "run_lab", "stop_lab", "FRONTEND_JOB", "lab_url"]

#: Names of frontend jobs: ``<job_name>-<8 hex>-frontend``.
FRONTEND_JOB = re.compile(r"^[A-Za-z0-9_.-]+-[0-9a-f]{8}-frontend$")
#: Where the frontend's script, log and runtime directories go, under the cluster's home.
LAB_DIR = ".mspass_cluster/lab"
#: Seconds between two looks at the queue and at Jupyter while it starts.
POLL_INTERVAL = 1.0
#: How often a pending job's reason is repeated (seconds).
PENDING_REPEAT = 30.0
#: How often the running tunnel checks that the job still runs (seconds).
WATCH_INTERVAL = 30.0
#: Lines of a failed job's log put in the error.
LOG_LINES = 25


@dataclass(frozen=True)
class LabRequest:
    """What ``mspass-cluster lab`` was asked for (the cluster's side: paths as the login node sees them)."""

    via: str
    port: int = 8899
    python: str = "python3"
    walltime: str = "04:00:00"
    cores: int | None = 2
    memory: str | None = "4GiB"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    container: str | None = None
    work_dir: str | None = None
    prologue: tuple = ()
    directives: tuple = ()
    job_name: str = "mspass"
    startup_timeout: float = 900.0
    new: bool = False


def lab_url(port: int, token: str, base_url: str = "/") -> str:
    """The URL the user opens: loopback, the forwarded port, Jupyter's base URL and token."""
    return f"http://127.0.0.1:{port}{base_url.rstrip('/')}/lab?token={token}"


def _remote(prologue, command: str) -> str:
    """One shell line for the login node: the prologue (``module load slurm``...), then ``command``."""
    return "\n".join([*prologue, command])


class Lab:
    """One frontend job reached through one tunnel (see the module's docstring)."""

    def __init__(self, request: LabRequest, *, say: Callable[[str], None] = print, **tunnel_options):
        self.request = request
        self.say = say
        self.tunnel = Tunnel(request.via, say=say, **tunnel_options)
        self.job_id: str | None = None
        self.node: str | None = None
        self.url: str | None = None
        self.spec: FrontendSpec | None = None
        self._forward_port: int | None = None
        self._destination: tuple[str, int] | None = None
        self._submitted = False

    async def run_remote(self, command: str, *, input: str | None = None, timeout: float = 60.0):
        return await self.tunnel.run(_remote(self.request.prologue, command), input=input, timeout=timeout)

    # ------------------------------------------------------------------ start
    async def start(self) -> str:
        """Connect, listen locally, submit or find the job, wait for Jupyter; the URL to open."""
        await self.tunnel.connect()
        self._forward_port = await self.tunnel.forward(self._route, self.request.port)
        home = await self._check_login_node()
        lab_dir = f"{home}/{LAB_DIR}"
        running = None if self.request.new else await self._running_frontend()
        if running is not None:
            self.job_id, name = running
            self.spec = FrontendSpec(job_name=name, lab_dir=lab_dir, notebook_dir=self.request.work_dir or home)
            self.say(f"Your frontend job {self.job_id} ({name}) is already in the queue: connecting to it.")
        else:
            await self._submit(home, lab_dir)
        try:
            host, port, token, base_url = await self._wait_for_jupyter()
        except BaseException:
            if self._submitted:
                await self._cancel_quietly()
            raise
        self._destination = (host, port)
        self.node = host
        self.url = lab_url(self._forward_port, token, base_url)
        return self.url

    def _route(self) -> tuple[str, int] | None:
        return self._destination

    async def _check_login_node(self) -> str:
        result = await self.run_remote(
            'printf "%s\\n" "$HOME"; for c in sbatch squeue scancel; do command -v "$c" >/dev/null || echo "missing $c"; done'
        )
        lines = (result.stdout or "").splitlines()
        missing = [line.split()[1] for line in lines[1:] if line.startswith("missing ")]
        if result.exit_status != 0 or not lines:
            raise CommandError(
                ["ssh", self.request.via, "sh"],
                result.exit_status,
                result.stdout or "",
                result.stderr or "",
                reason=f"The login node {self.request.via} could not run a shell command.",
            )
        if missing:
            raise CommandError(
                ["ssh", self.request.via, "command", "-v", *missing],
                127,
                "",
                "",
                reason=(
                    f"{' and '.join(missing)} not found on the login node {self.request.via} (a non-interactive SSH "
                    f"shell's PATH: `ssh {self.request.via} command -v sbatch` shows the same). Fix: is this the "
                    "cluster's login node? If Slurm comes from a module there, add --prologue 'module load slurm'."
                ),
            )
        return lines[0].strip()

    async def _running_frontend(self) -> tuple[str, str] | None:
        result = await self.run_remote(shlex.join(build_squeue_mine_argv()))
        if result.exit_status != 0:
            return None
        mine = [
            job
            for job in parse_squeue_mine(result.stdout or "")
            if FRONTEND_JOB.match(job.name)
            and job.name.startswith(f"{self.request.job_name}-")
            and job.state.kind != "ended"
        ]
        return (mine[-1].job_id, mine[-1].name) if mine else None

    async def _submit(self, home: str, lab_dir: str) -> None:
        request = self.request
        name = f"{request.job_name}-{secrets.token_hex(4)}-frontend"
        self.spec = spec = FrontendSpec(
            job_name=name,
            lab_dir=lab_dir,
            notebook_dir=request.work_dir or home,
            python=request.python,
            walltime=request.walltime,
            cores=request.cores,
            memory=request.memory,
            partition=request.partition,
            account=request.account,
            qos=request.qos,
            extra_directives=tuple(request.directives),
            prologue=tuple(request.prologue),
            container=request.container,
        )
        checks = []
        if request.container:
            checks.append(
                f"test -f {shlex.quote(request.container)} || {{ echo 'no image {request.container}' >&2; exit 3; }}"
            )
        if request.work_dir:
            checks.append(
                f"test -d {shlex.quote(request.work_dir)} || {{ echo 'no directory {request.work_dir}' >&2; exit 3; }}"
            )
        tmp = f"{spec.script_path}.{secrets.token_hex(4)}.tmp"
        command = " && ".join(
            [
                *checks,
                "umask 077",
                shlex.join(["mkdir", "-p", lab_dir]),
                f"cat > {shlex.quote(tmp)}",
                shlex.join(["mv", "-f", tmp, spec.script_path]),
                shlex.join(["sbatch", "--parsable", spec.script_path]),
            ]
        )
        result = await self.run_remote(command, input=frontend_script(spec))
        if result.exit_status == 3:
            raise ConfigError(
                f"{(result.stderr or '').strip()} on the cluster (as {request.via} sees it); give a path there."
            )
        if result.exit_status != 0:
            raise SubmitError(
                ["sbatch", "--parsable", spec.script_path],
                result.exit_status,
                result.stdout or "",
                result.stderr or "",
                reason=f"Slurm refused the frontend job on {request.via}: {(result.stderr or '').strip()}. Check "
                "--partition, --account, --qos, --memory and --walltime against `sinfo` and your allocation there.",
            )
        self.job_id = parse_sbatch_job_id(result.stdout or "")
        self._submitted = True
        self.say(f"Submitted the frontend job {self.job_id} ({name}) on {request.via}; waiting for Jupyter...")

    async def _job_state(self) -> tuple[str | None, str, str]:
        """``(state, nodes, reason)`` of the job as squeue shows it; state None once it left the queue."""
        result = await self.run_remote(shlex.join(["squeue", "-h", "-j", self.job_id, "-o", "%T|%N|%r"]))
        line = (result.stdout or "").strip().splitlines()
        if not line or result.exit_status != 0:
            return None, "", ""
        state, nodes, reason = (line[0].split("|") + ["", ""])[:3]
        return state, nodes, reason

    async def _wait_for_jupyter(self) -> tuple[str, int, str, str]:
        deadline = time.monotonic() + self.request.startup_timeout
        runtime = self.spec.runtime_dir(self.job_id)
        last_said, last_reason = 0.0, None
        while True:
            state, nodes, reason = await self._job_state()
            if state is None or state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                raise await self._failure(state or "no longer in the queue")
            if state == "PENDING":
                now = time.monotonic()
                if reason != last_reason or now - last_said > PENDING_REPEAT:
                    why = f" ({reason})" if reason and reason != "None" else ""
                    self.say(f"  job {self.job_id} is pending{why}; waiting")
                    last_said, last_reason = now, reason
            elif state == "RUNNING":
                info = await self._server_info(runtime)
                if info is not None and await self._answers(info):
                    return info["hostname"], int(info["port"]), info["token"], info.get("base_url", "/")
            if time.monotonic() > deadline:
                raise StartupTimeoutError(
                    f"Jupyter (frontend job {self.job_id}, {state.lower()}"
                    f"{f' on {nodes}' if nodes else f' ({reason})'}) did not answer within "
                    f"{self.request.startup_timeout:g} s; the job was cancelled. Its log: "
                    f"{self.spec.output_pattern.replace('%j', self.job_id)}. Fix: a longer --startup-timeout for a "
                    "busy queue."
                )
            await asyncio.sleep(POLL_INTERVAL)

    async def _server_info(self, runtime: str) -> dict | None:
        result = await self.run_remote(f"cat {shlex.quote(runtime)}/jpserver-*.json 2>/dev/null")
        try:
            info = json.loads(result.stdout or "")
        except ValueError:
            return None
        return info if {"hostname", "port", "token"} <= set(info) else None

    async def _answers(self, info: dict) -> bool:
        """Jupyter's ``/api/status`` answers 200 to the token, through the login node: really ready."""
        try:
            reader, writer = await self.tunnel.open_connection(info["hostname"], int(info["port"]))
            status, _ = await asyncio.wait_for(
                http_get(
                    reader,
                    writer,
                    f"{info['hostname']}:{info['port']}",
                    f"{info.get('base_url', '/').rstrip('/')}/api/status",
                    {"Authorization": f"token {info['token']}"},
                ),
                10,
            )
        except Exception:  # asyncssh's ChannelOpenError (not yet listening) is no OSError
            return False
        return status == 200

    async def _failure(self, state: str) -> JobFailedError:
        log = self.spec.output_pattern.replace("%j", self.job_id)
        result = await self.run_remote(f"tail -n {LOG_LINES} {shlex.quote(log)} 2>&1")
        tail = (result.stdout or "").rstrip()
        self._submitted = False
        return JobFailedError(
            f"The frontend job {self.job_id} (JupyterLab) ended before Jupyter answered ({state}). The last lines of "
            f"its log {log} on {self.request.via}:\n{tail}\nFix: the Python on the cluster must have JupyterLab "
            f"(--python, now {self.request.python!r}: `pip install 'mspass-cluster[lab]'` there), or give the MsPASS "
            "image with --container; `mspass-cluster lab --dry-run` shows the job's script.",
            role="frontend",
            job_id=self.job_id,
            state=state,
            log_path=log,
            log_tail=tail,
        )

    async def _cancel_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(self.run_remote(shlex.join(build_scancel_argv([self.job_id])), timeout=20))
            self.say(f"Cancelled the frontend job {self.job_id}.")

    # ------------------------------------------------------------------ running
    async def job_running(self) -> bool:
        state, _, _ = await self._job_state()
        return state is not None and state in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING")

    async def close(self) -> None:
        await self.tunnel.close()


async def run_lab(request: LabRequest, *, say: Callable[[str], None] = print, opened=None, **tunnel_options) -> int:
    """``mspass-cluster lab``: start (or find) the frontend and keep the tunnel up until Ctrl-C or the job's end."""
    lab = Lab(request, say=say, **tunnel_options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(lab.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            say("Interrupted before Jupyter answered; nothing is left running.")
            return 130
        stopping.cancel()
        url = starting.result()
        say(f"Jupyter is running on {lab.node}, job {lab.job_id}; open {url}")
        say(
            f"The tunnel stays up (it reconnects by itself) until Ctrl-C, which closes the tunnel only: "
            f"`mspass-cluster lab --stop --via {request.via}` ends the job."
        )
        if opened is not None:
            opened(url)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
            if stop.is_set():
                break
            if lab.tunnel.failure is not None:
                say(f"The tunnel cannot come back; Jupyter keeps running in job {lab.job_id}.")
                return 1
            with contextlib.suppress(Exception):
                if not await lab.job_running():
                    say(f"The frontend job {lab.job_id} has ended (walltime, or stopped); closing the tunnel.")
                    return 1
        say(
            f"Tunnel closed. Jupyter keeps running in job {lab.job_id}: `mspass-cluster lab --via {request.via}` "
            f"reconnects, `mspass-cluster lab --stop --via {request.via}` ends it."
        )
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await lab.close()


async def stop_lab(request: LabRequest, *, say: Callable[[str], None] = print, **tunnel_options) -> int:
    """``mspass-cluster lab --stop``: end your frontend jobs (only those) and wait until they left the queue."""
    lab = Lab(replace(request), say=say, **tunnel_options)
    await lab.tunnel.connect()
    try:
        await lab._check_login_node()
        result = await lab.run_remote(shlex.join(build_squeue_mine_argv()))
        jobs = [j.job_id for j in parse_squeue_mine(result.stdout or "") if FRONTEND_JOB.match(j.name)]
        if not jobs:
            say(f"No frontend job of yours on {request.via}.")
            return 0
        await lab.run_remote(shlex.join(build_scancel_argv(jobs)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = await lab.run_remote(shlex.join(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i"]))
            if not (result.stdout or "").strip():
                say(f"Stopped the frontend job(s) {', '.join(jobs)} on {request.via}.")
                return 0
            await asyncio.sleep(POLL_INTERVAL)
        say(f"Cancelled {', '.join(jobs)}; still ending after 60 s (squeue shows them).")
        return 1
    finally:
        await lab.close()
