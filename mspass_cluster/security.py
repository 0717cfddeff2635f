"""A cluster's credentials: a fresh certificate authority and the certificates of its roles.

Every cluster makes its own CA when it starts (an EC P-256 key, made in
milliseconds) and signs with it one certificate per kind of peer:

``worker.pem``
    Dask workers and nannies (mutual TLS with the scheduler and each other).
``db-server.pem``
    The database server (``mongod --tlsCertificateKeyFile``).
``db-client.pem``
    Every database client: the notebook, the workers, MsPASS's ``DBClient``.
    Its subject is the database's only user (x.509 authentication).
``db-member.pem``
    A sharded database's members (config server, shards, router) to one
    another (``--tlsClusterFile``, ``--clusterAuthMode x509``), and the
    cluster itself when it initiates and configures them. Its O and OU
    (``mspass_cluster``, ``mspass-member``) are every member's and differ
    from the client's OU, as MongoDB requires: a certificate with the
    member's O/OU/DC authenticates as the internal ``__system`` user.

The CA's private key never leaves this process's memory: nobody, the owner
included, can mint another certificate this cluster trusts, so a peer that
completes the handshake is one of the cluster's own. Hostnames are therefore
not checked (the database's node is not known when the certificates are
made). The files live in a directory created fresh with mode 0700, each
file 0600, and go away with the cluster.

The scheduler's and the notebook client's keys are kept in memory only.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import os
import urllib.parse
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ClusterCredentials", "CredentialFiles", "db_client_uri", "DB_CLIENT_OU", "DB_MEMBER_OU", "db_security_args"]

#: Organisation of every certificate; the roles differ in their OU.
ORGANISATION = "mspass_cluster"
#: OU of database clients: it must differ from the server's, or MongoDB takes a client for a cluster member.
DB_CLIENT_OU = "mspass-client"
#: OU of a sharded database's members (x.509 membership): the same for all of them, not a client's.
DB_MEMBER_OU = "mspass-member"
#: How long the certificates are valid: far beyond any walltime.
VALIDITY = datetime.timedelta(days=30)


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class _Authority:
    """The in-memory CA: signs leaf certificates for client and server use."""

    def __init__(self, cluster: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(f"mspass-cluster-ca-{cluster}", "mspass-ca")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, subject: x509.Name) -> tuple[bytes, bytes]:
        """A new key and its certificate (PEM), good as TLS client and server."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return _pem_key(key), _pem_cert(cert)


@dataclass(frozen=True)
class CredentialFiles:
    """Where a cluster's credential files are, as job scripts name them (no key material).

    Attributes
    ----------
    ca_file : str
        The CA certificate every peer checks the others against.
    worker_cert, worker_key : str
        Dask workers' and nannies' certificate and key (one file for the cluster's own).
    db_server_pem, db_client_pem : str
        The database server's and clients' certificate and key, or None when
        the database runs without TLS (a ``distributed.Security`` given for Dask only).
    db_user : str
        The x.509 user the database's first-user script creates.
    db_member_pem : str or None
        A sharded database's member certificate and key (x.509 membership).
    private_dir : str
        The cluster's own directory of credentials, removed with the cluster.
    """

    ca_file: str
    worker_cert: str
    worker_key: str
    db_server_pem: str | None = None
    db_client_pem: str | None = None
    db_ca_file: str | None = None
    db_user: str | None = None
    #: The cluster's own private directory holding these files (None in previews).
    private_dir: str | None = None
    db_member_pem: str | None = None

    @classmethod
    def placeholder(cls) -> "CredentialFiles":
        """The files of a cluster not started yet, for previews of its job scripts."""
        d = "<work_dir>/.mspass_cluster/<cluster>"
        return cls(
            f"{d}/ca.pem",
            f"{d}/worker.pem",
            f"{d}/worker.pem",
            f"{d}/db-server.pem",
            f"{d}/db-client.pem",
            f"{d}/ca.pem",
            f"CN={getpass.getuser()},OU={DB_CLIENT_OU},O={ORGANISATION}",
            db_member_pem=f"{d}/db-member.pem",
        )

    def db_uri(self, host: str, port: int) -> str:
        """The database's connection string for the cluster's clients (needs the database files)."""
        return db_client_uri(host, port, self.db_ca_file, self.db_client_pem)

    def with_dask(self, security) -> "CredentialFiles":
        """These files, with Dask's taken from a user's :class:`distributed.Security` (which must name files)."""
        return dataclasses.replace(
            self,
            ca_file=security.tls_ca_file,
            worker_cert=security.tls_worker_cert,
            worker_key=security.tls_worker_key or security.tls_worker_cert,
        )


def _write_private(path: str, data: bytes) -> None:
    """Create ``path`` new, 0600, never following a link, and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class ClusterCredentials:
    """One cluster's CA certificate and role certificates, as files in a private directory.

    Attributes
    ----------
    directory : str
        The private directory (0700) holding the files.
    ca_file, worker_pem, db_server_pem, db_client_pem, db_member_pem : str
        Paths of ``ca.pem`` and the role files (certificate and key in one PEM each).
    db_user : str
        The database clients' subject as MongoDB names the x.509 user (RFC 2253).
    """

    directory: str
    ca_file: str
    worker_pem: str
    db_server_pem: str
    db_client_pem: str
    db_user: str
    db_member_pem: str
    _scheduler_cert: str
    _scheduler_key: str
    _client_cert: str
    _client_key: str

    @classmethod
    def create(cls, directory: str, user: str | None = None, cluster: str = "") -> "ClusterCredentials":
        """Make a fresh CA and the role certificates, and write them into ``directory``.

        Parameters
        ----------
        directory : str
            Created here with mode 0700 if missing; an existing one must be
            empty of these files (they are created exclusively).
        user : str, optional
            Common name of the database user; default the login name.
        cluster : str, optional
            The cluster's name, for the CA's common name.
        """
        user = user or getpass.getuser()
        authority = _Authority(cluster or os.path.basename(directory.rstrip(os.sep)) or "cluster")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        paths = {
            name: os.path.join(directory, name)
            for name in ("ca.pem", "worker.pem", "db-server.pem", "db-client.pem", "db-member.pem")
        }
        _write_private(paths["ca.pem"], _pem_cert(authority.cert))
        for filename, subject in (
            ("worker.pem", _name("mspass-dask-worker", "mspass-dask")),
            ("db-server.pem", _name("mspass-db", "mspass-server")),
            ("db-client.pem", _name(user, DB_CLIENT_OU)),
            ("db-member.pem", _name("mspass-db-member", DB_MEMBER_OU)),
        ):
            key, cert = authority.issue(subject)
            _write_private(paths[filename], cert + key)
        scheduler_key, scheduler_cert = authority.issue(_name("mspass-dask-scheduler", "mspass-dask"))
        client_key, client_cert = authority.issue(_name("mspass-dask-client", "mspass-dask"))
        return cls(
            directory=directory,
            ca_file=paths["ca.pem"],
            worker_pem=paths["worker.pem"],
            db_server_pem=paths["db-server.pem"],
            db_client_pem=paths["db-client.pem"],
            db_user=_name(user, DB_CLIENT_OU).rfc4514_string(),
            db_member_pem=paths["db-member.pem"],
            _scheduler_cert=scheduler_cert.decode(),
            _scheduler_key=scheduler_key.decode(),
            _client_cert=client_cert.decode(),
            _client_key=client_key.decode(),
        )

    @property
    def files(self) -> CredentialFiles:
        """The file paths job scripts need."""
        return CredentialFiles(
            ca_file=self.ca_file,
            worker_cert=self.worker_pem,
            worker_key=self.worker_pem,
            db_server_pem=self.db_server_pem,
            db_client_pem=self.db_client_pem,
            db_ca_file=self.ca_file,
            db_user=self.db_user,
            private_dir=self.directory,
            db_member_pem=self.db_member_pem,
        )

    def dask_security(self):
        """A :class:`distributed.Security` for this process: the scheduler and its clients, keys in memory.

        Workers get the files (``--tls-ca-file``/``--tls-cert``/``--tls-key``).
        """
        from distributed.security import Security

        with open(self.ca_file) as f:
            ca = f.read()
        return Security(
            require_encryption=True,
            tls_ca_file=ca,
            tls_scheduler_cert=self._scheduler_cert,
            tls_scheduler_key=self._scheduler_key,
            tls_client_cert=self._client_cert,
            tls_client_key=self._client_key,
            tls_worker_cert=self.worker_pem,
            tls_worker_key=self.worker_pem,
        )

    def db_uri(self, host: str, port: int) -> str:
        """The database's connection string for this cluster's clients (file paths, no secret)."""
        return self.files.db_uri(host, port)


def db_client_uri(host: str, port: int, ca_file: str, client_pem: str) -> str:
    """``mongodb://host:port/?tls=true&...&authMechanism=MONGODB-X509``: TLS with a client certificate, x.509 auth.

    >>> db_client_uri("n1", 27017, "/run/c/ca.pem", "/run/c/db client.pem")  # doctest: +NORMALIZE_WHITESPACE
    'mongodb://n1:27017/?tls=true&tlsCAFile=%2Frun%2Fc%2Fca.pem&tlsCertificateKeyFile=%2Frun%2Fc%2Fdb%20client.pem&tlsAllowInvalidHostnames=true&authMechanism=MONGODB-X509&authSource=%24external'
    """
    query = urllib.parse.urlencode(
        {
            "tls": "true",
            "tlsCAFile": ca_file,
            "tlsCertificateKeyFile": client_pem,
            "tlsAllowInvalidHostnames": "true",
            "authMechanism": "MONGODB-X509",
            "authSource": "$external",
        },
        quote_via=urllib.parse.quote,
        safe="",
    )
    return f"mongodb://{host}:{port}/?{query}"


def db_security_args(tls: CredentialFiles, auth: bool = True) -> list[str]:
    """mongod's options for TLS with client certificates and (``auth``) access control.

    ``mongos`` has no ``--auth`` (its users live on the config server): ``auth=False`` for the router.
    """
    return [
        *(["--auth"] if auth else []),
        "--tlsMode",
        "requireTLS",
        "--tlsCertificateKeyFile",
        tls.db_server_pem,
        "--tlsCAFile",
        tls.db_ca_file,
    ]
