"""`loraswitch serve`: the OpenAI-compatible server on a base model and its adapter folders.

Register in the main CLI with `app.command("serve")(serve)`; also runnable on its own as
`python -m loraswitch.server [OPTIONS]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraswitch.console import LibraryOpt, open_switch

# positions (prompt plus answer) the compiled step is warmed up for by default: the 64 and 128
# buckets. On a CPU the first bucket's four graphs take any cache length and the 128 bucket
# reuses them; with CUDA graphs each bucket compiles two (one row runs in two slots), and the
# 128 bucket's take every longer length (`static.Decoder.covers`); either way every longer
# context decodes compiled too
COMPILE_CONTEXT = 128


def serve(
    base: Annotated[str | None, typer.Option("--base", help="Model directory or .gguf file (default: embedded SmolLM2-135M-Instruct).")] = None,
    adapter_dirs: Annotated[list[Path] | None, typer.Option("--adapter-dir", help="Folder of PEFT LoRA adapters (repeatable; default: the demo adapters).")] = None,
    router_dir: Annotated[Path | None, typer.Option("--router-dir", help="Folder of trained routers (default: the demo routers).")] = None,
    library: LibraryOpt = "demo",
    host: Annotated[str, typer.Option(help="Interface to listen on (127.0.0.1 = this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORASWITCH_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together in one batched forward.")] = 32,
    continuous: Annotated[bool, typer.Option("--continuous/--no-continuous", help="Continuous batching: requests that arrive while a batch decodes join it between steps (their prompts prefilled in chunks); off: they wait for the next batch.")] = True,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests allowed to wait; beyond that the server answers 429.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longer prompts are refused with 400.")] = 2048,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for (400 above).")] = 512,
    default_max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens when a request does not say.")] = 256,
    default_temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="temperature when a request does not say (OpenAI: 1).")] = 1.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request may take from arrival to last token (504 after).")] = 300.0,
    adapter_admin: Annotated[bool, typer.Option(help="Allow POST/DELETE /v1/adapters (loading folders from this machine's disk).")] = True,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes (413 above).")] = 4 * 1024 * 1024,
    max_parts: Annotated[int, typer.Option(min=1, help="Most numbered parts 'auto' answers part by part (capped by --max-batch); a longer list is answered whole.")] = 16,
    allowed_hosts: Annotated[list[str] | None, typer.Option("--allowed-hosts", help="Host header served when no API key is set (repeatable or comma-separated; default: the --host address, localhost, 127.0.0.1 and [::1]; '*': any).")] = None,
    docs: Annotated[bool, typer.Option(help="Serve /docs, /redoc and /openapi.json (behind --api-key when one is set).")] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    keep_prompts: Annotated[bool, typer.Option("--keep-prompts", help="Keep the texts of prompts no adapter took, for /v1/routing/shifts examples and 'loraswitch shifts export' (default: counts and router features only).")] = False,
    shift_min_size: Annotated[int, typer.Option(min=1, help="Unrouted prompts in one cluster before it is reported as a task shift.")] = 16,
    upstream: Annotated[str | None, typer.Option("--upstream", help="OpenAI-compatible server (base URL) that routed requests the local model would answer poorly are escalated to.")] = None,
    upstream_model: Annotated[str | None, typer.Option("--upstream-model", help="The model name sent upstream (needed with --upstream).")] = None,
    upstream_api_key_env: Annotated[str | None, typer.Option("--upstream-api-key-env", help="Environment variable holding the upstream's API key.")] = None,
    upstream_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to connect to the upstream and between bytes of its answer; beyond, the request is answered locally.")] = 30.0,
    escalate_threshold: Annotated[float | None, typer.Option("--escalate-threshold", min=0.0, help="Escalate when the estimated risk that the local answer is poor is at least this (default 0.5).")] = None,
    escalate_rate: Annotated[float | None, typer.Option("--escalate-rate", min=0.0, max=1.0, help="Calibrate the threshold so this share of the --calibration prompts escalates (RouteLLM-style).")] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Held-out prompts for --escalate-rate: .txt (one per line) or .jsonl ({\"prompt\": ...}).")] = None,
    compile_step: Annotated[bool, typer.Option("--compile", help="Decode with the compiled step (torch.compile): faster per token; its graphs compile before the port opens (minutes on a CPU: see --compile-context).")] = False,
    compile_context: Annotated[int, typer.Option("--compile-context", min=1, metavar="POSITIONS", help="With --compile: compile the step for every cache length bucket up to this many positions (prompt plus answer) before the port opens; on a CPU the first bucket's graphs serve any length, on a GPU those of the second (128). Nothing compiles after: what they do not cover decodes on the eager loop.")] = COMPILE_CONTEXT,
    prefix_cache: Annotated[int, typer.Option("--prefix-cache", min=0, metavar="POSITIONS", help="Reuse the keys and values of prompt openings that earlier prompts under the same adapters shared (the chat template's), up to this many cached positions (~46 KB each for SmolLM2); 0: off.")] = 2048,
    ray: Annotated[bool, typer.Option("--ray", help="Serve on Ray Serve: several replicas behind one API (needs pip install 'loraswitch\\[ray]'; see docs/scale-out.md).")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --ray: join this Ray cluster (default: start a local Ray on 127.0.0.1, stopped on exit).")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: how many replicas (each a whole engine with its own batching).")] = 1,
    autoscale: Annotated[str | None, typer.Option("--autoscale", metavar="MIN:MAX", help="With --ray: between MIN and MAX replicas by load (instead of --replicas).")] = None,
    adapters_per_replica: Annotated[int | None, typer.Option("--adapters-per-replica", min=1, help="Keep at most K adapters in each replica's layers (the rest wait in host memory, paged in on use, least recently used out); with --ray, Serve places each adapter's requests on replicas holding it.")] = None,
) -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), adapter
    management, /healthz, /metrics and the routing trace page /ui."""
    _check_scale_out(ray, ray_address, autoscale, replicas, upstream)
    check_upstream(upstream, upstream_model, escalate_threshold, escalate_rate, calibration)
    sock = None if ray else listening_socket(host, port)  # before the heavy imports: a busy port fails at once

    import logging

    from loraswitch.server.middleware import default_hosts
    from loraswitch.server.state import ServerSettings

    settings = ServerSettings(
        max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
        default_max_tokens=min(default_max_tokens, max_new_tokens), default_temperature=default_temperature,
        timeout=timeout, api_key=api_key or None, allow_adapter_admin=adapter_admin, max_body_bytes=max_body_bytes,
        max_parts=max_parts, docs=docs, keep_prompts=keep_prompts, shift_min_size=shift_min_size, continuous=continuous,
        allowed_hosts=[h.strip() for item in allowed_hosts for h in item.split(",") if h.strip()] if allowed_hosts
        else default_hosts(host),
    )
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    if ray:
        return serve_on_ray({"base": base, "adapter_dirs": adapter_dirs, "router_dir": router_dir, "library": library,
                             "compile": compile_step, "compile_context": compile_context, "adapters_per_replica": adapters_per_replica,
                             "prefix_cache": prefix_cache},
                            settings, host, port, ray_address, replicas, autoscale)
    import uvicorn

    from loraswitch.server.app import create_app

    switch = open_switch(base, adapter_dirs, router_dir, library)
    if upstream:
        switch.upstream = escalator(switch, upstream, upstream_model, upstream_api_key_env, upstream_timeout,
                                    escalate_threshold, escalate_rate, calibration, timeout)
    prepare_engine(switch.engine, compile_step, prefix_cache, adapters_per_replica, compile_context)
    where = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{sock.getsockname()[1]}"
    typer.echo(f"loraswitch serving {switch.base.name} with {len(switch.engine.names)} adapters "
               f"({', '.join(switch.engine.names) or 'none'}) on {where}  (trace page: {where}/ui)", err=True)
    config = uvicorn.Config(create_app(switch, settings), log_level=log_level.lower(), timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


def listening_socket(host: str, port: int):
    """The server's socket, bound here so a busy port is a clear error (exit 2) and `--port 0`
    prints the port the system gave."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _check_scale_out(ray: bool, ray_address: str | None, autoscale: str | None, replicas: int,
                     upstream: str | None) -> None:
    """The --ray options make sense together only (a clear error before anything loads)."""
    if not ray and (ray_address or autoscale or replicas != 1):
        raise typer.BadParameter("--ray-address, --replicas and --autoscale apply only with --ray")
    if autoscale and replicas != 1:
        raise typer.BadParameter("give --replicas or --autoscale, not both")
    if ray and upstream:
        raise typer.BadParameter("--upstream is not available with --ray yet (escalate from a plain server)")


def prepare_engine(engine, compile_step: bool, prefix_cache: int, adapters_per_replica: int | None,
                   context: int = 0) -> None:
    """The engine options of `serve`. With --compile the decode step's graphs for contexts of up
    to `context` positions compile before the port opens, so no request of the usual size waits
    minutes on them, and every row of its batch with it (generate.warm_up); what it took is printed."""
    import time

    from loraswitch.generate import warm_up

    engine.compile, engine.prefix_tokens = compile_step, prefix_cache
    engine.limit_resident(adapters_per_replica)
    if not compile_step:
        return
    typer.echo(f"compiling the decode step for contexts up to {context} positions (one and several rows, with "
               "and without an adapter, per cache length bucket)...", err=True)
    t0 = time.perf_counter()
    shapes = warm_up(engine, context)
    failed = engine.decoder.failed if engine.decoder is not None else None
    typer.echo(f"compiled in {time.perf_counter() - t0:.0f} s ({', '.join(f'{r}x{n}x{k}: {s} s' for (r, n, k), s in shapes.items())})"
               + (f"; compiling failed, decoding eagerly: {failed}" if failed else ""), err=True)


def serve_on_ray(switch_config: dict, settings, host: str, port: int, address: str | None, replicas: int,
                 autoscale: str | None) -> None:
    """`serve --ray`: the same app on Ray Serve until Ctrl-C (server.ray_serve.launch)."""
    import importlib.util
    import os

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise typer.BadParameter("--ray needs Ray Serve: pip install 'loraswitch[ray]'")
    from loraswitch.server.ray_serve.launch import Scale, parse_autoscale, run_until_stopped, start

    try:
        scaling = parse_autoscale(autoscale) if autoscale else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    threads = int(os.environ.get("LORASWITCH_THREADS", 1))
    cluster = start(switch_config, settings, Scale(replicas=replicas, autoscale=scaling, threads=threads), host, port,
                    address)
    shown = f"{scaling[0]}..{scaling[1]} (autoscaled)" if scaling else str(replicas)
    typer.echo(f"loraswitch serving on Ray Serve with {shown} replicas on {cluster.url}  (Ctrl-C stops)", err=True)
    run_until_stopped(cluster)


def check_upstream(url: str | None, model: str | None, threshold: float | None, rate: float | None,
                   calibration: Path | None) -> None:
    """Refuse inconsistent --upstream options before the model loads."""
    if not url and (model or threshold is not None or rate is not None or calibration):
        raise typer.BadParameter("--upstream-model, --escalate-threshold, --escalate-rate and --calibration need "
                                 "--upstream URL")
    if url and not model:
        raise typer.BadParameter("--upstream needs --upstream-model NAME (the model the upstream serves)")
    if rate is not None and threshold is not None:
        raise typer.BadParameter("give --escalate-rate or --escalate-threshold, not both")
    if (rate is None) != (calibration is None):
        raise typer.BadParameter("--escalate-rate and --calibration FILE go together (the rate is calibrated on it)")
    if url:  # before the model loads, as Upstream checks it
        from loraswitch.switch.upstream import check_url

        try:
            check_url(url)
        except ValueError as exc:
            raise typer.BadParameter(f"--upstream: {exc}") from None
    if calibration is not None:
        from loraswitch.library import read_examples

        try:
            if not read_examples(calibration):
                raise ValueError("it holds no prompt")
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"--calibration {calibration}: {exc}") from None


MIN_CALIBRATION = 50  # distinct calibration prompts below which the calibrated rate is a guess


def escalator(switch, url: str, model: str | None, key_env: str | None, timeout: float, threshold: float | None,
              rate: float | None, calibration: Path | None, request_timeout: float = 300.0):
    """The `Escalator` the --upstream options describe (its threshold calibrated for --escalate-rate).
    An upstream answer is cut at 90% of the request's --timeout (it ends with what arrived,
    finish_reason "error"), so a slow upstream never turns into the server's 504."""
    from loraswitch.library import read_examples
    from loraswitch.switch.escalate import Escalator
    from loraswitch.switch.escalation import DEFAULT_THRESHOLD
    from loraswitch.switch.upstream import Upstream

    try:
        up = Upstream.from_env(url, model or "", key_env, timeout=timeout,
                               deadline=min(Upstream.deadline, 0.9 * request_timeout))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    esc = Escalator(up, DEFAULT_THRESHOLD if threshold is None else threshold)
    if rate is not None and calibration is not None:
        prompts = [p for p, _ in read_examples(calibration)]
        esc.calibrate(switch, prompts, rate)
        typer.echo(f"escalation threshold {esc.threshold:.4f}: {rate:.0%} of {len(prompts)} calibration prompts",
                   err=True)
        if len(set(prompts)) < MIN_CALIBRATION:
            typer.echo(f"warning: only {len(set(prompts))} distinct calibration prompts; the share of real traffic "
                       f"that escalates can be far from {rate:.0%} (give {MIN_CALIBRATION} or more like it)", err=True)
    return esc


def main() -> None:  # pragma: no cover
    typer.run(serve)
