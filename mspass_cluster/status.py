"""What ``print(cluster)`` and the notebook show: every role, every job, what is true now.

:func:`view_of` takes a :class:`ClusterView` snapshot of a cluster; the text
and the HTML (no ipywidgets needed) are both rendered from it (pure), so
they never disagree.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from distributed.core import Status

from .sharding import part_label

__all__ = ["ClusterView", "JobRow", "view_of", "render_text", "render_html", "format_seconds"]


@dataclass(frozen=True)
class JobRow:
    """One job as a user asks about it."""

    role: str
    unit: str
    job_id: str
    name: str
    phase: str
    detail: str  #: Slurm's state and reason, e.g. ``PENDING (Resources)``
    node: str
    time_left: int | None
    log_path: str
    error: str | None = None  #: first line of its failure, if it failed
    #: What the job is, in words: its role, or the part of a sharded database (``router``, ``shard 1``...).
    label: str = ""


@dataclass(frozen=True)
class ClusterView:
    """A snapshot of one cluster."""

    name: str
    backend: str
    status: str
    db_address: str | None
    dashboard: str | None
    workers_connected: int
    workers_planned: int
    nodes_planned: int
    jobs: list[JobRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def view_of(cluster) -> ClusterView:
    """A snapshot of ``cluster`` (an :class:`~mspass_cluster.MsPASSCluster`): its roles, jobs and problems."""
    jobs = list(cluster._launcher.jobs.values())
    if cluster.db_job is not None and cluster.db_job not in jobs:
        jobs.append(cluster.db_job)  # a shared database's job (database=): shown, though not this cluster's
    # The database first (a sharded one's parts in their start order: config server, shards, router), then workers.
    jobs.sort(
        key=lambda j: (
            not j.role.startswith("db"),
            j.role == "db-router",
            j.name if j.role.startswith("db") else "",
            j.submitted,
        )
    )
    running = cluster.status == Status.running
    status, db_address = "running" if running else cluster.status.name, cluster.database.address
    lost = cluster.database.lost()
    if lost is not None:
        # A database named by a connection string has no job to describe.
        gone = getattr(cluster.database, "lost_job", None) or cluster.db_job  # a sharded database's lost part
        db_address = f"lost ({gone.describe() if gone else str(lost).splitlines()[0]})"
        if running:
            status = "running, but its database is lost"
    elif getattr(cluster.database, "moving", False):
        db_address = f"coming back ({cluster.db_job.describe() if cluster.db_job else cluster.database.address})"
        if running:
            status = "running, its database coming back"
    scheduler = getattr(cluster, "scheduler", None)
    return ClusterView(
        name=cluster.name,
        backend=cluster.backend,
        status=status,
        db_address=db_address,
        dashboard=cluster.dashboard_link if running else None,
        workers_connected=len(getattr(scheduler, "workers", None) or {}) if running else 0,
        workers_planned=len(cluster.plan),
        nodes_planned=len(cluster.worker_spec),
        problems=[str(j.error).splitlines()[0] for j in jobs if j.error is not None],
        jobs=[
            JobRow(
                j.role,
                j.unit,
                j.job_id,
                j.name,
                j.phase.value,
                j.state.value + (f" ({j.status.reason})" if j.status and j.status.reason else ""),
                j.node,
                j.time_left,
                j.log_path,
                label=part_label(j.name) or j.role,
            )
            for j in jobs
        ],
    )


def format_seconds(seconds: int | None) -> str:
    """``'1:02:03'`` for 3723 s; ``'—'`` when unknown."""
    if seconds is None:
        return "—"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _state(job: JobRow) -> str:
    return job.phase + (f" ({job.detail})" if job.detail and job.detail.lower() != job.phase else "")


def _dashboard_text(link: str | None) -> str:
    if not link:
        return "—"
    # A path through Jupyter's proxy: a browser opens it after the address it reaches Jupyter at.
    return link + " (after this Jupyter's address)" if link.startswith("/") else link


def render_text(view: ClusterView) -> str:
    """Several lines: the cluster, its problems, then one line per job."""
    lines = [
        f"MsPASSCluster {view.name} ({view.backend} backend): {view.status}",
        f"  database  {view.db_address or 'not answering'}",
        f"  workers   {view.workers_connected} of {view.workers_planned} connected, on {view.nodes_planned} "
        "worker node(s)",
        f"  dashboard {_dashboard_text(view.dashboard)}",
    ]
    lines += [f"  PROBLEM   {p}" for p in view.problems]
    if view.jobs:
        width = max(6, *(len(job.label or job.role) for job in view.jobs))
        lines.append(f"  {'role':{width}} {view.jobs[0].unit:>8} {'state':28} {'node':10} {'left':>8}  log")
        for job in view.jobs:
            lines.append(
                f"  {job.label or job.role:{width}} {job.job_id:>8} {_state(job)[:28]:28} {job.node or '—':10} "
                f"{format_seconds(job.time_left):>8}  {job.log_path}"
            )
    return "\n".join(lines)


_COLOURS = {
    "ready": "#1a7f37",
    "running": "#9a6700",
    "pending": "#9a6700",
    "submitted": "#9a6700",
    "failed": "#cf222e",
    "stopping": "#57606a",
    "stopped": "#57606a",
}


def render_html(view: ClusterView) -> str:
    """A self-contained HTML block for Jupyter (``_repr_html_``)."""
    e = html.escape
    link = f'<a href="{e(view.dashboard)}" target="_blank">{e(view.dashboard)}</a>' if view.dashboard else "—"
    rows = "".join(
        "<tr>"
        f"<td>{e(j.label or j.role)}</td><td>{e(j.job_id)}</td><td>{e(j.name)}</td>"
        f'<td style="color:{_COLOURS.get(j.phase, "inherit")}"><b>{e(j.phase)}</b>'
        f"{' ' + e(j.detail) if j.detail and j.detail.lower() != j.phase else ''}</td>"
        f"<td>{e(j.node or '—')}</td><td>{e(format_seconds(j.time_left))}</td>"
        f"<td><code>{e(j.log_path)}</code></td>"
        "</tr>"
        for j in view.jobs
    )
    problems = "".join(f'<p style="color:#cf222e"><b>Problem:</b> {e(p)}</p>' for p in view.problems)
    unit = view.jobs[0].unit if view.jobs else "job"
    return (
        '<div class="mspass-cluster">'
        f'<h4 style="margin:0.2em 0">MsPASSCluster {e(view.name)} '
        f"<small>({e(view.backend)} backend): {e(view.status)}</small></h4>"
        "<table><tbody>"
        f'<tr><th style="text-align:left">Database</th><td>{e(view.db_address or "not answering")}</td></tr>'
        f'<tr><th style="text-align:left">Workers</th><td>{view.workers_connected} of {view.workers_planned} '
        f"connected, on {view.nodes_planned} worker node(s)</td></tr>"
        f'<tr><th style="text-align:left">Dashboard</th><td>{link}</td></tr>'
        "</tbody></table>"
        f"{problems}"
        "<table><thead><tr>"
        f"<th>role</th><th>{e(unit)}</th><th>name</th><th>state</th><th>node</th><th>time left</th><th>log</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
        "</div>"
    )
