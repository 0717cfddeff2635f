"""Which address the scheduler takes."""

import pytest

from mspass_cluster.errors import ConfigError
from mspass_cluster.network import scheduler_host


def test_interface_wins_and_is_named():
    address, reason = scheduler_host("lo", ["10.77.0.11"])
    assert address == "127.0.0.1" and "lo" in reason


def test_unknown_interface_is_a_clear_error():
    with pytest.raises(ConfigError, match="no-such-if0"):
        scheduler_host("no-such-if0", [])


def test_the_route_to_the_nodes_picks_the_address_they_can_reach():
    address, reason = scheduler_host(None, ["127.0.0.5"])
    assert address.startswith("127.") and "127.0.0.5" in reason


def test_unresolvable_nodes_fall_back_to_the_default_route_and_say_so():
    address, reason = scheduler_host(None, ["no-such-node.invalid"])
    assert address and "default route" in reason
