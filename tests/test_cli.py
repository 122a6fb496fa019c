"""The CLI as a user meets it: help, and one clear line for every mistake a user can make."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pangea.bus.server import free_port
from pangea.settings import BusSettings
from tests.helpers import REPO, assert_one_line_error, role_env, run_pangea


@pytest.mark.parametrize(
    "command",
    [
        "run",
        "reference",
        "verify",
        "orchestrator",
        "preprocessor",
        "worker",
        "replay",
        "status",
        "plot",
        "checkpoint",
        "delete",
    ],
)
def test_every_command_has_help_with_an_example(command):
    result = run_pangea(command, "--help", env=role_env())
    assert result.returncode == 0
    assert "example" in result.stdout and f"pangea {command}" in result.stdout


def test_bad_flag_value_names_the_flag():
    result = run_pangea("run", "--lr", "-1", env=role_env())
    assert result.returncode == 2
    assert_one_line_error(result, "--lr")


def test_bad_env_value_names_the_variable():
    result = run_pangea("reference", env=role_env(optimizer="rmsprop"))
    assert_one_line_error(result, "PANGEA_OPTIMIZER")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["reference", "--dataset", "nope"], "unknown dataset"),
        (["reference", "--dataset", "missing.npz"], "does not exist"),
        (["reference", "--model", "no_such_module:factory"], "cannot import"),
        (["run", "--model", "mlp2"], "unknown model"),
        (["run", "--workers", "0"], "--workers"),
        (["run", "--hidden", "12,x"], "--hidden"),
        (["orchestrator", "--job", "a.b"], "--job"),
    ],
)
def test_user_mistakes_give_one_line(args, needle, tmp_path):
    assert_one_line_error(run_pangea(*args, env=role_env(), cwd=tmp_path), needle)


def test_no_server_at_the_url():
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_pangea("worker", "--nats-url", url, env=role_env(connect_timeout=1))
    assert_one_line_error(result, "cannot reach NATS", url)


def test_a_taken_default_health_port_falls_back_to_a_free_one():
    """Several roles on one host: the second to find the default port taken serves on another,
    says so in one warning, and carries on (here to its one-line connection error)."""
    default = BusSettings.model_fields["http_port"].default
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            holder.bind(("0.0.0.0", default))  # noqa: S104 - taken on every address, loopback included
            holder.listen()
        except OSError:
            pass  # another process holds it: taken all the same
        env = role_env(connect_timeout=1)
        del env["PANGEA_HTTP_PORT"]  # the default
        url = f"nats://127.0.0.1:{free_port()}"
        result = run_pangea("worker", "--nats-url", url, env=env)
    finally:
        holder.close()
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"port {default} is taken: health/metrics on port" in lines[0]
    assert "cannot reach NATS" in lines[1] and result.returncode == 2


def test_installed_package_finds_its_schema(tmp_path):
    """`pip install .` elsewhere, run from another directory: the schema ships as package data."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import pangea, pangea.wire.codec as c; "
        f"assert pangea.__file__.startswith({str(target)!r}), pangea.__file__; "
        f"p = c.schema_path(); assert str(p).startswith({str(target)!r}), p; "
        "print(c.schema().Batch.schema.node.displayName)"
    )
    env = {**role_env(), "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Batch" in result.stdout
    assert (target / "bin" / "pangea").exists()


def test_readme_documents_every_setting():
    """The configuration table cannot drift from the settings classes and flags."""
    from pangea.app.docs import settings_table

    assert settings_table() in (REPO / "README.md").read_text(), "regenerate with: python -m pangea.app.docs"
