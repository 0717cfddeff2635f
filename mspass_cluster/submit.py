"""What ``mspass-cluster submit`` checks and writes: the batch script that runs a notebook headless (pure checks).

Everything a user types is checked before anything is submitted: the
notebook (readable, valid, its kernel installed, and its ``parameters``
cell when ``--param`` is given), the Slurm names, the directives, the work
directory and the backend; nothing typed can add a line to the script.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
import tempfile

from .config import CONFIG_SECTION
from .errors import ConfigError
from .notebook import parameter_names, parse_params
from .slurm import build_batch_directives, directive_option
from .values import check_text

__all__ = ["render_submit_script", "ENV_WORK_DIR", "ENV_BACKEND", "ENV_DATABASE", "ONE_NODE_BACKENDS"]

#: The variables that carry ``--work-dir`` and ``--backend`` into the notebook's ``MsPASSCluster``: dask
#: reads ``DASK_*`` variables over its YAML files, so they override the user's ``mspass_cluster.yaml``.
ENV_WORK_DIR = f"DASK_{CONFIG_SECTION.upper()}__WORK_DIR"
ENV_BACKEND = f"DASK_{CONFIG_SECTION.upper()}__BACKEND"
#: ... and ``--database``, the shared database (``mspass-cluster db start``) the notebook's cluster uses.
ENV_DATABASE = f"DASK_{CONFIG_SECTION.upper()}__DATABASE"

#: Backends that start no processes on the job's other nodes: a batch job for them needs one node.
ONE_NODE_BACKENDS = ("local", "slurm")


def _check_slurm_name(flag: str, value) -> None:
    """A partition, account or QOS name: one word, as Slurm names are."""
    if value is None:
        return
    if not value or re.search(r"\s", value) or '"' in value:
        raise ConfigError(
            f"{flag} {value!r}: Slurm names have no spaces, newlines or quotes; give one name, e.g. {flag} normal "
            "(sinfo lists partitions, sacctmgr show assoc user=$USER your accounts and QOS)."
        )
    check_text(flag, value)


#: sbatch options that ``submit`` sets itself, long and short, and what to give instead.
OWN_DIRECTIVES = {
    "--nodes": "--nodes",
    "-N": "--nodes",
    "--time": "--walltime",
    "-t": "--walltime",
    "--partition": "--partition",
    "-p": "--partition",
    "--account": "--account",
    "-A": "--account",
    "--qos": "--qos",
    "-q": "--qos",
    "--job-name": None,
    "-J": None,
    "--output": None,
    "-o": None,
    "--ntasks-per-node": None,
}


def _check_directive(value: str) -> None:
    if not value.startswith("-") or "\n" in value or "\r" in value:
        raise ConfigError(
            f"--directive {value!r} is not one sbatch option on one line; give it as sbatch takes it, "
            "e.g. --directive=--constraint=ib."
        )
    check_text("--directive", value)
    option = directive_option(value)
    if option in OWN_DIRECTIVES:
        instead = OWN_DIRECTIVES[option]
        fix = f"use {instead} instead" if instead else "leave it out: submit sets the job's name, log and tasks"
        raise ConfigError(f"--directive {value!r} sets {option}, which would contradict the script's own; {fix}.")


def _check_notebook_path(path: str) -> None:
    check_text("notebook path", path)
    if "\\" in path:
        raise ConfigError(
            f"notebook path {path!r} holds a backslash: Slurm takes it as an escape in the job's --output path "
            "(the log beside the notebook) and the log is lost; rename the notebook or its directory."
        )


def render_submit_script(
    notebook: str,
    *,
    nodes: int,
    walltime: str,
    partition=None,
    account=None,
    qos=None,
    extra_directives=(),
    prologue=(),
    params=(),
    python=None,
    work_dir=None,
    backend="allocation",
    database=None,
) -> str:
    """The sbatch script that runs ``notebook`` headless on ``nodes`` nodes (pure).

    Parameters
    ----------
    notebook : str
        The notebook; the log and the executed notebook are written beside it.
    nodes : int
        Nodes of the job: the first runs the notebook and the database, the others workers.
    walltime : str
        Slurm time limit of the job.
    partition, account, qos : str, optional
        Slurm names; one word each.
    extra_directives : sequence of str
        More ``#SBATCH`` options, each one sbatch option such as ``--constraint=ib``.
    prologue : sequence of str
        Shell lines run before the notebook, e.g. ``module load mongodb``.
    params : sequence of str
        ``name=value`` parameters for the notebook.
    python : str, optional
        The Python that runs the notebook (default: this one).
    work_dir : str, optional
        The cluster's run directory, exported as ``DASK_MSPASS_CLUSTER__WORK_DIR``.
    backend : str, optional
        The cluster's backend, exported as ``DASK_MSPASS_CLUSTER__BACKEND`` (default
        ``allocation``: the job's own nodes; None exports nothing).
    database : str, optional
        A shared database's id (or connection string) for the notebook's
        cluster, exported as ``DASK_MSPASS_CLUSTER__DATABASE``.

    Returns
    -------
    str
        The script. Every value is quoted for the shell; none can add a line.

    Raises
    ------
    ConfigError
        For a value that would break out of its line or hide what runs: a
        control character (a line break, NUL, ...; a tab only in prologue
        lines) in any value, a space in a Slurm name, a backslash in the
        notebook path.
    """
    _check_notebook_path(notebook)
    for flag, value in (("--partition", partition), ("--account", account), ("--qos", qos)):
        _check_slurm_name(flag, value)
    for directive in extra_directives:
        _check_directive(directive)
    for line in prologue:
        check_text("--prologue", line, tab=True)
    for flag, value in (("--param", item) for item in params):
        check_text(flag, value)
    for flag, value in (
        ("--work-dir", work_dir),
        ("python", python),
        ("--walltime", str(walltime).strip()),
        ("--database", database),
    ):
        if value is not None:
            check_text(flag, value)
    notebook = os.path.abspath(notebook)
    directory, name = os.path.split(notebook)
    stem = os.path.splitext(name)[0]
    directives = build_batch_directives(
        job_name=f"mspass-nb-{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}",
        output=os.path.join(directory, stem) + "-%j.log",
        nodes=nodes,
        walltime=str(walltime).strip(),
        partition=partition,
        account=account,
        qos=qos,
        extra=extra_directives,
    )
    runner = [python or sys.executable, "-m", "mspass_cluster.notebook", notebook]
    for item in params:
        runner += ["--param", item]
    exports = [
        shlex.join(["export", f"{variable}={value}"])
        for variable, value in (
            (ENV_WORK_DIR, work_dir),
            (ENV_BACKEND, backend),
            # Quoted as a Python string: dask reads DASK_* values as literals, and an id may be all digits.
            (ENV_DATABASE, database and repr(database)),
        )
        if value
    ]
    lines = [
        "#!/usr/bin/env bash",
        *directives,
        "# Generated by mspass-cluster submit: runs the notebook headless; inside it, MsPASSCluster()",
        "# starts the database and workers as srun steps on this job's nodes. The executed notebook",
        f"# is written to {os.path.join(directory, stem)}-<job id>.ipynb; the job's exit status is the notebook's.",
        "set -u",
        *exports,
        *prologue,
        shlex.join(["cd", directory]),
        "exec " + shlex.join(runner),
        "",
    ]
    return "\n".join(lines)


def _check_work_dir(value: str) -> str:
    """``value`` as an absolute path, if it is, or can be made, a writable directory."""
    path = os.path.abspath(os.path.expanduser(value))
    check_text("--work-dir", path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"--work-dir {value!r}: {existing!r} is a file, not a directory; choose a directory on a file system "
            "all nodes share, e.g. --work-dir $SCRATCH/mspass."
        )
    try:  # a real write, not os.access: read-only mounts and root's view of /proc answer access() wrongly
        os.rmdir(tempfile.mkdtemp(prefix=".mspass-cluster-write-test-", dir=existing))
    except OSError as exc:
        what = "is not writable" if existing == path else f"cannot be created in {existing!r}"
        raise ConfigError(
            f"--work-dir {value!r} {what}: {exc.strerror or exc}. Choose a directory you can write, on a file "
            "system all nodes share, e.g. --work-dir $SCRATCH/mspass."
        ) from exc
    return path


def _check_batch_tools(notebook) -> None:
    """The job runs the notebook with this Python: it needs nbclient and the notebook's kernel."""
    missing = [m for m in ("nbclient", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not installed in {sys.executable}, which the job runs the notebook with; "
            "install them with: pip install 'mspass-cluster[batch]'."
        )
    kernel = notebook.metadata.get("kernelspec", {}).get("name", "python3")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec(kernel)
    except NoSuchKernel:
        known = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise ConfigError(
            f"the notebook asks for the Jupyter kernel {kernel!r}, which is not installed here (kernels: {known}). "
            f"Install it (python -m ipykernel install --user --name {kernel}) or choose another kernel in Jupyter "
            "(Kernel > Change kernel) and save the notebook."
        ) from None


def _check_params(path: str, notebook, items: list[str]) -> None:
    params = parse_params(items)
    names = [item.partition("=")[0] for item in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--param {', '.join(repeated)} given more than once; give each parameter once.")
    assigned = parameter_names(notebook)
    if assigned is None:
        raise ConfigError(
            f"--param given but {path!r} has no cell tagged 'parameters', so the notebook would not use them. "
            "In Jupyter, put the defaults (e.g. year = 2012) in one cell and give it the tag 'parameters' "
            "(View > Cell Toolbar > Tags, or the cell's property inspector)."
        )
    unknown = [n for n in params if n not in assigned]
    if unknown:
        raise ConfigError(
            f"--param {', '.join(unknown)}: not assigned in the 'parameters' cell of {path!r}, which assigns "
            f"{', '.join(assigned) or 'nothing'}. Check the spelling, or add a default for it to that cell."
        )
