"""Start (or join) a Ray cluster and run the server as a Ray Serve application.

Topology: one ``EngineReplica`` deployment with ``--replicas`` replicas (``num_cpus`` =
``--replica-cpus``, plus one GPU each on cuda) and one ``Ingress`` deployment serving the app of
``create_app`` with a ``RayEngineClient`` over the replicas' handle. Ray Serve's HTTP proxy
listens on ``--host``/``--port`` (127.0.0.1:8000 by default) and hands requests to the ingress.

A local cluster uses the loopback address (``SINGLE_NODE_ENV``) without Ray's dashboard
or its Jobs API (both unauthenticated network services); its object store is
``--ray-object-store-memory`` (the engine's tensors never go through it: requests and output
deltas are small). A cluster of several machines, joined with ``--ray-address``, belongs on a
private network: Ray's own ports are not meant to face anything else.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from ..config import ServerConfig

log = logging.getLogger(__name__)
# Ray's switch for a single-node cluster: its node address is then the loopback address (by
# default Ray advertises the machine's network address, even when told 127.0.0.1, and
# traffic between its processes leaves loopback). Read when Ray is imported, and inherited by
# every process of the local cluster.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
APP_NAME = "prolora"
REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "Ingress"
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0


class Ingress:
    """The ingress deployment's class: the FastAPI app of ``create_app`` over the replicas."""

    async def __init__(self, config: ServerConfig, replicas: Any, affinity: bool = True) -> None:
        from .ray_client import RayEngineClient

        self._config = config
        description = await replicas.describe.remote()
        self.client = RayEngineClient(replicas, description, affinity=affinity)

    def __serve_build_asgi_app__(self) -> Any:
        from ..api.app import create_app
        from .ray_client import ReplicaHeaderMiddleware

        app = create_app(self._config, engine=self.client)
        app.add_middleware(ReplicaHeaderMiddleware)
        return app


def replica_deployment(config: ServerConfig) -> Any:
    from ray import serve

    from .replica import EngineReplica

    scale = config.scaleout
    gpus = 1 if config.engine.device.startswith("cuda") else 0
    return serve.deployment(
        name=REPLICA_DEPLOYMENT, num_replicas=scale.replicas,
        ray_actor_options={"num_cpus": scale.replica_cpus, "num_gpus": gpus},
        # A running batch and as many waiting per replica; more wait in the router (and go to
        # whichever replica frees first), up to the engine's queue bound, then 429.
        max_ongoing_requests=2 * config.engine.max_batch,
        max_queued_requests=config.engine.max_queue,
        health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=10,
    )(EngineReplica)


def ingress_deployment(config: ServerConfig) -> Any:
    from ray import serve

    return serve.deployment(
        name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(256, config.engine.max_queue),
        health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    )(serve.ingress()(Ingress))


def build_application(config: ServerConfig, *, affinity: bool = True) -> Any:
    """The Serve application; ``affinity=False`` sends no multiplexed id (plain routing)."""
    if not config.scaleout.replicas:
        raise ValueError("build_application needs --replicas")
    return ingress_deployment(config).bind(config, replica_deployment(config).bind(config), affinity)


def start_ray(config: ServerConfig, *, num_cpus: float | None = None) -> None:
    """Join ``--ray-address`` or start a local cluster on loopback; start Serve's proxy on
    ``--host``/``--port``."""
    scale = config.scaleout
    if not scale.ray_address:
        _single_node_on_loopback()
    import ray
    from ray import serve

    if not ray.is_initialized():
        if scale.ray_address:
            ray.init(address=scale.ray_address)
        else:
            ray.init(num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
                     include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=scale.ray_object_store_memory)
    serve.start(http_options={"host": config.host, "port": config.port})


def _single_node_on_loopback() -> None:
    os.environ[SINGLE_NODE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported before the variable was set
        constants.ENABLE_RAY_CLUSTER = False


def run(config: ServerConfig, *, affinity: bool = True, num_cpus: float | None = None) -> Any:
    """Start the cluster and the application; returns the ingress's handle once serving."""
    start_ray(config, num_cpus=num_cpus)
    from ray import serve

    return serve.run(build_application(config, affinity=affinity), name=APP_NAME,
                     route_prefix="/", blocking=False)


def replicas_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: ServerConfig) -> int:
    """``prolora-serve serve --replicas N``: until SIGINT/SIGTERM."""
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    try:
        run(config)
        log.info("serving on http://%s:%d with %d engine replicas on Ray Serve", config.host,
                 config.port, config.scaleout.replicas)
        done.wait()
    finally:
        stop()
    return 0
