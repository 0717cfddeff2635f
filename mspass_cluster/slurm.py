"""Slurm, as data: directives, command lines and the parsers of their output.

Nothing here runs a command (:mod:`mspass_cluster.backends.slurm` does);
the job-state table and the words of a Slurm that does not answer are in
:mod:`mspass_cluster.slurm_states`.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from dataclasses import dataclass

from dask.utils import parse_bytes

from .slurm_states import JobState, JobStatus, controller_unreachable, parse_time_left


def _import_without_the_sigint_takeover():
    """dask-jobqueue's Slurm memory formatting, imported without its side effect on Ctrl-C.

    Importing dask-jobqueue 0.9.0 replaces the SIGINT handler with ``sys.exit()``
    (dask/dask-jobqueue#696, fixed after that release): Ctrl-C, or Jupyter's
    interrupt button, would then end a waiting ``MsPASSCluster(...)`` with
    ``SystemExit`` and exit status 0 instead of ``KeyboardInterrupt``. The
    handler in place before the import (Python's own, or the kernel's) is put back.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    from dask_jobqueue.slurm import slurm_format_bytes_ceil

    def taken_over(handler) -> bool:
        return getattr(handler, "__module__", "") == "dask_jobqueue.runner"

    if main_thread and taken_over(signal.getsignal(signal.SIGINT)):
        signal.signal(signal.SIGINT, signal.default_int_handler if taken_over(before) else before)
    return slurm_format_bytes_ceil


slurm_format_bytes_ceil = _import_without_the_sigint_takeover()

__all__ = [
    "JobState",
    "JobStatus",
    "build_directives",
    "build_batch_directives",
    "directive_option",
    "quote_directive",
    "output_directive",
    "expand_job_id",
    "build_sbatch_argv",
    "build_squeue_argv",
    "build_squeue_mine_argv",
    "build_squeue_named_argv",
    "build_scontrol_job_argv",
    "build_sacct_argv",
    "build_scancel_argv",
    "build_node_argv",
    "parse_node_room",
    "NodeRoom",
    "controller_unreachable",
    "parse_sbatch_job_id",
    "parse_squeue",
    "parse_squeue_mine",
    "parse_scontrol_job",
    "parse_sacct",
    "format_array_indices",
    "array_task_id",
    "build_config_argv",
    "parse_site_limits",
    "SiteLimits",
    "build_job_count_argv",
    "refused_for_load",
    "explain_reason",
    "LIMIT_REASONS",
]


def format_memory(value: str) -> str:
    """Memory for ``--mem``, rounded up to a whole unit Slurm accepts (``'4GiB'`` gives ``'4G'``)."""
    return slurm_format_bytes_ceil(parse_bytes(value))


def quote_directive(value: str) -> str:
    r"""A value for an ``#SBATCH`` line, read by Slurm as written.

    Slurm splits these lines on white space, takes ``'`` and ``"`` as quotes,
    ``\`` as an escape and an unquoted ``#`` as the start of a comment; a
    value holding any of them is written in double quotes, with ``"`` and
    ``\`` escaped.

    >>> quote_directive("/scratch/my run/x-%j.out")
    '"/scratch/my run/x-%j.out"'
    >>> print(quote_directive('/s/it\'s "run" #2/x.out'))
    "/s/it's \"run\" #2/x.out"
    """
    if not re.search(r"[\s\"'#\\]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def output_directive(pattern: str, codes: str = "j") -> str:
    """``--output=`` for a log path in which only the file name's ``%j`` is Slurm's (a ``%`` in a folder is not).

    ``codes``: the letters of Slurm's replacements kept in the file name
    (``"aA"`` for an array's task and array job ids).

    >>> output_directive("/s/100%j/x-%j.out")
    '--output=/s/100%%j/x-%j.out'
    >>> output_directive("/s/1%/w-%a-%A_%a.out", codes="aA")
    '--output=/s/1%%/w-%a-%A_%a.out'
    """
    folder, name = os.path.split(pattern)
    name = name.replace("%", "%%")
    for code in codes:
        name = name.replace("%%" + code, "%" + code)
    escaped = os.path.join(folder.replace("%", "%%"), name)
    return "--output=" + quote_directive(escaped)


def expand_job_id(pattern: str, job_id: str) -> str:
    """The log path of job ``job_id`` from an ``--output`` pattern (``%j`` in the file name only).

    >>> expand_job_id("/s/100%j/x-%j.out", "42")
    '/s/100%j/x-42.out'
    """
    folder, name = os.path.split(pattern)
    return os.path.join(folder, name.replace("%j", job_id))


def build_directives(
    *,
    job_name: str,
    output: str,
    walltime: str,
    cores: int | None = None,
    memory: str | None = None,
    exclusive: bool = False,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    extra: list | tuple = (),
    output_codes: str = "j",
) -> list[str]:
    """``#SBATCH`` lines for a one-node, one-task job (or each task of a job array).

    Parameters
    ----------
    job_name, output, walltime
        ``--job-name``, ``--output`` (stdout and stderr together; may use
        ``%j``) and ``--time``.
    cores, memory
        ``--cpus-per-task`` and ``--mem``; ``None`` leaves them out, except
        that an exclusive job without ``memory`` asks for ``--mem=0``
        (all of the node's memory).
    exclusive, partition, account, qos
        As Slurm names them.
    extra
        More options, written as given, last so they win.
    output_codes
        Slurm's replacements kept in ``output``'s file name (see :func:`output_directive`).

    Examples
    --------
    >>> build_directives(job_name="j", output="/l/j-%j.out", walltime="10", cores=2, memory="1GiB")
    ['#SBATCH --job-name=j', '#SBATCH --output=/l/j-%j.out', '#SBATCH --nodes=1', '#SBATCH --ntasks=1', '#SBATCH --cpus-per-task=2', '#SBATCH --mem=1G', '#SBATCH --time=10']
    """
    options = [f"--job-name={job_name}", output_directive(output, output_codes), "--nodes=1", "--ntasks=1"]
    if cores is not None:
        options.append(f"--cpus-per-task={cores}")
    if memory is not None:
        options.append(f"--mem={format_memory(memory)}")
    elif exclusive:
        options.append("--mem=0")
    if exclusive:
        options.append("--exclusive")
    options.append(f"--time={walltime}")
    options += _where_and_who(partition, account, qos, extra)
    return [f"#SBATCH {o}" for o in options]


def build_batch_directives(
    *,
    job_name: str,
    output: str,
    nodes: int,
    walltime: str,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    extra: list | tuple = (),
) -> list[str]:
    """``#SBATCH`` lines for a job of ``nodes`` whole nodes with one task on each.

    The shape of a submitted notebook's job: the batch script runs on the
    first node and starts the cluster's roles as ``srun`` steps, one task
    per node, each node exclusive with all of its memory.

    Parameters
    ----------
    job_name, output, walltime
        As for :func:`build_directives`.
    nodes : int
        ``--nodes``.
    partition, account, qos, extra
        As for :func:`build_directives`.

    Examples
    --------
    >>> build_batch_directives(job_name="nb", output="/l/nb-%j.log", nodes=3, walltime="1:00:00", account="p")
    ['#SBATCH --job-name=nb', '#SBATCH --output=/l/nb-%j.log', '#SBATCH --nodes=3', '#SBATCH --ntasks-per-node=1', '#SBATCH --exclusive', '#SBATCH --mem=0', '#SBATCH --time=1:00:00', '#SBATCH --account=p']
    """
    options = [
        f"--job-name={job_name}",
        output_directive(output),
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--exclusive",
        "--mem=0",
        f"--time={walltime}",
        *_where_and_who(partition, account, qos, extra),
    ]
    return [f"#SBATCH {o}" for o in options]


def _where_and_who(partition, account, qos, extra) -> list[str]:
    """The partition, account and QOS options that are set, then ``extra`` as given (last, so they win)."""
    options = [
        f"{flag}={quote_directive(value)}"
        for flag, value in (("--partition", partition), ("--account", account), ("--qos", qos))
        if value
    ]
    return options + [str(e) for e in extra]


def directive_option(directive: str) -> str:
    """The sbatch option one directive sets, as written: long (``--time``) or short (``-t``).

    >>> directive_option("--constraint=ib"), directive_option("--time 10"), directive_option("-N2")
    ('--constraint', '--time', '-N')
    """
    if directive.startswith("--"):
        return re.split(r"[=\s]", directive, maxsplit=1)[0]
    return directive[:2]


def build_sbatch_argv(script_path: str) -> list[str]:
    """``sbatch --parsable`` prints just ``jobid[;cluster]``."""
    return ["sbatch", "--parsable", script_path]


def parse_sbatch_job_id(stdout: str) -> str:
    """The job id in ``sbatch --parsable`` output.

    Raises
    ------
    ValueError
        When there is no job id in ``stdout``.
    """
    for line in reversed(stdout.strip().splitlines()):
        match = re.fullmatch(r"\s*(\d+)(?:;\S+)?\s*", line)
        if match:
            return match.group(1)
    raise ValueError(f"no job id in sbatch output {stdout!r}")


_SQUEUE_FORMAT = "%i|%T|%r|%N|%L"


def build_squeue_argv(job_ids) -> list[str]:
    """One ``squeue`` call for all ``job_ids``, including recently ended jobs.

    ``--array`` lists every task of a job array on a line of its own
    (``123_4``), also while the tasks still pend together as one record.
    """
    return [
        "squeue",
        "--noheader",
        "--array",
        "--states=all",
        f"--jobs={','.join(str(j) for j in job_ids)}",
        f"--format={_SQUEUE_FORMAT}",
    ]


def parse_squeue(stdout: str) -> dict[str, JobStatus]:
    """Statuses from :func:`build_squeue_argv` output, keyed by job id."""
    statuses = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not parts[0]:
            continue
        job_id, state, reason, nodes, left = parts
        reason = "" if reason in ("None", "(null)") else reason
        statuses[job_id] = JobStatus(job_id, JobState.parse(state), reason, nodes, time_left=parse_time_left(left))
    return statuses


_SQUEUE_MINE_FORMAT = "%i|%j|%T|%R"


def build_squeue_mine_argv() -> list[str]:
    """``squeue`` for every job of the calling user still in the queue, with its name."""
    return ["squeue", "--me", "--noheader", f"--format={_SQUEUE_MINE_FORMAT}"]


def parse_squeue_mine(stdout: str) -> list[JobStatus]:
    """Statuses from :func:`build_squeue_mine_argv` output, in squeue's order.

    squeue's ``%R`` is the nodes of a job that has them, else the reason it
    waits, in parentheses; it fills ``nodes`` or ``reason`` (as written, so
    that a job pending for no reason keeps ``None``).

    >>> pending, running = parse_squeue_mine("7|mspass-nb-flow|PENDING|(Priority)\\n8|x|RUNNING|n[1-2]\\n")
    >>> pending.name, pending.state.value, pending.reason, running.nodes
    ('mspass-nb-flow', 'PENDING', 'Priority', 'n[1-2]')
    """
    statuses = []
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not parts[0]:
            continue
        job_id, name, state, where = parts
        waiting = where.startswith("(") and where.endswith(")")
        statuses.append(
            JobStatus(
                job_id,
                JobState.parse(state),
                reason=where[1:-1] if waiting else "",
                nodes="" if waiting else where,
                name=name,
            )
        )
    return statuses


def build_squeue_named_argv(job_name: str) -> list[str]:
    """``squeue`` for the calling user's jobs named ``job_name``: their ids (an array's own id, ``%F``), one a line."""
    return ["squeue", "--me", "--noheader", f"--name={job_name}", "--format=%F"]


def build_scontrol_job_argv(job_id) -> list[str]:
    return ["scontrol", "--oneliner", "show", "job", str(job_id)]


def build_scontrol_jobs_argv() -> list[str]:
    """Every job the controller holds, one per line (one call for the final state of many jobs)."""
    return ["scontrol", "--oneliner", "show", "job"]


def parse_scontrol_job(stdout: str) -> JobStatus | None:
    """The status in ``scontrol --oneliner show job`` output, or None if absent."""
    fields = dict(re.findall(r"(\w+)=(\S*)", stdout))
    if "JobId" not in fields:
        return None
    reason = fields.get("Reason", "")
    nodes = fields.get("NodeList", "")
    return JobStatus(
        job_id=fields["JobId"],
        state=JobState.parse(fields.get("JobState", "UNKNOWN")),
        reason="" if reason == "None" else reason,
        nodes="" if nodes == "(null)" else nodes,
        exit_code=fields.get("ExitCode"),
    )


def parse_scontrol_jobs(stdout: str) -> dict[str, JobStatus]:
    """Every job in ``scontrol --oneliner show job`` output (all jobs, one per line), by id.

    An array task is found under its own id and as ``<array id>_<task>``.

    >>> line = "JobId=12 ArrayJobId=10 ArrayTaskId=2 JobName=w JobState=COMPLETED Reason=None ExitCode=0:0 NodeList=n1"
    >>> sorted(parse_scontrol_jobs(line + "\\n"))
    ['10_2', '12']
    """
    found = {}
    for line in stdout.splitlines():
        status = parse_scontrol_job(line)
        if status is None:
            continue
        found[status.job_id] = status
        array = re.search(r"\bArrayJobId=(\d+) ArrayTaskId=(\d+)\b", line)
        if array:
            found[f"{array.group(1)}_{array.group(2)}"] = status
    return found


def build_sacct_argv(job_ids) -> list[str]:
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        f"--jobs={','.join(str(j) for j in job_ids)}",
        "--format=JobID,State,ExitCode,NodeList",
    ]


def parse_sacct(stdout: str) -> dict[str, JobStatus]:
    """Statuses from :func:`build_sacct_argv` output, keyed by job id."""
    statuses = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not re.fullmatch(r"\d+(_\d+)?", parts[0]):
            continue
        job_id, state, exit_code, nodes = parts
        nodes = "" if nodes in ("None assigned", "(null)") else nodes
        statuses[job_id] = JobStatus(job_id, JobState.parse(state), "", nodes, exit_code or None)
    return statuses


def build_scancel_argv(job_ids, signal: str | None = None) -> list[str]:
    """``scancel`` for ``job_ids``; with ``signal``, send it to every process of the job."""
    argv = ["scancel"]
    if signal:
        argv += [f"--signal={signal}", "--full"]
    return argv + [str(j) for j in job_ids]


def build_node_argv(node: str) -> list[str]:
    """``scontrol show node`` for one node, on one line: its state and what is allocated on it."""
    return ["scontrol", "show", "node", "--oneliner", node]


@dataclass(frozen=True)
class NodeRoom:
    """One node's state and what is free on it, as Slurm counts (not what the OS says)."""

    state: str  #: e.g. ``IDLE``, ``MIXED``, ``ALLOCATED``, ``IDLE+DRAIN``, ``DOWN*``
    free_cpus: int
    free_memory_mb: int

    @property
    def up(self) -> bool:
        """Accepting jobs: not down, drained, failing, in maintenance, powered down or unresponsive."""
        bad = ("DOWN", "DRAIN", "FAIL", "MAINT", "POWER", "RESERVED", "NOT_RESPONDING", "UNKNOWN")
        return bool(self.state) and not any(word in self.state for word in bad) and not self.state.endswith("*")

    def fits(self, cpus: int, memory_mb: int) -> bool:
        """Whether a job of ``cpus`` and ``memory_mb`` can start on it now."""
        return self.up and self.free_cpus >= cpus and self.free_memory_mb >= memory_mb


def parse_node_room(stdout: str) -> NodeRoom | None:
    """The :class:`NodeRoom` in ``scontrol show node --oneliner`` output, or None.

    >>> parse_node_room("NodeName=n3 CPUAlloc=1 CPUTot=4 RealMemory=4000 AllocMem=2048 State=MIXED Partitions=debug")
    NodeRoom(state='MIXED', free_cpus=3, free_memory_mb=1952)
    >>> parse_node_room("NodeName=n1 CPUAlloc=0 CPUTot=4 RealMemory=4000 AllocMem=0 State=IDLE+DRAIN").up
    False
    """
    fields = dict(word.split("=", 1) for word in stdout.split() if "=" in word)
    try:
        return NodeRoom(
            state=fields.get("State", ""),
            free_cpus=int(fields["CPUTot"]) - int(fields.get("CPUAlloc", 0)),
            free_memory_mb=int(fields["RealMemory"]) - int(fields.get("AllocMem", 0)),
        )
    except (KeyError, ValueError):
        return None


# ------------------------------------------------------------------ job arrays
def format_array_indices(indices) -> str:
    """``--array``'s index list for ``indices``, consecutive runs as ranges.

    >>> format_array_indices([7, 0, 1, 2, 5])
    '0-2,5,7'
    """
    ordered = sorted(set(int(i) for i in indices))
    if not ordered:
        raise ValueError("no array index")
    runs, start, last = [], ordered[0], ordered[0]
    for index in ordered[1:] + [None]:
        if index is not None and index == last + 1:
            last = index
            continue
        runs.append(str(start) if start == last else f"{start}-{last}")
        if index is not None:
            start = last = index
    return ",".join(runs)


def array_task_id(array_job_id: str, index: int) -> str:
    """The id Slurm gives one task of a job array (``squeue``, ``scancel`` and ``scontrol`` take it).

    >>> array_task_id("872", 5)
    '872_5'
    """
    return f"{array_job_id}_{int(index)}"


# ------------------------------------------------------------------ site limits
def build_config_argv() -> list[str]:
    """``scontrol show config``: the controller's limits, read before submitting."""
    return ["scontrol", "show", "config"]


@dataclass(frozen=True)
class SiteLimits:
    """What the controller allows, from ``scontrol show config`` (None: not said).

    ``max_array_size``: the highest array index is one less (``MaxArraySize``,
    default 1001); ``max_job_count``: jobs the controller holds at once, every
    array task counting as one and ended jobs until ``MinJobAge``
    (``MaxJobCount``, default 10,000); ``rate_limited``: Slurm 23.02's per-user
    RPC rate limit is on (``SlurmctldParameters=rl_enable``).
    """

    max_array_size: int | None = None
    max_job_count: int | None = None
    min_job_age: int | None = None
    message_timeout: int | None = None
    rate_limited: bool = False

    @property
    def arrays(self) -> bool:
        """Whether this site takes job arrays at all (``MaxArraySize=0`` or 1 leave no usable index)."""
        return self.max_array_size is None or self.max_array_size > 1


def parse_site_limits(stdout: str) -> SiteLimits:
    r"""The :class:`SiteLimits` in ``scontrol show config`` output.

    >>> parse_site_limits("MaxArraySize            = 1001\nMaxJobCount             = 10000\n"
    ...                   "MessageTimeout          = 10 sec\nMinJobAge = 300 sec\nSlurmctldParameters = rl_enable,x")
    SiteLimits(max_array_size=1001, max_job_count=10000, min_job_age=300, message_timeout=10, rate_limited=True)
    """
    fields = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()

    def number(key):
        match = re.match(r"\d+", fields.get(key, ""))
        return int(match.group()) if match else None

    return SiteLimits(
        max_array_size=number("MaxArraySize"),
        max_job_count=number("MaxJobCount"),
        min_job_age=number("MinJobAge"),
        message_timeout=number("MessageTimeout"),
        rate_limited="rl_enable" in fields.get("SlurmctldParameters", ""),
    )


def build_job_count_argv() -> list[str]:
    """``squeue`` listing every job the controller holds (every user, every task, ended ones too): one id a line."""
    return ["squeue", "--noheader", "--array", "--states=all", "--format=%i"]


_LOAD_WORDS = re.compile(
    r"temporarily unavailable|temporarily unable|try again|rate.?limit|too many|socket timed out|timed out"
    r"|slurm_receive_msg|zero bytes were transmitted|unable to contact slurm controller|not responding",
    re.I,
)


def refused_for_load(text: str) -> bool:
    """True when a Slurm command failed because the controller is busy or away, not because of what was asked.

    Such a call is worth trying again after a pause: "Resource temporarily
    unavailable" (the controller's queue of RPCs, or ``MaxJobCount``, is
    full), "Socket timed out", Slurm 23.02's RPC rate limit, a controller
    that did not answer.

    >>> refused_for_load("sbatch: error: Batch job submission failed: Resource temporarily unavailable")
    True
    >>> refused_for_load("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified")
    False
    """
    return bool(_LOAD_WORDS.search(text))


#: Pending reasons that are limits of the site, your account or your QOS, in words, with what to do.
LIMIT_REASONS = {
    "QOSMaxJobsPerUserLimit": (
        "your QOS lets you run only so many jobs at once (MaxJobsPerUser); each worker node is a job, so it starts "
        "when one of yours ends. `sacctmgr show qos format=name,maxjobspu` shows the limit; fewer nodes, "
        "ready_workers=, or worker_submission='steps' (every worker node in one job) fit within it"
    ),
    "QOSMaxSubmitJobPerUserLimit": (
        "your QOS lets you queue only so many jobs (MaxSubmitJobsPerUser); fewer nodes, or "
        "worker_submission='steps' (every worker node in one job), fit within it"
    ),
    "AssocMaxJobsLimit": (
        "your account (association) lets you run only so many jobs at once (MaxJobs); each worker node is a job, so "
        "it starts when one of yours ends. `sacctmgr show assoc user=$USER format=account,maxjobs` shows the limit"
    ),
    "AssocGrpJobsLimit": (
        "your account's group has as many jobs running as it may (GrpJobs); it starts when one of the group's ends"
    ),
    "AssocMaxSubmitJobLimit": (
        "your account lets you queue only so many jobs (MaxSubmitJobs); worker_submission='steps' puts every "
        "worker node in one job"
    ),
    "QOSMaxNodePerUserLimit": (
        "your QOS lets you hold only so many nodes at once (MaxTRESPerUser node); it starts when some are freed"
    ),
    "AssocGrpNodeLimit": "your account's group holds as many nodes as it may (GrpTRES node)",
    "AssocGrpCpuLimit": "your account's group uses as many CPUs as it may (GrpTRES cpu)",
    "QOSGrpNodeLimit": "the QOS as a whole holds as many nodes as it may (GrpTRES node)",
    "QOSGrpCpuLimit": "the QOS as a whole uses as many CPUs as it may (GrpTRES cpu)",
    "AssocGrpCPUMinutesLimit": "your account has used up its CPU minutes (GrpTRESMins): ask for more, or another account",
    "AssocGrpBillingMinutes": "your account has used up its allocation (GrpTRESMins billing): another account, or more hours",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows one job (MaxNodes)",
    "PartitionTimeLimit": "the walltime is above the partition's MaxTime: give a shorter walltime",
    "JobArrayTaskLimit": "the array's own limit of tasks running at once (``%`` in --array) is reached",
    "MaxJobCount": "the controller holds as many jobs as it may (MaxJobCount)",
    "ReqNodeNotAvail": "a node it asks for is down, drained or reserved",
    "Resources": "the nodes it needs are busy; it starts when some free up",
    "Priority": "jobs of higher priority are ahead of it in the queue",
    "JobHeldUser": "it is held (scontrol release <job id> lets it go)",
    "JobHeldAdmin": "an administrator holds it",
    "Dependency": "it waits for another job to end (--dependency)",
    "BeginTime": "it may not start before its --begin time",
}


def explain_reason(reason: str) -> str:
    """Slurm's pending ``reason`` in words, with what to do where it is a limit; the reason itself if unknown.

    >>> explain_reason("AssocMaxJobsLimit").startswith("your account")
    True
    >>> explain_reason("SomethingNew")
    'SomethingNew'
    """
    return LIMIT_REASONS.get(reason.strip("()"), reason)
