"""How `server status` and store errors name a PostgreSQL store: without the password,
and in a form that says what libpq connects to (a Unix socket is not `host:5432`)."""

from __future__ import annotations

import pytest

from broker.server.store.postgres.common import describe_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://waystation:secret@db.example.com:6543/fleet",
     "postgresql://waystation@db.example.com:6543/fleet"),
    ("postgresql://waystation@127.0.0.1/waystation", "postgresql://waystation@127.0.0.1:5432/waystation"),
    # deploy/README.md step 5: peer authentication over the local socket.
    ("postgresql:///waystation?host=/var/run/postgresql",
     "postgresql:///waystation?host=/var/run/postgresql"),
    ("postgresql:///waystation?host=/tmp/pg&port=15432",
     "postgresql:///waystation?host=/tmp/pg&port=15432"),
    ("postgresql:///waystation", "postgresql:///waystation"),
    ("host=/run/pg user=w password=secret dbname=fleet", "postgresql://w@/fleet?host=/run/pg"),
])
def test_describe_url(url: str, shown: str) -> None:
    assert describe_url(url) == shown
    assert "secret" not in describe_url(url)
