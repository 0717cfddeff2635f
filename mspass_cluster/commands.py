"""The one place that runs external commands (sbatch, squeue, scancel, ...).

Commands are argv lists, never shell strings, and every call has a timeout.
A :class:`CommandRunner` counts the calls it makes per program, which the
benchmarks use to report the load put on the Slurm controller; pass your own
runner to a cluster to observe or redirect its commands.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
from dataclasses import dataclass

from .errors import CommandError

__all__ = ["CommandRunner", "CommandResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    """What a finished command returned."""

    argv: tuple
    returncode: int
    stdout: str
    stderr: str


class CommandRunner:
    """Runs argv lists with a timeout, synchronously or from asyncio.

    Parameters
    ----------
    timeout : float
        Default seconds a command may take before it is killed and
        :class:`~mspass_cluster.errors.CommandError` is raised.

    Attributes
    ----------
    calls : collections.Counter
        Number of calls per program name (``argv[0]``'s base name).
    """

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.calls: collections.Counter = collections.Counter()

    def _count(self, argv):
        self.calls[os.path.basename(argv[0])] += 1

    def _check(self, argv, returncode, stdout, stderr, check, error_cls):
        result = CommandResult(tuple(argv), returncode, stdout, stderr)
        if check and returncode != 0:
            raise error_cls(argv, returncode, stdout, stderr)
        return result

    def run(self, argv, *, timeout=None, check=True, error_cls=CommandError, env=None) -> CommandResult:
        """Run ``argv`` and wait for it; ``env`` adds variables to this process's environment for it.

        Raises
        ------
        CommandError
            (or ``error_cls``) when the program is missing, exits non-zero
            while ``check`` is true, or runs longer than ``timeout``.
        """
        argv = [str(a) for a in argv]
        timeout = self.timeout if timeout is None else timeout
        self._count(argv)
        logger.debug("running %s", argv)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=_environment(env)
            )
        except FileNotFoundError as exc:
            raise error_cls(
                argv, None, reason=f"{argv[0]} was not found on PATH. Is Slurm installed and loaded here?"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise error_cls(
                argv,
                None,
                _text(exc.stdout),
                _text(exc.stderr),
                reason=f"{argv[0]} did not answer within {timeout:g} s (the Slurm controller may be overloaded).",
            ) from exc
        return self._check(argv, proc.returncode, proc.stdout, proc.stderr, check, error_cls)

    async def arun(self, argv, *, timeout=None, check=True, error_cls=CommandError, env=None) -> CommandResult:
        """Like :meth:`run`, from a coroutine, without blocking the event loop."""
        argv = [str(a) for a in argv]
        timeout = self.timeout if timeout is None else timeout
        self._count(argv)
        logger.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_environment(env),
            )
        except FileNotFoundError as exc:
            raise error_cls(
                argv, None, reason=f"{argv[0]} was not found on PATH. Is Slurm installed and loaded here?"
            ) from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise error_cls(
                argv,
                None,
                reason=f"{argv[0]} did not answer within {timeout:g} s (the Slurm controller may be overloaded).",
            ) from exc
        return self._check(
            argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), check, error_cls
        )


def _environment(extra) -> dict | None:
    """This process's environment plus ``extra``, or None (inherit it) without."""
    return {**os.environ, **extra} if extra else None


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
