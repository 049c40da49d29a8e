"""Other embedding servers measured under the same load as embedserve, where installable.

Infinity (michaelfeil/infinity, `infinity_emb` on PyPI) is the one installable here: its pins
(numpy < 2, sentence-transformers < 4) clash with ours, so it lives in a venv of its own and the
harness is given its executable (`--infinity PATH`). TEI ships as a Rust binary or a container,
neither of which the development machine can fetch.

Infinity is run as its users run it: `infinity_emb v2` with its defaults (torch engine, dtype
auto) on the same model directory, device and batch size, answering the OpenAI-shaped
`POST /embeddings` (bench.run) or the Cohere-shaped `POST /rerank` (bench.rerank) that the
workloads are rewritten into.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from bench.server import ServerProcess, cpu_seconds, descendants

# The model name the workloads ask for (Infinity checks it against --served-model-name).
SERVED_NAME = "bench"


def openai_bodies(bodies: list[tuple[bytes, int, int]]) -> list[tuple[bytes, int, int]]:
    """TEI /embed bodies ({"inputs": [...]}) as OpenAI /embeddings bodies, same texts."""
    return [(json.dumps({"input": json.loads(body)["inputs"], "model": SERVED_NAME},
                        ensure_ascii=False).encode(), texts, tokens)
            for body, texts, tokens in bodies]


def rerank_bodies(bodies: list[tuple[bytes, int, int]]) -> list[tuple[bytes, int, int]]:
    """TEI /rerank bodies ({"query", "texts"}) as Infinity's (Cohere-shaped) /rerank bodies:
    the same query and documents, every document ranked, none returned."""
    def rewritten(body: bytes) -> bytes:
        tei = json.loads(body)
        return json.dumps({"query": tei["query"], "documents": tei["texts"],
                           "return_documents": False, "model": SERVED_NAME},
                          ensure_ascii=False).encode()

    return [(rewritten(body), texts, tokens) for body, texts, tokens in bodies]


class InfinityServer(ServerProcess):
    """`infinity_emb v2 --model-id M --device D --batch-size B` on a free loopback port."""

    name = "Infinity"
    path = "/embeddings"

    def __init__(self, executable: str, model_dir: str, device: str, batch_size: int) -> None:
        # No usage statistics from a benchmark run (the machine is offline anyway).
        super().__init__(
            lambda port: [executable, "v2", "--model-id", model_dir, "--served-model-name",
                          SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
                          "--device", device, "--batch-size", str(batch_size)],
            env={"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"})

    def versions(self) -> str:
        """infinity_emb's and torch's versions, from the Python of its venv."""
        python = Path(self.args[0]).with_name("python")
        code = ("import importlib.metadata as m, torch; "
                "print(m.version('infinity_emb'), torch.__version__, torch.get_num_threads())")
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            return "versions unknown"
        infinity, torch, threads = out.stdout.split()
        return f"infinity_emb {infinity}, torch {torch} ({threads} threads)"

    def cpu_s(self) -> float:
        """CPU seconds of the server and every process it started."""
        total = 0.0
        for pid in descendants(self.process.pid):
            with contextlib.suppress(OSError):  # exited while we looked
                total += cpu_seconds(pid)
        return total
