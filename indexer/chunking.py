"""How a file is cut into chunks: fixed-size chunks whose size is set by the file's size.

Small files (almost all of an image's files, and all of an import's modules) get 256 KiB
chunks: a read of a few pages of a shared library fetches little more than it needs.
Big files get bigger chunks, because a cold sequential read of model weights is bound by
the number of requests, not bytes (on the read-path benchmark, GETs of 256 KiB objects
reach ~75 MB/s where multi-MiB GETs of the same bytes reach 500-800 MB/s). Each tier
cuts at fixed offsets from the file's start, so an identical file dedups whole and an
appended or edited one still shares its aligned chunks. docs/format.md has the rationale.

Model weights are the exception to sizing by size alone: a 600 MB safetensors shard is
read front to back (or a tensor at a time, megabytes each), never paged through like a
shared library of the same size, so files of 64 MiB or more named like weights
(WEIGHT_SUFFIXES) get the 4 MiB chunks of the largest tier: a quarter of the requests
for a cold streaming load.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

SMALL_CHUNK = 256 * KIB
TIERS: tuple[tuple[int, int], ...] = (
    # (files of at least this size, get chunks of this size), largest first
    (1 * GIB, 4 * MIB),
    (64 * MIB, 1 * MIB),
)
WEIGHTS_CHUNK = 4 * MIB
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx",
                   ".npy", ".npz", ".h5", ".msgpack", ".tensors")
SCHEME = ("tiered-1w: 256KiB; files >= 64MiB: 1MiB, weights (" + " ".join(WEIGHT_SUFFIXES)
          + ") 4MiB; files >= 1GiB: 4MiB")
"""Recorded in manifests and layer records; a layer record with another scheme is
re-indexed rather than reused."""


def chunk_size_for(file_size: int, name: str = "") -> int:
    """The chunk size of a file of file_size bytes (named `name`: its base name or path)."""
    for at_least, size in TIERS:
        if file_size >= at_least:
            if name.endswith(WEIGHT_SUFFIXES):
                return max(size, WEIGHTS_CHUNK)
            return size
    return SMALL_CHUNK
