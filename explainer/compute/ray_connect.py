"""Connecting :class:`~explainer.compute.ray_executor.RayExecutor` to Ray: a cluster, or a Ray
instance of this machine that listens on loopback only.

Ray binds its servers (GCS, raylet and object manager, workers, dashboard agent, metrics export)
to 127.0.0.1 when the node's address is a loopback name, and to every interface when it is any
other address. ``ray.init(address="local")`` on Linux takes the machine's outward address as the
node's address, so a Ray started for ``--ray local`` would listen on every interface of the
machine; :func:`connect` starts it with the node address 127.0.0.1 instead (the single-machine
mode Ray uses on Windows and macOS, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``).

A cluster of several nodes on one machine (the test cluster of ``scripts/ray_cluster.sh``, the
throughput benchmark's clusters) stays on loopback the same way: every node has the address
127.0.0.1. In that mode ``ray start --address`` refuses to add a node, so :func:`start_node` adds
one as that command does; from a shell::

    python -m explainer.compute.ray_connect node 127.0.0.1:6379 /tmp/folder/node2 --num-cpus 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from explainer import errors

__all__ = ["LOCAL", "LOOPBACK", "connect", "import_ray", "start_node"]

LOCAL = "local"
"""The address that starts a Ray instance on this machine instead of joining a cluster."""

LOOPBACK = "127.0.0.1"
"""The node address that keeps Ray's servers on loopback (one of Ray's loopback names)."""


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`~explainer.errors.WorkerError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise errors.WorkerError(
            'Running on Ray needs the ray package: pip install -e ".[ray]" (or '
            "pip install 'ray>=2.9')."
        ) from None
    return ray


def connect(ray: Any, address: str | None, init_options: Mapping[str, Any] | None) -> bool:
    """Connect this process to Ray unless it is already; True when this call connected.

    ``address`` is :data:`LOCAL` (or empty) to start a Ray instance on this machine, bound to
    loopback, or a cluster's address for ``ray.init``.
    """
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": False,
               "logging_level": logging.WARNING, **dict(init_options or {})}  # fmt: skip
    local = address in (None, "", LOCAL)
    try:
        if local:
            _init_on_loopback(ray, options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise errors.WorkerError(
            f"Could not reach the Ray cluster at {address!r} ({exc}). Check the address "
            "(ray status on a node shows it), or use --ray local."
        ) from exc
    return True


def _init_on_loopback(ray: Any, options: dict[str, Any]) -> None:
    """``ray.init(address="local")`` with the node address 127.0.0.1 (unless the options name
    another): Ray's servers then listen on loopback only. Ray takes the node's address from
    ``ray._private.services.get_node_ip_address``, which gives loopback while the constant
    ``ENABLE_RAY_CLUSTER`` is false; it is false only during this call."""
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without it: its own choice of address
        ray_constants = None
    if ray_constants is None or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        ray.init(address=LOCAL, **options)
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address=LOCAL, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_node(
    gcs_address: str,
    temp_dir: str,
    *,
    num_cpus: int,
    agent_port: int | None = None,
    metrics_port: int | None = None,
) -> None:
    """Add a node of this machine, with the node address 127.0.0.1, to the cluster whose GCS is
    at ``gcs_address``, as ``ray start --address`` does; its processes outlive this one.

    Ray's constant ``ENABLE_RAY_CLUSTER`` must be false (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    before Ray is imported), as for the head node and the drivers: otherwise Ray reads 127.0.0.1
    as the machine's outward address. Token authentication reads ``RAY_AUTH_MODE`` and
    ``RAY_AUTH_TOKEN_PATH`` from the environment. ``agent_port`` and ``metrics_port`` are the
    dashboard agent's and the metrics export's ports (None: Ray's defaults).
    """
    import_ray()
    from ray._private import ray_constants
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise errors.WorkerError(
            "A node on 127.0.0.1 needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment "
            "(set before Ray is imported); without it Ray uses the machine's outward address."
        )
    ports = {"dashboard_agent_listen_port": agent_port, "metrics_export_port": metrics_port}
    params = RayParams(
        node_ip_address=LOOPBACK, node_name=LOOPBACK, gcs_address=gcs_address,
        num_cpus=num_cpus, temp_dir=temp_dir, include_log_monitor=True,
        **{name: port for name, port in ports.items() if port is not None},
    )  # fmt: skip
    try:
        from ray._private.authentication.authentication_token_setup import (
            ensure_token_if_auth_enabled,
        )
    except ImportError:  # a Ray without token authentication
        pass
    else:
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``node GCS_ADDRESS TEMP_DIR [--num-cpus N] [--agent-port P] [--metrics-port P]``: start a
    node with :func:`start_node`; 0 when it started."""
    parser = argparse.ArgumentParser(
        prog="python -m explainer.compute.ray_connect",
        description="Add a node on 127.0.0.1 to a Ray cluster of this machine.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser(
        "node", help="start a node (needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)"
    )
    node.add_argument("gcs_address", help="the head's address, 127.0.0.1:PORT")
    node.add_argument("temp_dir", help="the node's own temporary folder")
    node.add_argument("--num-cpus", type=int, default=1)
    node.add_argument("--agent-port", type=int, default=None)
    node.add_argument("--metrics-port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        start_node(
            args.gcs_address, args.temp_dir, num_cpus=args.num_cpus,
            agent_port=args.agent_port, metrics_port=args.metrics_port,
        )  # fmt: skip
    except errors.WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Ray node started at {LOOPBACK} (cluster {args.gcs_address}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
