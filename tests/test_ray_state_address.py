"""Ray workers of a local instance find their own cluster's State API, whatever else runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_workers_know_their_own_cluster_address(ray_session: object) -> None:
    """Train V2's PlacementGroupCleaner calls the State API without an address from a Ray
    worker; with no RAY_ADDRESS there, Ray scans the machine's GCS processes and fails when
    another local Ray runs ("Found multiple active Ray instances"), and the placement groups
    of stopped trials are never freed. ensure_ray gives the daemons the instance's address."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def probe() -> tuple[str | None, int]:
        import os

        from ray.util.state import list_actors

        return os.environ.get("RAY_ADDRESS"), len(list_actors(limit=10))

    address, _ = ray.get(probe.remote())
    assert address == ray.get_runtime_context().gcs_address
    assert os.environ.get("RAY_ADDRESS") != address  # the driver's own environment is left as it was
