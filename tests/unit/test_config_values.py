"""`parse_config`, field by field: each variable by its own name, the bool forms, the ends of
each range and each refusal's message, the defaults `--help` shows."""

from __future__ import annotations

import dataclasses

import pytest

from shared.config import ServerConfig, parse_config
from shared.errors import ConfigError


def parse(*argv: str, **environ: str) -> ServerConfig:
    return parse_config(list(argv), environ)


# Each variable by its own name (not read from the field's metadata, which a typo would share),
# with a value that is not its field's default.
ENV = {"MODEL_ID": ("model_id", "org/m"), "REVISION": ("revision", "v1"),
       "TOKENIZATION_WORKERS": ("tokenization_workers", 3), "DTYPE": ("dtype", "float32"),
       "SERVED_MODEL_NAME": ("served_model_name", "m"), "POOLING": ("pooling", "cls"),
       "MAX_CONCURRENT_REQUESTS": ("max_concurrent_requests", 7),
       "MAX_BATCH_TOKENS": ("max_batch_tokens", 99),
       "MAX_BATCH_REQUESTS": ("max_batch_requests", 5),
       "MAX_CLIENT_BATCH_SIZE": ("max_client_batch_size", 6),
       "AUTO_TRUNCATE": ("auto_truncate", False),
       "DEFAULT_PROMPT_NAME": ("default_prompt_name", "query"),
       "DEFAULT_PROMPT": ("default_prompt", "query: "), "DENSE_PATH": ("dense_path", "2_Dense"),
       "HF_TOKEN": ("hf_token", "t"), "HOSTNAME": ("hostname", "127.0.0.1"), "PORT": ("port", 81),
       "UDS_PATH": ("uds_path", "/run/x"), "HUGGINGFACE_HUB_CACHE": ("huggingface_hub_cache", "/d"),
       "PAYLOAD_LIMIT": ("payload_limit", 10), "API_KEY": ("api_key", "k"),
       "JSON_OUTPUT": ("json_output", True), "DISABLE_SPANS": ("disable_spans", True),
       "OTLP_ENDPOINT": ("otlp_endpoint", "http://c:4317"),
       "OTLP_SERVICE_NAME": ("otlp_service_name", "s"),
       "PROMETHEUS_PORT": ("prometheus_port", 9100),
       "CORS_ALLOW_ORIGIN": ("cors_allow_origin", ("https://a.example",)), "GRPC": ("grpc", True),
       "GRPC_MAX_PARALLEL_STREAM_REQUESTS": ("grpc_max_parallel_stream_requests", 4),
       "TASK": ("task", "sentence-similarity"), "AIP_PREDICT_ROUTE": ("aip_predict_route", "/p"),
       "AIP_HEALTH_ROUTE": ("aip_health_route", "/h"), "DEVICE": ("device", "cpu"),
       "DEVICES": ("devices", "0,1"), "DEVICE_ID": ("device_id", 1),
       "WORKERS_PER_DEVICE": ("workers_per_device", 2), "WORKER_THREADS": ("worker_threads", 3),
       "WORKER_TIMEOUT": ("worker_timeout", 1.5), "TOKENIZER_TIMEOUT": ("tokenizer_timeout", 2.5),
       "WORKER_READY_TIMEOUT": ("worker_ready_timeout", 3.5), "CUDA_GRAPHS": ("cuda_graphs", False),
       "SHUTDOWN_GRACE": ("shutdown_grace", 4.5)}


@pytest.mark.parametrize("name", sorted(ENV))
def test_each_variable_sets_its_field(name: str) -> None:
    field_name, value = ENV[name]
    config = parse(**{name: str(value[0]) if isinstance(value, tuple) else str(value)})
    assert getattr(config, field_name) == value


def test_every_field_has_a_variable_in_the_table() -> None:
    assert {f.name for f in dataclasses.fields(ServerConfig)} == {
        field_name for field_name, _ in ENV.values()}


@pytest.mark.parametrize(("raw", "expected"), [
    ("on", True), ("yes", True), ("TRUE", True), (" true ", True),
    ("off", False), ("no", False), ("False", False), (" 0\n", False)])
def test_bool_forms(raw: str, expected: bool) -> None:
    assert parse(AUTO_TRUNCATE=raw).auto_truncate is expected
    assert parse("--cuda-graphs", raw).cuda_graphs is expected


def test_the_ends_of_the_ranges_are_taken() -> None:
    assert parse("--port", "0").port == 0  # any free port
    assert parse("--port", "65535").port == 65535
    assert parse("--prometheus-port", "1").prometheus_port == 1
    assert parse("--prometheus-port", "65535").prometheus_port == 65535
    assert parse("--device-id", "0").device_id == 0
    assert parse("--devices", " 0, 1").devices == " 0, 1"
    for flag in ("--max-batch-tokens", "--tokenization-workers", "--worker-threads",
                 "--workers-per-device", "--max-batch-requests"):
        assert getattr(parse(flag, "1"), flag[2:].replace("-", "_")) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--worker-threads", "0"], "--worker-threads must be > 0"),
    (["--workers-per-device", "0"], "--workers-per-device must be > 0"),
    (["--tokenization-workers", "0"], "--tokenization-workers must be > 0"),
    (["--worker-timeout", "0"], "--worker-timeout, --worker-ready-timeout and "
                                "--tokenizer-timeout must be > 0"),
    (["--tokenizer-timeout", "-0.5"], "--worker-timeout, --worker-ready-timeout and "
                                      "--tokenizer-timeout must be > 0"),
    (["--device-id", "-1"], "--device-id must be >= 0"),
    (["--device-id", "0", "--devices", "1"],
     "--device-id and --devices both select CUDA devices: use one"),
    (["--device-id", "0", "--device", "mps"],
     "--device-id selects a CUDA device; it cannot go with --device mps"),
    (["--devices", "0", "--device", "mps"],
     "--devices selects CUDA devices; it cannot go with --device mps"),
    (["--devices", "0,x"], "--devices '0,x': expected CUDA indices like 0,1"),
])
def test_refusals_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(*argv)
    assert str(refused.value) == message


def test_a_variable_outside_its_choices_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        parse(DEVICE="gpu")
    assert str(refused.value) == ("environment variable DEVICE='gpu': choose one of "
                                  "('auto', 'cpu', 'cuda', 'mps')")


def test_a_bracketed_ipv6_hostname_variable_is_an_address() -> None:
    assert parse(HOSTNAME="[::1]").hostname == "[::1]"


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "(env: MAX_BATCH_TOKENS) [default: 16384]" in out
    assert "(env: AIP_HTTP_PORT or PORT) [default: 3000]" in out
    assert "(env: MODEL_ID) [" not in out  # no default shown for None
