"""`loraswitch serve`: the OpenAI-compatible server on a base model and its adapter folders.

Register in the main CLI with `app.command("serve")(serve)`; also runnable on its own as
`python -m loraswitch.server [OPTIONS]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraswitch.console import LibraryOpt, open_switch


def serve(
    base: Annotated[str | None, typer.Option("--base", help="Model directory or .gguf file (default: embedded SmolLM2-135M-Instruct).")] = None,
    adapter_dirs: Annotated[list[Path] | None, typer.Option("--adapter-dir", help="Folder of PEFT LoRA adapters (repeatable; default: the demo adapters).")] = None,
    router_dir: Annotated[Path | None, typer.Option("--router-dir", help="Folder of trained routers (default: the demo routers).")] = None,
    library: LibraryOpt = "demo",
    host: Annotated[str, typer.Option(help="Interface to listen on (127.0.0.1 = this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LORASWITCH_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together in one batched forward.")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests allowed to wait; beyond that the server answers 429.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longer prompts are refused with 400.")] = 2048,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for (400 above).")] = 512,
    default_max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens when a request does not say.")] = 256,
    default_temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="temperature when a request does not say (OpenAI: 1).")] = 1.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request may take from arrival to last token (504 after).")] = 300.0,
    adapter_admin: Annotated[bool, typer.Option(help="Allow POST/DELETE /v1/adapters (loading folders from this machine's disk).")] = True,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes (413 above).")] = 4 * 1024 * 1024,
    max_parts: Annotated[int, typer.Option(min=1, help="Most numbered parts 'auto' answers part by part (400 above; capped by --max-batch).")] = 16,
    allowed_hosts: Annotated[list[str] | None, typer.Option("--allowed-hosts", help="Host header served when no API key is set (repeatable or comma-separated; default: the --host address and localhost; '*': any).")] = None,
    docs: Annotated[bool, typer.Option(help="Serve /docs, /redoc and /openapi.json (behind --api-key when one is set).")] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    upstream: Annotated[str | None, typer.Option("--upstream", help="OpenAI-compatible server (base URL) that routed requests the local model would answer poorly are escalated to.")] = None,
    upstream_model: Annotated[str | None, typer.Option("--upstream-model", help="The model name sent upstream (needed with --upstream).")] = None,
    upstream_api_key_env: Annotated[str | None, typer.Option("--upstream-api-key-env", help="Environment variable holding the upstream's API key.")] = None,
    upstream_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to connect to the upstream and between bytes of its answer; beyond, the request is answered locally.")] = 30.0,
    escalate_threshold: Annotated[float | None, typer.Option("--escalate-threshold", min=0.0, help="Escalate when the estimated risk that the local answer is poor is at least this (default 0.5).")] = None,
    escalate_rate: Annotated[float | None, typer.Option("--escalate-rate", min=0.0, max=1.0, help="Calibrate the threshold so this share of the --calibration prompts escalates (RouteLLM-style).")] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Held-out prompts for --escalate-rate: .txt (one per line) or .jsonl ({\"prompt\": ...}).")] = None,
    compile_step: Annotated[bool, typer.Option("--compile", help="Decode with the compiled step (torch.compile): faster per token; each new batch size compiles once on first use (a minute or more).")] = False,
) -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), adapter
    management, /healthz, /metrics and the routing trace page /ui."""
    import logging

    import uvicorn

    from loraswitch.server.app import ServerSettings, create_app
    from loraswitch.server.middleware import default_hosts

    check_upstream(upstream, upstream_model, escalate_threshold, escalate_rate, calibration)
    switch = open_switch(base, adapter_dirs, router_dir, library)
    if upstream:
        switch.upstream = escalator(switch, upstream, upstream_model, upstream_api_key_env, upstream_timeout,
                                    escalate_threshold, escalate_rate, calibration)
    switch.engine.compile = compile_step
    settings = ServerSettings(
        max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
        default_max_tokens=min(default_max_tokens, max_new_tokens), default_temperature=default_temperature,
        timeout=timeout, api_key=api_key or None, allow_adapter_admin=adapter_admin, max_body_bytes=max_body_bytes,
        max_parts=max_parts, docs=docs,
        allowed_hosts=[h.strip() for item in allowed_hosts for h in item.split(",") if h.strip()] if allowed_hosts
        else default_hosts(host),
    )
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(switch, settings)
    where = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    typer.echo(f"loraswitch serving {switch.base.name} with {len(switch.engine.names)} adapters "
               f"({', '.join(switch.engine.names) or 'none'}) on {where}  (trace page: {where}/ui)", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=10)


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


def escalator(switch, url: str, model: str | None, key_env: str | None, timeout: float, threshold: float | None,
              rate: float | None, calibration: Path | None):
    """The `Escalator` the --upstream options describe (its threshold calibrated for --escalate-rate)."""
    from loraswitch.library import read_examples
    from loraswitch.switch.escalate import Escalator
    from loraswitch.switch.escalation import DEFAULT_THRESHOLD
    from loraswitch.switch.upstream import Upstream

    try:
        up = Upstream.from_env(url, model or "", key_env, timeout=timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    esc = Escalator(up, DEFAULT_THRESHOLD if threshold is None else threshold)
    if rate is not None and calibration is not None:
        prompts = [p for p, _ in read_examples(calibration)]
        esc.calibrate(switch, prompts, rate)
        typer.echo(f"escalation threshold {esc.threshold:.4f}: {rate:.0%} of {len(prompts)} calibration prompts",
                   err=True)
    return esc


def main() -> None:  # pragma: no cover
    typer.run(serve)
