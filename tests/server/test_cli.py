"""`loraswitch serve`: the command line and its flags."""

from __future__ import annotations


def test_serve_command_line():
    import typer
    from typer.testing import CliRunner

    from loraswitch.server.cli import serve

    app = typer.Typer()
    app.command("serve")(serve)
    app.command("noop")(lambda: None)  # a group, so "serve" is a subcommand as in the main CLI
    assert CliRunner().invoke(app, ["serve", "--help"]).exit_code == 0
    command = typer.main.get_command(app).commands["serve"]
    flags = {opt for param in command.params for opt in param.opts}
    for flag in ("--base", "--adapter-dir", "--host", "--port", "--api-key", "--max-batch", "--max-queue",
                 "--max-prompt-tokens", "--max-new-tokens", "--timeout"):
        assert flag in flags, flag
