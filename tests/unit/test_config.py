"""`parse_config`: TEI's defaults, flag > env > default, bool forms, refusals, `--help`."""

from __future__ import annotations

import dataclasses

import pytest

from shared.config import ServerConfig, build_parser, parse_config
from shared.errors import ConfigError


def parse(*argv: str, **environ: str) -> ServerConfig:
    return parse_config(list(argv), environ)


def test_defaults_are_teis() -> None:
    config = parse()
    assert config.port == 3000
    assert config.hostname == "0.0.0.0"
    assert config.max_concurrent_requests == 512
    assert config.max_batch_tokens == 16384
    assert config.max_batch_requests is None
    assert config.max_client_batch_size == 32
    assert config.payload_limit == 2_000_000
    assert config.auto_truncate is True
    assert config.uds_path == "/tmp/text-embeddings-inference-server"
    assert config.otlp_service_name == "text-embeddings-inference.server"
    assert config.model_id is None
    assert config.cors_allow_origin is None
    # Ours.
    assert (config.worker_timeout, config.tokenizer_timeout, config.worker_ready_timeout,
            config.shutdown_grace) == (30.0, 30.0, 300.0, 30.0)
    assert (config.device, config.workers_per_device, config.cuda_graphs) == ("auto", 1, True)


def test_parse_config_reads_os_environ_when_none_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BATCH_TOKENS", "1234")
    assert parse_config([]).max_batch_tokens == 1234


def test_env_beats_default() -> None:
    config = parse(PORT="8080", MODEL_ID="org/model", MAX_BATCH_REQUESTS="7", DTYPE="bfloat16")
    assert (config.port, config.model_id, config.max_batch_requests, config.dtype) == (
        8080, "org/model", 7, "bfloat16")


def test_flag_beats_env() -> None:
    config = parse("--port", "9001", "--model-id", "flag/model", PORT="8080", MODEL_ID="env/model")
    assert config.port == 9001
    assert config.model_id == "flag/model"


def test_short_port_flag() -> None:
    assert parse("-p", "4000").port == 4000


def test_empty_env_value_is_ignored() -> None:
    assert parse(PORT="").port == 3000


@pytest.mark.parametrize("env", ["HF_TOKEN", "HF_API_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_hf_token_from_either_env(env: str) -> None:
    assert parse(**{env: "secret"}).hf_token == "secret"


def test_hf_token_prefers_hf_token() -> None:
    assert parse(HF_TOKEN="new", HF_API_TOKEN="old").hf_token == "new"


@pytest.mark.parametrize("newer", ["HF_TOKEN", "HF_API_TOKEN"])
def test_hugging_face_hub_token_is_the_last_resort(newer: str) -> None:
    # The Hub's own order (HF_TOKEN before it): the variable TEI 0.x read never overrides one
    # that a newer setup sets beside it.
    assert parse(**{newer: "new", "HUGGING_FACE_HUB_TOKEN": "old"}).hf_token == "new"


# Every flag of TEI 1.9's text-embeddings-router (router/src/main.rs), with a value it takes: a
# TEI command line must start embedserve.
TEI_FLAGS = {"--model-id": "org/model", "--revision": "main", "--tokenization-workers": "2",
             "--dtype": "float16", "--served-model-name": "m", "--pooling": "mean",
             "--max-concurrent-requests": "8", "--max-batch-tokens": "1024",
             "--max-batch-requests": "4", "--max-client-batch-size": "4",
             "--auto-truncate": None, "--default-prompt-name": "query",
             "--default-prompt": "query: ",
             "--dense-path": "2_Dense", "--device-id": "0", "--hf-api-token": "t",
             "--hostname": "127.0.0.1", "--port": "3001", "--uds-path": "/tmp/x",
             "--huggingface-hub-cache": "/data", "--payload-limit": "100",
             "--api-key": "k", "--json-output": None, "--disable-spans": None,
             "--otlp-endpoint": "http://127.0.0.1:4317", "--otlp-service-name": "s",
             "--prometheus-port": "9000", "--cors-allow-origin": "http://a.example"}


@pytest.mark.parametrize("flag", sorted(TEI_FLAGS))
def test_every_tei_flag_is_taken(flag: str) -> None:
    value = TEI_FLAGS[flag]
    config = parse(flag, *([] if value is None else [value]))
    got = getattr(config, "hf_token" if flag == "--hf-api-token" else flag[2:].replace("-", "_"))
    if value is None:  # a switch
        assert got is True
    else:
        assert str(got[0] if isinstance(got, tuple) else got) == value


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--auto-truncate", "false"], {}, False),
        (["--auto-truncate", "False"], {}, False),
        (["--auto-truncate", "0"], {}, False),
        (["--auto-truncate"], {"AUTO_TRUNCATE": "false"}, True),
        (["--auto-truncate", "true"], {}, True),
        ([], {"AUTO_TRUNCATE": "false"}, False),
        ([], {"AUTO_TRUNCATE": "no"}, False),
        ([], {"AUTO_TRUNCATE": "1"}, True),
        ([], {}, True),
    ],
)
def test_auto_truncate_forms(argv: list[str], environ: dict[str, str], expected: bool) -> None:
    assert parse_config(argv, environ).auto_truncate is expected


def test_switches() -> None:
    assert parse("--json-output").json_output is True
    assert parse(JSON_OUTPUT="true").json_output is True
    assert parse(JSON_OUTPUT="false").json_output is False
    assert parse().json_output is False


def test_bad_auto_truncate_flag_exits() -> None:
    with pytest.raises(SystemExit):
        parse("--auto-truncate", "maybe")


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("PORT", "eighty"),
        ("MAX_BATCH_TOKENS", "1.5"),
        ("AUTO_TRUNCATE", "maybe"),
        ("DTYPE", "float8"),
        ("POOLING", "average"),
        ("WORKER_READY_TIMEOUT", "soon"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=var) as info:
        parse(**{var: raw})
    assert raw in str(info.value)


def test_grpc_false_from_env_is_accepted() -> None:
    assert parse(GRPC="false").grpc is False


def test_grpc_from_flag_or_env() -> None:
    assert parse("--grpc").grpc is True
    assert parse(GRPC="true").grpc is True


def test_default_prompt_and_name_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        parse("--default-prompt", "query: ", "--default-prompt-name", "query")


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-batch-tokens", "0"],
        ["--max-concurrent-requests", "-1"],
        ["--max-client-batch-size", "0"],
        ["--payload-limit", "0"],
        ["--max-batch-requests", "0"],
        ["--tokenization-workers", "0"],
        ["--grpc-max-parallel-stream-requests", "0"],
        ["--worker-timeout", "0"],
        ["--worker-ready-timeout", "-1"],
        ["--tokenizer-timeout", "0"],
    ],
)
def test_non_positive_limits_are_refused(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match=argv[0]):
        parse(*argv)


def test_validate_on_a_directly_built_config() -> None:
    with pytest.raises(ConfigError, match="--max-batch-tokens"):
        ServerConfig(max_batch_tokens=0).validate()
    ServerConfig().validate()


def test_help_mentions_every_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(ServerConfig):
        env = f.metadata["env"]
        for name in env if isinstance(env, tuple) else (env,):
            assert name in out, f"--help does not mention {name} ({f.name})"
        # A platform's own variables (Vertex AI's) have no flag, and say so in the epilog.
        flag = f"--{f.name.replace('_', '-')}"
        assert (flag not in out) if f.metadata["env_only"] else (flag in out)


def test_every_field_has_a_flag_and_help() -> None:
    parser = build_parser()
    dests = {action.dest: action for action in parser._actions}
    for f in dataclasses.fields(ServerConfig):
        assert f.metadata["help"]
        assert (f.name not in dests) if f.metadata["env_only"] else bool(dests[f.name].help)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--cors-allow-origin", "https://a.example, https://b.example"], {}),
        (["--cors-allow-origin", "https://a.example",
          "--cors-allow-origin", "https://b.example"], {}),
        ([], {"CORS_ALLOW_ORIGIN": "https://a.example,https://b.example,"}),
    ],
)
def test_cors_allow_origin_forms(argv: list[str], environ: dict[str, str]) -> None:
    assert parse_config(argv, environ).cors_allow_origin == (
        "https://a.example", "https://b.example")


def test_observability_flags_are_accepted() -> None:
    config = parse("--otlp-endpoint", "http://collector:4317", "--prometheus-port", "9000",
                   "--otlp-service-name", "embed", "--disable-spans")
    assert config.otlp_endpoint == "http://collector:4317" and config.prometheus_port == 9000
    assert config.otlp_service_name == "embed" and config.disable_spans is True
    assert parse(OTLP_ENDPOINT="https://collector:4317", PROMETHEUS_PORT="9100").prometheus_port \
        == 9100


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-1"])
def test_prometheus_port_out_of_range_is_refused(port: str) -> None:
    with pytest.raises(ConfigError, match="--prometheus-port"):
        parse_config(["--prometheus-port", port], {})


@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_port_out_of_range_is_refused(port: str) -> None:
    with pytest.raises(ConfigError, match="--port"):
        parse_config(["--port", port], {})


def test_negative_shutdown_grace_is_refused() -> None:
    with pytest.raises(ConfigError, match="--shutdown-grace"):
        parse_config(["--shutdown-grace", "-1"], {})
    assert parse("--shutdown-grace", "0").shutdown_grace == 0


def test_hostname_env_that_is_a_container_name_is_not_an_address() -> None:
    # Docker and Kubernetes set HOSTNAME to the container's name: TEI listens on 0.0.0.0 then.
    assert parse(HOSTNAME="embedserve-5d8f7-xk2p9").hostname == "0.0.0.0"
    assert parse(HOSTNAME="127.0.0.1").hostname == "127.0.0.1"
    assert parse(HOSTNAME="::1").hostname == "::1"
    assert parse(HOSTNAME=" 127.0.0.1 ").hostname == "127.0.0.1"
    assert parse("--hostname", " ::1").hostname == "::1"
    with pytest.raises(ConfigError, match=r"--hostname \(HOSTNAME\) is empty"):
        parse("--hostname", " ")
    assert parse("--hostname", "localhost", HOSTNAME="pod-name").hostname == "localhost"


def test_otlp_endpoint_without_a_scheme_is_plaintext_grpc() -> None:
    assert parse("--otlp-endpoint", "otel-collector:4317").otlp_endpoint == \
        "http://otel-collector:4317"
    assert parse(OTLP_ENDPOINT="https://otel:4317").otlp_endpoint == "https://otel:4317"


def test_vertex_ai_variables() -> None:
    config = parse(AIP_HTTP_PORT="8080", AIP_PREDICT_ROUTE="/predict", AIP_HEALTH_ROUTE="/h")
    assert (config.port, config.aip_predict_route, config.aip_health_route) == (
        8080, "/predict", "/h")
    # Vertex AI's port wins over the PORT=80 the images set; a flag wins over both.
    assert parse(PORT="80", AIP_HTTP_PORT="8080").port == 8080
    assert parse("--port", "3000", AIP_HTTP_PORT="8080").port == 3000
    with pytest.raises(ConfigError, match="AIP_PREDICT_ROUTE='predict': expected a path"):
        parse(AIP_PREDICT_ROUTE="predict")
    with pytest.raises(SystemExit):  # no flag: the platform's variables only
        parse("--aip-predict-route", "/p")


def test_version_flag(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        parse("--version")
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("embedserve ")


def test_grpc_serves_metrics_on_teis_port_by_default() -> None:
    # Over HTTP /metrics is on the API port; over gRPC it needs a port of its own.
    assert parse().prometheus_port is None
    assert parse("--grpc").prometheus_port == 9000
    assert parse("--grpc", "--prometheus-port", "9100").prometheus_port == 9100
    assert parse("--grpc", "--port", "9000").prometheus_port is None


def test_prometheus_port_must_differ_from_the_api_port() -> None:
    with pytest.raises(ConfigError, match="--prometheus-port 8080 is --port as well"):
        parse("--port", "8080", "--prometheus-port", "8080")


@pytest.mark.parametrize("endpoint", ["grpc://c:4317", "http://", "http://c:port", ":4317"])
def test_otlp_endpoint_must_be_a_url(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="--otlp-endpoint"):
        parse("--otlp-endpoint", endpoint)


def test_grpc_max_parallel_stream_requests_from_teis_variable() -> None:
    assert parse().grpc_max_parallel_stream_requests is None
    assert parse(GRPC_MAX_PARALLEL_STREAM_REQUESTS="16").grpc_max_parallel_stream_requests == 16
    with pytest.raises(ConfigError, match="--grpc-max-parallel-stream-requests"):
        parse(GRPC_MAX_PARALLEL_STREAM_REQUESTS="-3")


@pytest.mark.parametrize("argv", [["--port", "abc"], ["--pooling", "average"],
                                  ["--unknown-tei-flag", "x"], ["--auto-truncate", "maybe"]])
def test_a_bad_flag_is_one_line_and_status_2(argv: list[str], capsys) -> None:
    # As clap: the error alone, not argparse's 20-line usage above it.
    with pytest.raises(SystemExit) as done:
        parse(*argv)
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("embedserve: error: ") and argv[0] in line and "--help" in line


@pytest.mark.parametrize("argv", [["--json"], ["--model", "org/m"], ["--max-batch-tok", "8"]])
def test_abbreviated_flags_are_refused(argv: list[str]) -> None:
    # clap takes no prefix of a flag; argparse's would turn a TEI flag that embedserve lacks into
    # whichever of ours it begins.
    with pytest.raises(SystemExit) as done:
        parse(*argv)
    assert done.value.code == 2

