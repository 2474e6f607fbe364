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
                 "--max-prompt-tokens", "--max-new-tokens", "--timeout", "--max-body-bytes", "--max-parts",
                 "--allowed-hosts", "--docs", "--upstream", "--upstream-model", "--upstream-api-key-env",
                 "--upstream-timeout", "--escalate-threshold", "--escalate-rate", "--calibration", "--prefix-cache"):
        assert flag in flags, flag
    assert "--no-docs" in {opt for param in command.params for opt in param.secondary_opts}
    for bad in (["--upstream-model", "m"], ["--upstream", "http://127.0.0.1:1"],  # refused before any model loads
                ["--upstream", "http://127.0.0.1:1", "--upstream-model", "m", "--escalate-rate", "0.2"],
                ["--upstream", "http://127.0.0.1:1", "--upstream-model", "m", "--escalate-threshold", "0.5",
                 "--escalate-rate", "0.2", "--calibration", "x.txt"]):
        result = CliRunner().invoke(app, ["serve", *bad])
        assert result.exit_code == 2, (bad, result.output)


def test_bad_upstream_urls_and_calibration_files_are_refused_before_the_model_loads(tmp_path):
    import typer
    from typer.testing import CliRunner

    from loraswitch.server.cli import serve

    app = typer.Typer()
    app.command("serve")(serve)
    app.command("noop")(lambda: None)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"no_prompt": 1}\n')
    up = ["--upstream", "http://127.0.0.1:1", "--upstream-model", "m", "--escalate-rate", "0.2", "--calibration"]
    for bad, why in ((["--upstream", "ftp://127.0.0.1:1", "--upstream-model", "m"], "http"),
                     ([*up, str(tmp_path / "missing.txt")], "no such"), ([*up, str(tmp_path / "empty.txt")], "no prompt"),
                     ([*up, str(tmp_path / "bad.jsonl")], "prompt")):
        result = CliRunner().invoke(app, ["serve", "--port", "0", *bad])
        assert result.exit_code == 2 and why in result.output, (bad, result.output)


def test_default_allowed_hosts_follow_the_bound_address():
    from loraswitch.server.middleware import default_hosts, host_name

    assert default_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    assert "10.0.0.5" in default_hosts("10.0.0.5") and "localhost" in default_hosts("10.0.0.5")
    assert default_hosts("0.0.0.0") == ["*"]  # a wildcard bind cannot know its public names
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "::1", "example.org")] == \
        ["localhost", "::1", "::1", "example.org"]


def test_a_busy_port_is_a_clear_error_and_port_zero_gets_a_real_one():
    import socket

    import pytest
    import typer

    from loraswitch.server.cli import listening_socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(typer.BadParameter, match="cannot listen on 127.0.0.1"):
            listening_socket("127.0.0.1", busy.getsockname()[1])
    with listening_socket("127.0.0.1", 0) as sock:  # what `serve --port 0` prints
        assert sock.getsockname()[1] > 0
