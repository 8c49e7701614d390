"""The http tier: applications in Serve's local testing mode, shut down with their module."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _local_apps_end_with_their_module(local_serve):
    yield
