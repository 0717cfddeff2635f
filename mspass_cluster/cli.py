"""``mspass-cluster``: submit a notebook as a batch job; list and cancel your clusters' jobs.

::

    mspass-cluster submit flow.ipynb --nodes 4 --walltime 02:00:00 [--partition P --account A --param k=v] [--dry-run]
    mspass-cluster status
    mspass-cluster down CLUSTER_ID|JOB_ID ... [--yes]
    mspass-cluster down --all [--yes]
    mspass-cluster db start --db-dir DIR [--walltime 1-00:00:00 --partition P --account A --db-memory 16GiB]
    mspass-cluster db status [ID]
    mspass-cluster db stop ID
    mspass-cluster lab --via LOGIN [--walltime 04:00:00 --partition P --account A --container IMAGE] [--stop]
    mspass-cluster tunnel --via LOGIN HOST:PORT [--port N]

A submitted notebook runs headless on the allocation's first node; inside
it, ``MsPASSCluster()`` finds the allocation and starts the database and
workers as ``srun`` steps on the job's nodes (no further jobs). The executed
notebook, outputs and tracebacks included, is written beside the input as
``<name>-<job id>.ipynb``, and the job's exit status is the notebook's.

Everything a user types is checked before anything is submitted: the
notebook (and its ``parameters`` cell, when ``--param`` is given), the
walltime, the Slurm names, the work directory and the backend. ``down``
cancels only what it is named: whole clusters by id (or a unique prefix of
one), jobs by Slurm job id, or everything with ``--all``.

``db start`` starts a database on its own, as a long-lived Slurm job that
several notebooks and batch jobs use at once (``MsPASSCluster(database=ID)``);
``db stop`` stops it cleanly (see :mod:`mspass_cluster.standalone_db`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys

from . import sharding, standalone_db
from .backends import choose_backend, finalise_options, open_backend
from .backends.slurm import SlurmBackend
from .commands import CommandRunner
from .config import _BY_NAME, CHOICES, _from_config, parse_walltime, prepare_directories, resolve_options
from .db import ping
from .errors import ConfigError, MsPASSClusterError
from .files import cluster_umask, write_file
from .notebook import read_notebook
from .slurm import (
    build_sbatch_argv,
    build_scancel_argv,
    build_squeue_mine_argv,
    parse_sbatch_job_id,
    parse_squeue_mine,
)
from .status import format_seconds
from .submit import (  # noqa: F401  (render_submit_script and the ENV_ names are part of the CLI's interface)
    ENV_BACKEND,
    ENV_WORK_DIR,
    ONE_NODE_BACKENDS,
    _check_batch_tools,
    _check_directive,
    _check_notebook_path,
    _check_params,
    _check_slurm_name,
    _check_work_dir,
    render_submit_script,
)
from .values import coerce

__all__ = ["main", "render_submit_script"]

#: Job names this package gives: clusters' roles, and submitted notebooks.
OWN_JOB = re.compile(
    r"^(?P<prefix>[A-Za-z0-9_.-]+?)-(?P<cluster>[0-9a-f]{8})-"
    r"(shared-db|db|db-config|db-shard\d+|db-router|worker-\d+|workers|frontend)$|^mspass-nb-"
)

#: Shortest prefix of a cluster id that ``down`` accepts, so that one stray character cannot select a cluster.
MIN_PREFIX = 4

DESCRIPTION = """\
Run a Jupyter notebook as a Slurm batch job with a MsPASS cluster (MongoDB and
Dask workers) inside its allocation, list or cancel your clusters' jobs, and
start one database that many notebooks use."""

EPILOG = """\
examples:
  mspass-cluster submit flow.ipynb --nodes 5 --walltime 04:00:00 --partition normal --account EAR12345 \\
      --param year=2012 --param "band=(0.5, 5)"
  mspass-cluster submit flow.ipynb --dry-run     print the sbatch script, submit nothing
  mspass-cluster status                          list your clusters' and notebooks' jobs
  mspass-cluster down 3f2a9c01                   cancel cluster 3f2a9c01 (a unique prefix, e.g. 3f2a, will do)
  mspass-cluster down 1234                       cancel job 1234, e.g. a submitted notebook
  mspass-cluster down --all                      cancel all of them (asks first; --yes does not)
  mspass-cluster db start --db-dir /scratch/$USER/usarray/db --walltime 2-00:00:00
                                                 one database for many notebooks: prints its ID
  mspass-cluster db status                       your shared databases: state, node, time left, users
  mspass-cluster db stop 1a2b3c4d                stop one cleanly (its data stay in its db dir)
  mspass-cluster lab --via login.cluster.edu --walltime 04:00:00
                                                 from your laptop: JupyterLab on a compute node, through SSH
  mspass-cluster lab --stop --via login.cluster.edu   end it

Run 'mspass-cluster COMMAND --help' for a command's options."""

SUBMIT_DESCRIPTION = """\
Write NOTEBOOK's sbatch script beside it (<name>.sbatch) and submit it. The job
executes the notebook headless on its first node; inside it, MsPASSCluster()
starts the database there and a worker on each other node, as srun steps. The
executed notebook is written beside the input as <name>-<job id>.ipynb, the
log as <name>-<job id>.log; the job's exit status is the notebook's.

The notebook, its parameters and every option are checked first: a mistake is
reported here, before a node is used."""

SUBMIT_EPILOG = """\
examples:
  mspass-cluster submit flow.ipynb --nodes 5 --walltime 04:00:00 --partition normal --account EAR12345
  mspass-cluster submit flow.ipynb --param year=2012 --param "band=(0.5, 5)" --param station=TA
  mspass-cluster submit flow.ipynb --work-dir /scratch/$USER/run1 --directive=--constraint=ib
  mspass-cluster submit flow.ipynb --prologue "module load mongodb" --dry-run"""

DOWN_DESCRIPTION = """\
Cancel the jobs of the clusters named by id (as 'mspass-cluster status' shows
them; a unique prefix will do), or jobs by Slurm job id (a submitted notebook
is one job), or, with --all, every mspass_cluster job of yours, including the
clusters of notebooks that are still running. Asks first, unless --yes."""

DOWN_EPILOG = """\
examples:
  mspass-cluster down 3f2a9c01 --yes
  mspass-cluster down 3f2a 1234
  mspass-cluster down --all"""


DB_DESCRIPTION = """\
One database for many notebooks: start a MongoDB server as a Slurm job of its
own, which clusters use with MsPASSCluster(database=ID) instead of starting
their own, and which outlives them. It runs until 'db stop' or its walltime:
no notebook keeps it alive, and none stops it when it closes."""

DB_START_DESCRIPTION = """\
Submit the database as a Slurm job of its own on DB_DIR (default <work dir>/db),
wait until it answers, and print its ID, job, node and connection string. With
security (the default) it gets its own certificates, in a private directory in
DB_DIR that 'db stop' removes. The ID comes from DB_DIR: started again on the
same directory, the database keeps its ID, and the clusters using it find it.

It runs until 'mspass-cluster db stop ID' or its walltime; then its data stay
in DB_DIR/data."""

DB_START_EPILOG = """\
examples:
  mspass-cluster db start --db-dir /scratch/$USER/usarray/db --walltime 2-00:00:00 --db-memory 32GiB
  mspass-cluster db start --partition normal --account EAR12345 --container ~/mspass/mspass_latest.sif
then, in each notebook:  MsPASSCluster(nodes=4, database="<ID>")
or a batch notebook:     mspass-cluster submit flow.ipynb --database <ID>"""

DB_STOP_DESCRIPTION = """\
Stop a shared database cleanly: SIGTERM only, then wait (up to 5 minutes) for
its server to exit, as a cluster's own database is stopped; then remove its
credentials and its record. Its data stay in DB_DIR/data. Clusters still using
it lose it (they say so at their next call that needs it)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and adds ``(default: ...)`` to options that have one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _fail(message: str, status: int = 2) -> int:
    print(f"mspass-cluster: {message}", file=sys.stderr)
    return status


def _script_mode() -> int | None:
    """Mode of the written ``.sbatch``: 0600, or the umask's when the user's dask config turns ``security`` off."""
    option = _BY_NAME["security"]
    value = _from_config(option)
    return 0o600 if value is None or coerce(option, value) else None


def _submit(args, runner: CommandRunner) -> int:
    if not os.path.isfile(args.notebook):
        return _fail(f"no notebook {args.notebook!r}: give the path of an .ipynb file")
    backend = args.backend
    nodes = args.nodes if args.nodes is not None else (1 if backend in ONE_NODE_BACKENDS else 2)
    if nodes < 1:
        return _fail(f"--nodes {nodes}: give 1 or more (the first runs the database and the notebook)")
    if backend in ONE_NODE_BACKENDS and nodes > 1:
        where = "on the job's first node" if backend == "local" else "in jobs of their own"
        return _fail(
            f"--backend {backend} --nodes {nodes}: with backend {backend!r} the database and workers run {where}, "
            f"so the other {nodes - 1} node(s) would sit idle; use --nodes 1, or --backend allocation to use them"
        )
    try:
        parse_walltime(args.walltime)
        notebook = read_notebook(args.notebook)
        if args.param:
            _check_params(args.notebook, notebook, args.param)
        _check_batch_tools(notebook)
        work_dir = _check_work_dir(args.work_dir) if args.work_dir is not None else None
        if args.database and "://" not in args.database:
            standalone_db.find_record(args.database)  # a typo is reported now, not by the job
        mode = _script_mode()
        script = render_submit_script(
            args.notebook,
            nodes=nodes,
            walltime=args.walltime,
            partition=args.partition,
            account=args.account,
            qos=args.qos,
            extra_directives=args.directive,
            prologue=args.prologue,
            params=args.param,
            work_dir=work_dir,
            backend=backend,
            database=args.database,
        )
    except ImportError as exc:
        return _fail(f"{exc}; submitting notebooks needs: pip install 'mspass-cluster[batch]'")
    except (MsPASSClusterError, ValueError) as exc:
        return _fail(str(exc))
    if args.dry_run:
        print(script, end="")
        return 0
    stem = os.path.splitext(os.path.abspath(args.notebook))[0]
    path = f"{stem}.sbatch"
    write_file(path, script, mode)  # whole, new, never through a symlink: what sbatch reads is what was written
    try:
        result = runner.run(build_sbatch_argv(path), check=False)
    except MsPASSClusterError:
        os.unlink(path)
        raise
    if result.returncode != 0:
        os.unlink(path)  # nothing was queued: leave nothing behind that looks as if it had been
        return _fail(f"Slurm refused the job: {result.stderr.strip() or result.stdout.strip()}", 1)
    try:
        job_id = parse_sbatch_job_id(result.stdout)
    except ValueError:
        return _fail(
            f"sbatch accepted {path} but printed no job id (its output: {result.stdout.strip()!r}); the job may be "
            "queued: see mspass-cluster status, or squeue --me",
            1,
        )
    print(
        f"Submitted {args.notebook} as job {job_id}; log {stem}-{job_id}.log, executed notebook {stem}-{job_id}.ipynb"
    )
    return 0


def _own_jobs(runner: CommandRunner) -> list[tuple[str, str, str, str, str]]:
    """``(job id, name, state, nodes or reason, cluster id or "")`` of this user's mspass_cluster jobs."""
    jobs = []
    for job in parse_squeue_mine(runner.run(build_squeue_mine_argv()).stdout):
        match = OWN_JOB.match(job.name)
        if match:
            where = job.nodes or f"({job.reason})"
            jobs.append((job.job_id, job.name, job.state.value, where, match.group("cluster") or ""))
    return jobs


def _status(args, runner: CommandRunner) -> int:
    jobs = _own_jobs(runner)
    if not jobs:
        print("No mspass_cluster jobs of yours in the queue.")
        return 0
    print(f"{'JOBID':>10}  {'CLUSTER':8}  {'STATE':10}  {'NAME':40}  NODES/REASON")
    for job_id, name, state, where, cluster in jobs:
        part = sharding.part_label(name)  # a sharded database's router, config server or shard <i>
        print(f"{job_id:>10}  {cluster or '-':8}  {state:10}  {name:40}  {where}" + (f"  ({part})" if part else ""))
    shared = sorted({cluster for _, name, _, _, cluster in jobs if name.endswith(standalone_db.SHARED_SUFFIX)})
    if shared:
        print(
            f"Shared databases ({', '.join(shared)}; *-shared-db) run until `mspass-cluster db stop ID` or their "
            "walltime, whoever uses them: `mspass-cluster db status` shows who does."
        )
    return 0


def _describe(jobs) -> str:
    clusters = sorted({j[4] for j in jobs if j[4]})
    others = [f"{j[0]} ({j[1]})" for j in jobs if not j[4]]
    parts = []
    if clusters:
        parts.append(f"clusters {', '.join(clusters)}")
    if others:
        parts.append(f"jobs {', '.join(others)}")
    return "; ".join(parts) or "none: you have no mspass_cluster jobs in the queue"


def select_jobs(jobs, wanted) -> list:
    """The jobs of ``jobs`` (as :func:`_own_jobs` lists them) that the ids in ``wanted`` name.

    Each id is a cluster id, a unique prefix of one, or a Slurm job id;
    exact matches win over prefixes.

    Raises
    ------
    ConfigError
        For an id that names nothing (the message lists the known ids) or
        more than one cluster or job (it lists the candidates).
    """
    clusters = sorted({j[4] for j in jobs if j[4]})
    chosen = []
    for token in wanted:
        key = token.strip().lower()
        exact = [("cluster", c) for c in clusters if c == key] + [("job", j[0]) for j in jobs if j[0] == key]
        prefixes = [("cluster", c) for c in clusters if len(key) >= MIN_PREFIX and c.startswith(key)]
        targets = exact or prefixes
        if not targets:
            raise ConfigError(
                f"{token!r} is not the id of a cluster or job of yours (ids are matched whole, or by a prefix of "
                f"at least {MIN_PREFIX} characters of a cluster id). Yours: {_describe(jobs)}. "
                "See mspass-cluster status."
            )
        if len(targets) > 1:
            raise ConfigError(
                f"{token!r} is ambiguous: it could be {', '.join(f'{kind} {value}' for kind, value in targets)}; "
                "give more of the id."
            )
        kind, value = targets[0]
        chosen += [j for j in jobs if (j[4] if kind == "cluster" else j[0]) == value and j not in chosen]
    return chosen


def _down(args, runner: CommandRunner) -> int:
    if args.all and args.cluster:
        return _fail(f"give cluster or job ids ({' '.join(args.cluster)}) or --all, not both")
    if not args.all and not args.cluster:
        return _fail(
            "say what to cancel: cluster ids or job ids (see mspass-cluster status), e.g. mspass-cluster down "
            "3f2a9c01, or --all for every mspass_cluster job of yours, the clusters of running notebooks included"
        )
    jobs = _own_jobs(runner)
    if args.cluster:
        try:
            jobs = select_jobs(jobs, args.cluster)
        except ConfigError as exc:
            return _fail(str(exc))
    if not jobs:
        print("Nothing to cancel: you have no mspass_cluster jobs in the queue.")
        return 0
    for job_id, name, state, _, _ in jobs:
        print(f"{job_id:>10}  {state:10}  {name}")
    if not args.yes:
        try:
            answer = input(f"Cancel these {len(jobs)} job(s)? [y/N] ")
        except EOFError:
            return _fail(
                "no answer (input is not a terminal); nothing cancelled. Add --yes to cancel without asking", 1
            )
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing cancelled.")
            return 1
    shared = [j for j in jobs if j[1].endswith(standalone_db.SHARED_SUFFIX)]
    others = [j for j in jobs if j not in shared]
    status = 0
    for job_id, _, _, _, ident in shared:
        # A database is stopped cleanly (SIGTERM, its server's exit awaited), never killed at KillWait.
        record = standalone_db.read_record(ident)
        if record is not None and record.job_id == job_id:
            status = max(status, _stop_shared(record, runner))
        else:
            runner.run(build_scancel_argv([job_id], "TERM"), check=False)
            print(f"Sent SIGTERM to shared database job {job_id} (no record of it here): its server stops cleanly.")
    if others:
        result = runner.run(build_scancel_argv([j[0] for j in others]), check=False)
        if result.returncode != 0:
            return _fail(f"scancel failed (exit code {result.returncode}): {result.stderr.strip()}", 1)
        print(f"Cancelled {len(others)} job(s).")
    return status


# ------------------------------------------------------------------ one database, many notebooks
def _db_start(args, runner: CommandRunner) -> int:
    try:
        for flag, value in (("--partition", args.partition), ("--account", args.account), ("--qos", args.qos)):
            _check_slurm_name(flag, value)
        for directive in args.directive:
            _check_directive(directive)
        if args.walltime is not None:
            parse_walltime(args.walltime)
        work_dir = _check_work_dir(args.work_dir) if args.work_dir is not None else None
        options = resolve_options(
            backend="slurm",
            work_dir=work_dir,
            db_dir=os.path.abspath(os.path.expanduser(args.db_dir)) if args.db_dir else None,
            partition=args.partition,
            account=args.account,
            qos=args.qos,
            db_walltime=args.walltime,
            db_memory=args.db_memory,
            db_cores=args.db_cores,
            db_port=args.db_port,
            container=args.container,
            db_extra_directives=args.directive or None,
            job_script_prologue=args.prologue or None,
        )
        choose_backend("slurm")
        backend = open_backend("slurm", runner, cluster_umask(options))
        options = finalise_options(options, "slurm", backend)
        prepare_directories(options)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    ident = standalone_db.database_id(options.db_dir)
    print(
        f"Starting shared database {ident} on {options.db_dir} (job {options.job_name}-{ident}-shared-db)...",
        flush=True,
    )
    try:
        record = asyncio.run(standalone_db.start_database(options, backend, say=lambda line: print(line, flush=True)))
    except ConfigError as exc:  # its directory is in use: nothing was submitted
        return _fail(str(exc))
    print(_started_text(record))
    return 0


def _started_text(record) -> str:
    secured = (
        f"TLS with its own certificates (x.509), in {record.private_dir} (0700, yours alone; removed by db stop)"
        if record.private_dir
        else "no TLS, no authentication (security is off in your dask config): any user can reach it"
    )
    return "\n".join(
        [
            f"Shared database {record.id} is ready: job {record.job_id} on {record.host}, {record.address}",
            f"  connection string  {record.uri}",
            f"  data               {record.data_path}",
            f"  security           {secured}",
            f"  log                {record.log_path}",
            "Use it from any notebook or batch notebook of yours; they start no database of their own and leave",
            "this one running when they close:",
            f'  MsPASSCluster(nodes=4, database="{record.id}")',
            f"  mspass-cluster submit flow.ipynb --database {record.id}",
            f"  mspass-cluster db status {record.id}     state, node, time left, who uses it",
            f"  mspass-cluster db stop {record.id}       stop it cleanly",
            f"It runs until `mspass-cluster db stop {record.id}` or its walltime ({record.walltime}), whoever uses it:",
            "no notebook keeps it alive and none stops it, so stop it when you are done, or it holds its node until",
            f"then. Its data stay in {record.data_path}; `mspass-cluster db start --db-dir {record.db_dir}` starts",
            "it again, with the same id.",
        ]
    )


def _state_of(record, status) -> str:
    """``ready``, ``running, not answering (...)``, ``pending (Priority)``, ``ended (TIMEOUT)``."""
    if status is None or status.state.kind == "ended":
        state = status.state.value if status is not None else "unknown"
        return f"ended ({state}): `mspass-cluster db stop {record.id}` removes its record and credentials"
    if status.state.kind == "pending":
        return f"pending ({status.reason or status.state.value})"
    answer = ping(record.uri, 1.0, record.data_path) if record.uri else "it never answered"
    return "ready" if answer is None else f"running, not answering ({answer})"


def _db_status(args, runner: CommandRunner) -> int:
    try:
        records = [standalone_db.find_record(args.id)] if args.id else standalone_db.all_records()
    except ConfigError as exc:
        return _fail(str(exc))
    if not records:
        print("No shared databases of yours. Start one with: mspass-cluster db start --db-dir DIR")
        return 0
    statuses = asyncio.run(standalone_db.job_statuses(SlurmBackend(runner), records))
    for record in records:
        status = statuses.get(record.job_id)
        left = status.time_left if status is not None and status.state.kind == "running" else None
        print(f"{record.id}  {_state_of(record, status)}")
        print(f"  job        {record.job_id} ({record.name}) on {(status and status.nodes) or record.host or '-'}")
        print(f"  time left  {format_seconds(left)} (walltime {record.walltime})")
        print(f"  address    {record.address or '-'}")
        print(f"  data       {record.data_path}")
        print(f"  used by    {standalone_db.describe_users(record.id)}")
        if args.id:
            print(f"  connection string  {record.uri or '-'}")
            print(f"  log        {record.log_path}")
    return 0


def _db_stop(args, runner: CommandRunner) -> int:
    try:
        record = standalone_db.find_record(args.id)
    except ConfigError as exc:
        return _fail(str(exc))
    return _stop_shared(record, runner)


def _stop_shared(record, runner: CommandRunner) -> int:
    users = standalone_db.live_users(record.id)
    if users:
        print(
            f"Shared database {record.id} is used by {standalone_db.describe_users(record.id)}; they lose it now "
            "(their next call that needs it says so)."
        )
    print(f"Stopping shared database {record.id} (job {record.job_id}) with SIGTERM; waiting for its server to exit...")
    status = asyncio.run(standalone_db.stop_database(record, SlurmBackend(runner), say=print))
    where = f"Its data stay in {record.data_path}; `mspass-cluster db start --db-dir {record.db_dir}` starts it again."
    if status == 0:
        print(f"Shared database {record.id} stopped cleanly (job {record.job_id}, server exit status 0). {where}")
        return 0
    if status is None:
        print(f"Shared database {record.id} was not running (job {record.job_id}); removed its record. {where}")
        return 0
    print(f"Shared database {record.id} ended with server exit status {status}; see {record.log_path}. {where}")
    return 1


# ------------------------------------------------------------------ from a laptop
LAB_DESCRIPTION = """\
From your laptop, in one command: log in to the cluster's login node with SSH
(your keys, agent, ~/.ssh/config aliases and ProxyJump, strict known_hosts),
submit a job that runs JupyterLab on a compute node (in the MsPASS container
with --container) with a fresh token only you can read, wait until Jupyter
answers, forward 127.0.0.1:PORT on this machine to it through the login node,
and print the URL. The tunnel stays up and reconnects by itself; Ctrl-C closes
the tunnel only, and running 'lab' again reconnects to the same job. In the
notebook, MsPASSCluster(nodes=4) starts the database and workers as usual.
'lab --stop' (or 'down' on the cluster) ends the job."""

LAB_EPILOG = """\
examples:
  mspass-cluster lab --via login.cluster.edu --walltime 04:00:00 --partition normal --account EAR12345
  mspass-cluster lab --via me@gateway,login --container ~/mspass/mspass_latest.sif --python python3
  mspass-cluster lab --via login --stop
  mspass-cluster lab --dry-run --partition normal      print the job's script, connect nowhere"""

TUNNEL_DESCRIPTION = """\
Forward 127.0.0.1:PORT on this machine to HOST:PORT as the login node reaches
it (a cluster's scheduler dashboard, a database, any service on a compute node),
through SSH, until Ctrl-C; it reconnects by itself when the connection drops.
Only you can use it: it listens on loopback, never on other interfaces."""


def _lab_request(args):
    from .lab import LabRequest

    for flag, value in (("--partition", args.partition), ("--account", args.account), ("--qos", args.qos)):
        _check_slurm_name(flag, value)
    for directive in args.directive:
        _check_directive(directive)
    parse_walltime(args.walltime)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give 1 to 65535, or 0 for any free port")
    if args.memory is not None:
        coerce(_BY_NAME["memory"], args.memory)
    return LabRequest(
        via=args.via or "",
        port=args.port,
        python=args.python,
        walltime=args.walltime,
        cores=args.cores,
        memory=args.memory,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        container=args.container,
        work_dir=args.work_dir,
        prologue=tuple(args.prologue),
        directives=tuple(args.directive),
        startup_timeout=args.startup_timeout,
        new=args.new,
    )


def _lab(args, runner: CommandRunner) -> int:
    from .lab import run_lab, stop_lab
    from .roles import FrontendSpec, frontend_script

    try:
        request = _lab_request(args)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    if args.dry_run:
        home = "/home/<you>"
        spec = FrontendSpec(
            job_name=f"{request.job_name}-<id>-frontend",
            lab_dir=f"{home}/.mspass_cluster/lab",
            notebook_dir=request.work_dir or home,
            python=request.python,
            walltime=request.walltime,
            cores=request.cores,
            memory=request.memory,
            partition=request.partition,
            account=request.account,
            qos=request.qos,
            extra_directives=request.directives,
            prologue=request.prologue,
            container=request.container,
        )
        print(frontend_script(spec), end="")
        return 0
    if not args.via:
        return _fail("--via: give the login node, e.g. --via login.cluster.edu (or an alias of your ~/.ssh/config)")
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        return _fail("mspass-cluster lab needs asyncssh on this machine: pip install 'mspass-cluster[lab]'")
    opened = None
    if args.open:
        import webbrowser

        opened = webbrowser.open
    if args.stop:
        return asyncio.run(stop_lab(request))
    return asyncio.run(run_lab(request, opened=opened))


def _tunnel(args, runner: CommandRunner) -> int:
    from .tunnel import Tunnel

    host, _, port = args.destination.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return _fail(f"{args.destination!r} is not HOST:PORT; give e.g. n12:8787 (as the login node names it)")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port {args.port}: give 1 to 65535, or 0 for any free port")

    async def forward() -> int:
        tunnel = Tunnel(args.via, say=print)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            local = await tunnel.forward((host, int(port)), args.port or 0)
            await tunnel.connect()
            print(f"127.0.0.1:{local} -> {host}:{port} through {args.via}; Ctrl-C closes it.", flush=True)
            await stop.wait()
            print("Tunnel closed.")
            return 0
        finally:
            await tunnel.close()

    return asyncio.run(forward())


def _db(args, runner: CommandRunner) -> int:
    return {"start": _db_start, "status": _db_status, "stop": _db_stop}[args.db_command](args, runner)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``mspass-cluster``."""
    parser = argparse.ArgumentParser(
        prog="mspass-cluster", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    submit = commands.add_parser(
        "submit",
        help="run a notebook as a batch job",
        description=SUBMIT_DESCRIPTION,
        epilog=SUBMIT_EPILOG,
        formatter_class=_HelpFormatter,
    )
    submit.add_argument("notebook", metavar="NOTEBOOK", help="the .ipynb file to run")
    submit.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="nodes of the job: the first runs the database and the notebook, each other one a "
        "worker node (default: 2; 1 with --backend local or slurm)",
    )
    submit.add_argument(
        "--walltime",
        default="01:00:00",
        metavar="TIME",
        help="time limit of the job, in Slurm's formats: MM, HH:MM:SS, D-HH:MM",
    )
    submit.add_argument("--partition", metavar="NAME", help="Slurm partition (default: Slurm's default partition)")
    submit.add_argument("--account", metavar="NAME", help="Slurm account charged (default: your default account)")
    submit.add_argument("--qos", metavar="NAME", help="Slurm quality of service (default: the account's default)")
    submit.add_argument(
        "--directive",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra sbatch option, repeatable, e.g. --directive=--constraint=ib",
    )
    submit.add_argument(
        "--prologue",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the notebook, repeatable, e.g. --prologue 'module load mongodb'",
    )
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="notebook parameter, repeatable: a Python literal, else a string; NAME must be "
        "assigned in the notebook's cell tagged 'parameters'",
    )
    submit.add_argument(
        "--work-dir",
        metavar="DIR",
        help="the cluster's run directory, on a file system all nodes share; overrides work-dir "
        "in your dask config (default: the config's, else $MSPASS_WORK_DIR, else the notebook's directory)",
    )
    submit.add_argument(
        "--backend",
        choices=CHOICES["backend"],
        default="allocation",
        help="where the notebook's cluster runs its database and workers (overrides backend in "
        "your dask config): allocation, the job's own nodes; slurm, jobs of their own; "
        "local, processes on the job's node",
    )
    submit.add_argument(
        "--database",
        metavar="ID",
        help="the shared database (mspass-cluster db start) the notebook's MsPASSCluster() uses instead of starting "
        "one: its id, or a mongodb:// connection string (overrides database in your dask config)",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    commands.add_parser(
        "status",
        help="list your mspass_cluster jobs",
        formatter_class=_HelpFormatter,
        description="List your mspass_cluster jobs: clusters' database and worker jobs, and submitted notebooks.",
    )
    down = commands.add_parser(
        "down",
        help="cancel clusters or jobs by id, or --all",
        description=DOWN_DESCRIPTION,
        epilog=DOWN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    down.add_argument("cluster", nargs="*", metavar="ID", help="a cluster id (or a unique prefix) or a job id")
    down.add_argument("--all", action="store_true", help="cancel every mspass_cluster job of yours")
    down.add_argument("--yes", action="store_true", help="do not ask")
    db = commands.add_parser(
        "db",
        help="one database for many notebooks: db start, db status, db stop",
        description=DB_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    start = db_commands.add_parser(
        "start",
        help="start a shared database as a Slurm job of its own",
        description=DB_START_DESCRIPTION,
        epilog=DB_START_EPILOG,
        formatter_class=_HelpFormatter,
    )
    start.add_argument(
        "--work-dir",
        metavar="DIR",
        help="directory on a file system all nodes share; its logs/ get the job's script and log (default: the "
        "config's work-dir, else $MSPASS_WORK_DIR, else the current directory)",
    )
    start.add_argument("--db-dir", metavar="DIR", help="the database's directory (default: <work dir>/db)")
    start.add_argument("--partition", metavar="NAME", help="Slurm partition (default: Slurm's default partition)")
    start.add_argument("--account", metavar="NAME", help="Slurm account charged (default: your default account)")
    start.add_argument("--qos", metavar="NAME", help="Slurm quality of service (default: the account's default)")
    start.add_argument(
        "--walltime",
        "--db-walltime",
        metavar="TIME",
        help="time limit of the database's job, in Slurm's formats (MM, HH:MM:SS, D-HH:MM): it stops then "
        "(default: db-walltime, else walltime, of your dask config, else 01:00:00)",
    )
    start.add_argument("--db-memory", metavar="SIZE", help="memory of the database's job, e.g. 16GiB (default: 2GiB)")
    start.add_argument("--db-cores", type=int, metavar="N", help="cores of the database's job (default: 1)")
    start.add_argument("--db-port", type=int, metavar="PORT", help="the database's port (default: 27017)")
    start.add_argument("--container", metavar="IMAGE", help="Apptainer/Singularity image that runs mongod")
    start.add_argument(
        "--directive",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra sbatch option for the database's job, repeatable, e.g. --directive=--constraint=ssd",
    )
    start.add_argument(
        "--prologue",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run first in the job, repeatable, e.g. --prologue 'module load mongodb'",
    )
    status = db_commands.add_parser(
        "status",
        help="your shared databases: state, node, job, time left, who uses them",
        description="Show your shared databases (or the one named): state, node, job, time left, address, "
        "data, and the running clusters that use it.",
        formatter_class=_HelpFormatter,
    )
    status.add_argument("id", nargs="?", metavar="ID", help="a database id (or a unique prefix); default: all")
    stop = db_commands.add_parser(
        "stop",
        help="stop a shared database cleanly",
        description=DB_STOP_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    stop.add_argument("id", metavar="ID", help="the database's id (or a unique prefix), as db status shows it")
    lab = commands.add_parser(
        "lab",
        help="from your laptop: JupyterLab on a compute node, through SSH",
        description=LAB_DESCRIPTION,
        epilog=LAB_EPILOG,
        formatter_class=_HelpFormatter,
    )
    lab.add_argument(
        "--via",
        metavar="LOGIN",
        help="the login node: [user@]host[:port], an alias of your ~/.ssh/config, or jump hosts first: gateway,login",
    )
    lab.add_argument("--port", type=int, default=8899, metavar="N", help="local port on 127.0.0.1 (0: any free one)")
    lab.add_argument("--walltime", default="04:00:00", metavar="TIME", help="time limit of the Jupyter job")
    lab.add_argument("--partition", metavar="NAME", help="Slurm partition (default: Slurm's default partition)")
    lab.add_argument("--account", metavar="NAME", help="Slurm account charged (default: your default account)")
    lab.add_argument("--qos", metavar="NAME", help="Slurm quality of service (default: the account's default)")
    lab.add_argument("--cores", type=int, default=2, metavar="N", help="cores of the Jupyter job")
    lab.add_argument("--memory", default="4GiB", metavar="SIZE", help="memory of the Jupyter job")
    lab.add_argument(
        "--container", metavar="IMAGE", help="run Jupyter in this Apptainer/Singularity image (its path on the cluster)"
    )
    lab.add_argument(
        "--python",
        default="python3",
        metavar="PATH",
        help="the Python with JupyterLab and mspass_cluster on the compute node (or in the image)",
    )
    lab.add_argument(
        "--work-dir", metavar="DIR", help="Jupyter's root directory on the cluster (default: your home there)"
    )
    lab.add_argument(
        "--prologue",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run first, on the login node and in the job, repeatable, e.g. --prologue 'module load slurm'",
    )
    lab.add_argument(
        "--directive", action="append", default=[], metavar="OPTION", help="extra sbatch option, repeatable"
    )
    lab.add_argument(
        "--startup-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="how long to wait for Jupyter, queue time included; then the job is cancelled",
    )
    lab.add_argument("--new", action="store_true", help="submit a new job even when one of yours runs")
    lab.add_argument("--open", action="store_true", help="open the URL in this machine's browser")
    lab.add_argument("--stop", action="store_true", help="end your Jupyter job(s) on the login node's cluster")
    lab.add_argument("--dry-run", action="store_true", help="print the Jupyter job's script; connect nowhere")
    tunnel = commands.add_parser(
        "tunnel",
        help="forward a local port to HOST:PORT behind the login node",
        description=TUNNEL_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    tunnel.add_argument("destination", metavar="HOST:PORT", help="as the login node reaches it, e.g. n12:8787")
    tunnel.add_argument("--via", required=True, metavar="LOGIN", help="the login node, as for lab")
    tunnel.add_argument("--port", type=int, default=0, metavar="N", help="local port on 127.0.0.1 (0: any free one)")
    return parser


def main(argv=None, runner: CommandRunner | None = None) -> int:
    """Run ``mspass-cluster`` with ``argv``; return the exit status."""
    args = build_parser().parse_args(argv)
    runner = runner or CommandRunner()
    handler = {"submit": _submit, "status": _status, "down": _down, "db": _db, "lab": _lab, "tunnel": _tunnel}[
        args.command
    ]
    try:
        return handler(args, runner)
    except MsPASSClusterError as exc:
        print(f"mspass-cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
