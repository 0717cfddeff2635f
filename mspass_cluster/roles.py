"""What each role runs: the server's argv, its environment and its job script (pure).

Two roles run in Slurm jobs:

``db``
    The database server (``mongod`` by default) on ``<db_dir>/data``.
``worker``
    ``dask worker`` with ``processes`` worker processes sharing one node.

A sharded database (``db_shards``) replaces ``db`` with three roles (see
:mod:`mspass_cluster.sharding`): ``db-config`` (the config server),
``db-shard`` (one job per shard) and ``db-router`` (``mongos``).

The notebook process hosts the Dask scheduler (MsPASS's ``scheduler`` role).
One more role is submitted on its own, from a laptop, by ``mspass-cluster lab``:

``frontend``
    JupyterLab on a compute node (MsPASS's ``frontend`` role), with a fresh token; the
    notebook's ``MsPASSCluster()`` then starts ``db`` and ``worker`` jobs as usual.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import string
from importlib import resources

from dask.utils import format_bytes, parse_bytes

from . import containers, dbstorage, sharding
from ._version import __version__
from .config import ClusterOptions, parse_walltime
from .files import cluster_umask, directory_bytes
from .guardrails import worker_timeout_environment
from .security import CredentialFiles, db_security_args
from .slurm import build_directives, format_array_indices

__all__ = [
    "ROLES",
    "worker_argv",
    "lifetime_args",
    "db_argv",
    "db_data_path",
    "db_storage_lines",
    "db_copy_back_lines",
    "open_files_lines",
    "service_environment",
    "role_environment",
    "render_job_script",
    "build_job_script",
    "build_worker_array_script",
    "ScriptContext",
    "FRONTEND",
    "FrontendSpec",
    "frontend_script",
]

ROLES = ("db", "worker", *sharding.SHARDED_ROLES)

#: Placeholder used in scripts previewed before the scheduler exists.
SCHEDULER_PLACEHOLDER = "tcp://<scheduler-address>:<port>"
SECURE_SCHEDULER_PLACEHOLDER = "tls://<scheduler-address>:<port>"


#: The comment beside a job script's ``umask`` line.
_WHO_READS = {
    0o077: "only you can read what this job creates",
    0o027: "only you and your group can read what this job creates (group_access)",
}


class _ScriptTemplate(string.Template):
    # '@' keeps the template readable: '$' belongs to the shell.
    delimiter = "@"


def worker_argv(
    options: ClusterOptions,
    scheduler_address: str,
    name: str,
    tls: CredentialFiles | None = None,
    local: bool = False,
) -> list[str]:
    """``dask worker`` command line for one worker node.

    Dask names the processes ``<name>-0``, ``<name>-1``, ... when
    ``processes > 1``, and ``<name>`` otherwise. With ``tls``, workers and
    nannies listen on TLS only (the scheduler's scheme), accept only peers
    with a certificate from the cluster's CA, and run no dashboard of their
    own (it would serve their logs to anyone). ``local`` (the desktop):
    they listen on loopback only.
    """
    argv = [
        options.python,
        "-m",
        "distributed.cli.dask_worker",
        scheduler_address,
        "--name",
        name,
        "--nworkers",
        str(options.processes),
    ]
    if options.threads_per_process is not None:
        argv += ["--nthreads", str(options.threads_per_process)]
    if options.memory_bytes is not None:
        per_process = format_bytes(options.memory_bytes // options.processes).replace(" ", "")
        argv += ["--memory-limit", per_process]
    else:
        argv += ["--memory-limit", "auto"]
    argv += [
        "--nanny",
        "--death-timeout",
        str(options.death_timeout),
        "--local-directory",
        options.worker_dir,
    ]
    if tls is not None:
        argv += ["--tls-ca-file", tls.ca_file, "--tls-cert", tls.worker_cert, "--tls-key", tls.worker_key]
        argv += ["--no-dashboard"]
    if local:
        argv += ["--host", "127.0.0.1"]
    if tls is not None or local:
        # Even without a dashboard a worker serves HTTP (health, metrics): on loopback only.
        argv += ["--dashboard-address", "127.0.0.1:0"]
    return argv + lifetime_args(options) + list(options.worker_extra_args)


def lifetime_args(options: ClusterOptions) -> list[str]:
    """``--lifetime``/``--lifetime-stagger`` for ``dask worker``, from ``worker_lifetime``.

    A worker that reaches its lifetime hands its results to other workers and
    exits 0, so its job ends instead of being killed at walltime with its
    results lost; the cluster then submits a replacement. ``auto`` ends each
    worker 5 % of ``walltime`` (1 to 10 minutes) before walltime, staggered by
    up to half that margin so the nodes do not all leave at once; walltimes
    under 4 minutes leave no room for it. The cluster sets ``none`` for the
    backends without a walltime per job. A ``--lifetime`` in
    ``worker_extra_args`` wins.

    >>> from mspass_cluster.config import resolve_options
    >>> lifetime_args(resolve_options(walltime="01:00:00"))
    ['--lifetime', '3330s', '--lifetime-stagger', '90s']
    """
    if any(arg.split("=", 1)[0] == "--lifetime" for arg in options.worker_extra_args):
        return []
    if options.worker_lifetime == "none":
        return []
    if options.worker_lifetime != "auto":
        return ["--lifetime", options.worker_lifetime]
    walltime = parse_walltime(options.walltime)
    margin = min(max(walltime // 20, 60), 600)
    stagger = margin // 2
    if walltime < 240:
        return []
    return ["--lifetime", f"{walltime - margin - stagger}s", "--lifetime-stagger", f"{stagger}s"]


def db_data_path(options: ClusterOptions, job_name: str | None = None) -> str:
    """The server's data directory as the notebook knows it (the readiness probe checks it).

    ``<db_dir>/data``, as in MsPASS's scripts; with ``db_storage="node-local"``
    the job's own copy on its node, known here only as a
    :class:`~mspass_cluster.dbstorage.DbPathPattern` (``*/mspass_cluster-<job_name>-*/data``).
    """
    if options.db_storage == "node-local":
        return dbstorage.server_dbpath(job_name)
    return os.path.join(options.db_dir, "data")


def db_cache_gb(memory: str) -> float:
    """WiredTiger cache for a job with ``memory``: MongoDB's own rule, half of (memory - 1 GB), at least 0.25."""
    gigabytes = parse_bytes(memory) / 2**30
    return max(0.25, round(0.5 * (gigabytes - 1.0), 2))


def db_argv(
    options: ClusterOptions, local: bool = False, tls: CredentialFiles | None = None, dbpath: str | None = None
) -> list[str]:
    """Database server command line, on ``dbpath`` (default ``<db_dir>/data``).

    With ``tls`` (and its database files): TLS required on every connection,
    with a client certificate from the cluster's CA (``--tlsCAFile``, no
    connection without one), and access control (``--auth``): the only
    user is the cluster's client certificate (x.509), created by
    :func:`db_users_lines` once the server listens.

    The server listens on every interface of its node (as MsPASS's scripts
    do), or only on loopback for the desktop backend (``local``), never forks (so Slurm's signals reach it and its exit status is
    known), keeps no Unix socket in ``/tmp`` (stale sockets of other users
    block startup on shared nodes, MsPASS issue #690), and sizes its cache to
    the job's memory rather than to the whole node's.
    """
    return [
        *options.db_command,
        "--port",
        str(options.db_port),
        "--dbpath",
        os.path.join(options.db_dir, "data") if dbpath is None else dbpath,
        *(["--bind_ip", "127.0.0.1"] if local else ["--bind_ip_all"]),
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        f"{db_cache_gb(options.db_memory):g}",
        *(db_security_args(tls) if tls is not None and tls.db_server_pem else []),
    ]


def db_users_lines(options: ClusterOptions, tls: CredentialFiles, wrap=None) -> list[str]:
    """Shell lines that create the database's one user once the server listens, or stop the server.

    The user is the subject of the cluster's client certificate (x.509,
    role ``root``), created through MongoDB's localhost exception: the
    script connects over loopback, with TLS and that certificate, so the
    exception's window is closed to everyone without the cluster's
    credentials. An existing user (a database reopened) is kept. The script
    is ``templates/db_users.py`` (pymongo only: it runs with the image's
    Python in a container), fed on stdin; ``wrap`` turns its argv into the
    container command.
    """
    argv = [
        options.python,
        "-",
        "--port",
        str(options.db_port),
        "--ca",
        tls.db_ca_file,
        "--cert",
        tls.db_client_pem,
        "--subject",
        tls.db_user,
        "--timeout",
        str(int(options.startup_timeout)),
    ]
    if wrap is not None:
        argv = wrap(argv)
    body = resources.files(__package__).joinpath("templates/db_users.py").read_text()
    marker = "MSPASS_DB_USERS_END"
    if marker in body:  # pragma: no cover - a template that would end its own here-document
        raise ValueError(f"templates/db_users.py must not contain {marker}")
    return [
        "# The database's only user: this cluster's client certificate (x.509), created over loopback",
        "# with TLS and that certificate, so nobody else can use MongoDB's localhost exception.",
        "(",
        f"    {containers.join(argv)} <<'{marker}' &",
        body.rstrip("\n"),
        marker,
        "    users_script=$!",
        "    trap 'kill \"$users_script\" 2>/dev/null; exit 0' TERM",
        '    wait "$users_script" && exit 0',
        '    echo "mspass_cluster: the database\'s user could not be set up (see the line above); stopping the server" >&2',
        '    kill -TERM "$server_pid"',
        "    exit 1",
        ") &",
        "users_pid=$!",
    ]


#: Open files each role needs. The database: MongoDB's recommendation for ``ulimit -n`` (its production
#: notes), since WiredTiger keeps a file per collection and per index open besides one per connection
#: (MsPASS issues #532, #617, #669). A Dask worker process: a connection to the scheduler and to each peer it
#: exchanges data with (up to every other worker process of the cluster), a file per chunk it spilled
#: while reading it, MsPASS's MongoDB connection pool (up to 100) and the data files a task reads; 8192
#: leaves room for a thousand peers.
OPEN_FILES = {"db": 64000, "worker": 8192}
_NEEDS_FILES = {
    "db": ("MongoDB recommends", "the database"),
    "worker": ("a Dask worker process may need", "a worker"),
}


def open_files_lines(role: str) -> list[str]:
    """Shell lines raising the open-files soft limit to the hard one, and saying so when the hard one is low.

    The line names the limit, the node, what the role needs and what to
    ask the administrators, because only they can raise a hard limit.
    """
    need = OPEN_FILES[role]
    recommends, who = _NEEDS_FILES[role]
    return [
        f"# Open files: the soft limit up to the hard one, which should be {need} or more ({role}).",
        "open_files=$(ulimit -Hn)",
        'ulimit -n "$open_files" 2>/dev/null || true',
        f'if [ "$open_files" != unlimited ] && [ "$open_files" -lt {need} ]; then',
        f'    echo "mspass_cluster: open files: the hard limit on $(hostname) is $open_files, below the {need} '
        f"{recommends}; {who} may fail with 'Too many open files'. Ask your administrators to raise the hard "
        f'nofile limit of jobs to {need} or more (LimitNOFILE of slurmd, or /etc/security/limits.conf)"',
        "fi",
    ]


#: Ends the here-document that carries ``templates/db_storage.py`` into the job script.
_STORAGE_END = "MSPASS_DB_STORAGE_END"


def _storage_script() -> str:
    body = resources.files(__package__).joinpath("templates/db_storage.py").read_text()
    if _STORAGE_END in body:  # pragma: no cover - a template that would end its own here-document
        raise ValueError(f"templates/db_storage.py must not contain {_STORAGE_END}")
    return body.rstrip("\n")


def db_storage_lines(options: ClusterOptions, job_name: str, wrap=None) -> list[str]:
    """Shell lines that make the server's data directory ready before it starts.

    ``shared``: ``<db_dir>/data`` itself, refused while a complete copy made by
    an interrupted node-local copy-back waits beside it (running on the
    older copy would hide the newer one). ``node-local``: a fresh private
    directory ``$db_job_dir`` under ``db_local_dir`` on the node, holding
    ``templates/db_storage.py`` (stdlib only: it runs with the role's Python,
    in the container when there is one, through ``wrap``), which stages
    ``<db_dir>/data`` into ``$db_job_dir/data``, where the server runs (see its docstring).
    """
    data = os.path.join(options.db_dir, "data")
    if options.db_storage != "node-local":
        news = shlex.quote(os.path.join(options.db_dir, "data.new-")) + "*/.mspass_cluster-complete"
        olds = shlex.quote(os.path.join(options.db_dir, "data.old-")) + "*"
        lease = shlex.quote(os.path.join(options.db_dir, "node-local.json"))
        return [
            "# A node-local copy-back cut short may have left the newest data elsewhere: beside data, or (see",
            "# node-local.json) on a node, or data missing between two renames: never start on an older copy.",
            f"for leftover in {lease} {news} {olds}; do",
            '    [ -e "$leftover" ] || continue',
            f'    case "$leftover" in */data.old-*) [ -d {shlex.quote(data)} ] && continue ;; esac',
            '    echo "mspass_cluster: ${leftover%/.mspass_cluster-complete} was left by a node-local database whose '
            f"copy-back did not finish, so {data} may be older than its newest data. Start the database once with "
            "db_storage='node-local', which completes the copy-back or says where the newest files are and what "
            'to do" >&2',
            "    exit 1",
            "done",
            shlex.join(["mkdir", "-p", data]),
        ]
    wrap = wrap or (lambda command: command)
    stage_in = wrap(
        [
            options.python,
            containers.RawShell('"$db_job_dir/db_storage.py"'),
            "stage-in",
            "--db-dir",
            options.db_dir,
            "--job-dir",
            containers.RawShell('"$db_job_dir"'),
            "--node",
            containers.RawShell('"$db_node"'),
            "--job",
            containers.RawShell('"${SLURM_JOB_ID:-$$}"'),
        ]
    )
    variable = dbstorage.local_dir_variable(options.db_local_dir)
    lines = [
        "# --- node-local storage (db_storage='node-local'): the server runs on a copy of the data on this node",
        "db_node=${SLURMD_NODENAME:-$(hostname)}",
    ]
    if variable:
        lines += [
            f'if [ -z "${{{variable}:-}}" ]; then',
            f'    echo "mspass_cluster: stage-in failed: db_local_dir="{shlex.quote(options.db_local_dir)}" but '
            f"{variable} is not set on $db_node; give db_local_dir a directory on the node's own disk\" >&2",
            "    exit 1",
            "fi",
        ]
    lines += [
        f"db_local_dir={dbstorage.local_dir_word(options.db_local_dir)}",
        f'if ! db_job_dir=$(mktemp -d "$db_local_dir/{dbstorage.job_dir_template(job_name)}"); then',
        '    echo "mspass_cluster: stage-in failed: cannot make a directory in db_local_dir=$db_local_dir on '
        "$db_node (see the line above); give db_local_dir a writable directory on the node's own disk\" >&2",
        "    exit 1",
        "fi",
    ]
    if options.in_container:
        lines += [
            'case "$db_job_dir" in *[,:]*)',
            "    echo \"mspass_cluster: stage-in failed: $db_job_dir holds a ',' or ':', which the container "
            'runtime cannot bind; give db_local_dir a directory without them" >&2',
            '    rm -rf -- "$db_job_dir"',
            "    exit 1",
            "esac",
        ]
    lines += [
        f"cat > \"$db_job_dir/db_storage.py\" <<'{_STORAGE_END}'",
        _storage_script(),
        _STORAGE_END,
        f"if ! {containers.join(stage_in)}; then",
        '    rm -rf -- "$db_job_dir"',
        "    exit 1",
        "fi",
    ]
    return lines


def db_copy_back_lines(options: ClusterOptions, wrap=None) -> list[str]:
    """Shell lines run once the server exited: the node-local copy goes back to ``<db_dir>/data`` (atomically).

    A failed copy-back makes the job fail (``job_status``) even when the
    server stopped cleanly; its log then says why and where the newer files
    are (see :func:`mspass_cluster.dbstorage.copy_back_failure`).
    """
    if options.db_storage != "node-local":
        return []
    wrap = wrap or (lambda command: command)
    copy_back = wrap(
        [
            options.python,
            containers.RawShell('"$db_job_dir/db_storage.py"'),
            "copy-back",
            "--db-dir",
            options.db_dir,
            "--job-dir",
            containers.RawShell('"$db_job_dir"'),
            "--node",
            containers.RawShell('"$db_node"'),
            "--job",
            containers.RawShell('"${SLURM_JOB_ID:-$$}"'),
        ]
    )
    return [
        "# --- node-local storage: copy the data back to db_dir (atomically), however the server ended",
        f"if {containers.join(copy_back)}; then",
        '    rm -rf -- "$db_job_dir"',
        "else",
        '    [ "$job_status" -ne 0 ] || job_status=1',
        "fi",
    ]


def service_environment(
    scheduler_address: str, db_host: str | None, db_port: int, tls: CredentialFiles | None = None
) -> dict[str, str]:
    """The variables MsPASS code reads to find the scheduler and the database.

    ``MSPASS_DB_ADDRESS`` is present only once the database's node is known;
    workers started before that receive it from the scheduler (see
    :mod:`mspass_cluster.worker_env`). With the database's ``tls`` files it
    is the whole connection string (certificate paths, no secret), which
    ``mspasspy.client.Client()`` passes to MongoDB as it is; ``MONGODB_PORT``
    is then empty, since that ``Client()`` would append a port given there
    to the string (and an image's own ``MONGODB_PORT`` must not reach it).
    """
    host, _, port = scheduler_address.rpartition("://")[2].rpartition(":")
    env = {
        "MSPASS_SCHEDULER": "dask",
        "MSPASS_SCHEDULER_ADDRESS": host,
        "DASK_SCHEDULER_PORT": port,
        "DASK_SCHEDULER_ADDRESS": scheduler_address,
        "MONGODB_PORT": str(db_port),
    }
    secure_db = tls is not None and tls.db_client_pem is not None
    if secure_db:
        env["MONGODB_PORT"] = ""
    if db_host:
        env["MSPASS_DB_ADDRESS"] = tls.db_uri(db_host, db_port) if secure_db else db_host
    return env


def role_environment(
    options: ClusterOptions,
    role: str,
    *,
    cluster_id: str,
    scheduler_address: str,
    db_host: str | None,
    tls: CredentialFiles | None = None,
) -> dict[str, str]:
    """Variables every job exports: its role and directories, and :func:`service_environment`."""
    return {
        "MSPASS_ROLE": role,
        "MSPASS_CLUSTER_ID": cluster_id,
        "MSPASS_WORK_DIR": options.work_dir,
        "MSPASS_DB_DIR": options.db_dir,
        "MSPASS_LOG_DIR": options.log_dir,
        "MSPASS_WORKER_DIR": options.worker_dir,
        **service_environment(scheduler_address, db_host, options.db_port, tls),
    }


def heartbeat_watchdog(heartbeat: str, limit: int, private_dir: str | None = None) -> list[str]:
    """Shell lines that stop the server when ``heartbeat`` is older than ``limit`` seconds.

    The notebook owning the cluster refreshes the file; if its kernel dies,
    the database shuts down cleanly, and workers leave, instead of holding
    nodes until walltime (a worker whose nanny keeps restarting a crashing
    process never reaches ``death_timeout``). The stale file is removed,
    and so is the cluster's ``private_dir`` (its credentials), which the
    dead notebook can no longer remove.
    """
    check = max(1, min(15, limit // 4))
    return [
        "# Stop the server cleanly if the notebook owning this cluster stops refreshing its",
        "# heartbeat file (a crashed kernel) instead of holding the node until walltime.",
        f"heartbeat={shlex.quote(heartbeat)}",
        "(",
        "    # Ended with the job script: its sleep goes with it.",
        "    trap 'kill \"$sleeper\" 2>/dev/null; exit 0' TERM",
        "    while :; do",
        f"        sleep {check} &",
        "        sleeper=$!",
        '        wait "$sleeper"',
        '        kill -0 "$server_pid" 2>/dev/null || exit 0',
        f"        age={limit}",
        "        # Another job's guard may remove the stale file between a test and a read: read once.",
        '        stamp=$(date -r "$heartbeat" +%s 2>/dev/null) && age=$(( $(date +%s) - stamp ))',
        f'        if [ "$age" -ge {limit} ]; then',
        '            echo "mspass_cluster: no heartbeat from the notebook for $age s ($heartbeat); stopping the server"',
        '            kill -TERM "$server_pid"',
        '            rm -f "$heartbeat"',
        *([f"            rm -rf -- {shlex.quote(private_dir)}"] if private_dir else []),
        "            exit 0",
        "        fi",
        "    done",
        ") &",
        "watchdog_pid=$!",
    ]


def render_job_script(
    *,
    role: str,
    cluster_id: str,
    directives: list[str],
    exports: dict[str, str],
    prologue: list[str],
    setup: list[str],
    argv: list[str],
    watchdog: list[str] = (),
    after_start: list[str] = (),
    after_exit: list[str] = (),
    umask: int | None = None,
) -> str:
    """Fill the job-script template; every value is shell-quoted except prologue lines.

    With ``umask`` (077 with ``security``) the script sets it first, so that
    nothing the job creates (database files, spill files) is readable by others.
    ``after_exit`` runs once the server exited and ``$status`` holds its exit
    status; it may set ``job_status``, the job's own (the server's by default).
    """
    template = _ScriptTemplate(resources.files(__package__).joinpath("templates/job.sh").read_text())
    return template.substitute(
        umask="" if umask is None else f"umask {umask:03o}  # security: {_WHO_READS.get(umask, 'as set')}",
        directives="\n".join(directives),
        version=__version__,
        role=role,
        cluster_id=cluster_id,
        prologue="\n".join(prologue) if prologue else ":",
        exports="\n".join(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
        setup="\n".join(setup),
        command=containers.join(argv),
        watchdog="\n".join(watchdog),
        after_start="\n".join(after_start),
        after_exit="\n".join(after_exit),
    )


def build_job_script(
    options: ClusterOptions,
    role: str,
    *,
    cluster_id: str,
    job_name: str,
    scheduler_address: str,
    db_host: str | None = None,
    local: bool = False,
    heartbeat: str | None = None,
    tls: CredentialFiles | None = None,
    extra_directives=(),
    db_data_bytes: int = 0,
    cluster_size: int = 1,
) -> tuple[str, str]:
    """The complete job script for ``role`` and its ``--output`` pattern.

    Parameters
    ----------
    options : ClusterOptions
    role : {"db", "worker", "db-config", "db-shard", "db-router"}
    cluster_id : str
        The cluster's unique id.
    job_name : str
        Slurm job name; for workers also the Dask worker name.
    scheduler_address : str
        ``tcp://host:port`` of the scheduler.
    db_host : str, optional
        The database's host when already known.
    local : bool
        For the desktop backend: the database listens on loopback only.
    heartbeat : str, optional
        The notebook's heartbeat file; the job's server stops
        ``orphan_timeout`` seconds after it goes stale.
    tls : CredentialFiles, optional
        The cluster's credentials (``security``): Dask over mutual TLS, the
        database with TLS, client certificates and access control.
    extra_directives : sequence of str
        Slurm options for this one job, after every other (e.g. the
        ``--dependency`` and ``--nodelist`` of a database brought back).
    db_data_bytes : int
        The size of ``<db_dir>/data`` now: with ``db_storage="node-local"``
        it sizes the notice Slurm gives the database job before its walltime
        (:func:`mspass_cluster.dbstorage.signal_directive`) to copy back.
    cluster_size : int
        Worker nodes the cluster is being brought to: beyond 300 worker
        processes a worker's connect timeout grows with it
        (:func:`mspass_cluster.guardrails.connect_timeout`).

    Returns
    -------
    script : str
    output_pattern : str
        The log path, with ``%j`` standing for the job id.
    """
    output = os.path.join(options.log_dir, f"{job_name}-%j.out")
    cd = shlex.join(["cd", options.work_dir])
    node_local = role == "db" and options.db_storage == "node-local"
    if role == "db":
        copy_back_notice = (
            [dbstorage.signal_directive(db_data_bytes, parse_walltime(options.db_walltime))] if node_local else []
        )
        directives = db_directives(options, job_name, output, extra_directives, first=copy_back_notice)
        setup = [cd, *open_files_lines(role)]
        argv = db_argv(options, local, tls, containers.RawShell('"$db_job_dir/data"') if node_local else None)
    elif role in sharding.SHARDED_ROLES:
        directives = db_directives(options, job_name, output, extra_directives)
        setup = [cd, *open_files_lines("db")]
        if role == sharding.ROUTER_ROLE:
            setup += sharding.router_wait_lines(options, job_name)
            argv = sharding.router_argv(options, containers.RawShell('"$configdb"'), tls)
        else:
            index = sharding.shard_index(job_name)
            setup.append(shlex.join(["mkdir", "-p", sharding.member_dbpath(options, role, index)]))
            argv = sharding.member_argv(options, role, index, db_cache_gb(options.db_memory), tls)
    elif role == "worker":
        directives = worker_directives(options, job_name, output, extra_directives)
        setup = [cd, shlex.join(["mkdir", "-p", options.worker_dir]), *open_files_lines(role)]
        argv = worker_argv(options, scheduler_address, job_name, tls, local)
    else:
        raise ValueError(f"role={role!r} is not one of {ROLES}")
    exports = role_environment(
        options, role, cluster_id=cluster_id, scheduler_address=scheduler_address, db_host=db_host, tls=tls
    )
    if role == "worker":
        exports.update(worker_timeout_environment(cluster_size * options.processes))
    wrap = None
    if options.in_container:

        def wrap(command: list[str]) -> list[str]:
            return containers.wrap(
                command,
                container=options.container,
                runtime=options.container_runtime,
                user_binds=options.binds,
                directories=[options.work_dir, options.db_dir, options.log_dir, options.worker_dir],
                env_names=list(exports),
                extra_args=options.container_args,
                gpu=options.gpu,
                cleanenv=options.container_cleanenv,
                # The node-local copy is made on the node: its path is the job's.
                node_binds=['"$db_job_dir"'] if node_local else [],
            )

        container_setup, argv = wrap(argv)
        setup = setup + container_setup
    in_image = wrap and (lambda command: wrap(command)[1])
    after_start, after_exit = [], []
    if role == "db":
        setup = setup + db_storage_lines(options, job_name, in_image)
        after_exit = db_copy_back_lines(options, in_image)
    if role in ("db", sharding.ROUTER_ROLE) and tls is not None and tls.db_server_pem:
        # A sharded cluster's users live on its config server: created through the router, on its node.
        after_start = db_users_lines(options, tls, in_image)
    private_dir = tls.private_dir if tls is not None else None
    watchdog = heartbeat_watchdog(heartbeat, options.orphan_timeout, private_dir) if heartbeat else []
    script = render_job_script(
        role=role,
        cluster_id=cluster_id,
        directives=directives,
        exports=exports,
        prologue=options.job_script_prologue,
        setup=setup,
        argv=argv,
        watchdog=watchdog,
        after_start=after_start,
        after_exit=after_exit,
        umask=cluster_umask(options),
    )
    return script, output


def db_directives(options: ClusterOptions, job_name: str, output: str, extra=(), first=()) -> list:
    """The ``#SBATCH`` lines of a database job (the single database, or a sharded part): never exclusive.

    ``first`` (a notice before the walltime) goes before the user's ``job_extra_directives`` and
    ``db_extra_directives``, ``extra`` (this job's own) after them.
    """
    return build_directives(
        job_name=job_name,
        output=output,
        walltime=options.db_walltime,
        cores=options.db_cores,
        memory=options.db_memory,
        exclusive=False,
        partition=options.db_partition,
        account=options.account,
        qos=options.qos,
        extra=[*first, *options.job_extra_directives, *options.db_extra_directives, *extra],
    )


def worker_directives(options: ClusterOptions, job_name: str, output: str, extra=(), output_codes: str = "j") -> list:
    """The ``#SBATCH`` lines of a worker node's job (or of each task of a job array of them)."""
    return build_directives(
        job_name=job_name,
        output=output,
        walltime=options.walltime,
        cores=options.cores,
        memory=options.memory,
        exclusive=options.exclusive,
        partition=options.partition,
        account=options.account,
        qos=options.qos,
        extra=[*options.job_extra_directives, *extra],
        output_codes=output_codes,
    )


def build_worker_array_script(options: ClusterOptions, cluster_name: str, indices) -> tuple[str, str, str]:
    r"""One job array for the worker nodes ``<cluster_name>-worker-<i>``, ``i`` in ``indices``.

    Task ``i`` of the array runs worker node ``i``'s own job script
    (``<log_dir>/<cluster_name>-worker-<i>.sh``, written beside it and the
    same as a job of its own would run), so every node keeps its script,
    its log and its Dask worker names; the array only brings them to Slurm
    in one submission. Its ``#SBATCH`` lines are a worker node's, with
    ``--array`` and a log per task, ``<cluster_name>-worker-<i>-<array job
    id>_<i>.out``, which is ``<node name>-<task's job id>.out``.

    Returns
    -------
    script : str
    name : str
        The array's job name (``<cluster_name>-workers``).
    output_pattern : str
        The log path with Slurm's ``%a`` (task) and ``%A`` (array job id).

    Examples
    --------
    >>> from mspass_cluster.config import resolve_options
    >>> script, name, output = build_worker_array_script(resolve_options(log_dir="/l", walltime="10"), "c", [3, 4, 7])
    >>> print("\n".join(line for line in script.splitlines() if "--array" in line or line.startswith("exec")))
    #SBATCH --array=3-4,7
    exec bash /l/c-worker-"${SLURM_ARRAY_TASK_ID:?this script runs as a Slurm job array}".sh
    >>> name, output
    ('c-workers', '/l/c-worker-%a-%A_%a.out')
    """
    spec = format_array_indices(indices)
    name = f"{cluster_name}-workers"
    output = os.path.join(options.log_dir, f"{cluster_name}-worker-%a-%A_%a.out")
    directives = worker_directives(options, name, output, [f"--array={spec}"], output_codes="aA")
    umask = cluster_umask(options)
    node_script = shlex.quote(os.path.join(options.log_dir, f"{cluster_name}-worker-"))
    lines = [
        "#!/usr/bin/env bash",
        *directives,
        "#",
        f"# mspass_cluster {__version__}: worker nodes {spec} of cluster {cluster_name}, submitted together as one",
        "# Slurm job array. Task <i> runs worker node <i>'s own job script, beside this one.",
        *([f"umask {umask:03o}"] if umask is not None else []),
        f'exec bash {node_script}"${{SLURM_ARRAY_TASK_ID:?this script runs as a Slurm job array}}".sh',
    ]
    return "\n".join(lines) + "\n", name, output


def build_worker_holder_script(
    options: ClusterOptions, cluster_name: str, indices, heartbeat: str | None = None
) -> tuple[str, str, str]:
    r"""One multi-node job holding the worker nodes ``<cluster_name>-worker-<i>``, ``i`` in ``indices``.

    For ``worker_submission="steps"`` (see
    :mod:`mspass_cluster.backends.steps`): a single queued job however many
    nodes, each node with a worker node's cores and memory. The script only
    holds the nodes; the notebook starts each worker node's own job script in
    it as an ``srun`` step. It ends by itself when the notebook stops
    refreshing ``heartbeat`` for ``orphan_timeout`` seconds, so a crashed
    kernel does not leave the nodes held until walltime.

    Returns
    -------
    script : str
    name : str
        The holder's job name (``<cluster_name>-workers``, as a job array's).
    output_pattern : str
        Its log path, with Slurm's ``%j``.

    Examples
    --------
    >>> from mspass_cluster.config import resolve_options
    >>> script, name, output = build_worker_holder_script(resolve_options(log_dir="/l", walltime="10"), "c", [3, 4, 7])
    >>> print("\n".join(line for line in script.splitlines() if line.startswith(("#SBATCH --n", "#SBATCH --ntasks"))))
    #SBATCH --nodes=3
    #SBATCH --ntasks=3
    #SBATCH --ntasks-per-node=1
    >>> name, output
    ('c-workers', '/l/c-workers-3-7-%j.out')
    """
    indices = list(indices)
    name = f"{cluster_name}-workers"
    output = os.path.join(options.log_dir, f"{name}-{min(indices)}-{max(indices)}-%j.out")
    count = len(indices)
    directives = [
        line
        for line in worker_directives(
            options, name, output, [f"--nodes={count}", f"--ntasks={count}", "--ntasks-per-node=1"]
        )
        if line not in ("#SBATCH --nodes=1", "#SBATCH --ntasks=1")
    ]
    umask = cluster_umask(options)
    limit = options.orphan_timeout
    check = max(1, min(15, limit // 4))
    watch = (
        [
            f"heartbeat={shlex.quote(heartbeat)}",
            "while :; do",
            f"    sleep {check}",
            f"    age={limit}",
            '    stamp=$(date -r "$heartbeat" +%s 2>/dev/null) && age=$(( $(date +%s) - stamp ))',
            f'    if [ "$age" -ge {limit} ]; then',
            '        echo "mspass_cluster: no heartbeat from the notebook for $age s ($heartbeat); '
            'giving the nodes back"',
            "        exit 0",
            "    fi",
            "done",
        ]
        if heartbeat
        else ["while :; do sleep 3600; done"]
    )
    lines = [
        "#!/usr/bin/env bash",
        *directives,
        "#",
        f"# mspass_cluster {__version__}: holds worker nodes {format_array_indices(indices)} of cluster "
        f"{cluster_name} (worker_submission='steps').",
        "# The notebook starts each worker node's own job script, beside this one, as an srun step in",
        "# this job; this script only keeps the nodes, until cancelled or orphaned.",
        *([f"umask {umask:03o}"] if umask is not None else []),
        'echo "mspass_cluster: holding $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST) for worker steps"',
        *watch,
    ]
    return "\n".join(lines) + "\n", name, output


@dataclasses.dataclass(frozen=True)
class ScriptContext:
    """Everything a cluster's job scripts are rendered from, fixed once known (immutable).

    The cluster makes one when its options are final and makes a new one,
    with :meth:`knowing`, when the scheduler's address, then the database's
    host, become known; a script never depends on when it is rendered.
    """

    options: ClusterOptions
    cluster_id: str
    cluster_name: str
    local: bool = False
    heartbeat: str | None = None
    scheduler_address: str = SCHEDULER_PLACEHOLDER
    db_host: str | None = None
    #: The credentials' files (``security``), or None for an open cluster.
    tls: CredentialFiles | None = None
    #: Worker nodes the cluster is being brought to (connect timeouts grow with it beyond 300 processes).
    cluster_size: int = 1

    def knowing(self, **facts) -> "ScriptContext":
        """This context with ``facts`` (``scheduler_address=``, ``db_host=``) added."""
        return dataclasses.replace(self, **facts)

    def render(self, role: str, job_name: str, directives=()) -> tuple[str, str]:
        """The job script of ``role`` named ``job_name`` (with Slurm's extra ``directives``), and its log pattern.

        A node-local database's script depends on the size of ``<db_dir>/data``
        now (the notice before its walltime), measured here.
        """
        node_local = role == "db" and self.options.db_storage == "node-local"
        return build_job_script(
            self.options,
            role,
            cluster_id=self.cluster_id,
            job_name=job_name,
            scheduler_address=self.scheduler_address,
            db_host=self.db_host,
            local=self.local,
            heartbeat=self.heartbeat,
            tls=self.tls,
            extra_directives=directives,
            cluster_size=self.cluster_size,
            db_data_bytes=directory_bytes(os.path.join(self.options.db_dir, "data")) if node_local else 0,
        )


#: The role of ``mspass-cluster lab``'s job (MsPASS's name for the Jupyter process).
FRONTEND = "frontend"


@dataclasses.dataclass(frozen=True)
class FrontendSpec:
    """What the frontend job (JupyterLab on a compute node) is made from; paths are the cluster's.

    ``lab_dir`` gets the job's script, its log and, per job, Jupyter's runtime directory
    ``<lab_dir>/<job_name>-<job id>/`` (0700): ``token`` and Jupyter's own ``jpserver-<pid>.json``
    (address, port, token), both 0600, which ``mspass-cluster lab`` reads through SSH.
    """

    job_name: str
    lab_dir: str
    notebook_dir: str
    python: str = "python3"
    walltime: str = "04:00:00"
    cores: int | None = 2
    memory: str | None = "4GiB"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_directives: tuple = ()
    prologue: tuple = ()
    container: str | None = None
    container_runtime: str = "auto"
    binds: tuple = ()
    container_args: tuple = ()
    umask: int | None = 0o077

    @classmethod
    def from_options(cls, options: ClusterOptions, job_name: str) -> "FrontendSpec":
        """The spec a cluster's options give (``job_script("frontend", ...)``): logs in ``log_dir``."""
        return cls(
            job_name=job_name,
            lab_dir=options.log_dir,
            notebook_dir=options.work_dir,
            python=options.python,
            walltime=options.walltime,
            partition=options.partition,
            account=options.account,
            qos=options.qos,
            extra_directives=tuple(options.job_extra_directives),
            prologue=tuple(options.job_script_prologue),
            container=options.container if options.in_container else None,
            container_runtime=options.container_runtime,
            binds=tuple(options.binds),
            container_args=tuple(options.container_args),
            umask=cluster_umask(options),
        )

    @property
    def script_path(self) -> str:
        return os.path.join(self.lab_dir, f"{self.job_name}.sh")

    @property
    def output_pattern(self) -> str:
        return os.path.join(self.lab_dir, f"{self.job_name}-%j.out")

    def runtime_dir(self, job_id: str) -> str:
        return os.path.join(self.lab_dir, f"{self.job_name}-{job_id}")


#: Jupyter's environment, handed into a container by name.
_JUPYTER_ENV = ["JUPYTER_RUNTIME_DIR", "JUPYTER_TOKEN", "MSPASS_FRONTEND_JOB"]


def frontend_script(spec: FrontendSpec) -> str:
    """The frontend job's script: JupyterLab on the job's node, its token fresh and readable by you alone.

    Jupyter listens on the node's own address (``hostname``), on a port it picks, and
    refuses every request without the token; it writes the address and port it chose to
    its runtime directory, where ``mspass-cluster lab`` finds them.
    """
    directives = build_directives(
        job_name=spec.job_name,
        output=spec.output_pattern,
        walltime=spec.walltime,
        cores=spec.cores,
        memory=spec.memory,
        partition=spec.partition,
        account=spec.account,
        qos=spec.qos,
        extra=list(spec.extra_directives),
    )
    runtime = os.path.join(spec.lab_dir, spec.job_name)
    setup = [
        shlex.join(["cd", spec.notebook_dir]),
        "# Jupyter's runtime directory (0700): its jpserver-<pid>.json gives the address and port it chose.",
        f'export JUPYTER_RUNTIME_DIR={shlex.quote(runtime)}-"${{SLURM_JOB_ID:-$$}}"',
        'mkdir -p -m 0700 "$JUPYTER_RUNTIME_DIR"',
        "# A fresh token for this job alone (never on a command line, where ps would show it).",
        "JUPYTER_TOKEN=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \\n')",
        "export JUPYTER_TOKEN",
        '(umask 077 && printf \'%s\\n\' "$JUPYTER_TOKEN" >"$JUPYTER_RUNTIME_DIR/token")',
        'export MSPASS_FRONTEND_JOB="${SLURM_JOB_ID:-$$}"',
    ]
    argv = [
        spec.python,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        containers.RawShell('--ip="$(hostname)"'),
        "--port=0",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={spec.notebook_dir}",
    ]
    if spec.container:
        container_setup, argv = containers.wrap(
            argv,
            container=spec.container,
            runtime=spec.container_runtime,
            user_binds=list(spec.binds),
            directories=[spec.notebook_dir, spec.lab_dir],
            env_names=_JUPYTER_ENV,
            extra_args=list(spec.container_args),
        )
        setup = setup + container_setup
    return render_job_script(
        role=FRONTEND,
        cluster_id=spec.job_name,
        directives=directives,
        exports={},
        prologue=list(spec.prologue),
        setup=setup,
        argv=argv,
        umask=spec.umask,
    )
