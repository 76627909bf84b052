"""Mosquitto 2.0 with the generated pattern ACL passes the same ACL contract."""

from __future__ import annotations

import pytest

from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerAclContract, BrokerProcess
from tests.helpers import RecordingClient


class TestMosquittoAcl(BrokerAclContract):
    """The ACL contract against a real Mosquitto."""

    refuses_wide_subscriptions = False

    @pytest.fixture
    def broker(self, mosquitto_broker: BrokerProcess) -> BrokerProcess:
        """The broker under test."""
        return mosquitto_broker


def test_pattern_acl_follows_the_username_not_the_client_id(
    mosquitto_broker: BrokerProcess,
) -> None:
    """%u patterns: under another client id a device still publishes only as its username."""
    server = RecordingClient(mosquitto_broker.port, "merge-1", SERVER_USER, USERS[SERVER_USER])
    client = RecordingClient(mosquitto_broker.port, "some-client-id", "van-12", USERS["van-12"])
    try:
        assert server.connect() == "Success"
        assert server.subscribe(f"{PREFIX}/#") == 1
        assert client.connect() == "Success"
        client.publish(f"{PREFIX}/some-client-id/up", b"forged")
        client.publish(f"{PREFIX}/van-12/up", b"marker")
        server.wait_for(f"{PREFIX}/van-12/up", b"marker")
        assert [m.payload for m in server.received()] == [b"marker"]
    finally:
        client.close()
        server.close()
