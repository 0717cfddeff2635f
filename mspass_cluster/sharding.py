"""The sharded database's parts, ports, command lines and command documents (pure).

A sharded database (``db_shards=N``) is N + 2 Slurm jobs, in MongoDB's
order (the research note's mlaunch and MsPASS sequences, without their
sleeps):

1. ``db-config``: the config server, ``mongod --configsvr --replSet cfg``
   on ``<db_dir>/config``, port ``db_port + 1``;
2. ``db-shard`` *i*: ``mongod --shardsvr --replSet shard<i>`` on
   ``<db_dir>/shard<i>``, port ``db_port + 2 + i`` (distinct ports, so that
   several may share a node);
3. ``db-router``: ``mongos --configdb cfg/<config host>:<port>`` on
   ``db_port``. Its job is submitted with the others, so that it waits in the
   queue alongside them rather than after them; its script waits until the
   cluster writes the config server's address into ``<log_dir>/<job
   name>.configdb``, which it does once the config server and every shard
   are PRIMARY (the node is known only then).

With ``security`` (the default) every part requires TLS with a certificate
from the cluster's CA (``--tlsMode requireTLS``, ``--tlsCertificateKeyFile``
the database server's, ``--tlsCAFile``), and the members authenticate one
another by certificate (``--clusterAuthMode x509``, ``--tlsClusterFile`` the
member certificate, whose O/OU are every member's and not a client's). The
config server and the shards also run with ``--auth`` (a ``mongos`` has no
such option: x.509 membership turns its access control on). Host names are
not checked (``--tlsAllowInvalidHostnames``): the certificates are made
before Slurm chooses the nodes, and only this cluster's CA, whose key never
leaves the notebook's memory, signs them (see :mod:`mspass_cluster.security`).

Each replica set has one member. Set names are fixed (``cfg``,
``shard<i>``), not per cluster, so that a later cluster on the same
``db_dir`` finds its data under the same names.
"""

from __future__ import annotations

import os
import re
import shlex

from .config import ClusterOptions
from .errors import ConfigError
from .security import CredentialFiles, db_security_args

__all__ = [
    "CONFIG_ROLE",
    "SHARD_ROLE",
    "ROUTER_ROLE",
    "SHARDED_ROLES",
    "CONFIG_SET",
    "shard_set",
    "member_port",
    "member_dbpath",
    "job_name",
    "shard_index",
    "part_label",
    "member_argv",
    "router_argv",
    "security_args",
    "configdb_file",
    "router_wait_lines",
    "config_string",
    "shard_string",
    "replica_set_document",
    "add_shard_command",
    "parse_shard_collections",
    "shard_collection_commands",
    "check_options",
]

CONFIG_ROLE, SHARD_ROLE, ROUTER_ROLE = "db-config", "db-shard", "db-router"
SHARDED_ROLES = (CONFIG_ROLE, SHARD_ROLE, ROUTER_ROLE)
CONFIG_SET = "cfg"


def shard_set(index: int) -> str:
    """The replica set (and shard) name of shard ``index``: ``shard<i>``."""
    return f"shard{index}"


def member_port(options: ClusterOptions, role: str, index: int = 0) -> int:
    """The port of a part: the router ``db_port``, the config server ``db_port + 1``, shard *i* ``db_port + 2 + i``.

    >>> from mspass_cluster.config import resolve_options
    >>> o = resolve_options(db_port=28100, db_shards=2)
    >>> member_port(o, "db-router"), member_port(o, "db-config"), member_port(o, "db-shard", 1)
    (28100, 28101, 28103)
    """
    if role == ROUTER_ROLE:
        return options.db_port
    if role == CONFIG_ROLE:
        return options.db_port + 1
    return options.db_port + 2 + index


def member_dbpath(options: ClusterOptions, role: str, index: int = 0) -> str:
    """``<db_dir>/config`` or ``<db_dir>/shard<i>``."""
    return os.path.join(options.db_dir, "config" if role == CONFIG_ROLE else shard_set(index))


def job_name(cluster_name: str, role: str, index: int = 0) -> str:
    """``<cluster>-db-config``, ``<cluster>-db-router``, ``<cluster>-db-shard<i>``."""
    return f"{cluster_name}-{role}{index if role == SHARD_ROLE else ''}"


def shard_index(name: str) -> int:
    """The shard number at the end of a job name (0 when it has none, e.g. a preview).

    >>> shard_index("mspass-ab12cd34-db-shard3"), shard_index("preview")
    (3, 0)
    """
    found = re.search(r"-db-shard(\d+)$", name)
    return int(found.group(1)) if found else 0


def security_args(tls: CredentialFiles | None, router: bool = False) -> list[str]:
    """TLS, x.509 membership and (not on the router, which has no ``--auth``) access control; [] without ``tls``.

    >>> from mspass_cluster.security import CredentialFiles
    >>> " ".join(security_args(CredentialFiles.placeholder(), router=True)).replace("<work_dir>/.mspass_cluster/<cluster>/", "")
    '--tlsMode requireTLS --tlsCertificateKeyFile db-server.pem --tlsCAFile ca.pem --clusterAuthMode x509 --tlsClusterFile db-member.pem --tlsAllowInvalidHostnames'
    """
    if tls is None or not tls.db_server_pem:
        return []
    return [
        *db_security_args(tls, auth=not router),
        "--clusterAuthMode",
        "x509",
        "--tlsClusterFile",
        tls.db_member_pem,
        "--tlsAllowInvalidHostnames",
    ]


def part_label(name: str) -> str | None:
    """What a sharded database's job is, in words, from its job name: ``router``, ``config server``, ``shard <i>``.

    None for any other job.

    >>> part_label("mspass-ab12cd34-db-shard3"), part_label("mspass-ab12cd34-db-router"), part_label("c-worker-0")
    ('shard 3', 'router', None)
    """
    found = re.search(r"-db-(config|router|shard(\d+))$", name)
    if not found:
        return None
    if found.group(2) is not None:
        return f"shard {found.group(2)}"
    return {"config": "config server", "router": "router"}[found.group(1)]


def member_argv(
    options: ClusterOptions, role: str, index: int, cache_gb: float, tls: CredentialFiles | None = None
) -> list[str]:
    """The command line of the config server or of shard ``index``: ``db_command`` as a one-member replica set."""
    replica = (
        ["--replSet", CONFIG_SET, "--configsvr"]
        if role == CONFIG_ROLE
        else ["--replSet", shard_set(index), "--shardsvr"]
    )
    return [
        *options.db_command,
        "--port",
        str(member_port(options, role, index)),
        "--dbpath",
        member_dbpath(options, role, index),
        "--bind_ip_all",
        "--nounixsocket",
        "--wiredTigerCacheSizeGB",
        f"{cache_gb:g}",
        *replica,
        *security_args(tls),
    ]


def config_string(config_host: str, options: ClusterOptions) -> str:
    """``cfg/<host>:<port>``: the config servers, as ``--configdb`` and ``shardIdentity`` name them."""
    return f"{CONFIG_SET}/{config_host}:{member_port(options, CONFIG_ROLE)}"


def router_argv(options: ClusterOptions, configdb: str, tls: CredentialFiles | None = None) -> list[str]:
    """The router's command line (``db_router_command``), on ``db_port``, with ``--configdb configdb``."""
    return [
        *options.db_router_command,
        "--port",
        str(options.db_port),
        "--configdb",
        configdb,
        "--bind_ip_all",
        "--nounixsocket",
        *security_args(tls, router=True),
    ]


def configdb_file(options: ClusterOptions, router_job_name: str) -> str:
    """``<log_dir>/<router job name>.configdb``: where the router's job reads its ``--configdb``."""
    return os.path.join(options.log_dir, f"{router_job_name}.configdb")


def router_wait_lines(options: ClusterOptions, router_job_name: str) -> list[str]:
    """Shell lines: wait (polling, up to ``startup_timeout``) for the file holding the config servers' address."""
    path = shlex.quote(configdb_file(options, router_job_name))
    limit = int(options.startup_timeout)
    return [
        "# The config server's node is known once it runs: the cluster writes its address here when the config",
        "# server and every shard are PRIMARY (this job waits in the queue with theirs meanwhile).",
        f"configdb_file={path}",
        'echo "mspass_cluster: db-router waiting for the config servers\' address in $configdb_file"',
        "waited=0",
        'while [ ! -s "$configdb_file" ]; do',
        f'    if [ "$waited" -ge {limit * 5} ]; then',
        f'        echo "mspass_cluster: no config server address after {limit} s (startup_timeout); stopping" >&2',
        "        exit 1",
        "    fi",
        "    sleep 0.2",
        "    waited=$((waited + 1))",
        "done",
        'configdb=$(cat "$configdb_file")',
    ]


def shard_string(index: int, host: str, options: ClusterOptions) -> str:
    """``shard<i>/<host>:<port>``: the shard as ``addShard`` and ``config.shards`` name it."""
    return f"{shard_set(index)}/{host}:{member_port(options, SHARD_ROLE, index)}"


def replica_set_document(set_name: str, host: str, port: int, configsvr: bool, version: int = 1) -> dict:
    """The configuration of a one-member replica set, for ``replSetInitiate`` or ``replSetReconfig``.

    >>> replica_set_document("cfg", "n1", 28101, True)
    {'_id': 'cfg', 'version': 1, 'members': [{'_id': 0, 'host': 'n1:28101'}], 'configsvr': True}
    """
    document = {"_id": set_name, "version": version, "members": [{"_id": 0, "host": f"{host}:{port}"}]}
    if configsvr:
        document["configsvr"] = True
    return document


def add_shard_command(index: int, host: str, options: ClusterOptions) -> dict:
    """``{addShard: "shard<i>/<host>:<port>", name: "shard<i>"}``."""
    return {"addShard": shard_string(index, host, options), "name": shard_set(index)}


def parse_shard_collections(entries: list[str]) -> list[tuple[str, dict]]:
    """``collection:field`` (hashed) and ``collection:f1,f2`` (ranged) -> ``[(collection, key)]``.

    >>> parse_shard_collections(["wf_TimeSeries:_id", "fs.chunks:files_id,n"])
    [('wf_TimeSeries', {'_id': 'hashed'}), ('fs.chunks', {'files_id': 1, 'n': 1})]

    Raises
    ------
    ConfigError
        For an entry without a collection or a field.
    """
    parsed = []
    for entry in entries:
        collection, _, fields = str(entry).partition(":")
        names = [f.strip() for f in fields.split(",") if f.strip()]
        if not collection.strip() or not names:
            raise ConfigError(
                f"db_shard_collections entry {entry!r} is not 'collection:field' (a hashed key) or "
                "'collection:field1,field2' (a ranged key), e.g. 'wf_TimeSeries:_id'."
            )
        key = {names[0]: "hashed"} if len(names) == 1 else {name: 1 for name in names}
        parsed.append((collection.strip(), key))
    return parsed


def shard_collection_commands(options: ClusterOptions) -> list[dict]:
    """``shardCollection`` for each of ``db_shard_collections`` in ``db_shard_database``."""
    return [
        {"shardCollection": f"{options.db_shard_database}.{collection}", "key": key}
        for collection, key in parse_shard_collections(options.db_shard_collections)
    ]


def check_options(options: ClusterOptions) -> None:
    """ConfigError, before anything is submitted, for what a sharded database cannot do (yet)."""
    if options.db_storage == "node-local":
        raise ConfigError(
            "db_shards with db_storage='node-local' is not supported: the shards keep their data in "
            f"{options.db_dir}/shard<i>. Use db_storage='shared' (the default)."
        )
    if not options.db_router_command:
        raise ConfigError("db_router_command is empty; give the router program, e.g. db_router_command=['mongos'].")
    if not re.fullmatch(r"[^/\\. \"$]+", options.db_shard_database or ""):
        raise ConfigError(
            f"db_shard_database={options.db_shard_database!r} is not a MongoDB database name (no '/', '\\', '.', "
            "' ', '\"' or '$'), e.g. 'mspass'."
        )
    parse_shard_collections(options.db_shard_collections)
