"""A dense float32 state file that is a valid safetensors file *and* can be updated in place.

Layout: the 8-byte little-endian header length, the JSON header padded with spaces (safetensors
allows trailing whitespace) so the data starts 64-byte aligned, then every module's
``<prefix>.residual`` tensor (d_out x d_in, float32, row-major), contiguous, in sorted prefix
order. The layout follows from the module list alone, so:

- a new state is a *sparse* file of zeros (``R = 0`` costs no disk until it is written);
- one module is read, updated and written back in place (positioned reads and writes of just
  its bytes), so a node's memory for an update is one module, whatever the model size;
- a checkpoint is a byte copy, readable by ``safe_open``/``fold``/``pull`` like any safetensors
  file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

STATE_SUFFIX = ".residual"
STATE_METADATA = {"format": "chorus-state", "version": "1"}
_ALIGN = 64


class StateFileError(Exception):
    """A state file is missing, truncated, or laid out for other modules."""


@dataclass(frozen=True)
class DenseLayout:
    """Where each module's dense tensor lives in a state file. ``transposed`` names the modules
    whose base weight holds ``R`` transposed (GPT-2 ``Conv1D``, embeddings); it is written into
    the header so ``fold`` places a pulled ``R`` right without the model at hand."""

    modules: tuple[tuple[str, int, int], ...]  # (prefix, d_out, d_in), sorted by prefix
    transposed: tuple[str, ...] = ()

    @classmethod
    def of(cls, modules: Mapping[str, tuple[int, int]], transposed=()) -> "DenseLayout":
        return cls(tuple((p, int(s[0]), int(s[1])) for p, s in sorted(modules.items())),
                   tuple(sorted(transposed)))

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {p: (o, i) for p, o, i in self.modules}

    def header(self) -> bytes:
        """The complete header, length prefix included."""
        metadata = dict(STATE_METADATA)
        if self.transposed:
            metadata["transposed"] = json.dumps(list(self.transposed))
        entries: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for prefix, d_out, d_in in self.modules:
            size = d_out * d_in * 4
            entries[prefix + STATE_SUFFIX] = {"dtype": "F32", "shape": [d_out, d_in],
                                              "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(entries, separators=(",", ":")).encode()
        encoded += b" " * (-(len(encoded) + 8) % _ALIGN)
        return struct.pack("<Q", len(encoded)) + encoded

    @property
    def data_start(self) -> int:
        return len(self.header())

    @property
    def data_bytes(self) -> int:
        return sum(o * i * 4 for _, o, i in self.modules)

    @property
    def total_bytes(self) -> int:
        return self.data_start + self.data_bytes

    def spans(self) -> dict[str, tuple[int, tuple[int, int]]]:
        """prefix -> (absolute byte offset, shape)."""
        out: dict[str, tuple[int, tuple[int, int]]] = {}
        offset = self.data_start
        for prefix, d_out, d_in in self.modules:
            out[prefix] = (offset, (d_out, d_in))
            offset += d_out * d_in * 4
        return out


def create_zero_file(path: Path, layout: DenseLayout) -> None:
    """Write the header and extend to full size: every module reads as zeros, sparse on disk."""
    with open(path, "wb") as fh:
        fh.write(layout.header())
        fh.truncate(layout.total_bytes)
        fh.flush()
        os.fsync(fh.fileno())


def check_file(path: Path, layout: DenseLayout) -> None:
    """Refuse a file whose header or size is not exactly ``layout``'s (another federation's state,
    a truncated copy, or something else entirely)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(layout.data_start)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if head != layout.header():
        raise StateFileError(f"{path}: not a state file for this federation's modules")
    if size != layout.total_bytes:
        raise StateFileError(f"{path}: {size} bytes, expected {layout.total_bytes} (truncated?)")


class DenseFile:
    """Module-by-module access to a state file with positioned reads and writes: one module in
    memory at a time, no memory map (whose page faults cost more than the copy here). The file
    stays open for the object's life, so a reader is not disturbed if the file is replaced or
    deleted (a new checkpoint) while it reads."""

    def __init__(self, path: Path, layout: DenseLayout, *, writable: bool = False):
        self._fd = -1
        check_file(path, layout)
        self.path = path
        self.layout = layout
        self.writable = writable
        self._spans = layout.spans()
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def read_module(self, prefix: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The module's tensor, read into ``out`` (a contiguous float32 buffer of at least its
        size, reused by callers that update module after module) or a new tensor."""
        offset, shape = self._spans[prefix]
        count = shape[0] * shape[1]
        target = torch.empty(count, dtype=torch.float32) if out is None else out.view(-1)[:count]
        view = memoryview(target.numpy()).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise StateFileError(f"{self.path}: ends inside module {prefix}")
            done += got
        return target.view(shape)

    def write_module(self, prefix: str, tensor: torch.Tensor) -> None:
        if not self.writable:
            raise StateFileError(f"{self.path}: opened read-only")
        offset, shape = self._spans[prefix]
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise StateFileError(f"{prefix}: expected float32 {shape}, got {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
        view = memoryview(tensor.contiguous().numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(self._fd, [view[done:]], offset + done)

    def prefixes(self) -> list[str]:
        return [p for p, _, _ in self.layout.modules]

    def sync(self) -> None:
        """Make every write durable."""
        os.fsync(self._fd)
