"""Authentication, least-privilege permissions per role, and TLS, against a real nats-server."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats
import pytest

from pangea.bus import security, subjects
from pangea.bus.server import EmbeddedServer
from tests.cluster import Cluster
from tests.conftest import role_env, run_pangea
from tests.test_e2e import assert_exact, reference


def _login(users: dict, user: str) -> dict[str, str]:
    return {"nats_user": user, "nats_password": users[user][0]}


async def _violations(url: str, user: str, password: str, job: str) -> list[str]:
    """Publish what a worker must not; the server's permission errors, as the client sees them."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, user=user, password=password, error_cb=on_error)
    await nc.publish(subjects.params(job), b"forged parameters")
    await nc.publish(subjects.batches(job, "w1"), b"forged batch")
    await nc.publish(subjects.plans(job), b"forged plan")
    await nc.flush()
    await asyncio.sleep(0.5)
    await nc.close()
    return errors


async def _unauthenticated(url: str) -> str:
    try:
        nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=2, allow_reconnect=False)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises, it must not connect
        return str(exc) or type(exc).__name__
    await nc.close()
    return ""


def test_per_role_users_and_permissions(job, tmp_path):
    users = security.job_users(job, ["w0", "w1"])
    server = EmbeddedServer(tmp_path / "store", extra_config=security.authorization_block(users)).start()
    cluster = Cluster(server.url, job, tmp_path)
    out = tmp_path / "run"
    try:
        cluster.worker("w0", **_login(users, "w0"))
        cluster.worker("w1", **_login(users, "w1"), test_delay=0.05)
        cluster.start("pre", "preprocessor", **_login(users, "preprocessor"))
        cluster.start("orch", "orchestrator", "--workers", "2", "--epochs", "1", "--out", str(out),
                      **_login(users, "orchestrator"))
        assert asyncio.run(_unauthenticated(server.url)), "a client without credentials was let in"
        errors = asyncio.run(_violations(server.url, "w0", users["w0"][0], job))
        for subject in (subjects.params(job), subjects.batches(job, "w1"), subjects.plans(job)):
            assert any("permissions violation" in e.lower() and subject in e for e in errors), (subject, errors)
        cluster.wait("orch")
        for name in ("pre", "w0", "w1"):
            assert cluster.wait(name) == 0
    finally:
        cluster.close()
        server.stop()
    assert_exact(out, reference(tmp_path / "ref", epochs=1))
    passwords = [p for p, _ in users.values()]
    for path in [*tmp_path.glob("*.log"), out / "metrics.json"]:
        text = path.read_text(errors="replace")
        assert not any(p in text for p in passwords), f"a password leaked into {path.name}"


def test_pangea_run_secure(tmp_path):
    out = tmp_path / "run"
    result = run_pangea("run", "--secure", "--epochs", "1", "--out", str(out), env=role_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_exact(out, reference(tmp_path / "ref", epochs=1))
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
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=pangea-test-ca", cwd=d)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=pangea-{name}", cwd=d)
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_tls_with_client_certificates_is_exact(certificates, job, tmp_path):
    d = certificates
    tls = (f'tls {{ cert_file: "{d / "server.pem"}", key_file: "{d / "server.key"}", '
           f'ca_file: "{d / "ca.pem"}", verify: true }}\n')
    server = EmbeddedServer(tmp_path / "store", extra_config=tls, scheme="tls").start()
    try:
        assert asyncio.run(_unauthenticated(server.url.replace("tls://", "nats://"))), "plain client let in"
        out = tmp_path / "run"
        env = role_env(server.url, tls_ca=d / "ca.pem", tls_cert=d / "client.pem", tls_key=d / "client.key")
        result = run_pangea("run", "--job", job, "--epochs", "1", "--out", str(out), env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert_exact(out, reference(tmp_path / "ref", epochs=1))
        no_cert = run_pangea("worker", "--job", job, env=role_env(server.url, tls_ca=d / "ca.pem", connect_timeout=3))
        assert no_cert.returncode == 2 and "Traceback" not in no_cert.stderr
    finally:
        server.stop()


def test_infra_secure_config_is_generated_and_valid(tmp_path):
    """infra/nats/pangea-secure.conf is what the code generates, and nats-server accepts it."""
    from pangea.bus.server import find_binary
    from tests.conftest import REPO

    path = REPO / "infra" / "nats" / "pangea-secure.conf"
    assert path.read_text() == security.server_config("digits"), "regenerate: python -m pangea.bus.security --job digits"
    env = {"PATH": "/usr/bin:/bin", **{f"PANGEA_{r}_PASSWORD": "x" for r in ("ORCHESTRATOR", "PREPROCESSOR", "OBSERVER", "WORKER", "REDUCER")}}
    check = subprocess.run([find_binary(), "-c", str(path), "-t"], env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "is valid" in check.stdout + check.stderr
