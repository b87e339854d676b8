"""The loopback OCI registry the registry tests push to."""

from __future__ import annotations

import os

import pytest

from export import local_registry as registry_server


@pytest.fixture(scope="module")
def oci_registry(tmp_path_factory):
    """A real OCI registry on loopback for this module (skipped only where docker-registry is absent)."""
    tmp = tmp_path_factory.mktemp("registry")
    started = registry_server.start(tmp)
    if started is None:
        if os.environ.get("CI"):
            pytest.fail("docker-registry is not installed; .ci/run installs it with apt-get")
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    proc, host = started
    yield {"host": host, "data": tmp / "data"}
    registry_server.stop(proc)
