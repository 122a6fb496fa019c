"""The deployment files in infra/ name only real commands, settings, ports, streams and consumers.

Nothing here starts a container: the Dockerfile, the compose file and the Kubernetes manifests
are read and checked against the code (the CLI's subcommands, the settings classes, the
subject names), so a renamed setting or stream breaks a test, not a deployment.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from urllib.parse import urlsplit

import pytest

from pangea import settings as cfg
from pangea.bus import subjects
from pangea.cli import build_parser
from tests.conftest import REPO

try:
    import yaml
except ImportError:  # the Dockerfile and `docker-compose config` checks need no YAML parser
    yaml = None

NO_YAML = "PyYAML is not installed (pip install pyyaml, in the test extras): it parses infra/*.yaml"

INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "docker-compose.yaml"
K8S = INFRA / "k8s"

ROLES = {
    "orchestrator": cfg.OrchestratorSettings, "preprocessor": cfg.PreprocessorSettings, "worker": cfg.WorkerSettings,
}
SETTINGS_CLASSES = (
    cfg.BusSettings, cfg.TrainSettings, cfg.OrchestratorSettings, cfg.PreprocessorSettings,
    cfg.WorkerSettings, cfg.RunSettings, cfg.ReplaySettings,
)
# The consumer KEDA reads: the orchestrator creates it under this name.
BACKLOG_CONSUMER = subjects.BACKLOG_CONSUMER
HTTP_PORT = cfg.BusSettings.model_fields["http_port"].default
SAMPLE_POD_NAME = "pangea-worker-5f7d9c8b6-x2x9k"  # what a fieldRef metadata.name gives


def env_names(*classes: type[cfg.BusSettings]) -> set[str]:
    """The PANGEA_* variables the given settings classes read."""
    return {f"PANGEA_{name.upper()}" for cls in classes for name in cls.model_fields}


SETTING_NAMES = env_names(*SETTINGS_CLASSES)


def subcommands() -> set[str]:
    parser = build_parser()
    return {
        name for action in parser._actions  # noqa: SLF001 - argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction) for name in action.choices  # noqa: SLF001
    }


def assert_real_command(argv: list[str], role: str) -> None:
    """`pangea <argv>` is the role's subcommand and every flag in it parses."""
    assert argv and argv[0] == role, f"command {argv} should start with {role}"
    assert role in subcommands()
    build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag


def assert_env_read_by(role: str, env: dict[str, str], where: str) -> None:
    names = {k for k in env if k.startswith("PANGEA_")}
    assert not names - SETTING_NAMES, f"{where}: not a Pangea setting: {sorted(names - SETTING_NAMES)}"
    unread = names - env_names(ROLES[role])
    assert not unread, f"{where}: `pangea {role}` does not read {sorted(unread)}"


def load_role(role: str, env: dict[str, str], monkeypatch, tmp_path) -> cfg.BusSettings:
    """The role's settings as its container would build them from `env` (values validated too)."""
    for key in list(os.environ):
        if key.startswith("PANGEA_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    return cfg.load(ROLES[role])


def urls_in(text: str) -> list[tuple[int, str]]:
    """(port, path) of every http://host:port/path in a health check command."""
    return [(int(p), path) for p, path in re.findall(r"http://[^/\s:'\"]+:(\d+)(/[\w/-]*)", text)]


# ------------------------------------------------------------------ Dockerfile


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per occurrence, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def test_dockerfile_runs_pangea_as_a_non_root_user():
    d = dockerfile()
    assert d["FROM"][0].startswith("python:3.11"), d["FROM"]
    assert d["ENTRYPOINT"] == ['["pangea"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pangea" in scripts
    assert d["USER"][-1] not in ("root", "0"), d["USER"]


def test_dockerfile_serves_and_checks_the_health_port():
    d = dockerfile()
    assert str(HTTP_PORT) in " ".join(d["EXPOSE"]).split()
    (check,) = d["HEALTHCHECK"]
    assert "/healthz" in check and "PANGEA_HTTP_PORT" in check and "urllib" in check
    env = dict(re.findall(r"(PANGEA_\w+)=(\S+)", " ".join(d["ENV"])))
    assert not set(env) - SETTING_NAMES, set(env) - SETTING_NAMES
    assert env["PANGEA_HTTP_PORT"] == str(HTTP_PORT)


def test_dockerfile_pins_the_same_torch_as_ci():
    """Workers must compute identical gradients: the image's torch is the one CI tests."""
    pin = re.compile(r"torch==([\w.+]+)")
    image, ci = set(pin.findall(DOCKERFILE.read_text())), set(pin.findall((REPO / ".ci" / "run").read_text()))
    assert image and image == ci, (image, ci)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text(), "the CPU build, not a multi-GB CUDA one"


# ------------------------------------------------------------------ docker compose


@pytest.fixture(scope="module")
def compose() -> dict:
    if yaml is None:
        pytest.skip(NO_YAML)
    return yaml.safe_load(COMPOSE.read_text())


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def service_command(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def test_compose_has_nats_and_every_role(compose):
    assert {"nats", *ROLES} <= set(compose["services"])


@pytest.mark.parametrize("role", ROLES)
def test_compose_role_runs_its_pangea_subcommand(compose, role):
    service = compose["services"][role]
    assert "entrypoint" not in service, "the image's ENTRYPOINT is `pangea`"
    assert_real_command(service_command(service), role)
    build = service["build"]
    assert build["context"] == ".." and (INFRA / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


@pytest.mark.parametrize("role", ROLES)
def test_compose_env_is_settings_the_role_reads(compose, role, monkeypatch, tmp_path):
    env = service_env(compose["services"][role])
    assert_env_read_by(role, env, f"compose service {role}")
    load_role(role, env, monkeypatch, tmp_path)  # and every value is valid


def test_compose_roles_share_the_bus_settings(compose):
    shared = {k: str(v) for k, v in compose["x-pangea-env"].items()}
    assert set(shared) <= env_names(cfg.BusSettings), "the shared env is read by every role"
    for role in ROLES:
        env = service_env(compose["services"][role])
        assert shared.items() <= env.items(), f"{role} lacks the shared x-pangea-env"
    url = urlsplit(shared["PANGEA_NATS_URL"])
    assert url.scheme == "nats" and url.hostname == "nats" and url.port == 4222


@pytest.mark.parametrize("role", ROLES)
def test_compose_role_health_check_and_startup_order(compose, role, monkeypatch, tmp_path):
    service = compose["services"][role]
    port = load_role(role, service_env(service), monkeypatch, tmp_path).http_port
    assert urls_in(" ".join(service["healthcheck"]["test"])) == [(port, "/healthz")]
    assert service["depends_on"]["nats"]["condition"] == "service_healthy"
    assert service["restart"] == "on-failure", "a finished job exits 0 and must stay finished"


def test_compose_orchestrator_resumes_and_keeps_its_outputs(compose, monkeypatch, tmp_path):
    service = compose["services"]["orchestrator"]
    settings = load_role("orchestrator", service_env(service), monkeypatch, tmp_path)
    assert settings.resume is True, "a restarted orchestrator must continue from its checkpoint"
    mounts = [volume.split(":")[1] for volume in service["volumes"]]
    assert str(settings.out) in mounts, f"PANGEA_OUT={settings.out} is not on a volume"
    assert [p.split(":")[-1] for p in service["ports"]] == [str(settings.http_port)]
    workers = compose["services"]["worker"].get("deploy", {}).get("replicas", 1)
    assert settings.workers <= workers, "round 0 would wait for more workers than compose starts"


def test_compose_worker_can_be_scaled(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker


def test_compose_nats_has_jetstream_on_a_volume_and_monitoring(compose):
    nats = compose["services"]["nats"]
    args = service_command(nats)
    assert "-js" in args
    store = args[args.index("-sd") + 1]
    assert store in [volume.split(":")[1] for volume in nats["volumes"]]
    assert args[args.index("-m") + 1] == "8222"
    assert urls_in(" ".join(nats["healthcheck"]["test"])) == [(8222, "/healthz")]


def test_compose_file_is_valid_for_docker_compose():
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose not on PATH (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # it is a Python program of its own
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    if yaml is None:
        pytest.skip(NO_YAML)
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def of_kind(manifests: dict[str, list[dict]], kind: str) -> list[dict]:
    return [d for docs in manifests.values() for d in docs if d["kind"] == kind]


def kustomization(manifests) -> dict:
    return manifests["kustomization.yaml"][0]


def configmaps(manifests) -> dict[str, dict[str, str]]:
    return {c["metadata"]["name"]: {k: str(v) for k, v in c["data"].items()} for c in of_kind(manifests, "ConfigMap")}


def pangea_container(manifests, deployment: dict) -> dict:
    image = kustomization(manifests)["images"][0]["name"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["image"] == image]
    return container


def roles(manifests) -> dict[str, dict]:
    """Role -> its Deployment, the role read from the container's args."""
    return {pangea_container(manifests, d)["args"][0]: d for d in of_kind(manifests, "Deployment")}


def container_env(manifests, container: dict) -> dict[str, str]:
    """What the container sees: its ConfigMaps, then its own env (fieldRefs as a sample pod name)."""
    env: dict[str, str] = {}
    maps = configmaps(manifests)
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else SAMPLE_POD_NAME
    return env


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def nats_services(manifests) -> dict[str, dict[str, int]]:
    """Services in front of the NATS StatefulSet: name -> {port name: port}."""
    (sts,) = of_kind(manifests, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    return {
        s["metadata"]["name"]: {p["name"]: p["port"] for p in s["spec"]["ports"]}
        for s in of_kind(manifests, "Service") if selects(s["spec"]["selector"], labels)
    }


def test_k8s_every_manifest_parses_and_is_in_the_kustomization(manifests):
    listed = kustomization(manifests)["resources"]
    assert sorted(listed) == sorted(set(manifests) - {"kustomization.yaml"})
    for name, docs in manifests.items():
        assert docs, f"{name} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), name
            assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], name


def test_k8s_has_one_deployment_per_role(manifests):
    assert sorted(roles(manifests)) == sorted(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_k8s_deployment_runs_its_subcommand_with_settings_it_reads(manifests, role, monkeypatch, tmp_path):
    container = pangea_container(manifests, roles(manifests)[role])
    assert "command" not in container, "the image's ENTRYPOINT is `pangea`"
    assert_real_command([str(a) for a in container["args"]], role)
    env = container_env(manifests, container)
    assert_env_read_by(role, env, f"k8s Deployment {role}")
    load_role(role, env, monkeypatch, tmp_path)


@pytest.mark.parametrize("role", ROLES)
def test_k8s_probes_and_scrape_annotations_use_the_health_port(manifests, role, monkeypatch, tmp_path):
    deployment = roles(manifests)[role]
    template = deployment["spec"]["template"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    container = pangea_container(manifests, deployment)
    port = load_role(role, container_env(manifests, container), monkeypatch, tmp_path).http_port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and named.get(get["port"], get["port"]) == port, (probe, get)
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(port) and notes["prometheus.io/path"] == "/metrics"


def test_k8s_orchestrator_is_single_resumes_and_keeps_its_outputs(manifests, monkeypatch, tmp_path):
    deployment = roles(manifests)["orchestrator"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "two orchestrators of one job must never overlap"
    container = pangea_container(manifests, deployment)
    settings = load_role("orchestrator", container_env(manifests, container), monkeypatch, tmp_path)
    assert settings.resume is True
    assert str(settings.out) in [m["mountPath"] for m in container["volumeMounts"]]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in of_kind(manifests, "Service") if selects(s["spec"]["selector"], labels)]
    assert services and settings.http_port in [p["port"] for p in services[0]["spec"]["ports"]]


def test_k8s_nats_has_jetstream_on_a_claim_and_the_roles_find_it(manifests):
    (sts,) = of_kind(manifests, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = [str(a) for a in container["args"]]
    assert "-js" in args
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get(args[args.index("-sd") + 1]) in claims, "the JetStream store is not on a claim"
    monitor = int(args[args.index("-m") + 1])
    services = nats_services(manifests)
    assert any(ports.get("client") == 4222 and ports.get("monitor") == monitor for ports in services.values())
    for data in configmaps(manifests).values():
        for url in data.get("PANGEA_NATS_URL", "").split(","):
            url = urlsplit(url.strip())
            assert url.hostname in services and url.port == services[url.hostname]["client"], url


def test_keda_scales_the_workers_on_the_backlog_consumer(manifests, monkeypatch, tmp_path):
    (scaled,) = of_kind(manifests, "ScaledObject")
    spec = scaled["spec"]
    workers = roles(manifests)["worker"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["scaleTargetRef"]["name"] == workers["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    orchestrator = pangea_container(manifests, roles(manifests)["orchestrator"])
    settings = load_role("orchestrator", container_env(manifests, orchestrator), monkeypatch, tmp_path)
    assert meta["stream"] == subjects.stream(settings.job, "batches")
    assert meta["consumer"] == BACKLOG_CONSUMER
    assert meta["account"] == "$G"
    assert int(meta["lagThreshold"]) >= 1
    # KEDA runs in its own namespace: the endpoint is a nats Service's full name, monitor port.
    namespace = kustomization(manifests)["namespace"]
    services = nats_services(manifests)
    host, _, port = meta["natsServerMonitoringEndpoint"].rpartition(":")
    service = host.removesuffix(f".{namespace}.svc.cluster.local")
    assert service in services and int(port) == services[service]["monitor"], meta["natsServerMonitoringEndpoint"]
    # Round 0 waits for PANGEA_WORKERS workers: KEDA must never hold fewer.
    assert spec["minReplicaCount"] >= settings.workers
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]


def test_k8s_kustomization_builds():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not on PATH: `kubectl kustomize infra/k8s` not checked")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
