"""TLS and access control of the mongod stand-ins, as mongod 7.0 enforces them.

Both stand-ins (``tests/bin/fake_mongod.py`` and
:mod:`mspass_cluster.embedded_db`) accept the secure command line the cluster
gives ``mongod``::

    --auth --tlsMode requireTLS --tlsCertificateKeyFile SERVER_PEM --tlsCAFile CA

and enforce it through this module, so that a refusal in a test is a real
refusal:

* :func:`server_ssl_context` -- the TLS context of ``--tlsMode requireTLS``:
  every connection must complete a TLS handshake and present a client
  certificate signed by ``--tlsCAFile`` (no
  ``--tlsAllowConnectionsWithoutCertificates``); a plain-TCP client, a client
  without a certificate and one whose certificate another CA signed all fail
  the handshake.
* :class:`AccessControl` and its per-connection :class:`ConnectionSession` --
  ``--auth``: an unauthenticated connection may run only the commands mongod
  runs without authentication (:data:`UNAUTHENTICATED_COMMANDS`); anything
  else fails with code 13 ``Unauthorized``, "command <name> requires
  authentication". MONGODB-X509 authentication (``authenticate`` on
  ``$external``, or ``speculativeAuthenticate`` in ``hello``/``isMaster``)
  succeeds when the peer certificate's subject, as an RFC 2253 string (see
  :func:`subject_name`), is a user in ``$external``; otherwise code 18
  ``AuthenticationFailed``. The localhost exception: while no user exists, a
  connection from a loopback address (or a Unix domain socket) may create
  the first user, in ``$external`` or ``admin``, and nothing else.
* Membership by certificate (``--clusterAuthMode x509``, a sharded
  cluster's members): MONGODB-X509 authentication with a certificate whose
  O, OU and DC equal those of the server's own member certificate
  (``--tlsClusterFile``, else ``--tlsCertificateKeyFile``) is the internal
  ``__system`` user, without any user in the store; ``createUser`` of a
  subject that would be taken for a member is refused (code 2), as mongod
  refuses it. ``--clusterAuthMode`` implies access control, as in mongod (a
  ``mongos`` has no ``--auth``).
* :class:`UserStore` -- the users, answered by the gate itself
  (``createUser``, ``usersInfo``, ``dropUser``, ``connectionStatus``) and
  kept in ``<dbpath>/mongod_users.json`` (0600), so a restart on the same data
  keeps them. Without ``--auth`` the same commands work, as in mongod, but
  nothing is enforced.

Faithful to mongod 7.0: the list of commands an unauthenticated connection
may run (``connectionStatus`` included, which mongod runs without
authentication); the codes, names and messages of the refusals; the replies
of ``authenticate``, ``speculativeAuthenticate``, ``connectionStatus`` and
``usersInfo``; the localhost exception's scope (``createUser`` on ``admin``
or ``$external``, only while no user exists, only over loopback).

Not faithful:

* Only MONGODB-X509 users: ``createUser`` outside ``$external`` is refused
  (the stand-ins cannot verify passwords), and ``saslStart``/``saslContinue``
  (SCRAM, PLAIN) fail with ``MechanismUnavailable``.
* Roles are checked against mongod's built-in role names and stored, not
  enforced: any authenticated user may run any command. No custom roles
  (``createRole``), no ``updateUser``/``grantRolesToUser``.
* An unauthenticated connection gets code 13 even for a command the server
  does not have (mongod: 59 ``CommandNotFound`` first).
* Authentication failures are logged with their reason, but not in mongod's
  exact log format.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import sys
import threading
import uuid
from typing import Any, Callable, Mapping

import bson

from ._mongod_cli import EXIT_FAILURE, MongodOptions

__all__ = [
    "AccessControl",
    "ConnectionSession",
    "TLSConfigurationError",
    "UNAUTHENTICATED_COMMANDS",
    "USERS_FILE",
    "UserStore",
    "access_control",
    "is_local",
    "member_identity",
    "member_identity_of_file",
    "server_ssl_context",
    "server_ssl_context_or_exit",
    "subject_name",
]

#: The user database of certificate (and other external) users.
EXTERNAL_DB = "$external"
#: The one authentication mechanism the stand-ins serve.
X509 = "MONGODB-X509"
#: The user store, in ``--dbpath``.
USERS_FILE = "mongod_users.json"

#: Commands mongod runs on a connection that has not authenticated (their ``requiresAuth`` is false).
UNAUTHENTICATED_COMMANDS = frozenset(
    {
        "hello",
        "isMaster",
        "ismaster",
        "ping",
        "buildInfo",
        "buildinfo",
        "authenticate",
        "saslStart",
        "saslContinue",
        "logout",
        "endSessions",
        "getnonce",
        "connectionStatus",
    }
)
_HELLO_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})
# The localhost exception grants createUser on these databases only (mongod's _getDefaultPrivileges).
_LOCALHOST_EXCEPTION_DBS = frozenset({"admin", EXTERNAL_DB})
# mongod's built-in roles: those valid on any database, and those only on admin.
_DATABASE_ROLES = frozenset({"read", "readWrite", "dbAdmin", "dbOwner", "userAdmin", "enableSharding"})
_ADMIN_ROLES = frozenset(
    {
        "readAnyDatabase",
        "readWriteAnyDatabase",
        "userAdminAnyDatabase",
        "dbAdminAnyDatabase",
        "clusterAdmin",
        "clusterManager",
        "clusterMonitor",
        "hostManager",
        "backup",
        "restore",
        "root",
        "__system",
    }
)
# OpenSSL's short names for the attributes Python's getpeercert() spells out.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationalUnitName": "OU",
    "organizationName": "O",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "street",
    "domainComponent": "DC",
    "userId": "UID",
}

Reply = dict[str, Any]
#: ``log(severity, log_id, message, attributes)``, as :meth:`mspass_cluster._mongod_log.MongodLog.write` minus component and context.
LogFunction = Callable[[str, int, str, dict[str, Any]], None]


def _error(errmsg: str, code: int, code_name: str) -> Reply:
    return {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}


def _unauthorized(command: str) -> Reply:
    return _error(f"command {command} requires authentication", 13, "Unauthorized")


_AUTHENTICATION_FAILED = _error("Authentication failed.", 18, "AuthenticationFailed")


# --------------------------------------------------------------------------- TLS


class TLSConfigurationError(Exception):
    """The TLS files cannot be used; ``str()`` is mongod's ``<CodeName>: <reason>``."""


def server_ssl_context(opts: MongodOptions) -> ssl.SSLContext | None:
    """The server's TLS context for the parsed options; None when TLS is disabled.

    Parameters
    ----------
    opts : MongodOptions
        A command line that passed :meth:`MongodOptions.check`, with
        ``--tlsMode`` ``disabled`` or ``requireTLS``.

    Returns
    -------
    ssl.SSLContext or None
        A server context that requires a client certificate signed by
        ``--tlsCAFile`` (TLS 1.2 or later, as mongod 7.0 by default).

    Raises
    ------
    TLSConfigurationError
        A file that cannot be read or used, or no ``--tlsCAFile``.
    """
    if opts.tlsMode == "disabled":
        return None
    if opts.tlsCAFile is None:
        # mongod 7.0 refuses TLS without a chain of trust; the system store
        # (--tlsUseSystemCA) would let any public CA's customer in.
        raise TLSConfigurationError(
            "InvalidSSLConfiguration: The use of TLS without specifying a chain of trust is no longer supported"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(opts.tlsCertificateKeyFile)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigurationError(
            f"InvalidSSLConfiguration: Can not set up PEM key file. ({opts.tlsCertificateKeyFile}: {_reason(exc)})"
        ) from exc
    try:
        context.load_verify_locations(cafile=opts.tlsCAFile)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigurationError(
            f"InvalidSSLConfiguration: Can not set up ssl CA file. ({opts.tlsCAFile}: {_reason(exc)})"
        ) from exc
    return context


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


def server_ssl_context_or_exit(opts: MongodOptions) -> ssl.SSLContext | None:
    """:func:`server_ssl_context`, or exit with status 1 as mongod's failed global initialisation."""
    try:
        return server_ssl_context(opts)
    except TLSConfigurationError as exc:
        print(f"Failed global initialization: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


def subject_name(certificate: Mapping[str, Any] | None) -> str | None:
    """The certificate's subject as MongoDB names an x.509 user: RFC 2253, most specific first.

    Parameters
    ----------
    certificate : dict or None
        ``ssl.SSLSocket.getpeercert()`` of a verified peer.

    Returns
    -------
    str or None
        E.g. ``CN=alice,OU=mspass-client,O=mspass_cluster``; None without a certificate.

    Examples
    --------
    >>> subject_name({"subject": ((("organizationName", "mspass_cluster"),), (("commonName", "a,b"),))})
    'CN=a\\\\,b,O=mspass_cluster'
    """
    if not certificate or "subject" not in certificate:
        return None
    rdns = []
    for rdn in reversed(certificate["subject"]):
        rdns.append("+".join(f"{_SHORT_NAMES.get(key, key)}={_escape(value)}" for key, value in rdn))
    return ",".join(rdns)


def _escape(value: str) -> str:
    escaped = "".join(f"\\{ch}" if ch in ',+"\\<>;' else ch for ch in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


#: The subject attributes that make a certificate a cluster member's (MongoDB's x.509 membership).
_MEMBER_ATTRIBUTES = ("O", "OU", "DC")
#: The internal user a member authenticates as.
SYSTEM_USER = {
    "_id": "local.__system",
    "user": "__system",
    "db": "local",
    "roles": [{"role": "__system", "db": "admin"}],
}


def member_identity(certificate: Mapping[str, Any] | None) -> frozenset[tuple[str, str]]:
    """The O, OU and DC of a certificate (``getpeercert()`` form): what members share and clients must not.

    >>> sorted(member_identity({"subject": ((("organizationName", "m"),), (("commonName", "x"),))}))
    [('O', 'm')]
    """
    if not certificate or "subject" not in certificate:
        return frozenset()
    return frozenset(
        (_SHORT_NAMES.get(key, key), value)
        for rdn in certificate["subject"]
        for key, value in rdn
        if _SHORT_NAMES.get(key, key) in _MEMBER_ATTRIBUTES
    )


def member_identity_of_file(path: str) -> frozenset[tuple[str, str]]:
    """:func:`member_identity` of the first certificate in a PEM file (a member's ``--tlsClusterFile``)."""
    from cryptography import x509

    with open(path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    names = {"O": "organizationName", "OU": "organizationalUnitName", "DC": "domainComponent"}
    subject = tuple(
        ((names[short], attribute.value),)
        for attribute in certificate.subject
        for short in _MEMBER_ATTRIBUTES
        if attribute.rfc4514_attribute_name == short
    )
    return member_identity({"subject": subject})


def access_control(opts: MongodOptions, store: Any) -> "AccessControl":
    """The access control of a server's command line: ``--auth``, and ``--clusterAuthMode x509`` membership."""
    identity = None
    if opts.clusterAuthMode == "x509":
        identity = member_identity_of_file(opts.tlsClusterFile or opts.tlsCertificateKeyFile)
    return AccessControl(store, auth=bool(getattr(opts, "auth", False)) or identity is not None, members=identity)


def is_local(peer: Any) -> bool:
    """Whether a peer address is this host's own: loopback, or a Unix domain socket.

    Parameters
    ----------
    peer
        ``getpeername()``: an (address, port, ...) tuple, or a str/bytes/None for a Unix socket.
    """
    if not isinstance(peer, tuple):
        return True
    address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# --------------------------------------------------------------------------- users


class UserStore:
    """The server's users, kept in ``<dbpath>/mongod_users.json``.

    Parameters
    ----------
    dbpath : str
        The data directory (it exists; the server holds it).

    Raises
    ------
    ValueError
        The file exists and is not a user list.
    """

    def __init__(self, dbpath: str):
        self.path = os.path.join(dbpath, USERS_FILE)
        self._lock = threading.Lock()
        self._users: list[dict[str, Any]] = self._load()

    def _load(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                users = json.load(handle)
        except FileNotFoundError:
            return []
        if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
            raise ValueError(f"{self.path} is not a list of users")
        return users

    def _save(self) -> None:
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self._users, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def empty(self) -> bool:
        """True while no user exists (the localhost exception is open)."""
        with self._lock:
            return not self._users

    def find(self, db: str, user: str) -> dict[str, Any] | None:
        """The user ``user`` of database ``db``, or None."""
        with self._lock:
            return next((dict(u) for u in self._users if (u["db"], u["user"]) == (db, user)), None)

    def select(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Copies of the users ``predicate`` accepts, in creation order."""
        with self._lock:
            return [dict(u) for u in self._users if predicate(u)]

    def add(self, record: dict[str, Any], *, only_if_empty: bool = False) -> str:
        """Add a user and save the store.

        Parameters
        ----------
        record : dict
            With at least ``db`` and ``user``.
        only_if_empty : bool, optional
            Add only while no user exists (atomically: two connections racing
            through the localhost exception create one user between them).

        Returns
        -------
        str
            ``"created"``, ``"exists"`` (that user already exists) or
            ``"not-empty"`` (``only_if_empty`` and some user exists).
        """
        with self._lock:
            if only_if_empty and self._users:
                return "not-empty"
            if any((u["db"], u["user"]) == (record["db"], record["user"]) for u in self._users):
                return "exists"
            self._users.append(dict(record))
            self._save()
            return "created"

    def remove(self, db: str, user: str) -> bool:
        """Remove a user; False if there was none."""
        with self._lock:
            kept = [u for u in self._users if (u["db"], u["user"]) != (db, user)]
            if len(kept) == len(self._users):
                return False
            self._users = kept
            self._save()
            return True


# --------------------------------------------------------------------------- the gate


class AccessControl:
    """A server's access control: ``--auth`` and its user store; one :class:`ConnectionSession` per connection.

    Parameters
    ----------
    store : UserStore
        The server's users.
    auth : bool
        ``--auth``: refuse unauthenticated commands. Without it the user
        commands still work, but nothing is enforced.
    members : frozenset, optional
        With ``--clusterAuthMode x509``: the O/OU/DC (:func:`member_identity`)
        of this server's member certificate; a peer certificate with the same
        ones authenticates as ``__system``.
    """

    def __init__(self, store: UserStore, *, auth: bool, members: frozenset[tuple[str, str]] | None = None):
        self.store = store
        self.auth = auth
        self.members = members or None

    def session(
        self, peer: Any, certificate: Mapping[str, Any] | None, log: LogFunction | None = None
    ) -> ConnectionSession:
        """The access state of one new connection.

        Parameters
        ----------
        peer
            The connection's ``getpeername()``.
        certificate : dict or None
            The verified client certificate (``getpeercert()``), None without TLS.
        log : callable, optional
            Where authentication events go.
        """
        return ConnectionSession(self, peer, certificate, log)


class ConnectionSession:
    """What one connection may do, and who it is; see :class:`AccessControl`.

    Attributes
    ----------
    subject : str or None
        The client certificate's subject (RFC 2253), None without one.
    user : dict or None
        The authenticated user (a :class:`UserStore` record).
    """

    def __init__(
        self, control: AccessControl, peer: Any, certificate: Mapping[str, Any] | None, log: LogFunction | None
    ):
        self._control = control
        self._log = log
        self.peer = peer
        self.local = is_local(peer)
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "anonymous unix socket"
        self.subject = subject_name(certificate)
        self.member = control.members is not None and member_identity(certificate) == control.members
        self.user: dict[str, Any] | None = None
        self._commands: dict[str, Callable[[str, dict[str, Any]], Reply]] = {
            "authenticate": self._authenticate,
            "saslStart": self._sasl,
            "saslContinue": self._sasl,
            "logout": self._logout,
            "connectionStatus": self._connection_status,
            "createUser": self._create_user,
            "usersInfo": self._users_info,
            "dropUser": self._drop_user,
        }

    def check(self, name: str, db: str, document: Mapping[str, Any]) -> Reply | None:
        """The gate's answer to one command, or None to let the server run it.

        Parameters
        ----------
        name : str
            The command's name (the document's first key).
        db : str
            The database it runs on (``$db``).
        document : mapping
            The command document.

        Returns
        -------
        dict or None
            A refusal (code 13 for an unauthenticated connection under
            ``--auth``), or the reply to a command the gate answers itself
            (``authenticate``, ``saslStart``, ``saslContinue``, ``logout``,
            ``connectionStatus``, ``createUser``, ``usersInfo``,
            ``dropUser``); None for everything else.
        """
        if (
            self.user is not None
            and self.user is not SYSTEM_USER
            and self._control.store.find(self.user["db"], self.user["user"]) is None
        ):
            # As mongod: a user dropped meanwhile is no longer authenticated on any connection.
            self.user = None
        if self._control.auth and self.user is None and name not in UNAUTHENTICATED_COMMANDS:
            if name == "createUser" and db in _LOCALHOST_EXCEPTION_DBS and self.local and self._control.store.empty():
                return self._create_user(db, document, first_only=True)
            return _unauthorized(name)
        command = self._commands.get(name)
        return command(db, dict(document)) if command is not None else None

    def respond(
        self, name: str, db: str, document: Mapping[str, Any], execute: Callable[[], Reply | None]
    ) -> Reply | None:
        """Run one command through the gate: :meth:`check`, else ``execute()``.

        A ``hello``/``isMaster`` carrying ``speculativeAuthenticate`` is
        answered by the server and the result of the authentication is added
        to its reply, as mongod does.

        Parameters
        ----------
        execute : callable
            Runs the command on the server; returns its reply (None: no reply).
        """
        reply = self.check(name, db, document)
        if reply is not None:
            return reply
        reply = execute()
        speculative = document.get("speculativeAuthenticate")
        if name in _HELLO_COMMANDS and isinstance(reply, dict) and isinstance(speculative, Mapping):
            outcome = self._authenticate(str(speculative.get("db", EXTERNAL_DB)), dict(speculative), speculative=True)
            if outcome.get("ok"):
                reply["speculativeAuthenticate"] = {"dbname": outcome["dbname"], "user": outcome["user"]}
        return reply

    # ------------------------------------------------------------------ authentication

    def _authenticate(self, db: str, document: dict[str, Any], *, speculative: bool = False) -> Reply:
        mechanism = document.get("mechanism")
        if mechanism is None:
            return _error("Auth mechanism not specified", 2, "BadValue")
        if mechanism != X509:
            return _mechanism_unavailable(mechanism)
        requested = document.get("user")
        attr = {
            "mechanism": X509,
            "speculative": speculative,
            "principalName": requested or self.subject or "",
            "authenticationDatabase": db,
            "remote": self.remote,
        }
        if db != EXTERNAL_DB:
            reason = "X.509 authentication must always use the $external database."
        elif self.subject is None:
            reason = "No verified subject name available from client"
        elif requested is not None and requested != self.subject:
            reason = "There is no x.509 client certificate matching the user."
        elif self.member:
            self.user = SYSTEM_USER
            self._emit(
                "I", 5286306, "Successfully authenticated", {**attr, "user": "__system", "isClusterMember": True}
            )
            return {"dbname": EXTERNAL_DB, "user": self.subject, "ok": 1.0}
        else:
            user = self._control.store.find(EXTERNAL_DB, self.subject)
            if user is not None:
                self.user = user
                self._emit("I", 5286306, "Successfully authenticated", attr)
                return {"dbname": EXTERNAL_DB, "user": self.subject, "ok": 1.0}
            reason = f'Could not find user "{self.subject}" for db "{EXTERNAL_DB}"'
        self._emit("I", 5286307, "Failed to authenticate", {**attr, "error": f"UserNotFound: {reason}"})
        return dict(_AUTHENTICATION_FAILED)

    def _sasl(self, db: str, document: dict[str, Any]) -> Reply:
        return _mechanism_unavailable(document.get("mechanism", "SCRAM-SHA-256"))

    def _logout(self, db: str, document: dict[str, Any]) -> Reply:
        if self.user is not None and self.user["db"] == db:
            self.user = None
        return {"ok": 1.0}

    def _connection_status(self, db: str, document: dict[str, Any]) -> Reply:
        users = [] if self.user is None else [{"user": self.user["user"], "db": self.user["db"]}]
        roles = [] if self.user is None else [dict(role) for role in self.user["roles"]]
        return {"authInfo": {"authenticatedUsers": users, "authenticatedUserRoles": roles}, "ok": 1.0}

    def _emit(self, severity: str, log_id: int, message: str, attr: dict[str, Any]) -> None:
        if self._log is not None:
            self._log(severity, log_id, message, attr)

    # ------------------------------------------------------------------ user management

    def _create_user(self, db: str, document: Mapping[str, Any], *, first_only: bool = False) -> Reply:
        name = document.get("createUser")
        if not isinstance(name, str) or not name:
            return _error(
                "BSON field 'createUser.createUser' is the wrong type, expected type 'string'", 14, "TypeMismatch"
            )
        if db != EXTERNAL_DB:
            return _error(
                f"createUser on database '{db}' is not supported by this mongod stand-in: it keeps only "
                f"MONGODB-X509 users, in the {EXTERNAL_DB} database",
                2,
                "BadValue",
            )
        if "pwd" in document:
            return _error("Cannot set the password of a user in the $external database", 2, "BadValue")
        if self._control.members is not None and _identity_of_subject(name) == self._control.members:
            return _error(
                "Cannot create an x.509 user with a subjectname that would be recognized as an internal cluster member",
                2,
                "BadValue",
            )
        if "roles" not in document:
            return _error("BSON field 'createUser.roles' is missing but a required field", 40414, "Location40414")
        roles = _parse_roles(document["roles"], db)
        if isinstance(roles, dict):
            return roles
        record = {
            "_id": f"{db}.{name}",
            "userId": str(uuid.uuid4()),
            "user": name,
            "db": db,
            "roles": roles,
            "mechanisms": ["external"],
        }
        outcome = self._control.store.add(record, only_if_empty=first_only)
        if outcome == "not-empty":
            # Another connection created the first user meanwhile: the exception has closed.
            return _unauthorized("createUser")
        if outcome == "exists":
            return _error(f'User "{name}@{db}" already exists', 51003, "Location51003")
        message = "Created the first user through the localhost exception" if first_only else "Created user"
        self._emit("I", 0, message, {"user": name, "db": db, "remote": self.remote})
        return {"ok": 1.0}

    def _users_info(self, db: str, document: Mapping[str, Any]) -> Reply:
        spec = document.get("usersInfo")
        wanted: list[tuple[str, str]] | None = []
        if isinstance(spec, Mapping) and spec.get("forAllDBs"):
            wanted = None
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
            wanted = None
        else:
            for entry in spec if isinstance(spec, list) else [spec]:
                if isinstance(entry, str):
                    wanted.append((db, entry))
                elif isinstance(entry, Mapping) and isinstance(entry.get("user"), str):
                    wanted.append((str(entry.get("db", db)), entry["user"]))
                else:
                    return _error("User name must be a string or a document with 'user' and 'db'", 2, "BadValue")
        if wanted is None:
            every_db = isinstance(spec, Mapping)

            def chosen(user: dict[str, Any]) -> bool:
                return every_db or user["db"] == db
        else:
            keys = set(wanted)

            def chosen(user: dict[str, Any]) -> bool:
                return (user["db"], user["user"]) in keys

        users = []
        for user in sorted(self._control.store.select(chosen), key=lambda u: u["_id"]):
            users.append(
                {
                    "_id": user["_id"],
                    "userId": bson.Binary(uuid.UUID(user["userId"]).bytes, bson.binary.UUID_SUBTYPE),
                    "user": user["user"],
                    "db": user["db"],
                    "roles": user["roles"],
                    "mechanisms": user.get("mechanisms", ["external"]),
                }
            )
        return {"users": users, "ok": 1.0}

    def _drop_user(self, db: str, document: Mapping[str, Any]) -> Reply:
        name = document.get("dropUser")
        if not isinstance(name, str) or not self._control.store.remove(db, name):
            return _error(f"User '{name}@{db}' not found", 11, "UserNotFound")
        if self.user is not None and (self.user["db"], self.user["user"]) == (db, name):
            self.user = None
        return {"ok": 1.0}


def _identity_of_subject(subject: str) -> frozenset[tuple[str, str]]:
    """The O/OU/DC of an RFC 2253 subject string (escaped commas kept inside their value)."""
    parts = re.split(r"(?<!\\),", subject)
    pairs = (part.split("=", 1) for part in parts if "=" in part)
    return frozenset((k.strip(), v.replace("\\", "")) for k, v in pairs if k.strip() in _MEMBER_ATTRIBUTES)


def _mechanism_unavailable(mechanism: Any) -> Reply:
    return _error(
        f"Received authentication for mechanism {mechanism} which is not enabled", 334, "MechanismUnavailable"
    )


def _parse_roles(roles: Any, db: str) -> list[dict[str, str]] | Reply:
    """``[{"role": r, "db": d}, ...]`` from createUser's ``roles``, or mongod's refusal."""
    if not isinstance(roles, list):
        return _error("BSON field 'createUser.roles' is the wrong type, expected type 'array'", 14, "TypeMismatch")
    parsed = []
    for entry in roles:
        if isinstance(entry, str):
            role, role_db = entry, db
        elif isinstance(entry, Mapping) and isinstance(entry.get("role"), str) and isinstance(entry.get("db"), str):
            role, role_db = entry["role"], entry["db"]
        else:
            return _error(f"Invalid role specification: {entry!r}", 2, "BadValue")
        if role_db == EXTERNAL_DB or not (role in _DATABASE_ROLES or (role_db == "admin" and role in _ADMIN_ROLES)):
            return _error(f"Could not find role: {role}@{role_db}", 31, "RoleNotFound")
        parsed.append({"role": role, "db": role_db})
    return parsed
