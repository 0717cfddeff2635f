"""DBClient travels to workers as its connection string; ping says why a server does not answer."""

import pickle
import socket
import sys

from conftest import require_mspasspy

from mspass_cluster.db import DBClient, connection_string, get_db_client, ping


def test_db_client_pickles_to_its_connection_string_and_reconnects():
    client = DBClient("mongodb://n3:27017/", serverSelectionTimeoutMS=1500)
    clone = pickle.loads(pickle.dumps(client))
    assert isinstance(clone, DBClient) and clone is not client
    assert clone._mspass_host == "mongodb://n3:27017/"
    assert clone.options.server_selection_timeout == 1.5
    client.close(), clone.close()


def test_with_mspasspy_its_client_is_returned():
    require_mspasspy()
    from mspasspy.db.client import DBClient as MsPASSDBClient

    client = get_db_client(connection_string("localhost", 27017))
    assert isinstance(client, MsPASSDBClient)
    client.close()


def test_without_mspasspy_the_packages_own_client_is_returned(monkeypatch):
    monkeypatch.setitem(sys.modules, "mspasspy.db.client", None)  # what `import` sees when mspasspy is absent
    client = get_db_client(connection_string("localhost", 27017))
    assert isinstance(client, DBClient)
    client.close()


def test_ping_of_a_closed_port_explains_itself():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = ping(connection_string("127.0.0.1", port), timeout=0.3)
    assert answer is not None and "ServerSelectionTimeoutError" in answer
