"""Writing the security benchmark's results: ``security.json``, ``security.md`` (tables), ``security.png``."""

from __future__ import annotations

import json
from pathlib import Path

from .bench import median
from .report import _housekeeping, _ratio, _s, _samples, _table

__all__ = ["write_all", "write_json", "write_markdown", "write_png", "MILESTONES"]

VARIANTS = ("secure", "open")
LABELS = {"secure": "secure (security=True, default)", "open": "open (security=False)"}
COLORS = {"secure": "tab:green", "open": "tab:grey"}
BACKENDS = ("slurm", "local")
#: The start-up milestones of a cluster (see ``benchmarks.security.Milestones``), in the order they come.
MILESTONES = (
    ("db_submitted", "database job submitted"),
    ("first_worker_submitted", "first worker job submitted"),
    ("db_ready", "database answers (the cluster's probe, with this cluster's certificate if secure)"),
    ("first_worker_connected", "first worker connected to the scheduler"),
    ("last_worker_connected", "last worker connected to the scheduler"),
)


def write_all(results: dict, out: Path) -> list[Path]:
    """Write the three files; return their paths."""
    return [
        write_json(results, out / "security.json"),
        write_markdown(results, out / "security.md"),
        write_png(results, out / "security.png"),
    ]


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


# ----------------------------------------------------------------- markdown
def _ms(value) -> str:
    return "—" if value is None else f"{value * 1000:.1f}"


def _diff(a, b) -> str:
    return "—" if a is None or b is None else f"{a - b:+.2f}"


def _header(results: dict) -> list[str]:
    meta, plan = results["meta"], results["plan"]
    v = meta["versions"]
    smoke = " --smoke" if plan["smoke"] else ""
    return [
        "# What security costs: the same MsPASSCluster with security on and off",
        "",
        f"Run {meta['date']} on `{meta['uname']}` ({meta['cpu_count']} CPUs, {meta.get('cpu_model')}, AES instructions: "
        f"{'yes' if meta.get('cpu_aes') else 'no'}), Slurm test bed of {meta['testbed_nodes']} nodes ({meta['slurm']}); "
        f"Python {meta['python']}, {meta.get('openssl')}, cryptography {v.get('cryptography')}, dask {v['dask']}, "
        f"distributed {v['distributed']}, mspass_cluster {v['mspass-cluster']} (commit "
        f"{str(meta.get('git_commit', '?'))[:10]}{', with uncommitted changes' if meta.get('package_modified') else ''}). "
        f"Command: `benchmarks/run-security --repeat {plan['repeat']}{smoke}`; the run took "
        f"{meta['duration_s'] / 60:.1f} min.",
        "",
        f"Medians of {plan['repeat']} sample{'' if plan['repeat'] == 1 else 's'} per variant, the two variants "
        "interleaved (the order flips with every repetition), each sample a cluster of its own, closed and its jobs "
        "gone before the next starts. Ratio = secure / open. Workers: one process per node, 4 cores, 3 GiB; the "
        "database is the nx-27017 stand-in.",
        "",
    ]


def _ready(results: dict) -> list[str]:
    rows = []
    for backend in BACKENDS:
        if backend not in results:
            continue
        section = results[backend]
        ready = section["ready"]
        ratio = ready["ratio"]
        within = "—" if ratio is None else ("yes" if ratio <= ready["target_ratio"] else "**no**")
        rows.append(
            [
                f"`{backend}`",
                section["nodes"],
                _s(ready["median"]["secure"]),
                _s(ready["median"]["open"]),
                _ratio(ratio),
                within,
                _samples(ready["samples"]["secure"]),
                _samples(ready["samples"]["open"]),
            ]
        )
    if not rows:
        return []
    target = results["target_ratio"]
    return [
        "## Time to ready",
        "",
        "From creating the cluster object until the database answers and every worker is connected (the "
        f"constructor). Issue 10's target: secure within {round((target - 1) * 100)} % of open (ratio ≤ {target:.2f}).",
        "",
        *_table(
            [
                "backend",
                "worker nodes",
                "secure (s)",
                "open (s)",
                "ratio",
                f"≤ {target:.2f}",
                "secure samples",
                "open samples",
            ],
            rows,
        ),
        "",
    ]


def _milestones(results: dict) -> list[str]:
    lines = []
    for backend in BACKENDS:
        if backend not in results:
            continue
        ready = results[backend]["ready"]
        medians = ready["milestone_medians"]
        rows = [
            [
                what,
                _s(medians["secure"][key]),
                _s(medians["open"][key]),
                _diff(medians["secure"][key], medians["open"][key]),
            ]
            for key, what in MILESTONES
        ]
        rows.append(
            [
                "ready (the constructor returned)",
                _s(ready["median"]["secure"]),
                _s(ready["median"]["open"]),
                _diff(ready["median"]["secure"], ready["median"]["open"]),
            ]
        )
        lines += [
            f"### `{backend}`: seconds from creating the cluster object (medians)",
            "",
            *_table(["milestone", "secure", "open", "secure − open"], rows),
            "",
        ]
    if not lines:
        return []
    return [
        "## Where the time goes: the clusters' own milestones",
        "",
        "From the `mspass_cluster` log records (job submitted, database ready) and the scheduler's `add-worker` "
        "events, in every sample above; per-sample values in `security.json`.",
        "",
        *lines,
    ]


def _transfer(results: dict) -> list[str]:
    section = results.get("slurm", {}).get("transfer")
    if not section:
        return []
    samples = section["samples"]
    checks = {name: [s["checks"] for s in samples[name] if s] for name in VARIANTS}

    def per_variant(fn):
        return [fn(name) for name in VARIANTS]

    def crossed(name):
        values = [c["crossed_nodes"] for c in checks[name]]
        return f"{sum(values)} of {len(samples[name])}"

    def hosts(name):
        pairs = sorted({" → ".join(c["hostnames"].values()) for c in checks[name]})
        return ", ".join(pairs) or "—"

    rows = [
        ["GiB/s (median), as the user sees it", *per_variant(lambda n: _s(section["median_gib_per_s"][n]))],
        ["samples (GiB/s)", *per_variant(lambda n: _samples(section["gib_per_s"][n]))],
        [
            "seconds for the whole transfer (median)",
            *per_variant(
                lambda n: _s(
                    median([s["seconds"] for s in samples[n] if s]),
                )
            ),
        ],
        [
            "GiB/s while a transfer was under way (Dask's own record)",
            *per_variant(lambda n: _s(section["median_dask_gib_per_s"][n])),
        ],
        ["Dask's record, samples", *per_variant(lambda n: _samples(section["dask_gib_per_s"][n]))],
        ["between the workers", *per_variant(lambda n: ", ".join(sorted({c["scheme"] for c in checks[n]})) or "—")],
        ["nodes (producer → consumer)", *per_variant(hosts)],
        ["samples where every byte came from the producer's node", *per_variant(crossed)],
        [
            "comm compression on the workers",
            *per_variant(lambda n: ", ".join(sorted({c["compression"] for c in checks[n]})) or "—"),
        ],
    ]
    return [
        "## Transfer throughput (Slurm, 2 worker nodes)",
        "",
        f"One core of this machine encrypts AES-256-GCM at {_gbs(results['meta'].get('openssl_speed_aes_256_gcm_16k'))} "
        "in 16 KiB records (`openssl speed`).",
        "",
        f"{section['bytes'] / 2**30:.2f} GiB of random bytes per sample, in arrays of {section['block_bytes'] / 2**20:.0f} MiB "
        f"made on the worker of one node and consumed on the worker of the other (`workers=`, "
        f"`allow_other_workers=False`), {section['batch_bytes'] / 2**30:.2f} GiB per batch. Timed per batch: from "
        "submitting the consumers until their results are gathered (scheduling, the transfer, receiving, a trivial "
        "task); arrays are made before the timing and every key is released, and both workers seen holding none, "
        "after it. Every sample is a new cluster, so nothing is cached. Dask's own record: the bytes the consumer "
        "fetched over the time any fetch was under way (its `transfer_incoming_log`).",
        "",
        *_table(["", LABELS["secure"] + ", TLS", LABELS["open"] + ", TCP"], rows),
        "",
        f"Ratio secure / open: {_ratio(section['ratio'])} as the user sees it, {_ratio(section['dask_ratio'])} in "
        "Dask's own record.",
        "",
    ]


def _gbs(value) -> str:
    return "—" if value is None else f"{value / 2**30:.2f} GiB/s"


def _parts(results: dict) -> list[str]:
    parts = results.get("parts")
    if not parts:
        return []
    lines = ["## Parts of the cost, measured alone (no Slurm)", ""]
    rows = []
    if "credentials" in parts:
        c = parts["credentials"]
        rows.append(
            [
                "`ClusterCredentials.create`: a CA and 5 EC P-256 keys and certificates, 4 files written 0600",
                _ms(c["median_create_s"]),
                "",
                f"{len(c['create_s'])} samples, {_ms(min(c['create_s']))} to {_ms(max(c['create_s']))} ms",
            ]
        )
        rows.append(
            ["`dask_security()` (the scheduler's and client's `Security`)", _ms(c["median_dask_security_s"]), "", ""]
        )
    if "dask_connection" in parts:
        d = parts["dask_connection"]
        rows.append(
            [
                "a new Dask connection on loopback (connect + Dask's handshake)",
                _ms(d["median_s"]["tls"]) + " (mutual TLS)",
                _ms(d["median_s"]["tcp"]) + " (TCP)",
                f"ratio {_ratio(d['ratio'])}; {len(d['samples_s']['tls'])} samples each; "
                f"{' '.join(map(str, d.get('tls_cipher') or ['cipher not recorded']))}",
            ]
        )
    if "worker_start" in parts:
        w = parts["worker_start"]["median_s"]
        rows.append(
            [
                "a worker node's `dask worker` (nanny + worker) from its start until the scheduler has it",
                _ms(w["secure"]) + " (TLS, no worker dashboard)",
                _ms(w["open"]) + " (TCP, dashboard)",
                f"open without the dashboard: {_ms(w['open_no_dashboard'])} ms; "
                f"{len(parts['worker_start']['samples_s']['secure'])} samples each",
            ]
        )
    if "database" in parts:
        m = parts["database"]["median"]
        rows += [
            [
                "database: from starting the server until its port accepts connections",
                _ms(m["secure"].get("listening_s")) + " (TLS required)",
                _ms(m["open"].get("listening_s")),
                "",
            ],
            [
                "database: the user exists (first-user script started with the server, as in the job)",
                _ms(m["secure"].get("user_created_s")),
                "(no such step)",
                f"{_ms(_sub(m['secure'].get('user_created_s'), m['secure'].get('listening_s')))} ms after the port "
                f"opened; a Python importing pymongo alone: {_ms(parts['database']['median_python_imports_pymongo_s'])} ms",
            ],
            [
                "database: the first-user script has exited (not waited for by the cluster)",
                _ms(m["secure"].get("users_script_exited_s")),
                "",
                f"{_ms(_sub(m['secure'].get('users_script_exited_s'), m['secure'].get('user_created_s')))} ms after "
                "the user exists",
            ],
            [
                "database: the cluster's readiness probe first succeeds",
                _ms(m["secure"].get("ready_s")) + " (x.509 authentication)",
                _ms(m["open"].get("ready_s")),
                f"secure − open: {_ms(_sub(m['secure'].get('ready_s'), m['open'].get('ready_s')))} ms",
            ],
            [
                "database: one readiness probe on a ready server (new client, `ping`, `getCmdLineOpts`)",
                _ms(m["secure"].get("probe_s")),
                _ms(m["open"].get("probe_s")),
                "",
            ],
        ]
    if "first_user_steps" in parts:
        f = parts["first_user_steps"]["median"]
        rows += [
            [
                "first-user script, step by step (its own functions, timed by a wrapper): its port opened; "
                "the script imported pymongo",
                f"{_ms(f['listening_s'])}; {_ms(f['imported_s'])}",
                "",
                f"{len(parts['first_user_steps']['samples'])} samples",
            ],
            [
                "first-user script: noticed that the server answers (`wait_for_server`)",
                _ms(f["server_noticed_s"]),
                "",
                f"{_ms(f['noticed_after_listening_s'])} ms after the port opened, at its try number "
                f"{f['tries_before_noticing']:g} (each try a new pymongo client with a 1 s server selection timeout)",
            ],
            [
                "first-user script: user created and authentication checked (4 TLS clients in all)",
                _ms(f["verified_s"]),
                "",
                f"{_ms(f['steps_after_noticing_s'])} ms after noticing the server",
            ],
        ]
    lines += _table(["part", "secure (ms)", "open (ms)", ""], rows)
    return lines + [""]


def _sub(a, b):
    return None if a is None or b is None else a - b


def write_markdown(results: dict, path: Path) -> Path:
    lines = _header(results) + _ready(results) + _milestones(results) + _transfer(results) + _parts(results)
    lines += _housekeeping(results)
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------- plot
def _bars(ax, groups, ylabel: str, title: str) -> None:
    """Bars of medians per variant with every sample as a dot; ``groups`` is [(label, medians, samples)]."""
    width = 0.38
    for offset, name in ((-width / 2, "secure"), (width / 2, "open")):
        positions = [i + offset for i in range(len(groups))]
        ax.bar(positions, [g[1][name] or 0.0 for g in groups], width, color=COLORS[name], alpha=0.8, label=LABELS[name])
        for pos, (_, medians, samples) in zip(positions, groups):
            points = [v for v in samples[name] if v is not None]
            ax.scatter([pos] * len(points), points, s=12, color="black", zorder=3)
            if medians[name] is not None:
                ax.annotate(
                    f"{medians[name]:.2f}",
                    (pos, max(points + [medians[name]])),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 3),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups], fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    top = max([v for g in groups for s in g[2].values() for v in s if v] + [1e-9])
    ax.set_ylim(0, top * 1.3)


def write_png(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    ready = [
        (
            f"{b}, {results[b]['nodes']} node(s)\nratio {_ratio(results[b]['ready']['ratio'])}",
            results[b]["ready"]["median"],
            results[b]["ready"]["samples"],
        )
        for b in BACKENDS
        if b in results
    ]
    if ready:
        _bars(left, ready, "seconds (bars: median; dots: samples)", "Time to ready")
    else:
        left.set_axis_off()
    section = results.get("slurm", {}).get("transfer")
    if section:
        groups = [
            (
                f"as the user sees it\nratio {_ratio(section['ratio'])}",
                section["median_gib_per_s"],
                section["gib_per_s"],
            ),
            (
                f"Dask's own record\nratio {_ratio(section['dask_ratio'])}",
                section["median_dask_gib_per_s"],
                section["dask_gib_per_s"],
            ),
        ]
        _bars(
            right,
            groups,
            "GiB/s (bars: median; dots: samples)",
            f"Transfer between 2 nodes, {section['bytes'] / 2**30:.2f} GiB",
        )
    else:
        right.set_axis_off()
    meta = results["meta"]
    fig.suptitle(
        f"security=True against security=False, Slurm test bed on one VM ({meta['cpu_count']} CPUs), {meta['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """``python -m benchmarks.security_report DIR``: write security.md and security.png again from DIR/security.json."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "benchmarks/results")
    results = json.loads((out / "security.json").read_text())
    for path in (write_markdown(results, out / "security.md"), write_png(results, out / "security.png")):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
