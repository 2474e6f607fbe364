"""`loraswitch shifts`: read a running server's task-shift report (`GET /v1/routing/shifts`) and
export a cluster's prompts as an examples file (`{"prompt": ...}` per line, the format
`loraswitch adapters add --examples`, `POST /v1/adapters` examples and `train-router --data`
read). A client of the HTTP API only (standard library, no model loaded): it works against any
loraswitch server, local or not, that was started with `--keep-prompts`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

shifts_app = typer.Typer(help="Task shifts: clusters of prompts no adapter took, on a running server.",
                         no_args_is_help=True)
UrlOpt = Annotated[str, typer.Option("--url", envvar="LORASWITCH_URL", help="The server's base URL.")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="LORASWITCH_API_KEY", help="Its API key, if it has one.")]


def fetch(url: str, path: str, api_key: str | None) -> dict:
    """GET `path` from the server as JSON; a clean exit with the server's message on an error."""
    req = urllib.request.Request(url.rstrip("/") + path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        typer.echo(f"error: {url}{path}: HTTP {exc.code}: {message}", err=True)
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None


@shifts_app.command("list")
def shifts_list(url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The clusters a server reports as task shifts, largest first."""
    report = fetch(url, "/v1/routing/shifts", api_key)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{report['unrouted']} unrouted prompts, {report['clusters']} clusters, "
               f"{len(report['data'])} at least {report['min_size']} prompts")
    for c in report["data"]:
        example = f"  e.g. {c['examples'][-1]!r}" if c["examples"] else ""
        typer.echo(f"{c['id']}\t{c['size']} prompts\t{c['first_seen']} .. {c['last_seen']}{example}")


@shifts_app.command("export")
def shifts_export(
    cluster: Annotated[str, typer.Argument(help="Cluster id from 'loraswitch shifts list' (e.g. c3).")],
    out: Annotated[Path, typer.Argument(help="Examples file to write (.jsonl, one {\"prompt\": ...} per line).")],
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Write a cluster's kept prompts as an examples file: data to train an adapter for the new
    task, and its routing examples (`loraswitch adapters add PATH --examples OUT.jsonl`)."""
    prompts = fetch(url, f"/v1/routing/shifts/{cluster}/prompts", api_key)["data"]
    if not prompts:
        typer.echo(f"error: cluster {cluster} has no kept prompts", err=True)
        raise typer.Exit(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    typer.echo(f"wrote {len(prompts)} prompts of cluster {cluster} to {out}", err=True)
