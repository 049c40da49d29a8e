"""`embedserve` / `text-embeddings-router`: parse the config, start workers, serve HTTP (or
gRPC with --grpc)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from opentelemetry.trace import Tracer

from router import tasks
from router.app import build_app, metrics_app
from router.devices import cpu_threads_per_worker, tokenizer_processes, worker_devices
from router.http_server import (
    bind,
    close_budget,
    closed_within,
    hypercorn_config,
    raise_open_files_limit,
    serve_app,
)
from router.inputs import InputRules, prompt_list
from router.metrics import Metrics
from router.query_route import QueryVectors
from router.routes import AppState
from router.schemas import ClassifierModelType, EmbeddingModelType, Info, ModelType
from router.service import InferenceService
from router.socket_dir import socket_dir
from router.tokenization import TokenizerPool
from router.tracing import Tracing
from router.workers import WorkerPool
from shared.classifier import scored_before
from shared.config import (
    ServerConfig,
    container_hostname,
    package_version,
    parse_config,
)
from shared.dtypes import default_dtype
from shared.errors import ConfigError
from shared.logs import setup_logging, unknown_log_level
from shared.modelinfo import ModelInfo, load_model_info
from shared.protocol import WorkerConfig
from shared.resolve import ResolvedModel, resolve_model
from shared.st_modules import optional_json

log = logging.getLogger("embedserve")


def max_input_length(info: ModelInfo, config: ServerConfig) -> int:
    """The model's limit, capped by the batch budget as TEI does (an entry must fit a batch)."""
    limit = info.max_input_length
    if info.length_unlimited:
        # A static model (sentence-transformers has no limit for it): an input must still fit
        # one batch, so the batch budget is the limit, cut or refused per --auto-truncate.
        return config.max_batch_tokens
    if limit <= config.max_batch_tokens:
        return limit
    if not config.auto_truncate:
        raise ConfigError(
            f"The maximum input length is `{limit}` which exceeds "
            f"`--max-batch-tokens={config.max_batch_tokens}`. Either increase "
            f"`--max-batch-tokens` to at least `{limit}`, or set `--auto-truncate true` so that "
            f"longer inputs are truncated to `{config.max_batch_tokens}` tokens."
        )
    log.warning("the maximum input length %d exceeds --max-batch-tokens=%d: inputs are "
                "truncated to %d tokens", limit, config.max_batch_tokens, config.max_batch_tokens)
    return config.max_batch_tokens


def default_prompt(info: ModelInfo, config: ServerConfig) -> str | None:
    if config.default_prompt is not None:
        return config.default_prompt
    name = config.default_prompt_name or info.default_prompt_name
    if name is None:
        return None
    if name not in info.prompts:
        raise ConfigError(
            f"`default-prompt-name` is set to `{name}` but it was not found in the Sentence "
            f"Transformers prompts. Available prompts: {prompt_list(info.prompts)}"
        )
    return info.prompts[name]


def model_type(info: ModelInfo) -> ModelType:
    """/info's model_type: TEI's embedding {pooling} or classifier / reranker {labels}."""
    if info.kind == "embedding":
        assert info.pooling is not None
        return ModelType(embedding=EmbeddingModelType(info.pooling.replace("-", "_")))
    labels = ClassifierModelType(
        id2label=dict(info.id2label),
        label2id={label: int(i) for i, label in info.id2label.items()},
    )
    return ModelType(classifier=labels) if info.kind == "classifier" else ModelType(reranker=labels)


def build_info(config: ServerConfig, model: ResolvedModel, info: ModelInfo, dtype: str,
               rules: InputRules, tokenizers: int) -> Info:
    return Info(
        model_id=model.model_id,
        model_sha=model.sha or config.revision,
        model_dtype=dtype,
        served_model_name=config.served_model_name or model.model_id,
        model_type=model_type(info),
        max_concurrent_requests=config.max_concurrent_requests,
        max_input_length=rules.max_input_length,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_requests=config.max_batch_requests,
        max_client_batch_size=config.max_client_batch_size,
        auto_truncate=config.auto_truncate,
        tokenization_workers=tokenizers,
        version=package_version(),
        # Empty when an image was built without --build-arg GIT_SHA / DOCKER_LABEL: unknown.
        sha=os.environ.get("EMBEDSERVE_GIT_SHA") or None,
        docker_label=os.environ.get("DOCKER_LABEL") or None,
        embedding_dimension=info.output_dim if info.kind == "embedding" else None,
        normalize_module=info.has_normalize,
        dense_modules=[Path(d.path).name for d in info.dense],
        prompts=info.prompts,
        default_prompt=rules.default_prompt,
        sparse_vectors=info.sparse_vectors,
        workers=[],
    )


# SentenceTransformer leaves the prompt out of these three by their Hub names, whatever their
# Pooling file says (they predate include_prompt).
INSTRUCTOR_MODELS = frozenset({"hkunlp/instructor-base", "hkunlp/instructor-large",
                               "hkunlp/instructor-xl"})


def left_truncation_note(model_dir: Path) -> str | None:
    """What to warn of where tokenizer_config.json sets `truncation_side: left`: transformers
    (so sentence-transformers) then cuts a long input's start, but here the request's
    `truncation_direction` decides (TEI's, default right)."""
    path = model_dir / "tokenizer_config.json"
    settings = optional_json(path)
    if not isinstance(settings, dict) or settings.get("truncation_side") != "left":
        return None
    return (f"{path} sets truncation_side \"left\": sentence-transformers cuts long inputs at "
            "their start, this server on the side a request's truncation_direction names "
            "(Right unless it says Left)")


def excludes_prompt(info: ModelInfo, model_id: str) -> bool:
    """Whether pooling leaves each prompted text's prompt out."""
    return not info.include_prompt or model_id in INSTRUCTOR_MODELS


def input_rules(config: ServerConfig, model: ResolvedModel, info: ModelInfo) -> InputRules:
    limit = max_input_length(info, config)
    return InputRules(
        max_input_length=limit,
        max_client_batch_size=config.max_client_batch_size,
        vocab_size=info.vocab_size,
        prompts=info.prompts,
        default_prompt=default_prompt(info, config),
        # The file's truncation, where it (not the batch budget) is the limit.
        truncation_side=info.truncation_side if limit == info.max_input_length else None,
        exclude_prompt=excludes_prompt(info, model.model_id),
        scored_before=scored_before(info.config, info.kind) if info.logit_score is None else None,
    )


def worker_settings(config: ServerConfig, model: ResolvedModel, devices: list[str],
                    runtime_dir: str) -> list[WorkerConfig]:
    """One worker per device entry, all on the socket in `runtime_dir`; CPU workers split the
    cores between them unless --worker-threads says how many each takes."""
    cpu_workers = sum(device == "cpu" for device in devices)
    return [
        WorkerConfig(
            worker_id=str(index),
            endpoint=f"ipc://{runtime_dir}/workers.sock",
            model_dir=str(model.path),
            pooling=config.pooling,
            dense_path=config.dense_path,
            device=device,
            dtype=config.dtype,
            max_batch_tokens=config.max_batch_tokens,
            parent_pid=os.getpid(),
            json_output=config.json_output,
            threads=(config.worker_threads or cpu_threads_per_worker(cpu_workers)
                     if device == "cpu" else None),
            cuda_graphs=config.cuda_graphs,
        )
        for index, device in enumerate(devices)
    ]


async def run(config: ServerConfig) -> None:
    _check_grpc_installed(config)
    model = resolve_model(config)
    info = load_model_info(model.path, config.pooling, config.dense_path)
    if info.pooling is None and info.kind == "embedding":  # a classifier's head pools itself
        raise ConfigError(
            "The `--pooling` arg is not set and we could not find a pooling configuration "
            "(`1_Pooling/config.json`) for this model."
        )
    rules = input_rules(config, model, info)
    log.info("serving %s from %s: max input length %d, pooling %s", model.model_id, model.path,
             rules.max_input_length, info.pooling)
    if rules.truncation_side is None and (note := left_truncation_note(model.path)):
        log.warning("%s", note)
    devices = worker_devices(config)
    tokenizers = tokenizer_processes(config, devices)
    # Made once nothing above can refuse the configuration; removed on every way out below.
    runtime_dir = socket_dir(config.uds_path)
    worker_configs = worker_settings(config, model, devices, runtime_dir)
    log.info("workers: %s", ", ".join(f"{c.worker_id}={c.device}" for c in worker_configs))
    metrics = Metrics(rules.max_input_length)
    tracing = (Tracing(config.otlp_endpoint, config.otlp_service_name, package_version())
               if config.otlp_endpoint else None)
    tracer = tracing.tracer if tracing is not None else None
    workers = WorkerPool(worker_configs, hang_timeout=config.worker_timeout,
                         ready_timeout=config.worker_ready_timeout, metrics=metrics)
    try:
        service = InferenceService(
            rules=rules,
            embedding_dim=info.embedding_dim,
            output_dim=info.output_dim,
            max_concurrent_requests=config.max_concurrent_requests,
            max_batch_tokens=config.max_batch_tokens,
            max_batch_requests=config.max_batch_requests,
            auto_truncate=config.auto_truncate,
            position_offset=info.position_offset,
            model_kind=info.kind,
            splade=info.splade,
            lexical=info.lexical is not None,
            csr=info.csr is not None,
            empty_bag_id=info.empty_bag_id,
            queries=(QueryVectors(info.query_route, info.splade_spec.max_active_dims,
                                  info.vocab_size, rules)
                     if info.query_route is not None else None),
            tokenizers=TokenizerPool(str(info.tokenizer_path), tokenizers,
                                     json_logs=config.json_output, lowercase=info.lowercase,
                                     model_type=info.model_type,
                                     conversations=info.conversations,
                                     empty_bag_id=info.empty_bag_id,
                                     stall_timeout=config.tokenizer_timeout),
            workers=workers,
            metrics=metrics,
            tracer=tracer,
        )
        workers.on_change = service.on_workers_changed
        # What the workers will choose (shared/dtypes.py); /info shows what they report once
        # they are ready.
        dtype = config.dtype or default_dtype(devices[0].partition(":")[0],
                                              model_type=info.model_type)
        app_info = build_info(config, model, info, dtype, rules, tokenizers)
        await _serve(AppState(config, service, app_info, info), tracer)
    finally:
        workers.close_now()
        if tracing is not None:
            tracing.shutdown()
        shutil.rmtree(runtime_dir, ignore_errors=True)


async def _serve(state: AppState, tracer: Tracer | None) -> None:
    """Open the port at once and start the service behind it; on SIGTERM/SIGINT refuse new
    requests, drain the ones in flight, then close. The same for HTTP and gRPC."""
    config, service = state.config, state.service
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: a closed terminal
        loop.add_signal_handler(sig, stop.set)
    hyper = hypercorn_config(config, config.port)
    # The gRPC server binds (and checks) its own port.
    sockets = None if config.grpc else bind(hyper, "--port")
    closed = asyncio.Event()
    metrics_server = None
    if config.grpc and config.prometheus_port is None:
        log.warning("no /metrics is served: --port is 9000, where --grpc would serve it by "
                    "default; pass --prometheus-port")
    if config.prometheus_port is not None:
        metrics_hyper = hypercorn_config(config, config.prometheus_port)
        metrics_sockets = bind(metrics_hyper, "--prometheus-port")
        # /metrics alone, until the main server has closed.
        metrics_server = tasks.start_supervised(
            serve_app(metrics_app(service.metrics), metrics_hyper, metrics_sockets,
                         closed.wait),
            "the Prometheus server")
    # The port opens at once; until this is done, /health answers 503 and gRPC health
    # NOT_SERVING.
    starting = loop.create_task(service.start(config.worker_ready_timeout))

    drained = asyncio.Event()

    async def until_stopped() -> None:
        waiter = loop.create_task(stop.wait())
        await asyncio.wait({waiter, starting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is not None:
            waiter.cancel()
            return  # start-up failed: close the port now; the error is raised below
        if starting.done():
            log.info("ready")
        await waiter
        log.info("shutting down: draining in-flight requests (at most %g s)",
                 config.shutdown_grace)
        await service.admission.drain(config.shutdown_grace)
        log.info("drained: closing connections")
        drained.set()

    try:
        if config.grpc:
            from router.grpc import server as grpc_server

            await grpc_server.serve(state, until_stopped)
        else:
            assert sockets is not None
            await closed_within(
                loop.create_task(serve_app(build_app(state, tracer=tracer),
                                              hyper, sockets, until_stopped)),
                drained,
                lambda: close_budget(service.admission.deadline, config.shutdown_grace))
    finally:
        closed.set()
        if metrics_server is not None:
            await asyncio.wait({metrics_server}, timeout=close_budget(
                service.admission.deadline, config.shutdown_grace))
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})  # cancel() only asks; cancelled() needs it done
        await service.stop()
    if not starting.cancelled() and (failure := starting.exception()) is not None:
        raise failure


def _check_grpc_installed(config: ServerConfig) -> None:
    """Fail before loading the model when --grpc cannot be served (the `grpc` extra)."""
    if not config.grpc:
        return
    try:
        import router.grpc.server  # noqa: F401  (also generates the stubs if needed)
    except ImportError as exc:
        raise ConfigError(f"--grpc needs the grpc extra (pip install 'embedserve[grpc]'): "
                          f"{exc}") from None


def main(argv: list[str] | None = None) -> int:
    prog = Path(sys.argv[0]).name or "embedserve"
    try:
        config = parse_config(argv, prog=prog)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.json_output, "router", spans=not config.disable_spans)
    if config.hostname == "0.0.0.0" and (name := container_hostname(os.environ)):
        log.info("HOSTNAME=%r is a name, not an address (Docker and Kubernetes set it to the "
                 "container's): listening on 0.0.0.0, as TEI does", name)
    if (unknown := unknown_log_level()) is not None:  # said once, by the router
        log.warning("LOG_LEVEL=%r names no level (error, warn, info, debug, trace): logging at "
                    "info", unknown)
    raise_open_files_limit()
    try:
        import uvloop

        uvloop.run(run(config))
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    if tasks.failures:
        log.error("stopped because %s failed", ", ".join(tasks.failures))
        return 1
    return 0


def grpc_main() -> int:
    """`embedserve-grpc`: `embedserve --grpc`, as TEI's gRPC image runs it."""
    return main(["--grpc", *sys.argv[1:]])
