"""The CLI as a user meets it: help, and one clear line for every mistake a user can make."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pangea.bus.server import free_port
from tests.conftest import REPO, role_env, run_pangea


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "command",
    ["run", "reference", "orchestrator", "preprocessor", "worker", "replay", "status", "plot", "checkpoint", "delete"],
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


def test_installed_package_finds_its_schema(tmp_path):
    """`pip install .` elsewhere, run from another directory: the schema ships as package data."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    code = (
        "import pangea, pangea.codec as c; "
        "assert pangea.__file__.startswith(%r), pangea.__file__; "
        "p = c.schema_path(); assert str(p).startswith(%r), p; "
        "print(c.schema().Batch.schema.node.displayName)" % (str(target), str(target))
    )
    env = {**role_env(), "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Batch" in result.stdout
    assert (target / "bin" / "pangea").exists()


def test_readme_documents_every_setting():
    """The configuration table cannot drift from the settings classes and flags."""
    from pangea.docs import settings_table

    assert settings_table() in (REPO / "README.md").read_text(), "regenerate with: python -m pangea.docs"
