"""Authentication, least-privilege permissions per role, and TLS, against a real nats-server."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from pangea.bus import auth_config, security, subjects
from pangea.bus.server import EmbeddedServer
from tests.cluster import Cluster
from tests.helpers import role_env, run_pangea, violations
from tests.yardstick import assert_exact, assert_verified, reference


def _login(users: dict, user: str) -> dict[str, str]:
    return {"nats_user": user, "nats_password": users[user][0]}


async def _unauthenticated(url: str) -> str:
    try:
        nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=2, allow_reconnect=False)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises, it must not connect
        return str(exc) or type(exc).__name__
    await nc.close()
    return ""


def test_per_role_users_and_permissions(job, tmp_path):
    users = security.job_users(job, ["w0", "w1"])
    server = EmbeddedServer(tmp_path / "store", extra_config=auth_config.authorization_block(users)).start()
    cluster = Cluster(server.url, job, tmp_path)
    out = tmp_path / "run"
    try:
        cluster.worker("w0", **_login(users, "w0"))
        cluster.worker("w1", **_login(users, "w1"), test_delay=0.05)
        cluster.start("pre", "preprocessor", **_login(users, "preprocessor"))
        cluster.start(
            "orch",
            "orchestrator",
            "--workers",
            "2",
            "--epochs",
            "1",
            "--out",
            str(out),
            **_login(users, "orchestrator"),
        )
        assert asyncio.run(_unauthenticated(server.url)), "a client without credentials was let in"
        errors = asyncio.run(violations(server.url, job, user="w0", password=users["w0"][0]))
        for subject in (subjects.params(job), subjects.batches(job, "w1"), subjects.plans(job)):
            assert any("permissions violation" in e.lower() and subject in e for e in errors), (subject, errors)
        cluster.wait("orch")
        for name in ("pre", "w0", "w1"):
            assert cluster.wait(name) == 0
    finally:
        cluster.close()
        server.stop()
    assert_verified(out)  # workers started by hand, on torch's default threads: verify knows them
    passwords = [p for p, _ in users.values()]
    for path in [*tmp_path.glob("*.log"), out / "metrics.json"]:
        text = path.read_text(errors="replace")
        assert not any(p in text for p in passwords), f"a password leaked into {path.name}"


@pytest.mark.slow  # moved out of the default run to keep it near 10 minutes; .ci/run runs it
def test_pangea_run_secure(tmp_path):
    out = tmp_path / "run"
    result = run_pangea("run", "--secure", "--epochs", "1", "--out", str(out), env=role_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_exact(out, reference(tmp_path / "ref", workers=2, epochs=1))
    assert "Permissions Violation" not in (out / "nats-server.log").read_text()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path):
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command (Debian package openssl) to make test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pangea-test-ca",
        cwd=d,
    )
    for name, extra in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=pangea-{name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


@pytest.mark.slow  # ~25 s: keeps the default suite near 10 minutes; CI runs it with the slow tests
def test_tls_with_client_certificates_is_exact(certificates, job, tmp_path):
    d = certificates
    tls = (
        f'tls {{ cert_file: "{d / "server.pem"}", key_file: "{d / "server.key"}", '
        f'ca_file: "{d / "ca.pem"}", verify: true }}\n'
    )
    server = EmbeddedServer(tmp_path / "store", extra_config=tls, scheme="tls").start()
    try:
        assert asyncio.run(_unauthenticated(server.url.replace("tls://", "nats://"))), "plain client let in"
        out = tmp_path / "run"
        env = role_env(server.url, tls_ca=d / "ca.pem", tls_cert=d / "client.pem", tls_key=d / "client.key")
        result = run_pangea("run", "--job", job, "--epochs", "1", "--out", str(out), env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert_exact(out, reference(tmp_path / "ref", workers=2, epochs=1))
        no_cert = run_pangea("worker", "--job", job, env=role_env(server.url, tls_ca=d / "ca.pem", connect_timeout=3))
        assert no_cert.returncode == 2 and "Traceback" not in no_cert.stderr
    finally:
        server.stop()


def test_infra_secure_config_is_generated_and_valid(tmp_path):
    """infra/nats/pangea-secure.conf is what the code generates, and nats-server accepts it."""
    from pangea.bus.server import find_binary
    from tests.helpers import REPO

    path = REPO / "infra" / "nats" / "pangea-secure.conf"
    assert path.read_text() == security.server_config("digits"), (
        "regenerate: python -m pangea.bus.security --job digits"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        **{f"PANGEA_{r}_PASSWORD": "x" for r in ("ORCHESTRATOR", "PREPROCESSOR", "OBSERVER", "WORKER", "REDUCER")},
    }
    check = subprocess.run([find_binary(), "-c", str(path), "-t"], env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "is valid" in check.stdout + check.stderr


@pytest.mark.parametrize(("auth", "name"), [("nkey", "pangea-nkey.conf"), ("jwt", "pangea-jwt.conf")])
def test_infra_nkey_and_jwt_configs_are_generated_and_valid_with_generated_keys(auth, name, tmp_path):
    """infra/nats/pangea-{nkey,jwt}.conf are what the code generates; with the keys that
    `python -m pangea.bus.security --auth A --keys DIR` makes, nats-server accepts them."""
    from pangea.bus.server import find_binary
    from tests.helpers import REPO

    path = REPO / "infra" / "nats" / name
    assert path.read_text() == security.server_config("digits", auth), (
        f"regenerate: python -m pangea.bus.security --job digits --auth {auth} > infra/nats/{name}"
    )
    keys = tmp_path / "keys"
    result = subprocess.run(
        [sys.executable, "-m", "pangea.bus.security", "--job", "digits", "--auth", auth, "--keys", str(keys)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == path.read_text(), result.stderr
    env = {"PATH": "/usr/bin:/bin"}
    if auth == "nkey":  # the server's environment: the roles' public keys
        env.update(line.split("=", 1) for line in (keys / security.NKEYS_ENV).read_text().splitlines())
        assert set(env) - {"PATH"} == {f"PANGEA_{role.upper()}_NKEY" for role in security.SHARED_ROLES}
    else:  # the operator block is included from the config's directory
        (tmp_path / security.TRUST_FILE).write_text((keys / security.TRUST_FILE).read_text())
    (tmp_path / name).write_text(path.read_text())
    check = subprocess.run([find_binary(), "-c", str(tmp_path / name), "-t"], env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "is valid" in check.stdout + check.stderr, check.stdout + check.stderr
    assert not re.search(r"\bS[UAO][A-Z2-7]{56}\b|eyJ", path.read_text())  # no seed, no JWT committed


def test_infra_trust_example_has_the_keys_the_generator_writes():
    """infra/nats/pangea-trust.conf.example: placeholders only, laid out as the real file."""
    from pangea.bus import identities
    from tests.helpers import REPO

    def keys_of(text: str) -> list[str]:
        return [
            line.split(":")[0].strip() for line in text.splitlines() if line and not line.startswith(("#", " ", "}"))
        ]

    example = (REPO / "infra" / "nats" / "pangea-trust.conf.example").read_text()
    assert keys_of(example) == keys_of(identities.new_trust().server_config)
    assert "eyJ" not in example.replace("eyJ...", "")  # no real JWT
