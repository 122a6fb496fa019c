"""NKey and JWT (creds file) authentication against a real nats-server.

Every key and JWT is made at test time: seeds with the `nkeys` library (pangea.bus.keys), JWTs
and creds files with pangea.bus.jwt, where a deployment would use `nk` and `nsc`.  No secret
is committed.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import nacl.signing
import nats
import pytest

from pangea.bus import identities, jwt, keys, security, subjects
from pangea.bus.server import EmbeddedServer
from tests.cluster import Cluster
from tests.helpers import assert_one_line_error, role_env, run_pangea, violations
from tests.yardstick import assert_exact, assert_verified, reference

SEED = "PANGEA_NATS_NKEY_SEED"
CREDS = "PANGEA_NATS_CREDS"


def _raw_public_key(public_key: str) -> bytes:
    """The 32 ed25519 bytes of an NKey public key (base32 of prefix byte, key, crc16)."""
    return base64.b32decode(public_key + "=" * (-len(public_key) % 8))[1:33]


def _verify(token: str, issuer: str) -> None:
    header, claims, signature = token.split(".")
    nacl.signing.VerifyKey(_raw_public_key(issuer)).verify(f"{header}.{claims}".encode(), jwt._unb64(signature))


# ------------------------------------------------------------------ JWTs and keys, no server


def test_jwts_chain_operator_account_user_with_valid_signatures():
    operator, account, user = (keys.keypair(keys.new_seed(kind)) for kind in ("operator", "account", "user"))
    op_key, acc_key, user_key = (k.public_key.decode() for k in (operator, account, user))
    perms = security.role_permissions("j", "worker", "w0")
    tokens = {
        "operator": (jwt.operator_jwt(operator, "op"), op_key, op_key),
        "account": (jwt.account_jwt(operator, acc_key, "acc"), op_key, acc_key),
        "user": (jwt.user_jwt(account, user_key, "w0", perms, expires=2_000_000_000), acc_key, user_key),
    }
    for kind, (token, issuer, subject) in tokens.items():
        _verify(token, issuer)
        claims = jwt.decode(token)
        assert (claims["iss"], claims["sub"], claims["nats"]["type"], claims["nats"]["version"]) == (
            issuer,
            subject,
            kind,
            2,
        )
        assert claims["jti"] == jwt.claim_id(claims)
    user_claims = jwt.decode(tokens["user"][0])
    assert user_claims["nats"]["pub"] == {"allow": perms["publish"]}
    assert user_claims["nats"]["sub"] == {"allow": perms["subscribe"]}
    assert user_claims["exp"] == 2_000_000_000
    assert jwt.decode(tokens["account"][0])["nats"]["limits"]["disk_storage"] == -1  # JetStream on


def test_claim_id_is_nsc_s():
    """The standard claims of a user JWT that nsc made (public, from nats-server's tests) and its jti."""
    claims = {
        "iat": 1624885730,
        "iss": "AAYJDVLZGWN7Y3FBPCVXCRVQZDFMYGHU4YXLGSXX7U254KH5SC3R5QKM",
        "name": "user",
        "sub": "UD3BGWIBPU3CWL4HOUU4VJEQWTUASAEG6OJ3XHM3EEJNA2PA3UVNYTZN",
    }
    assert jwt.claim_id(claims) == "DLTF4ZKUWM4TOFEMBJ4PE3MQEVXHRBI7LY47Y4C353LZRJINBRBQ"


def test_creds_file_reads_back_and_bad_ones_say_what_is_missing():
    seed = keys.new_seed("user")
    token = jwt.user_jwt(keys.keypair(keys.new_seed("account")), keys.public_key(seed), "u")
    text = jwt.creds(token, seed)
    assert jwt.parse_creds(text) == (token, seed)
    for broken, missing in [
        ("no markers at all", "BEGIN NATS USER JWT"),
        (text.replace(f"\n{seed.decode()}\n", "\n\n"), "seed alone"),
        (text.replace("------END NATS USER JWT------", ""), "jwt alone"),
        (text.replace("\n", "\r\n"), "CRLF"),
    ]:
        with pytest.raises(jwt.JWTError, match=missing):
            jwt.parse_creds(broken)
    with pytest.raises(jwt.JWTError):
        jwt.decode("eyJub3QiOiJ0aGlzIn0.e30.c2ln")


def test_issued_nkeys_and_jwts_leave_only_public_keys_on_the_server(tmp_path):
    users = security.job_roles("j", ["w0", "w1"], shards=2)
    for method in ("nkey", "jwt"):
        issued = identities.issue(method, users, tmp_path / method)
        assert set(issued.logins) == set(users) == {"orchestrator", "preprocessor", "observer", "w0", "w1", "shard-1"}
        assert (tmp_path / method).stat().st_mode & 0o777 == 0o700
        for user, login in issued.logins.items():
            (path,) = login.values()
            assert path.stat().st_mode & 0o777 == 0o600, path
            text = path.read_text()
            seed = (jwt.parse_creds(text)[1] if method == "jwt" else text.strip().encode()).decode()
            assert keys.public_key(seed.encode()) == issued.public_keys[user]
            assert seed not in issued.server_config
        if method == "nkey":
            assert all(key in issued.server_config for key in issued.public_keys.values())
        else:  # the users are not in the server's config at all: their JWTs carry the permissions
            assert not any(key in issued.server_config for key in issued.public_keys.values())


# ------------------------------------------------------------------ runs against a real server


def _logged(log: Path, *needles: str, timeout: float = 60) -> bool:
    """Whether one line of `log` holds every needle within `timeout` seconds (a role may be slow to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(all(n in line for n in needles) for line in log.read_text(errors="replace").splitlines()):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow  # moved out of the default run to keep it near 10 minutes; .ci/run runs it
def test_nkey_users_per_role_are_exact_and_a_worker_key_cannot_act_for_others(job, tmp_path):
    """NKey users per role on a server that holds public keys only; w0's key forging parameters,
    plans or w1's batches, or a worker posing as w1 with w0's key: permission violations."""
    issued = identities.issue("nkey", security.job_roles(job, ["w0", "w1"]), tmp_path / "keys")
    server = EmbeddedServer(
        tmp_path / "store", log_file=tmp_path / "nats.log", extra_config=issued.server_config
    ).start()
    cluster = Cluster(server.url, job, tmp_path)
    out = tmp_path / "run"
    seed = {user: login["nats_nkey_seed"] for user, login in issued.logins.items()}
    try:
        cluster.worker("w0", nats_nkey_seed=seed["w0"])
        cluster.worker("w1", nats_nkey_seed=seed["w1"], test_delay=0.05)
        cluster.start("pre", "preprocessor", nats_nkey_seed=seed["preprocessor"])
        cluster.start(
            "orch",
            "orchestrator",
            "--workers",
            "2",
            "--epochs",
            "1",
            "--out",
            str(out),
            nats_nkey_seed=seed["orchestrator"],
        )
        cluster.start("impostor", "worker", "--worker-id", "w1", nats_nkey_seed=seed["w0"], connect_timeout=3)
        errors = asyncio.run(violations(server.url, job, nkeys_seed=str(seed["w0"])))
        for subject in (subjects.params(job), subjects.batches(job, "w1"), subjects.plans(job)):
            assert any("permissions violation" in e.lower() and subject in e for e in errors), (subject, errors)
        cluster.wait("orch")
        for name in ("pre", "w0", "w1"):
            assert cluster.wait(name) == 0
        # The impostor may not even look at w1's batch consumer (let alone create or read it).
        w1_batches = f"{subjects.stream(job, 'batches')}.{subjects.worker_consumer('w1')}"
        assert _logged(tmp_path / "nats.log", "Violation", w1_batches), cluster.log("impostor")[-2000:]
    finally:
        cluster.close()
        server.stop()
    assert_verified(out)  # workers started by hand, on torch's default threads: verify knows them
    seeds = [Path(p).read_text().strip() for p in seed.values()]
    for path in [*tmp_path.glob("*.log"), out / "metrics.json"]:
        text = path.read_text(errors="replace")
        assert not any(s in text for s in seeds), f"a seed leaked into {path.name}"


@pytest.mark.slow
def test_pangea_run_secure_jwt_is_exact(tmp_path):
    """`--secure jwt`: an operator, an account and a creds file per role; the server sees JWTs only."""
    out = tmp_path / "run"
    result = run_pangea("run", "--secure", "jwt", "--epochs", "1", "--out", str(out), env=role_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_exact(out, reference(tmp_path / "ref", workers=2, epochs=1))
    log = (out / "nats-server.log").read_text()
    assert "Permissions Violation" not in log and "Trusted Operators" in log


@pytest.mark.slow
def test_pangea_run_secure_nkey_is_exact(tmp_path):
    out = tmp_path / "run"
    result = run_pangea("run", "--secure", "nkey", "--epochs", "1", "--out", str(out), env=role_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_exact(out, reference(tmp_path / "ref", workers=2, epochs=1))
    assert "Permissions Violation" not in (out / "nats-server.log").read_text()


# ------------------------------------------------------------------ bad input: one line, exit 2


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """An NKey server and a JWT server for job `j`, with the observer's seed and creds files, and
    every bad input: case -> (server, settings, what the one line must say)."""
    d = tmp_path_factory.mktemp("auth")
    perms = security.role_permissions("j", "observer")
    nkey = identities.issue("nkey", {"observer": perms}, d / "nkey")
    trust = identities.new_trust()
    good = identities.write_creds(trust, d / "observer.creds", "observer", perms)
    expired = identities.write_creds(trust, d / "expired.creds", "observer", perms, expires=int(time.time()) - 60)
    stranger = identities.write_creds(identities.new_trust(), d / "stranger.creds", "observer", perms)
    (d / "garbage.nk").write_text("not a seed\n")
    keys.write_seed(d / "stranger.nk", keys.new_seed("user"))
    (d / "no-markers.creds").write_text(keys.new_seed("user").decode() + "\n")
    (d / "bad-jwt.creds").write_text(good.read_text().replace("eyJ", "xyz", 1))
    cases = {
        "seed file missing": ("nkey", {SEED: d / "missing.nk"}, (SEED, "cannot read", "No such file")),
        "seed file unreadable": ("nkey", {SEED: d}, (SEED, "cannot read")),
        "not a seed": ("nkey", {SEED: d / "garbage.nk"}, (SEED, "holds no NKey seed")),
        "seed the server does not know": ("nkey", {SEED: d / "stranger.nk"}, (SEED, "refused our credentials")),
        "creds file missing": ("jwt", {CREDS: d / "missing.creds"}, (CREDS, "cannot read")),
        "creds file without markers": ("jwt", {CREDS: d / "no-markers.creds"}, (CREDS, "not a creds file")),
        "creds file with a broken JWT": ("jwt", {CREDS: d / "bad-jwt.creds"}, (CREDS, "not a creds file")),
        "user of an account the server does not know": ("jwt", {CREDS: stranger}, (CREDS, "refused our credentials")),
        "expired user JWT": ("jwt", {CREDS: expired}, (CREDS, "expired at")),
    }
    with (
        EmbeddedServer(d / "nkey-store", extra_config=nkey.server_config) as nkey_server,
        EmbeddedServer(d / "jwt-store", extra_config=trust.server_config) as jwt_server,
    ):
        yield {
            "nkey": nkey_server.url,
            "jwt": jwt_server.url,
            "cases": cases,
            "good": {"nkey": (SEED, nkey.logins["observer"]["nats_nkey_seed"]), "jwt": (CREDS, good)},
        }


CASES = [
    "seed file missing",
    "seed file unreadable",
    "not a seed",
    "seed the server does not know",
    "creds file missing",
    "creds file without markers",
    "creds file with a broken JWT",
    "user of an account the server does not know",
    "expired user JWT",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_credentials_give_one_line_naming_the_setting(servers, case):
    server, settings, needles = servers["cases"][case]
    env = role_env(servers[server], job="j", connect_timeout=10)
    env.update({k: str(v) for k, v in settings.items()})
    command = "worker" if "server does not know" in case else "status"  # a role exits 2: it is not restarted
    result = run_pangea(command, env=env)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, *needles)


async def _connect_error(url: str, creds: Path) -> str:
    try:
        nc = await nats.connect(url, user_credentials=str(creds), allow_reconnect=False, connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises, it must not connect
        return str(exc)
    await nc.close()
    return ""


def test_the_server_itself_refuses_an_expired_jwt(servers):
    """Pangea reads the expiry first to say so in its line; the server would refuse the JWT anyway."""
    _, settings, _ = servers["cases"]["expired user JWT"]
    assert "authorization violation" in asyncio.run(_connect_error(servers["jwt"], settings[CREDS])).lower()


def test_good_credentials_reach_the_job(servers):
    """The fixtures' own observer credentials are let in: the refusals above are about the input."""
    for server, (setting, path) in servers["good"].items():
        env = {**role_env(servers[server], job="j"), setting: str(path)}
        assert_one_line_error(run_pangea("status", env=env), "no job 'j'")


def test_without_the_nkeys_package_the_line_says_how_to_install_it(servers, tmp_path):
    """A Pangea installed without nats-py's nkeys extra: one line naming the setting and the fix."""
    blocker = tmp_path / "no-nkeys" / "nkeys"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'nkeys'\", name='nkeys')\n")
    env = role_env(servers["nkey"], job="j", nats_nkey_seed=servers["good"]["nkey"][1])
    env["PYTHONPATH"] = str(blocker.parent)
    result = run_pangea("status", env=env)
    assert result.returncode == 2
    assert_one_line_error(result, SEED, "nkeys package", "pip install")


def test_secure_takes_a_method_and_true_still_means_passwords(monkeypatch):
    from pangea import settings as cfg
    from pangea.app.parser import build_parser

    assert build_parser().parse_args(["run", "--secure"]).secure == "password"
    assert build_parser().parse_args(["run", "--secure", "jwt"]).secure == "jwt"
    monkeypatch.setenv("PANGEA_SECURE", "true")
    assert cfg.load(cfg.RunSettings).secure == "password"
    monkeypatch.setenv("PANGEA_SECURE", "false")
    assert cfg.load(cfg.RunSettings).secure == "off"
    with pytest.raises(cfg.SettingsError, match="--secure"):
        cfg.load(cfg.RunSettings, secure="kerberos")
