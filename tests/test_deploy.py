"""Static checks of the deployment files: the Dockerfile, docker-compose.yml and deploy/docker/compose.postgres.yml,
the Kubernetes manifests under deploy/k8s/ (and deploy/k8s/postgres/) and the systemd unit. No Docker engine or
cluster runs here, so each file is parsed and checked for what matters, and every ``replika serve`` command line in
them is parsed by ``replika serve``'s own parser and built into a validated :class:`Config` together with the
config files and environment they give it."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from replika_server.auth import load_auth
from replika_server.cli import build_parser, serve_flags
from replika_server.config import Config, ConfigError, check_exposure, load_config_file
from replika_server.store import engine_of
from tests.conftest import WAIT, ServerProcess

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BROKER_PORT, ADMIN_PORT, UID = 8777, 8333, 10001
#: REPLIKA_* variables that are not serve settings: the config file's name, and the client commands' own.
NOT_SETTINGS = {"REPLIKA_CONFIG", "REPLIKA_URL", "REPLIKA_TOKEN"}


# ------------------------------------------------------------------------------------------------ helpers
def parse_serve(argv: list[str]) -> argparse.Namespace:
    """``replika ARGV`` through the real parser; a flag it does not know fails the test."""
    assert argv[:1] == ["serve"], argv
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"replika serve does not accept {shlex.join(argv)}")


def effective_config(argv: list[str], environ: Mapping[str, str], files: Mapping[str, str], tmp_path: Path) -> Config:
    """The settings ``replika ARGV`` would run with, given its environment and the config files it can see
    (path in the container or host -> text)."""
    args = parse_serve(argv)
    for name in environ:
        if name.startswith("REPLIKA_") and name not in NOT_SETTINGS:
            assert name.removeprefix("REPLIKA_").lower() in Config.__dataclass_fields__, f"{name} is no setting"
    config_path = args.config or environ.get("REPLIKA_CONFIG")
    file = None
    if config_path is not None:
        assert config_path in files, f"{config_path} is not provided by the deployment"
        local = tmp_path / "config.toml"
        local.write_text(files[config_path])
        file = load_config_file(local)
    return Config.build(serve_flags(args), environ={k: str(v) for k, v in environ.items()}, file=file)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(rest: str) -> list[str]:
    value = yaml.safe_load(rest)  # a JSON array, which YAML reads too
    assert isinstance(value, list), f"not exec form: {rest}"
    return [str(v) for v in value]


def docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def k8s_documents(directory: Path = K8S) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not a Kubernetes object
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield {**doc, "_file": path.name}


def k8s(kind: str, directory: Path = K8S) -> list[dict[str, Any]]:
    return [d for d in k8s_documents(directory) if d["kind"] == kind]


def pod_files(pod: dict[str, Any], container: dict[str, Any], directories: list[Path]) -> dict[str, str]:
    """The files the pod sees: the keys of the ConfigMaps and Secrets under their mounts, each object taken from
    the first of ``directories`` that has one of its name."""
    files: dict[str, str] = {}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    objects = [d for directory in directories for d in k8s_documents(directory)]
    for mount in container["volumeMounts"]:
        name, path = mount["name"], mount["mountPath"]
        if "configMap" in volumes.get(name, {}):
            wanted = ("ConfigMap", volumes[name]["configMap"]["name"])
        elif "secret" in volumes.get(name, {}):
            wanted = ("Secret", volumes[name]["secret"]["secretName"])
        else:
            continue
        found = next(d for d in objects if (d["kind"], d["metadata"]["name"]) == wanted)  # the first directory's
        files.update({f"{path}/{key}": text for key, text in found.get("data", found.get("stringData")).items()})
    return files


def systemd_unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "systemd" / "replika.service").read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def healthcheck_passes(python_code: str, admin_port: int, environ: Mapping[str, str] | None = None) -> bool:
    """Run a health check's Python against a real admin sidecar on ``admin_port`` (the deployment's 8333)."""
    code = python_code.replace(f":{ADMIN_PORT}/", f":{admin_port}/")
    env = dict(os.environ, **(environ or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=WAIT, env=env).returncode == 0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("deploy") / "data").start()
    try:
        yield proc
    finally:
        proc.stop()


# ------------------------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_runs_a_slim_non_root_image_with_a_data_volume(tmp_path: Path) -> None:
    instructions = dockerfile()
    stage = final_stage(instructions)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?|debian:\S+", stage[0][1]), stage[0]
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert users[-1] == f"{UID}:{UID}", "numeric, so that Kubernetes' runAsNonRoot can check it"
    exposed = {p for word, rest in stage if word == "EXPOSE" for p in rest.split()}
    assert {str(BROKER_PORT), str(ADMIN_PORT)} <= exposed
    volumes = [v for word, rest in stage if word == "VOLUME" for v in exec_form(rest)]
    assert volumes == ["/data"]
    for word, rest in instructions:  # everything copied from the build context exists
        if word == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


def test_dockerfile_healthcheck_asks_healthz_with_python(broker: ServerProcess) -> None:
    stage = final_stage(dockerfile())
    checks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD")
    assert "--interval" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2], "slim images have python, not curl"
    assert healthcheck_passes(argv[2], broker.admin_port, {"REPLIKA_ADMIN_PORT": str(broker.admin_port)})
    assert not healthcheck_passes(argv[2], 1, {"REPLIKA_ADMIN_PORT": "1"})


def test_dockerfile_serves_0_0_0_0_with_json_logs_on_stdout_and_needs_auth(tmp_path: Path) -> None:
    stage = final_stage(dockerfile())
    entrypoint = next(exec_form(rest) for word, rest in stage if word == "ENTRYPOINT")
    cmd = next(exec_form(rest) for word, rest in stage if word == "CMD")
    assert entrypoint == ["replika"]
    env = docker_env(stage)
    image_config = {"/etc/replika/replika.toml": (ROOT / "deploy" / "docker" / "replika.toml").read_text()}
    config = effective_config(cmd, env, image_config, tmp_path)
    assert (config.host, config.admin_host, config.data_dir) == ("0.0.0.0", "0.0.0.0", Path("/data"))
    assert (config.log_format, config.log_stream) == ("json", "stdout")
    with pytest.raises(ConfigError, match="without authentication"):
        check_exposure(config)  # refused until given tokens (or --insecure): documented in the Dockerfile
    check_exposure(effective_config(cmd, {**env, "REPLIKA_AUTH": "/run/secrets/a"}, image_config, tmp_path))
    # Flags and the environment can still override the image's defaults.
    assert effective_config(cmd, {**env, "REPLIKA_HOST": "::"}, image_config, tmp_path).host == "::"


def test_dockerignore_keeps_stores_and_secrets_out() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "everything is excluded unless listed"
    assert not any(p.startswith("!") and ("data" in p or "auth" in p or ".venv" in p) for p in patterns)


# ------------------------------------------------------------------------------------------------ compose
def test_compose_keeps_the_store_in_a_volume_and_checks_health(broker: ServerProcess, tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["replika"]
    assert service["build"] == "." and (ROOT / "Dockerfile").exists()
    mounts = dict(v.split(":", 1) for v in service["volumes"])
    volume = next(name for name, target in mounts.items() if target == "/data")
    assert volume in compose["volumes"], "a named volume, declared"
    published = {p.rsplit(":", 1)[-1] for p in service["ports"]}
    assert published == {str(BROKER_PORT), str(ADMIN_PORT)}
    test = service["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-c", test[3]] and "/healthz" in test[3]
    assert healthcheck_passes(test[3], broker.admin_port)
    assert service["read_only"] is True and "ALL" in service["cap_drop"]
    env = {**docker_env(final_stage(dockerfile())), **service.get("environment", {})}
    image_config = {"/etc/replika/replika.toml": (ROOT / "deploy" / "docker" / "replika.toml").read_text()}
    config = effective_config(service["command"], env, image_config, tmp_path)
    check_exposure(config)  # it binds 0.0.0.0 and has tokens
    assert config.data_dir == Path("/data")
    secret = next(iter(service["secrets"]))
    assert config.auth == Path(f"/run/secrets/{secret}")
    assert compose["secrets"][secret]["file"] == "./deploy/auth.toml"


def test_the_example_auth_file_is_a_valid_auth_file_once_filled_in(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "auth.example.toml").read_text()
    with pytest.raises(ConfigError, match="64 hex"):
        load_auth(ROOT / "deploy" / "auth.example.toml", None)  # unchanged, it cannot be deployed
    filled = re.sub(r'"REPLACE-[^"]*"', lambda m: f'"{hashlib.sha256(m.group().encode()).hexdigest()}"', text)
    (tmp_path / "auth.toml").write_text(filled)
    assert {p.name for p in load_auth(tmp_path / "auth.toml", None).principals} == {"admin", "app"}


# ------------------------------------------------------------------------------------------------ Kubernetes
def test_k8s_statefulset_keeps_the_store_on_a_claim_mounted_at_the_data_dir(tmp_path: Path) -> None:
    (sts,) = k8s("StatefulSet")
    assert sts["apiVersion"] == "apps/v1" and sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    claims = {c["metadata"]["name"]: c["spec"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = [name for name in claims if name in mounts]
    assert claims[claim]["accessModes"] == ["ReadWriteOnce"] and claims[claim]["resources"]["requests"]["storage"]
    assert claim not in {v["name"] for v in pod["spec"].get("volumes", [])}, "the claim, not a pod volume"

    files = pod_files(pod, container, [K8S])
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    env.setdefault("REPLIKA_CONFIG", "/etc/replika/replika.toml")  # from the image
    config = effective_config(container["args"], env, files, tmp_path)
    assert config.data_dir == Path(mounts[claim]), "the store must live on the claim"
    assert str(config.auth) in files, "the auth file comes from the Secret"
    check_exposure(config)
    assert (config.host, config.log_format, config.log_stream) == ("0.0.0.0", "json", "stdout")
    assert config.max_store_size < 10 * 1024**3  # below the claim's 10Gi
    assert claims[claim]["resources"]["requests"]["storage"] == "10Gi"


@pytest.mark.parametrize(("kind", "directory"), [("StatefulSet", K8S), ("Deployment", K8S / "postgres")])
def test_k8s_probes_ports_and_security_context(kind: str, directory: Path) -> None:
    (workload,) = k8s(kind, directory)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == {BROKER_PORT, ADMIN_PORT}

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("livenessProbe") == ("/healthz", ADMIN_PORT)
    assert probe("startupProbe") == ("/healthz", ADMIN_PORT)
    assert probe("readinessProbe") == ("/readyz", ADMIN_PORT)
    assert container["readinessProbe"]["timeoutSeconds"] > 5, "/readyz waits up to 5 s for the store"
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == UID and security["fsGroup"] == UID
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False and own["readOnlyRootFilesystem"] is True
    assert own["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] >= 10


def test_k8s_services_select_the_pod_and_name_its_ports() -> None:
    (sts,) = k8s("StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {s["metadata"]["name"]: s["spec"] for s in k8s("Service")}
    assert services[sts["spec"]["serviceName"]]["clusterIP"] == "None", "the governing Service is headless"
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in spec["ports"]} <= port_names
    assert {p["port"] for p in services["replika"]["ports"]} == {BROKER_PORT, ADMIN_PORT}


def test_k8s_kustomization_applies_all_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    assert all((K8S / r).exists() for r in resources)
    assert resources == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    for doc in k8s_documents():
        assert doc["metadata"]["name"] and doc["apiVersion"], doc["_file"]


# ------------------------------------------------------------------------------------------------ PostgreSQL mode
PG_COMPOSE = ROOT / "deploy" / "docker" / "compose.postgres.yml"
PG_K8S = K8S / "postgres"


def ignored_by_git(path: Path) -> bool:
    done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], timeout=WAIT)
    return done.returncode == 0


def test_compose_on_postgresql_gives_every_node_the_same_store_and_no_volume(tmp_path: Path) -> None:
    compose = yaml.safe_load(PG_COMPOSE.read_text())
    db, nodes = compose["services"]["postgres"], compose["services"]["replika"]
    assert nodes["deploy"]["replicas"] == 3, "one service, three nodes: they share its command and URL"
    assert "volumes" not in nodes, "a node keeps no state: the store is PostgreSQL"
    assert nodes["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert nodes["build"] == "../.." and (PG_COMPOSE.parent / nodes["build"] / "Dockerfile").exists()
    env = {**docker_env(final_stage(dockerfile())), **nodes.get("environment", {})}
    image_config = {"/etc/replika/replika.toml": (ROOT / "deploy" / "docker" / "replika.toml").read_text()}
    config = effective_config(nodes["command"], env, image_config, tmp_path)
    check_exposure(config)  # it binds 0.0.0.0 and has tokens
    assert config.auth == Path("/run/secrets/replika_auth") and "replika_auth" in nodes["secrets"]
    assert engine_of(config.store_url)[0] == "postgresql"
    url = urllib.parse.urlsplit(config.store)
    assert (url.hostname, url.password) == ("postgres", None), "the service's name, and no secret in the URL"
    assert (
        url.path.lstrip("/") == db["environment"]["POSTGRES_DB"] and url.username == db["environment"]["POSTGRES_USER"]
    )
    # The broker port only through the proxy; the admin sidecars on the host's loopback only.
    assert all(p["target"] == ADMIN_PORT and p["host_ip"] == "127.0.0.1" for p in nodes["ports"])


def test_compose_on_postgresql_keeps_the_password_in_a_secret_file_that_is_not_committed(tmp_path: Path) -> None:
    compose = yaml.safe_load(PG_COMPOSE.read_text())
    db, nodes = compose["services"]["postgres"], compose["services"]["replika"]
    assert db["image"].startswith("postgres:") and "ports" not in db, "reached by the nodes only"
    assert "POSTGRES_PASSWORD" not in db["environment"]
    secret = db["environment"]["POSTGRES_PASSWORD_FILE"].removeprefix("/run/secrets/")
    assert secret in db["secrets"] and secret in nodes["secrets"]
    password_file = (PG_COMPOSE.parent / compose["secrets"][secret]["file"]).resolve()
    assert ignored_by_git(password_file), f"{password_file} must never be committed"
    mounts = {target: volume for volume, target in (v.split(":", 1) for v in db["volumes"])}
    assert mounts["/var/lib/postgresql/data"] in compose["volumes"], "the database in a named volume, declared"
    # The nodes' entrypoint reads the same file into PGPASSWORD (libpq's) and runs replika with the command.
    shell, flag, script, name = nodes["entrypoint"]
    assert (shell, flag, name) == ("/bin/sh", "-c", "replika")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "replika"
    fake.write_text('#!/bin/sh\necho "$PGPASSWORD"; echo "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "password").write_text("s3cret\n")
    script = script.replace("$$", "$").replace(f"/run/secrets/{secret}", str(tmp_path / "password"))
    done = subprocess.run(
        [shell, flag, script, name, *nodes["command"]],
        env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.stdout.splitlines() == ["s3cret", " ".join(nodes["command"])], done
    no_file = script.replace(str(tmp_path / "password"), str(tmp_path / "absent"))
    assert subprocess.run([shell, flag, no_file, name], capture_output=True, timeout=WAIT).returncode != 0


def test_compose_on_postgresql_puts_the_nodes_behind_one_tcp_proxy(broker: ServerProcess) -> None:
    compose = yaml.safe_load(PG_COMPOSE.read_text())
    proxy, nodes = compose["services"]["proxy"], compose["services"]["replika"]
    assert proxy["ports"] == [f"{BROKER_PORT}:{BROKER_PORT}"]
    source, target = proxy["volumes"][0].split(":")[:2]
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"
    cfg = (PG_COMPOSE.parent / source).read_text()
    lines = [line.split("#")[0].split() for line in cfg.splitlines()]
    lines = [words for words in lines if words]
    assert ["mode", "tcp"] in lines and ["bind", f":{BROKER_PORT}"] in lines
    (template,) = [words for words in lines if words[0] == "server-template"]
    assert template[3] == f"replika:{BROKER_PORT}" and int(template[2]) >= nodes["deploy"]["replicas"]
    (defaults,) = [words for words in lines if words[0] == "default-server"]
    assert defaults[1:4] == ["check", "port", str(ADMIN_PORT)] and ["option", "httpchk"] in lines
    (send,) = [words for words in lines if words[:2] == ["http-check", "send"]]
    assert send[2:6] == ["meth", "GET", "uri", "/readyz"]
    idle = Config().idle_timeout
    for side in ("client", "server"):
        (value,) = [w[2] for w in lines if w[:2] == ["timeout", side]]
        assert parse_duration(value) > idle, "the broker's idle timeout, not the proxy's, ends idle connections"
    test = nodes["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and healthcheck_passes(test[3], broker.admin_port)


def parse_duration(text: str) -> float:
    """haproxy's time format: a number with an optional unit (ms, s, m, h); milliseconds without one."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", text).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[unit]


def test_k8s_on_postgresql_is_a_deployment_without_volumes_and_its_store_from_a_secret(tmp_path: Path) -> None:
    (deployment,) = k8s("Deployment", PG_K8S)
    assert not k8s("StatefulSet", PG_K8S) and not k8s("PersistentVolumeClaim", PG_K8S)
    assert (
        deployment["spec"]["replicas"] >= 2 and deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    )
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "volumeClaimTemplates" not in deployment["spec"]
    assert all({"configMap", "secret", "emptyDir"} & set(v) for v in pod["spec"]["volumes"]), "no persistent volume"
    (container,) = pod["spec"]["containers"]
    (store,) = [e for e in container["env"] if e["name"] == "REPLIKA_STORE"]
    assert "value" not in store, "the URL holds the password: from a Secret, not the manifest"
    ref = store["valueFrom"]["secretKeyRef"]
    (example,) = [s for s in k8s("Secret", PG_K8S) if s["metadata"]["name"] == ref["name"]]
    url = example["stringData"][ref["key"]]
    assert "REPLACE-" in (urllib.parse.urlsplit(url).password or ""), "an example password must not look real"
    files = pod_files(pod, container, [PG_K8S, K8S])  # the auth Secret is the LMDB variant's replika-auth
    env = {"REPLIKA_CONFIG": "/etc/replika/replika.toml", "REPLIKA_STORE": url}  # REPLIKA_CONFIG: from the image
    config = effective_config(container["args"], env, files, tmp_path)
    assert engine_of(config.store_url)[0] == "postgresql" and config.store == url
    assert str(config.auth) in files, "the auth file comes from the Secret"
    check_exposure(config)
    assert (config.host, config.log_format, config.log_stream) == ("0.0.0.0", "json", "stdout")


def test_k8s_on_postgresql_service_budget_and_kustomization() -> None:
    (deployment,) = k8s("Deployment", PG_K8S)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    (service,) = k8s("Service", PG_K8S)
    assert service["spec"]["selector"].items() <= labels.items() and service["spec"]["type"] == "ClusterIP"
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert {p["port"] for p in service["spec"]["ports"]} == {BROKER_PORT, ADMIN_PORT}
    (budget,) = k8s("PodDisruptionBudget", PG_K8S)
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    resources = set(yaml.safe_load((PG_K8S / "kustomization.yaml").read_text())["resources"])
    assert resources == {p.name for p in PG_K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    for doc in k8s_documents(PG_K8S):
        assert doc["metadata"]["name"] and doc["apiVersion"], doc["_file"]


# ------------------------------------------------------------------------------------------------ systemd
def test_systemd_unit_is_hardened_and_its_command_line_parses(tmp_path: Path) -> None:
    unit = systemd_unit()
    service = {key: values[-1] for key, values in unit["Service"].items()}
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/replika") and argv[0].startswith("/"), "systemd wants an absolute path"
    files = {"/etc/replika/replika.toml": (ROOT / "deploy" / "systemd" / "replika.toml").read_text()}
    config = effective_config(argv[1:], {}, files, tmp_path)
    assert config.data_dir == Path("/var/lib") / service["StateDirectory"]
    check_exposure(config)
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root", "0")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
        "KillSignal": "SIGTERM",
    }.items():
        assert service.get(key) == value, key
    assert service["ExecReload"].endswith("-HUP $MAINPID"), "SIGHUP reloads the auth file"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    sysusers = (ROOT / "deploy" / "systemd" / "replika.sysusers").read_text()
    assert re.search(rf"^u {service['User']} ", sysusers, re.MULTILINE)
