"""SSH to a login node and forward a loopback port of this machine through it (asyncssh).

This module knows SSH and TCP, nothing of Slurm or Jupyter: :mod:`mspass_cluster.lab`
uses it to reach a JupyterLab on a compute node, ``mspass-cluster tunnel`` to reach any
``host:port`` the login node can reach.

::

    laptop                               login node (sshd)            compute node
    127.0.0.1:PORT  ==== SSH (asyncssh) ====>  direct-tcpip  ---------> host:port

* The user's own SSH setup is used as OpenSSH would use it: ``~/.ssh/config`` (host
  aliases, ``User``, ``Port``, ``IdentityFile``, ``ProxyJump`` chains), keys and the agent
  (``SSH_AUTH_SOCK``), and strict host-key checking against ``~/.ssh/known_hosts``: an
  unknown host or a changed key is refused with its fingerprint and the fix
  (:class:`~mspass_cluster.errors.HostKeyError`). Keyboard-interactive prompts (a
  one-time code) are passed to the terminal when there is one.
* The local end listens on ``127.0.0.1`` only (no ``-g``: other users of this machine
  cannot reach it through another interface); the listener belongs to this process and
  outlives the SSH connection: when the connection drops (a network change, a login node
  that kills long sessions, a sleeping laptop), the tunnel reconnects with a backoff and
  new browser connections wait for it instead of being refused.
* Keepalives (every ``keepalive_interval`` seconds, ``keepalive_count_max`` unanswered
  ones end the connection) notice a connection that died silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import AuthenticationError, ConfigError, HostKeyError, HostUnreachableError, TunnelError

__all__ = ["SSHTarget", "parse_target", "Tunnel", "http_get"]

logger = logging.getLogger("mspass_cluster")

#: How long one attempt to connect (TCP and the SSH handshake, not the login prompts) may take.
CONNECT_TIMEOUT = 20.0
#: Seconds between keepalives; that many times ``KEEPALIVE_COUNT_MAX`` without an answer ends the connection.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 3
#: Waits between attempts to reconnect (seconds), the last one repeated.
RECONNECT_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: How long a new local connection waits for the SSH connection to come back before it is closed.
WAIT_FOR_CONNECTION = 120.0

_TARGET = re.compile(r"^(?:(?P<user>[^@\s:,]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@\s:,\[\]]+)(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class SSHTarget:
    """One SSH hop: ``[user@]host[:port]``; ``host`` may be an alias of ``~/.ssh/config``."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        text = f"{self.user}@{self.host}" if self.user else self.host
        return f"{text}:{self.port}" if self.port else text


def parse_target(text: str) -> tuple[SSHTarget, list[SSHTarget]]:
    """The login node and the jump hosts before it, from ``"[user@]host[:port]"`` or ``"jump1,jump2,login"``.

    Raises
    ------
    ConfigError
        For an empty or malformed hop, naming it.

    Examples
    --------
    >>> parse_target("me@gateway:2222,login")
    (SSHTarget(host='login', user=None, port=None), [SSHTarget(host='gateway', user='me', port=2222)])
    """
    hops = []
    for word in (text or "").split(","):
        match = _TARGET.match(word.strip())
        port = int(match.group("port")) if match and match.group("port") else None
        if not match or (port is not None and not 1 <= port <= 65535):
            raise ConfigError(
                f"--via {text!r}: {word.strip()!r} is not an SSH host; give [user@]host[:port], an alias of your "
                "~/.ssh/config, or jump hosts first separated by commas (gateway,login)"
            )
        hops.append(SSHTarget(match.group("host").strip("[]"), match.group("user"), port))
    return hops[-1], hops[:-1]


def _terminal_prompt(prompt: str, echo: bool) -> str:
    if echo:
        print(prompt, end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().rstrip("\n")
    return getpass.getpass(prompt)


def _client_factory(prompt: Callable[[str, bool], str] | None):
    import asyncssh

    class _Client(asyncssh.SSHClient):
        """Passes a site's keyboard-interactive questions (a one-time code) to the terminal."""

        def kbdint_auth_requested(self):
            return "" if prompt is not None else None

        def kbdint_challenge_received(self, name, instructions, lang, prompts):
            if prompt is None:
                return None
            for line in (name, instructions):
                if line:
                    print(line, file=sys.stderr, flush=True)
            return [prompt(text, echo) for text, echo in prompts]

        def password_auth_requested(self):
            return prompt("Password: ", False) if prompt is not None else None

    return _Client


async def http_get(reader, writer, host: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.0 GET over an open stream pair; ``(status, body)``. For probes through a tunnel."""
    lines = [f"GET {path} HTTP/1.0", f"Host: {host}", *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    writer.write("\r\n".join(lines).encode())
    data = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/\d\.\d (\d{3})", head)
    if not match:
        raise OSError(f"no HTTP answer from {host} ({head[:80]!r})")
    return int(match.group(1)), body


class Tunnel:
    """An SSH connection to a login node that is kept up, and loopback ports forwarded through it.

    Parameters
    ----------
    via : str
        ``[user@]host[:port]``, an alias of ``~/.ssh/config``, or a chain ``jump1,jump2,login``
        (a ``ProxyJump`` in the config is followed too).
    prompt : callable or None
        ``prompt(text, echo) -> answer`` for keyboard-interactive questions and passwords;
        default: the terminal when stdin is one, else none (such a login then fails).
    say : callable
        Where the tunnel's few lines go (lost, reconnected); default: the ``mspass_cluster`` logger.
    config, known_hosts, client_keys
        asyncssh's options, for tests; by default the user's files, as OpenSSH reads them.
    """

    def __init__(
        self,
        via: str,
        *,
        prompt: Callable[[str, bool], str] | None = ...,
        say: Callable[[str], None] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_count_max: int = KEEPALIVE_COUNT_MAX,
        reconnect_backoff=RECONNECT_BACKOFF,
        **ssh_options,
    ):
        self.via = via
        self.target, self.jumps = parse_target(via)
        self._prompt = (_terminal_prompt if sys.stdin.isatty() else None) if prompt is ... else prompt
        self._say = say or logger.warning
        self._connect_timeout = connect_timeout
        self._keepalive = (keepalive_interval, keepalive_count_max)
        self._backoff = tuple(reconnect_backoff)
        self._ssh_options = ssh_options
        self._conn = None
        self._up = asyncio.Event()
        self._closing = False
        self._watch: asyncio.Task | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._handlers: set[asyncio.Task] = set()
        #: How many times the connection was made again after it dropped.
        self.reconnects = 0
        #: Why the connection cannot be made again (a changed host key, a refused login), once so.
        self.failure: TunnelError | None = None

    # ------------------------------------------------------------------ connecting
    def _connect_kwargs(self) -> dict:
        kwargs = dict(self._ssh_options)
        if self.target.port:
            kwargs["port"] = self.target.port
        if self.target.user:
            kwargs["username"] = self.target.user
        if self.jumps:
            kwargs["tunnel"] = ",".join(str(hop) for hop in self.jumps)
        return kwargs

    async def connect(self) -> None:
        """Log in to the login node (once); raise a :class:`~mspass_cluster.errors.TunnelError` saying why not."""
        self._conn = await self._open()
        self._up.set()
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._keep_up())

    async def _open(self):
        import asyncssh

        kwargs = self._connect_kwargs()
        try:
            return await asyncssh.connect(
                self.target.host,
                client_factory=_client_factory(self._prompt),
                connect_timeout=self._connect_timeout,
                keepalive_interval=self._keepalive[0],
                keepalive_count_max=self._keepalive[1],
                **kwargs,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise await self._host_key_error(exc, kwargs) from exc
        except asyncssh.PermissionDenied as exc:
            raise AuthenticationError(
                f"The login node {self.via} refused to let you in ({exc.reason}). Tried: the keys of your SSH agent "
                f"and of ~/.ssh (or IdentityFile in ~/.ssh/config){', and keyboard-interactive' if self._prompt else ''}"
                f". Fix: check that `ssh {self.via}` works from this terminal (the right user name: "
                "--via user@host or User in ~/.ssh/config; the key's public half in ~/.ssh/authorized_keys on the "
                "cluster, or registered the way your site asks; ssh-add for a key with a passphrase)."
            ) from exc
        except (OSError, asyncio.TimeoutError, asyncssh.ConnectionLost) as exc:
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
            raise HostUnreachableError(
                f"Cannot reach the login node {self.via}: {what}. Fix: check the name (or its HostName in "
                f"~/.ssh/config), that you are on the network (or VPN) it is reachable from, and that `ssh "
                f"{self.via}` works from this terminal."
            ) from exc
        except asyncssh.Error as exc:
            raise TunnelError(f"SSH to {self.via} failed: {exc.reason}. Check that `ssh {self.via}` works.") from exc

    async def _host_key_error(self, exc, kwargs) -> HostKeyError:
        import asyncssh

        options = asyncssh.SSHClientConnectionOptions(host=self.target.host, **_option_subset(kwargs))
        host, port = options.host, options.port
        fingerprint, key_line = None, None
        with contextlib.suppress(Exception):
            key = await asyncssh.get_server_host_key(
                self.target.host, tunnel=kwargs.get("tunnel", ()), config=kwargs.get("config", ())
            )
            if key is not None:
                fingerprint = key.get_fingerprint("sha256")
                name = host if port == 22 else f"[{host}]:{port}"
                key_line = f"{name} {key.export_public_key('openssh').decode().strip()}"
        known = _known_host_names(kwargs.get("known_hosts"), host, port)
        shown = f"{host}" if host == self.target.host else f"{self.target.host} ({host})"
        if known:
            return HostKeyError(
                f"The host key of {shown}, port {port}, is NOT the one in {known}: it presents "
                f"{fingerprint or 'another key'}. Someone may be intercepting the connection, or the site changed "
                f"its keys. Connection refused. Fix: compare with the fingerprints your site publishes; only if they "
                f"match, remove the old key with `ssh-keygen -R {host}` and connect again.",
                host=host,
                fingerprint=fingerprint,
                mismatch=True,
            )
        add = f"\n  echo '{key_line}' >> ~/.ssh/known_hosts" if key_line else ""
        return HostKeyError(
            f"The host key of {shown}, port {port}, is unknown here (not in ~/.ssh/known_hosts): it presents "
            f"{fingerprint or 'a key that could not be read'}. Fix: compare this fingerprint with the one your site "
            f"publishes; if it matches, run `ssh {self.via}` once and answer yes, or add it:{add}",
            host=host,
            fingerprint=fingerprint,
        )

    async def _keep_up(self) -> None:
        while not self._closing:
            conn = self._conn
            await conn.wait_closed()
            if self._closing:
                return
            self._up.clear()
            self._say(f"SSH connection to {self.via} lost; reconnecting (open pages keep their place)")
            attempt = 0
            while not self._closing:
                try:
                    self._conn = await self._open()
                except (HostKeyError, AuthenticationError) as exc:
                    self.failure = exc
                    self._say(f"cannot reconnect to {self.via}: {exc}")
                    return
                except TunnelError as exc:
                    delay = self._backoff[min(attempt, len(self._backoff) - 1)]
                    attempt += 1
                    if attempt in (1, 5) or attempt % 20 == 0:
                        self._say(
                            f"still reconnecting to {self.via} ({type(exc.__cause__).__name__}); next try in {delay:g} s"
                        )
                    await asyncio.sleep(delay)
                    continue
                self.reconnects += 1
                self._up.set()
                self._say(f"SSH connection to {self.via} back (reconnect {self.reconnects})")
                break

    async def connection(self, timeout: float = WAIT_FOR_CONNECTION):
        """The current SSH connection, waiting up to ``timeout`` seconds while it is being made again."""
        if self._closing:
            raise TunnelError(f"the tunnel through {self.via} is closed")
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            raise HostUnreachableError(
                f"the SSH connection to {self.via} has been down for {timeout:g} s; still trying"
            ) from None
        return self._conn

    # ------------------------------------------------------------------ using it
    async def run(self, command: str, *, input: str | None = None, timeout: float = 60.0):
        """Run ``command`` (one shell line) on the login node; asyncssh's completed process (``exit_status``...)."""
        conn = await self.connection()
        return await conn.run(command, input=input, check=False, timeout=timeout)

    async def open_connection(self, host: str, port: int):
        """A ``(reader, writer)`` pair to ``host:port`` as the login node reaches it."""
        conn = await self.connection()
        return await conn.open_connection(host, port)

    async def forward(self, destination, local_port: int = 0) -> int:
        """Listen on ``127.0.0.1:local_port`` (0: any free port) and pass each connection to ``destination``.

        ``destination`` is ``(host, port)`` as the login node reaches it, or a callable giving
        it (None while unknown: connections are then closed). Returns the local port. The
        listener stays while the SSH connection is made again.

        Raises
        ------
        ConfigError
            When ``local_port`` is taken on this machine.
        """

        async def handle(reader, writer):
            task = asyncio.current_task()
            self._handlers.add(task)
            try:
                target = destination() if callable(destination) else destination
                if target is None:
                    writer.close()
                    return
                try:
                    remote_reader, remote_writer = await self.open_connection(*target)
                except Exception as exc:  # asyncssh's ChannelOpenError is no OSError
                    logger.debug("tunnel: cannot open %s:%s through %s: %s", *target, self.via, exc)
                    writer.close()
                    return
                await asyncio.gather(_pipe(reader, remote_writer), _pipe(remote_reader, writer))
            finally:
                self._handlers.discard(task)

        try:
            server = await asyncio.start_server(handle, "127.0.0.1", local_port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"local port {local_port} on 127.0.0.1 is taken (by another program, or a tunnel of yours "
                    f"still open). Fix: choose another with --port N, or --port 0 for any free one."
                ) from exc
            raise
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Close the listeners and the SSH connection (what runs behind them on the cluster is left alone)."""
        self._closing = True
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.wait_closed(), 5)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()


async def _pipe(reader, writer) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError, Exception):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


def _option_subset(kwargs: dict) -> dict:
    subset = {k: v for k, v in kwargs.items() if k in ("port", "username", "config")}
    default = os.path.expanduser("~/.ssh/config")
    if "config" not in subset and os.access(default, os.R_OK):
        subset["config"] = [default]
    return subset


def _known_host_names(known_hosts, host: str, port: int) -> str | None:
    """The known_hosts file that has a key for ``host`` (as OpenSSH names it), or None."""
    import asyncssh

    paths = (
        [known_hosts]
        if isinstance(known_hosts, (str, os.PathLike))
        else [os.path.expanduser("~/.ssh/known_hosts"), "/etc/ssh/ssh_known_hosts"]
    )
    for path in paths:
        try:
            known = asyncssh.read_known_hosts(str(path))
        except (OSError, ValueError, asyncssh.Error):
            continue
        if any(known.match(host, "", port)[:2]):
            return str(path)
    return None
