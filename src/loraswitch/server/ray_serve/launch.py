"""Start Ray (or join a cluster) and Serve, run the application, stop it all on exit.

`start` is what `loraswitch serve --ray` and the tests call: it returns a `Cluster` whose `url`
answers the OpenAI API and whose `stop` tears down what `start` began (a Ray instance it
started is shut down; a cluster it joined is only left).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

APP_NAME = "loraswitch"


@dataclass
class Scale:
    """How many replicas: a fixed `replicas`, or `autoscale` = (min, max) by load."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    threads: int = 1  # torch threads per replica
    target_requests: int = 8  # autoscaling: ongoing requests per replica it aims for

    def options(self, max_ongoing: int) -> dict:
        if self.autoscale:
            low, high = self.autoscale
            scaling = {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                       "target_ongoing_requests": self.target_requests, "upscale_delay_s": 2,
                       "downscale_delay_s": 30}
            return {"autoscaling_config": scaling, "max_ongoing_requests": max_ongoing}
        return {"num_replicas": self.replicas, "max_ongoing_requests": max_ongoing}


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX), 1 <= MIN <= MAX (ValueError otherwise)."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or not 1 <= int(low) <= int(high):
        raise ValueError(f"--autoscale takes MIN:MAX with 1 <= MIN <= MAX, not {text!r}")
    return int(low), int(high)


@dataclass
class Cluster:
    url: str
    started_ray: bool
    library: object = field(repr=False)  # the Library actor handle

    def stop(self) -> None:
        import ray
        from ray import serve

        if not self.started_ray:  # a cluster we joined: take down our application only
            serve.delete(APP_NAME)
            return
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _start_serve(serve, host: str, port: int, tries: int = 3) -> None:
    """`serve.start`, tried again when its HTTP proxy is not up within Ray's fixed 60 s: on a loaded
    two-core machine (a CI run beside other jobs) the proxy's first start can take longer, and
    Ray then kills it (a fresh-clone CI run here hit exactly that)."""
    from ray.exceptions import ActorDiedError, GetTimeoutError

    for attempt in range(tries):
        try:
            serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
            return
        except (ActorDiedError, GetTimeoutError):
            if attempt == tries - 1:
                raise
            serve.shutdown()


def start(switch_config: dict, settings, scale: Scale, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None) -> Cluster:
    """Serve `settings` (a `ServerSettings`) on a base model and library (`switch_config`:
    `open_switch`'s base, adapter_dirs, router_dir, library) with `scale` replicas."""
    import ray
    from ray import serve

    from loraswitch.server.ray_serve.cluster import LIBRARY_ACTOR, Library
    from loraswitch.server.ray_serve.ingress import Ingress
    from loraswitch.server.ray_serve.replica import Replica

    env = {"LORASWITCH_THREADS": str(scale.threads), "OMP_NUM_THREADS": str(scale.threads)}
    # Serve marks its HTTP proxy unhealthy after three 5 s readiness checks and restarts it; on a
    # loaded two-core machine a Python worker can take longer than that just to start, so the
    # proxy never came up (seen in a fresh-clone CI run). The raylet started below inherits these.
    for var, seconds in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30"), ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")):
        os.environ.setdefault(var, seconds)
        env[var] = os.environ[var]
    if address is None:  # this machine: the workers import this very loraswitch
        src = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 runtime_env={"env_vars": env}, logging_level="warning", log_to_driver=False)
    else:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="warning")
    try:
        _start_serve(serve, host, port)
        library = ray.remote(Library).options(name=LIBRARY_ACTOR, num_cpus=0, get_if_exists=True,
                                              max_restarts=-1).remote()
        config = {**switch_config, "settings": {**asdict(settings), "allowed_hosts": ["*"]}}
        actor = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
        replicas = serve.deployment(Replica, name="Replica", ray_actor_options=actor,
                                    health_check_period_s=2, health_check_timeout_s=30,
                                    **scale.options(2 * settings.max_batch))
        ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=4096,
                                   ray_actor_options=actor)
        gate = {"api_key": settings.api_key, "allowed_hosts": settings.allowed_hosts,
                "max_body_bytes": settings.max_body_bytes}
        serve.run(ingress.bind(replicas.bind(config, library), library, gate), name=APP_NAME, route_prefix="/")
    except BaseException:
        if address is None:
            serve.shutdown()
            ray.shutdown()
        raise
    shown = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
    return Cluster(url=f"http://{shown}:{port}", started_ray=address is None, library=library)


def run_until_stopped(cluster: Cluster) -> None:
    """Block until Ctrl-C or SIGTERM, then stop the cluster."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
