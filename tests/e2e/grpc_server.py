"""The real `embedserve --grpc` as a subprocess, ready when gRPC health says SERVING."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.server import STOP_TIMEOUT_S, Server, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer(Server):
    def __init__(self, *args: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        # /metrics has a port of its own under --grpc (TEI's 9000 by default): a free one here,
        # so that servers can run side by side.
        self.metrics_port = free_port()
        super().__init__("--grpc", "--prometheus-port", str(self.metrics_port), *args, env=env,
                         log_path=log_path)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def health(self, service: str = "") -> int | None:
        """The service's health status, or None while the port is not open yet."""
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return self.health_stub.Check(request, timeout=5).status
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return None
            raise

    def first_health(self, timeout: float = 60) -> int:
        """The first status the server answers (NOT_SERVING while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedserve exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            if (status := self.health()) is not None:
                return status
            time.sleep(0.05)
        raise TimeoutError(f"no gRPC health answer after {timeout} s:\n{self.log()}")

    def wait_healthy(self, timeout: float = 180) -> GrpcServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedserve exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            if self.health() == SERVING:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"embedserve --grpc not SERVING after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        self.channel.close()
        return super().stop(timeout)


@contextmanager
def grpc_serving(*args: str, log_path: Path,
                 env: dict[str, str] | None = None) -> Iterator[GrpcServer]:
    """A SERVING gRPC server for the block; on the way out it must stop cleanly (exit 0)."""
    srv = GrpcServer(*args, env=env, log_path=log_path).wait_healthy()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log()


@contextmanager
def http_and_grpc(*args: str, root: Path,
                  grpc_args: tuple[str, ...] = ()) -> Iterator[tuple[Server, GrpcServer]]:
    """The same model and flags served twice, over HTTP and over gRPC (started together), to
    compare the two APIs' answers. Both must stop cleanly."""
    common = ("--tokenization-workers", "1", *args)
    http = Server(*common, log_path=root / "http.log")
    rpc = GrpcServer(*common, *grpc_args, log_path=root / "grpc.log")
    try:
        http.wait_healthy()
        rpc.wait_healthy()
        yield http, rpc
    finally:
        codes = (http.stop(), rpc.stop())
    assert codes == (0, 0), f"{http.log()}\n{rpc.log()}"
