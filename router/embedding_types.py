"""Embeddings written as the compact types the Cohere and Jina APIs offer besides floats.

`ubinary` packs the signs of eight dimensions into one byte (a dimension > 0 is a 1 bit, the
first dimension the byte's high bit) and `binary` is the same byte minus 128 as an int8: what
sentence-transformers' quantize_embeddings gives for those precisions (and what Cohere's and
Jina's APIs answer). A vector whose width is not a multiple of 8 gets a last byte padded with 0
bits, row by row, as quantize_embeddings (6.3: `np.packbits(..., axis=-1)`) pads it.
`base64` is the little-endian float32 bytes, as the openai client decodes them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np


def ubinary(vectors: np.ndarray) -> np.ndarray:
    """[n, dim] floats -> [n, ceil(dim / 8)] uint8."""
    return np.packbits(vectors > 0, axis=1)


def binary(vectors: np.ndarray) -> np.ndarray:
    """[n, dim] floats -> [n, ceil(dim / 8)] int8."""
    return (ubinary(vectors).astype(np.int16) - 128).astype(np.int8)


def float32_base64(row: np.ndarray) -> str:
    return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode()


# Each type's writer: [n, dim] float32 vectors -> what the JSON answer holds per vector.
WRITERS: dict[str, Callable[[np.ndarray], Any]] = {
    "float": lambda vectors: vectors,
    "base64": lambda vectors: [float32_base64(row) for row in vectors],
    "binary": binary,
    "ubinary": ubinary,
}
