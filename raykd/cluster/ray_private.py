"""Every use of Ray's private APIs, in one module: what to check when Ray is upgraded.

Ray is pinned below 2.61 because of these. Each one is best effort and says what it falls back
to when the private name moved; nothing else in raykd imports `ray._private`, `ray.serve._private`
or `ray.train.*._internal`. (`raykd.core.console.in_ray_worker` reads `ray._private.worker` from
`sys.modules` without importing Ray: the core layer cannot import this module.)
"""

from __future__ import annotations

import logging


def ray_start_address() -> str | None:
    """GCS address recorded by the last `ray start` on this machine, if that GCS is still running."""
    try:
        from ray._private import services

        services.find_gcs_addresses.cache_clear()
        address = services.find_bootstrap_address(None)
        return address if address and address in services.find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 - private Ray helpers: no cluster found is the safe answer
        return None


def worker_output_dispatcher():
    """Ray's dispatcher of worker stdout/stderr forwarded to the driver (handlers by name)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def autoscaler_events(lines: list[str]) -> list[str]:
    """Only the events of the autoscaler's periodic status output, as Ray's own printer keeps them."""
    from ray._private.worker import filter_autoscaler_events

    return list(filter_autoscaler_events(lines))


def print_worker_lines(data: dict) -> None:
    """Print forwarded worker lines the way Ray does (its `(actor pid=...)` prefixes and colours)."""
    from ray._private.worker import print_to_stdstream

    print_to_stdstream(data, ignore_prefix=False)


def serve_proxy_host() -> str | None:
    """The address Serve's HTTP proxies bind (None: Serve not running or not reachable)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if not ray.is_initialized():
        return None
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except (ValueError, ray.exceptions.RayError):
        return None


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint path at INFO on each worker; the loop prints
    one line per epoch instead. Private loggers (one is named after its file): best effort."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for module in (context, storage):
        module.logger.setLevel(logging.WARNING)


def release_orphaned_placement_groups() -> int:
    """Remove placement groups of this job whose creator (a Train controller) has died.

    When ASHA stops a trial, Tune ends the trial actor and the Train controller it owns dies
    with it; Train's detached PlacementGroupCleaner then removes the worker group's placement
    group through the State API. Where that API cannot be reached (dashboard off, or several
    local Ray instances on one machine, so that it cannot tell which one is meant) the group
    keeps its CPUs until the driver exits and later trials wait forever. This does the same
    cleanup from the Tune driver. Reads the GCS table directly (no public API exposes the
    creator's liveness); on any error it does nothing.
    """
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        removed = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            # a driver-created group (Tune's trial groups) has no creator actor and counts as "dead"
            by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()
            if (by_actor and pg.creator_actor_dead and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
                    and not pg.is_detached and pg.creator_job_id.hex() == job):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        return removed
    except Exception:  # noqa: BLE001 - a safety net only: Train's own cleaner is the first line
        return 0
