"""A pytest plugin: tests that must not run at the same time as others of their kind are
put into one pytest-xdist group (`--dist loadgroup` runs a group on one worker, in order).

    rabbitmq   every test marked `rabbitmq`: each module starts a three-node RabbitMQ
               cluster (three Erlang VMs, most of a core while they boot, 50-90 s on a
               loaded machine); two clusters at once would put six VMs on two cores, and
               in one worker the package-scoped cluster of tests/broker/ is started once
               instead of once per worker.

Without xdist the mark is inert. tests/conftest.py loads it for the whole suite.
"""

from __future__ import annotations

import pytest

GROUPS = {"rabbitmq": "rabbitmq"}
"""marker name -> xdist group of the tests carrying it."""


def group_of(item: pytest.Item) -> str | None:
    """The xdist group a test belongs to by its markers (the first that matches)."""
    for marker, group in GROUPS.items():
        if item.get_closest_marker(marker) is not None:
            return group
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: pytest-xdist's worker turns xdist_group marks into the "@group" node-id
    # suffix its scheduler groups by in its own hook of this name, which otherwise ran
    # first: the marks came too late and the group's tests went to both workers.
    for item in items:
        group = group_of(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
