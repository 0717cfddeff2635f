"""Create the cluster's database user, once, right after mongod starts.

Run by the database job on the database's node, with the container image's
Python (this package is not installed there: standard library and pymongo
only), the script on standard input::

    python - --port P --ca CA --cert CLIENT_PEM --subject SUBJECT --timeout T < db_users.py

It waits until mongod answers over TLS on 127.0.0.1:P (the client
certificate ``CLIENT_PEM``, hostnames not checked), then:

* if MONGODB-X509 authentication as ``SUBJECT`` works, the user exists
  (a restart on the same data): exit 0;
* otherwise it creates ``SUBJECT`` in ``$external`` with role ``root`` on
  ``admin`` through mongod's localhost exception (open only while the server
  has no user, only over loopback), checks that authentication now works,
  and exits 0.

Any failure -- no answer within T seconds, a refused certificate, a server
that already has other users -- prints one line on standard error, starting
``mspass_cluster:``, and exits 1; the job script then stops mongod so that
the job fails with that line in its log.
"""

from __future__ import annotations

import argparse
import sys
import time

import pymongo
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

EXTERNAL = "$external"
ROLES = [{"role": "root", "db": "admin"}]
# Each attempt waits this long for the server; the whole wait is --timeout.
ATTEMPT_SECONDS = 1.0


class BootstrapError(Exception):
    """Why the user could not be made sure of; ``str()`` is the line to print."""


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="db_users.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="mongod's port on 127.0.0.1")
    parser.add_argument("--ca", required=True, help="the cluster's CA certificate (PEM)")
    parser.add_argument("--cert", required=True, help="the database client's certificate and key (PEM)")
    parser.add_argument("--subject", required=True, help="the client certificate's subject, RFC 2253")
    parser.add_argument("--timeout", type=float, required=True, help="seconds to wait for mongod")
    return parser.parse_args(argv)


def connect(args: argparse.Namespace, timeout: float, *, authenticate: bool) -> pymongo.MongoClient:
    """A client of the server on 127.0.0.1, over TLS with the client certificate."""
    options = {
        "tls": True,
        "tlsCAFile": args.ca,
        "tlsCertificateKeyFile": args.cert,
        "tlsAllowInvalidHostnames": True,
        "directConnection": True,
        "serverSelectionTimeoutMS": max(1, int(timeout * 1000)),
        "connectTimeoutMS": max(1, int(timeout * 1000)),
    }
    if authenticate:
        options.update(authMechanism="MONGODB-X509", authSource=EXTERNAL, username=args.subject)
    try:
        return pymongo.MongoClient("127.0.0.1", args.port, **options)
    except (ConfigurationError, OSError, ValueError) as exc:
        raise BootstrapError(f"cannot use the certificates {args.cert} and {args.ca}: {exc}") from exc


def wait_for_server(args: argparse.Namespace) -> None:
    """Return once the server answers ``ping`` over TLS (allowed before authentication)."""
    deadline = time.monotonic() + args.timeout
    while True:
        attempt = min(ATTEMPT_SECONDS, max(deadline - time.monotonic(), 0.05))
        client = connect(args, attempt, authenticate=False)
        try:
            client.admin.command("ping")
            return
        except PyMongoError as exc:
            last_error = exc
        finally:
            client.close()
        if time.monotonic() >= deadline:
            raise BootstrapError(
                f"the database on 127.0.0.1:{args.port} did not answer over TLS within {args.timeout:g} s "
                f"(last error: {_first_line(last_error)})"
            )


def authenticates(args: argparse.Namespace) -> bool:
    """Whether MONGODB-X509 authentication as the subject succeeds."""
    client = connect(args, ATTEMPT_SECONDS * 5, authenticate=True)
    try:
        client.admin.command("ping")
        return True
    except OperationFailure as exc:
        if exc.code == 18:  # AuthenticationFailed: no such user (yet)
            return False
        raise BootstrapError(f"X.509 authentication as {args.subject} failed: {_first_line(exc)}") from exc
    except PyMongoError as exc:
        raise BootstrapError(f"X.509 authentication as {args.subject} failed: {_first_line(exc)}") from exc
    finally:
        client.close()


def create_user(args: argparse.Namespace) -> None:
    """Create the subject in ``$external`` through the localhost exception."""
    client = connect(args, ATTEMPT_SECONDS * 5, authenticate=False)
    try:
        client[EXTERNAL].command("createUser", args.subject, roles=ROLES)
    except OperationFailure as exc:
        if exc.code == 13:
            reason = "the server already has other users, so the localhost exception is closed"
        elif exc.code == 51003:
            reason = "the user exists but X.509 authentication as it failed: is it the subject of --cert?"
        else:
            reason = "the server refused"
        raise BootstrapError(f"cannot create the database user {args.subject}: {reason} ({_first_line(exc)})") from exc
    except PyMongoError as exc:
        raise BootstrapError(f"cannot create the database user {args.subject}: {_first_line(exc)}") from exc
    finally:
        client.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    try:
        wait_for_server(args)
        if authenticates(args):
            print(f"mspass_cluster: database user {args.subject} exists")
            return 0
        create_user(args)
        if not authenticates(args):
            raise BootstrapError(f"created the database user {args.subject}, but X.509 authentication as it fails")
    except BootstrapError as exc:
        print(f"mspass_cluster: {exc}", file=sys.stderr)
        return 1
    print(f"mspass_cluster: created database user {args.subject} (root on admin)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
