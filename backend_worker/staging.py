"""How a batch's int32 wire arrays reach the device: as int64 (embedding lookups and index ops
take int64), written back to back into one host buffer and moved in one transfer.

On CUDA the host buffer is pinned, so the copy is a DMA queued on the stream (non_blocking)
where a copy from ordinary memory would stall the host; pinning a fresh buffer per batch costs
more than the copy, so buffers are reused batch after batch. Reuse is safe because every batch
ends by reading its result back to the host, which waits for the stream.
"""

from __future__ import annotations

import numpy as np
import torch


class StagingBuffer:
    """One int64 device buffer and its host mirror (pinned on CUDA), of a fixed size."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.device_buffer = torch.zeros(size, dtype=torch.int64, device=device)
        self.host_buffer = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._host = self.host_buffer.numpy()

    def write(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Copy `arrays` to the device back to back, in one transfer; their device views.
        Arrays of the same lengths land at the same addresses every time (what a captured
        graph, which reads fixed addresses, relies on)."""
        bounds, start = [], 0
        for array in arrays:
            stop = start + array.shape[0]
            self._host[start:stop] = array
            bounds.append((start, stop))
            start = stop
        self.device_buffer[:start].copy_(self.host_buffer[:start], non_blocking=True)
        return [self.device_buffer[a:b] for a, b in bounds]


class HostStaging:
    """A batch's arrays to the device: through a StagingBuffer grown as needed on CUDA; a plain
    conversion elsewhere (there is no transfer to save)."""

    def __init__(self, device: torch.device, staged: bool | None = None) -> None:
        self.device = device
        # `staged` on the CPU runs the CUDA path's buffer logic, unpinned (tests).
        self.staged = device.type == "cuda" if staged is None else staged
        self._buffer: StagingBuffer | None = None

    def to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        if not self.staged:
            return [torch.from_numpy(a.astype(np.int64)).to(self.device) for a in arrays]
        total = sum(a.shape[0] for a in arrays)
        if self._buffer is None or total > self._buffer.size:
            self._buffer = StagingBuffer(max(2 * total, 1 << 16), self.device)
        return self._buffer.write(*arrays)
