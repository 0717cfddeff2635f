"""Writing a run's results: ``results.json`` (everything), ``results.md`` (tables), ``results.png`` (plots)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_all", "write_json", "write_markdown", "write_png"]

LABELS = {"mspass": "MsPASSCluster", "jobqueue": "dask-jobqueue"}
COLORS = {"mspass": "tab:blue", "jobqueue": "tab:orange"}


def write_all(results: dict, out: Path) -> list[Path]:
    """Write the three files; return their paths."""
    return [
        write_json(results, out / "results.json"),
        write_markdown(results, out / "results.md"),
        write_png(results, out / "results.png"),
    ]


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


# ----------------------------------------------------------------- markdown
def _s(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _nodes(count: int) -> str:
    return f"{count} worker node" + ("" if count == 1 else "s")


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _samples(values) -> str:
    return ", ".join(_s(v) for v in values) or "—"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _header(results: dict) -> list[str]:
    meta, plan = results["meta"], results["plan"]
    versions = meta["versions"]
    smoke = " --smoke" if plan["smoke"] else ""
    return [
        "# MsPASSCluster vs dask-jobqueue SLURMCluster on the Slurm test bed",
        "",
        f"Run {meta['date']} on `{meta['uname']}` ({meta['cpu_count']} CPUs), Slurm test bed of "
        f"{meta['testbed_nodes']} nodes ({meta['slurm']}); Python {meta['python']}, dask {versions['dask']}, "
        f"distributed {versions['distributed']}, dask-jobqueue {versions['dask-jobqueue']}, "
        f"mspass_cluster {versions['mspass-cluster']} (commit {str(meta.get('git_commit', '?'))[:10]}"
        f"{', with uncommitted changes' if meta.get('package_modified') else ''}). Command: `benchmarks/run --sizes "
        f"{','.join(str(s) for s in plan['sizes'])} --repeat {plan['repeat']}{smoke}`; the run took "
        f"{meta['duration_s'] / 60:.1f} min.",
        "",
        f"Figures are medians of {plan['repeat']} run{'' if plan['repeat'] == 1 else 's'} in seconds, the two tools "
        "interleaved; "
        "ratio = MsPASSCluster / dask-jobqueue (below 1: MsPASSCluster faster). Both get one worker process per node, "
        "4 cores, 3 GiB, 10 min walltime; MsPASSCluster also starts and stops its database job (the nx-27017 "
        "stand-in), dask-jobqueue runs workers only.",
        "",
    ]


def _time_to_ready(section: dict, reference: dict) -> list[str]:
    rows = []
    for size in section["sizes"]:
        key = str(size)
        rows.append(
            [
                size,
                _s(section["median"]["mspass"][key]),
                _s(section["median"]["jobqueue"][key]),
                _ratio(section["ratio"][key]),
                _samples(section["samples"]["mspass"][key]),
                _samples(section["samples"]["jobqueue"][key]),
            ]
        )
    low, high = reference["startup_sharded_s"]
    rows.append(
        [
            "MsPASS scripts (reference, not run)",
            f"≥ {reference['startup_non_sharded_s']} of fixed sleep (non-sharded), {low}–{high} (sharded)",
            "",
            "",
            "",
            "",
        ]
    )
    return [
        "## Time to ready",
        "",
        "From creating the cluster object until the database answers and every worker is connected "
        "(MsPASSCluster: its constructor; dask-jobqueue: constructor + `scale(jobs=n)` + `client.wait_for_workers(n)`).",
        "",
        *_table(
            [
                "worker nodes",
                "MsPASSCluster (s)",
                "dask-jobqueue (s)",
                "ratio",
                "MsPASSCluster samples",
                "dask-jobqueue samples",
            ],
            rows,
        ),
        "",
    ]


def _scale(section: dict) -> list[str]:
    low, high = section["from"], section["to"]
    rows = []
    for key, what in (
        ("up", f"scale-up {low}→{high}: every new worker connected"),
        (
            "down",
            f"scale-down {high}→{low}: scheduler shows {low} worker{'' if low == 1 else 's'} "
            "and squeue only the remaining jobs",
        ),
    ):
        part = section[key]
        rows.append(
            [
                what,
                _s(part["median"]["mspass"]),
                _s(part["median"]["jobqueue"]),
                _ratio(part["ratio"]),
                _samples(part["samples"]["mspass"]),
                _samples(part["samples"]["jobqueue"]),
            ]
        )
    return [
        f"## Scaling ({low} → {high} → {_nodes(low)})",
        "",
        *_table(
            [
                "operation",
                "MsPASSCluster (s)",
                "dask-jobqueue (s)",
                "ratio",
                "MsPASSCluster samples",
                "dask-jobqueue samples",
            ],
            rows,
        ),
        "",
    ]


def _yes_no(flags) -> str:
    return "yes" if flags and all(flags) else ("no" if not any(flags) else "sometimes")


def _failure(section: dict) -> list[str]:
    ms, jq = section["errors"]["mspass"], section["errors"]["jobqueue"]
    cap = section["cap_s"]
    hit = [e.get("hit_cap") for e in jq]
    jq_time = _s(section["median"]["jobqueue"]) + (
        f" (hit the {cap:g} s cap: no error of its own)" if hit and all(hit) else ""
    )
    ms_ids = "; ".join(f"job {e.get('job_id')}, exit {e.get('exit_code')}" for e in ms)
    slurm = "; ".join(
        f"job {s['job_id']} {s['state']}, exit {s['exit_code']}" for e in jq for s in e.get("slurm_saw", [])
    )
    rows = [
        ["time from creating the cluster to an error (s, median)", _s(section["median"]["mspass"]), jq_time],
        ["samples (s)", _samples(section["samples"]["mspass"]), _samples(section["samples"]["jobqueue"])],
        [
            "error the user gets",
            ", ".join(sorted({str(e.get("error_type")) for e in ms})),
            ", ".join(sorted({str(e.get("error_type")) for e in jq})),
        ],
        [
            "error names the job id",
            f"{_yes_no([e.get('names_job_id') for e in ms])}: {ms_ids}",
            _yes_no([e.get("names_job_id") for e in jq]),
        ],
        [
            "error names the exit code",
            _yes_no([e.get("names_exit_code") for e in ms]),
            _yes_no([e.get("names_exit_code") for e in jq]),
        ],
        ["what Slurm knew meanwhile", "(in the error)", slurm or "—"],
        ["ratio", _ratio(section["ratio"]), ""],
    ]
    closing = [e.get("close_error") for e in jq if e.get("close_error")]
    scancelled = [e for e in jq if e.get("harness_scancelled")]
    notes = [
        f"dask-jobqueue's close() raised: {closing[0].splitlines()[0]}"
        if closing
        else "dask-jobqueue's close() raised nothing.",
        f"The harness had to scancel dask-jobqueue's jobs {len(scancelled)} time(s)."
        if scancelled
        else "Its jobs had already ended; none was left for the harness to cancel.",
    ]
    return [
        f"## Failure detection (worker `python={section['worker_python']}`)",
        "",
        f"dask-jobqueue never checks on its jobs, so the user waits in `client.wait_for_workers(1, timeout={cap:g})`; "
        "MsPASSCluster raises `JobFailedError` by itself.",
        "",
        *_table(["", "MsPASSCluster", "dask-jobqueue"], rows),
        "",
        " ".join(notes),
        "",
    ]


def _teardown(section: dict, reference: dict) -> list[str]:
    rows = [
        [
            "`close()` returned",
            _s(section["median_close_returned"]["mspass"]),
            _s(section["median_close_returned"]["jobqueue"]),
            "",
            _samples(section["close_returned"]["mspass"]),
            _samples(section["close_returned"]["jobqueue"]),
        ],
        [
            "nothing left: no job in squeue, no process",
            _s(section["median"]["mspass"]),
            _s(section["median"]["jobqueue"]),
            _ratio(section["ratio"]),
            _samples(section["samples"]["mspass"]),
            _samples(section["samples"]["jobqueue"]),
        ],
        [
            "MsPASS scripts (reference, not run)",
            f"{reference['shutdown_non_sharded_s']} of fixed sleep (non-sharded), {reference['shutdown_sharded_4_shards_s']} "
            "(sharded, 4 shards)",
            "",
            "",
            "",
            "",
        ],
    ]
    return [
        f"## Teardown ({_nodes(section['nodes'])})",
        "",
        "From `close()` until squeue lists none of the cluster's jobs and none of its processes is alive (polled every "
        "0.1 s). MsPASSCluster also stops its database with SIGTERM and waits for a clean exit.",
        "",
        *_table(
            ["", "MsPASSCluster (s)", "dask-jobqueue (s)", "ratio", "MsPASSCluster samples", "dask-jobqueue samples"],
            rows,
        ),
        "",
    ]


def _calls(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _load(section: dict) -> list[str]:
    ms, jq = section["mspass"], section["jobqueue"]
    if ms.get("error") or jq.get("error"):
        return ["## Load on the Slurm controller", "", "Not measured: a cluster did not start (see errors).", ""]
    steady = section["steady_window_s"]
    rows = [
        ["start-up (s)", _s(ms["startup_s"]), _s(jq["startup_s"])],
        [
            "status calls during start-up (squeue + sacct + scontrol)",
            ms["startup_status_calls"],
            jq["startup_status_calls"],
        ],
        [
            "status calls per minute during start-up",
            _s(ms["startup_status_per_min"], 1),
            _s(jq["startup_status_per_min"], 1),
        ],
        [
            f"status calls per minute after ready (over {steady:g} s)",
            _s(ms["steady_status_per_min"], 1),
            _s(jq["steady_status_per_min"], 1),
        ],
        ["every Slurm call counted during start-up", _calls(ms["startup_calls"]), _calls(jq["startup_calls"])],
        ["counted by", ms["method"], jq["method"]],
    ]
    return [
        f"## Load on the Slurm controller ({_nodes(section['nodes'])})",
        "",
        *_table(["", "MsPASSCluster", "dask-jobqueue"], rows),
        "",
    ]


def _reference(reference: dict) -> list[str]:
    low, high = reference["startup_sharded_s"]
    return [
        "## Reference: the MsPASS job scripts' fixed sleeps (not run)",
        "",
        *_table(
            ["", "non-sharded", "sharded (4 shards)"],
            [
                [
                    "sleeping before the first use of the cluster",
                    f"≥ {reference['startup_non_sharded_s']} s",
                    f"{low} to {high} s",
                ],
                [
                    "sleeping at shutdown",
                    f"{reference['shutdown_non_sharded_s']} s",
                    f"{reference['shutdown_sharded_4_shards_s']} s",
                ],
            ],
        ),
        "",
        f"Source: {reference['source']}. {reference['note']}",
        "",
    ]


def _housekeeping(results: dict) -> list[str]:
    left = results.get("leftovers", [])
    errors = results.get("errors", [])
    lines = ["## Housekeeping", ""]
    if left:
        lines += [
            f"- {item['context']}, {item['tool']}: had to clean up {item.get('jobs') or item.get('processes')}"
            for item in left
        ]
    else:
        lines.append("- No job or process was left for the harness to cancel after any `close()`.")
    if errors:
        lines += [f"- error in {e['context']} ({e['tool']}): {e['error'].splitlines()[0]}" for e in errors]
    else:
        lines.append("- No error besides the provoked failures.")
    if results.get("cancelled_at_end"):
        lines.append(f"- Jobs cancelled when the run ended: {', '.join(sorted(results['cancelled_at_end']))}.")
    foreign = results.get("foreign_jobs", [])
    if foreign:
        lines.append(
            f"- Jobs not started by this run were in squeue at {len(foreign)} cluster start(s) "
            "(another user of the test bed): those figures may be disturbed; see results.json."
        )
    else:
        lines.append("- No other job was in squeue when any cluster started.")
    return lines + [""]


def write_markdown(results: dict, path: Path) -> Path:
    reference = results["reference_sleeps"]
    lines = _header(results)
    if "time_to_ready" in results:
        lines += _time_to_ready(results["time_to_ready"], reference)
    if "scale" in results:
        lines += _scale(results["scale"])
    if "failure" in results:
        lines += _failure(results["failure"])
    if "teardown" in results:
        lines += _teardown(results["teardown"], reference)
    if "controller_load" in results:
        lines += _load(results["controller_load"])
    lines += _reference(reference) + _housekeeping(results)
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------- plot
def _ready_panel(ax, section: dict, reference_s: float) -> None:
    sizes = section["sizes"]
    for offset, tool in ((-0.12, "mspass"), (0.12, "jobqueue")):
        xs, ys = [], []
        for size in sizes:
            for value in section["samples"][tool][str(size)]:
                if value is not None:
                    xs.append(size + offset)
                    ys.append(value)
        ax.scatter(xs, ys, s=18, alpha=0.6, color=COLORS[tool])
        medians = [section["median"][tool][str(s)] for s in sizes]
        ax.plot(sizes, medians, marker="o", color=COLORS[tool], label=f"{LABELS[tool]} (median, points: samples)")
    ax.axhline(
        reference_s,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"MsPASS scripts: {reference_s} s fixed sleep, non-sharded (not run)",
    )
    ax.set_xlabel("worker nodes")
    ax.set_ylabel("seconds")
    ax.set_title("Time to ready")
    ax.set_xticks(sizes)
    ax.set_xlim(min(sizes) - 1, max(sizes) + 1)
    ax.set_ylim(
        0, max([reference_s] + [v for t in section["samples"].values() for vs in t.values() for v in vs if v]) * 1.15
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _bar_groups(results: dict) -> list[tuple[str, dict, dict]]:
    """(label, medians by tool, samples by tool) for the second panel."""
    groups = []
    if "scale" in results:
        s = results["scale"]
        groups.append((f"scale-up\n{s['from']}→{s['to']}", s["up"]["median"], s["up"]["samples"]))
        groups.append((f"scale-down\n{s['to']}→{s['from']}", s["down"]["median"], s["down"]["samples"]))
    if "failure" in results:
        f = results["failure"]
        groups.append((FAILURE_LABEL, f["median"], f["samples"]))
    if "teardown" in results:
        t = results["teardown"]
        groups.append((f"teardown\n({_nodes(t['nodes'])})", t["median"], t["samples"]))
    return groups


FAILURE_LABEL = "failure →\nerror"


def _all_hit_cap(results: dict) -> bool:
    hits = [e.get("hit_cap") for e in results["failure"]["errors"]["jobqueue"]]
    return bool(hits) and all(hits)


def _bars_panel(ax, results: dict) -> None:
    groups = _bar_groups(results)
    width = 0.38
    for offset, tool in ((-width / 2, "mspass"), (width / 2, "jobqueue")):
        heights = [g[1][tool] or 0.0 for g in groups]
        positions = [i + offset for i in range(len(groups))]
        ax.bar(positions, heights, width, color=COLORS[tool], alpha=0.8, label=LABELS[tool])
        for pos, (label, medians, samples) in zip(positions, groups):
            points = [v for v in samples[tool] if v is not None]
            ax.scatter([pos] * len(points), points, s=12, color="black", zorder=3)
            if medians[tool] is not None:
                text = f"{medians[tool]:.1f}"
                if label == FAILURE_LABEL and tool == "jobqueue" and _all_hit_cap(results):
                    text += "\n(cap:\nno error)"
                # Above the highest dot, so the label never hides a sample.
                ax.annotate(
                    text,
                    (pos, max(points + [medians[tool]])),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 3),
                    textcoords="offset points",
                )
    # Log scale: the failure cap (60 s) would otherwise flatten the sub-second bars.
    ax.set_yscale("log")
    values = [v for _, medians, samples in groups for t in samples for v in samples[t] + [medians[t]] if v]
    if values:
        ax.set_ylim(min(values) / 2, max(values) * 4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups], fontsize=8)
    ax.set_ylabel("seconds, log scale (bars: median; dots: samples)")
    ax.set_title("Scaling, failure detection, teardown")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def write_png(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    if "time_to_ready" in results:
        _ready_panel(left, results["time_to_ready"], results["reference_sleeps"]["startup_non_sharded_s"])
    else:
        left.set_axis_off()
    _bars_panel(right, results)
    meta = results["meta"]
    fig.suptitle(
        f"MsPASSCluster vs dask-jobqueue on the Slurm test bed ({meta['testbed_nodes']} nodes, "
        f"{meta['cpu_count']} CPUs), {meta['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """``python -m benchmarks.report DIR``: write results.md and results.png again from DIR/results.json."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "benchmarks/results")
    results = json.loads((out / "results.json").read_text())
    for path in (write_markdown(results, out / "results.md"), write_png(results, out / "results.png")):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
