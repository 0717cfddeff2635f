"""``mspass-cluster``: submit a notebook as a batch job; list and cancel your clusters' jobs.

::

    mspass-cluster submit flow.ipynb --nodes 4 --walltime 02:00:00 [--partition P --account A --param k=v] [--dry-run]
    mspass-cluster status
    mspass-cluster down CLUSTER_ID|JOB_ID ... [--yes]
    mspass-cluster down --all [--yes]

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
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .commands import CommandRunner
from .config import _BY_NAME, CHOICES, _from_config, parse_walltime
from .errors import ConfigError, MsPASSClusterError
from .files import write_file
from .notebook import read_notebook
from .slurm import (
    build_sbatch_argv,
    build_scancel_argv,
    build_squeue_mine_argv,
    parse_sbatch_job_id,
    parse_squeue_mine,
)
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
OWN_JOB = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+?)-(?P<cluster>[0-9a-f]{8})-(db|worker-\d+)$|^mspass-nb-")

#: Shortest prefix of a cluster id that ``down`` accepts, so that one stray character cannot select a cluster.
MIN_PREFIX = 4

DESCRIPTION = """\
Run a Jupyter notebook as a Slurm batch job with a MsPASS cluster (MongoDB and
Dask workers) inside its allocation, and list or cancel your clusters' jobs."""

EPILOG = """\
examples:
  mspass-cluster submit flow.ipynb --nodes 5 --walltime 04:00:00 --partition normal --account EAR12345 \\
      --param year=2012 --param "band=(0.5, 5)"
  mspass-cluster submit flow.ipynb --dry-run     print the sbatch script, submit nothing
  mspass-cluster status                          list your clusters' and notebooks' jobs
  mspass-cluster down 3f2a9c01                   cancel cluster 3f2a9c01 (a unique prefix, e.g. 3f2a, will do)
  mspass-cluster down 1234                       cancel job 1234, e.g. a submitted notebook
  mspass-cluster down --all                      cancel all of them (asks first; --yes does not)

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
        print(f"{job_id:>10}  {cluster or '-':8}  {state:10}  {name:40}  {where}")
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
    result = runner.run(build_scancel_argv([j[0] for j in jobs]), check=False)
    if result.returncode != 0:
        return _fail(f"scancel failed (exit code {result.returncode}): {result.stderr.strip()}", 1)
    print(f"Cancelled {len(jobs)} job(s).")
    return 0


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
    return parser


def main(argv=None, runner: CommandRunner | None = None) -> int:
    """Run ``mspass-cluster`` with ``argv``; return the exit status."""
    args = build_parser().parse_args(argv)
    runner = runner or CommandRunner()
    handler = {"submit": _submit, "status": _status, "down": _down}[args.command]
    try:
        return handler(args, runner)
    except MsPASSClusterError as exc:
        print(f"mspass-cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
