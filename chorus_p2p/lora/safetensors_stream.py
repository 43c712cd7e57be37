"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a residual for a large model
is hundreds of MB to GB even factored. This writer spools each tensor's bytes to a scratch file as
soon as it is computed and writes the header at the end, so peak memory is one module's output.
The format (8-byte little-endian header length, JSON header, raw little-endian data) is
safetensors' documented layout; files are read back with ``safe_open`` in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import torch

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


class StreamingSafetensorsWriter:
    def __init__(self, scratch_dir: str | os.PathLike | None = None):
        self._data = tempfile.TemporaryFile(dir=scratch_dir)
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.sha256: str | None = None  # set by finish()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"duplicate tensor name {name!r}")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {tensor.dtype}")
        data = tensor.detach().contiguous().cpu()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        self._data.write(raw)
        self._header[name] = {"dtype": _DTYPES[data.dtype], "shape": list(data.shape),
                              "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def finish(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, *,
               hash_it: bool = False) -> None:
        """Write the file; with ``hash_it``, also its sha256 (``self.sha256``) from the bytes as
        they go out, so a blob store can take the file without reading it again."""
        header = dict(sorted(self._header.items()))
        if metadata:
            header = {"__metadata__": dict(metadata), **header}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data section starts 8-byte aligned
        digest = hashlib.sha256() if hash_it else None
        with open(Path(path), "wb") as out:
            for part in (struct.pack("<Q", len(encoded)), encoded):
                out.write(part)
                if digest is not None:
                    digest.update(part)
            self._data.seek(0)
            for chunk in iter(lambda: self._data.read(1 << 20), b""):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
        self.sha256 = None if digest is None else digest.hexdigest()
        self.close()

    def close(self) -> None:
        self._data.close()
