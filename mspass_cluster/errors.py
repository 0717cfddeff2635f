"""Every error this package raises, in one hierarchy.

::

    MsPASSClusterError                  base class: catch this to catch them all
    ├── ConfigError (ValueError)        bad option, value or directory, found before anything is submitted
    ├── CommandError                    an external command (squeue, scancel, ...) failed or timed out
    │   ├── SubmitError                 sbatch rejected a job (bad partition, account, memory, ...)
    │   └── SlurmUnavailableError       Slurm's controller does not answer (down, restarting, overloaded)
    ├── JobFailedError                  a job ended before its service was ready, or while it was needed
    ├── ClusterClosedError              a call on a cluster that was closed
    ├── DatabaseMovedError              a database client made before the database came back on another node
    ├── TunnelError                     an SSH connection to a login node could not be made or used
    │   ├── HostKeyError                the login node's host key is unknown, or not the one known_hosts has
    │   ├── AuthenticationError         the login node refused every key (and password or code) offered
    │   └── HostUnreachableError        no SSH answer from the login node (name, network, port, timeout)
    └── StartupTimeoutError (TimeoutError)
                                        the database or workers were not ready before the deadline

Every message says what failed, the concrete values (job id, state, exit code,
log path) and what to do next.
"""

from __future__ import annotations

__all__ = [
    "MsPASSClusterError",
    "ConfigError",
    "CommandError",
    "SubmitError",
    "SlurmUnavailableError",
    "JobFailedError",
    "ClusterClosedError",
    "DatabaseMovedError",
    "StartupTimeoutError",
    "TunnelError",
    "HostKeyError",
    "AuthenticationError",
    "HostUnreachableError",
]


class MsPASSClusterError(Exception):
    """Base class of every error raised by ``mspass_cluster``."""


class ConfigError(MsPASSClusterError, ValueError):
    """An option has a bad value; raised before anything is submitted."""


class CommandError(MsPASSClusterError):
    """An external command failed, could not be run, or timed out.

    Parameters
    ----------
    argv : list of str
        The command that was run.
    returncode : int or None
        Its exit code, or None when it could not be started or timed out.
    stdout, stderr : str
        What it printed.
    reason : str, optional
        A one-line explanation placed first in the message.
    """

    def __init__(self, argv, returncode, stdout="", stderr="", reason=None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        lines = [reason or f"Command failed with exit code {returncode}."]
        lines.append("Command: " + " ".join(self.argv))
        if returncode is not None:
            lines.append(f"Exit code: {returncode}")
        if stderr.strip():
            lines.append("stderr: " + stderr.strip())
        if stdout.strip():
            lines.append("stdout: " + stdout.strip())
        super().__init__("\n".join(lines))

    @classmethod
    def explaining(cls, error: "CommandError", reason: str) -> "CommandError":
        """This kind of error for the same command as ``error``, with ``reason`` first."""
        return cls(error.argv, error.returncode, error.stdout, error.stderr, reason=reason)


class SubmitError(CommandError):
    """``sbatch`` refused a job; the message carries sbatch's own words."""


class SlurmUnavailableError(CommandError):
    """Slurm's controller did not answer (``Unable to contact slurm controller``, socket timeouts).

    Not a problem of the cluster's options: the same request may work once
    the controller is back (``scontrol ping`` tells).
    """


class JobFailedError(MsPASSClusterError):
    """A Slurm job of the cluster ended when its service was still needed.

    Attributes
    ----------
    role : str
        ``"db"`` or ``"worker"``.
    job_id : str
    state : str
        Slurm's final state (FAILED, CANCELLED, TIMEOUT, COMPLETED, ...).
    exit_code : str or None
        Slurm's ``exit:signal`` pair, e.g. ``"127:0"``.
    log_path : str
    log_tail : str
    """

    def __init__(self, message, *, role, job_id, state, exit_code=None, log_path=None, log_tail=""):
        self.role = role
        self.job_id = job_id
        self.state = state
        self.exit_code = exit_code
        self.log_path = log_path
        self.log_tail = log_tail
        super().__init__(message)


class ClusterClosedError(MsPASSClusterError):
    """A call on a cluster after :meth:`~mspass_cluster.MsPASSCluster.close`: its jobs and scheduler are gone."""


class DatabaseMovedError(MsPASSClusterError):
    """A database client handed out before the database was brought back on another node: get a new one."""


class StartupTimeoutError(MsPASSClusterError, TimeoutError):
    """The cluster was not ready before ``startup_timeout``; says what was still pending and why."""


class TunnelError(MsPASSClusterError):
    """An SSH connection to a login node (``mspass-cluster lab --via``, :mod:`mspass_cluster.tunnel`) failed."""


class HostKeyError(TunnelError):
    """The login node's host key is not in known_hosts, or differs from the one there.

    Attributes
    ----------
    host : str
    fingerprint : str or None
        The SHA256 fingerprint of the key the server presented.
    mismatch : bool
        True when known_hosts holds another key for this host.
    """

    def __init__(self, message, *, host, fingerprint=None, mismatch=False):
        self.host = host
        self.fingerprint = fingerprint
        self.mismatch = mismatch
        super().__init__(message)


class AuthenticationError(TunnelError):
    """The login node refused every way of logging in that was offered."""


class HostUnreachableError(TunnelError):
    """The login node did not answer SSH: unknown name, no route, connection refused or timed out."""
