"""Atomic file writes and shard read/write.

A shard is a safetensors file holding ``acts`` ``[N, M, P, D]`` (storage dtype), ``seq``
int64 ``[N]``, ``pos`` int32 ``[N]`` and ``token`` int32 ``[N]``. Reads memory-map the file
and build tensors over the mapping (zero copy), so only the rows touched are paged in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.cache_format import (
    SAFETENSORS_DTYPE_CODES,
    CacheError,
    ShardRecord,
)
from shared.hub_spec import rewrite_advice

__all__ = [
    "SHARD_TENSORS",
    "atomic_write_bytes",
    "discard_temporaries",
    "fsync_dir",
    "is_temporary",
    "nonfinite_count",
    "sha256_file",
    "write_shard",
    "ShardReader",
    "DiskFullError",
]

SHARD_TENSORS: dict[str, torch.dtype | None] = {
    "acts": None,  # storage dtype, from the manifest
    "seq": torch.int64,
    "pos": torch.int32,
    "token": torch.int32,
}
"""Tensors every shard holds and their dtypes (``None``: the cache's storage dtype)."""

# One key only: safetensors serialises __metadata__ from a hash map, so with two keys their
# order (and the file's bytes) would vary between processes, breaking byte-identical resumes.
# The format version lives in the manifest.
SHARD_METADATA = {"format": "pt"}

Buffer = bytes | bytearray | memoryview

_DTYPE_CODE = {dtype: code for code, dtype in SAFETENSORS_DTYPE_CODES.items()}
# safetensors' Dtype enum in declaration order: it lays tensors out from the highest rank down.
_SAFETENSORS_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
                           "F32", "F64", "I64", "U64"]


# Per storage dtype: the unsigned integer type of its width and the mask of its exponent bits. A
# value is inf or NaN exactly when every exponent bit is set, that is when its magnitude bits (all
# but the sign) read as an integer are at least the mask.
_EXPONENT_MASKS: dict[torch.dtype, tuple[torch.dtype, type, int]] = {
    torch.float16: (torch.int16, np.uint16, 0x7C00),
    torch.bfloat16: (torch.int16, np.uint16, 0x7F80),
    torch.float32: (torch.int32, np.uint32, 0x7F800000),
}
# Values tested at a time: the block's masked copy stays in the core's L2 cache between the two
# passes over it (2.3 GB/s unblocked, 8.4 GB/s at 2^18 values on a 2-CPU VM, one thread).
_NONFINITE_BLOCK = 1 << 18


def nonfinite_count(acts: torch.Tensor) -> int:
    """How many values of a CPU float tensor are inf or NaN.

    For the storage dtypes this tests the exponent bits with numpy, a cache-sized block at a time:
    ~20x faster than ``torch.isfinite`` on float16/bfloat16 on the CPU (which converts every value
    first) and ~5x faster than sha256, so a harvest's shard writer and ``verify`` check every row
    for a fraction of what hashing costs. One thread: it never competes with torch's own."""
    code = _EXPONENT_MASKS.get(acts.dtype)
    if code is None:
        return int((~torch.isfinite(acts)).sum())
    int_dtype, uint_type, mask = code
    bits = acts.detach().view(int_dtype).numpy().view(uint_type).reshape(-1)
    magnitude = uint_type((1 << (8 * bits.itemsize - 1)) - 1)  # every bit but the sign
    scratch = np.empty(min(bits.size, _NONFINITE_BLOCK), dtype=uint_type)
    count = 0
    for start in range(0, bits.size, _NONFINITE_BLOCK):
        block = scratch[: min(_NONFINITE_BLOCK, bits.size - start)]
        np.bitwise_and(bits[start : start + len(block)], magnitude, out=block)
        if block.max() >= mask:  # rare: count only the blocks that hold one
            count += int(np.count_nonzero(block >= mask))
    return count


class DiskFullError(OSError):
    """Raised when a write fails for lack of space; nothing already written is lost."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"\..+\.tmp-\d+")
"""The name of an atomic write's temporary (``.<name>.tmp-<pid>``, a file or a checkpoint folder)."""


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is an atomic write's temporary (never part of a result)."""
    return _TEMPORARY.fullmatch(name) is not None


def discard_temporaries(*folders: str | Path) -> list[Path]:
    """Delete the temporaries that killed writes left in ``folders`` (not recursive); returns them.

    A write killed before its rename leaves ``.<name>.tmp-<pid>`` behind (a whole shard or
    checkpoint, possibly GBs), which no later run of another pid overwrites. Call this only while
    holding the folder's lock (:class:`shared.folder_lock.FolderLock`): then no live writer owns one.
    """
    gone = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if is_temporary(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p)
    return sorted(gone)


def too_many_open_files(path: str | Path) -> str:
    """The error for a shard that cannot be opened because the process holds its open-file limit."""
    try:
        import resource

        limit = f"this process's limit, `ulimit -n`, is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
    except (ImportError, OSError, ValueError):
        limit = "the process's open-file limit is reached"
    return (f"cannot open shard {path}: too many open files ({limit}). Each shard mapped at once holds a file "
            "descriptor, and training maps one or two windows of --window shards at a time: lower --window, or "
            "raise the limit (`ulimit -n 65536` in the shell that runs the command)")


def atomic_write_bytes(path: str | Path, data: bytes | Sequence[Buffer]) -> None:
    """Write ``data`` (bytes, or buffers written one after another) to ``path`` atomically: temp
    file in the same folder, fsync, rename.

    A crash leaves either the old file or the new one, never a mix. A full disk raises
    :class:`DiskFullError` and removes the temp file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in [data] if isinstance(data, bytes) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                e.errno,
                f"disk full while writing {path}: free space on {path.parent} and re-run the "
                "same command; it resumes from what was already written",
            ) from e
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_order(item: tuple[str, torch.Tensor]) -> tuple[int, str]:
    return -_SAFETENSORS_DTYPE_RANK.index(_DTYPE_CODE[item[1].dtype]), item[0]


def write_shard(
    cache_dir: str | Path,
    rel_file: str,
    acts_NMPD: torch.Tensor,
    seq_N: torch.Tensor,
    pos_N: torch.Tensor,
    token_N: torch.Tensor,
) -> ShardRecord:
    """Serialise one shard atomically and return its manifest record (rows, bytes, sha256).

    The bytes depend only on the tensors, so re-writing the same rows gives the same file.
    They are exactly what ``safetensors.torch.save(tensors, metadata=SHARD_METADATA)`` returns
    (tested), but written and hashed straight from the tensors' memory: the library's bytes
    object costs three copies of the shard, which took ~60% of the harvest writer's CPU time.
    """
    n = acts_NMPD.shape[0]
    if acts_NMPD.ndim != 4:
        raise ValueError(f"acts must be [N, M, P, D], got shape {tuple(acts_NMPD.shape)}")
    for name, t in (("seq", seq_N), ("pos", pos_N), ("token", token_N)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    tensors = {
        "acts": acts_NMPD.cpu().contiguous(),
        "seq": seq_N.to("cpu", torch.int64).contiguous(),
        "pos": pos_N.to("cpu", torch.int32).contiguous(),
        "token": token_N.to("cpu", torch.int32).contiguous(),
    }
    if sys.byteorder != "little":  # the format is little-endian: let the library swap the bytes
        from safetensors.torch import save

        parts: list[Buffer] = [save(tensors, metadata=SHARD_METADATA)]
        return _write_parts(cache_dir, rel_file, n, parts, len(parts[0]))
    # The safetensors layout: JSON header (metadata first, then the tensors in data order, that
    # is by dtype as safetensors ranks them, highest first, then by name), padded with spaces to
    # 8 bytes, then the tensors' bytes back to back.
    header: dict[str, Any] = {"__metadata__": SHARD_METADATA}
    parts = []
    offset = 0
    for name, t in sorted(tensors.items(), key=_tensor_order):
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_CODE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        if nbytes:
            parts.append(memoryview(t.view(-1).view(torch.uint8).numpy()))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    parts.insert(0, struct.pack("<Q", len(head)) + head)
    return _write_parts(cache_dir, rel_file, n, parts, len(parts[0]) + offset)


def _write_parts(cache_dir: str | Path, rel_file: str, n: int, parts: list[Buffer], nbytes: int) -> ShardRecord:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    path = Path(cache_dir) / rel_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, parts)
    return ShardRecord(file=rel_file, n_rows=n, sha256=digest.hexdigest(), bytes=nbytes)


class ShardReader:
    """A memory-mapped shard. ``reader.acts`` etc. are tensors over the mapping (no copy).

    Validates on open: the safetensors header parses, the four tensors exist with the
    expected dtypes and shapes, and their byte ranges (with any other tensors', which are
    ignored) exactly cover the file.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        row_shape: tuple[int, int, int],
        dtype: torch.dtype,
        n_rows: int | None = None,
        expected_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"shard {self.path} is missing; {rewrite_advice(self.path)}")
        size = self.path.stat().st_size
        if expected_bytes is not None and size != expected_bytes:
            fix = rewrite_advice(self.path, local="delete it and re-run the harvest to rewrite it")
            raise CacheError(
                f"shard {self.path} has {size} bytes but the manifest says {expected_bytes}: "
                f"it is truncated or was replaced; {fix}"
            )
        try:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so tensors over it are writable without ever
                # touching the file (torch warns on read-only buffers).
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            raise CacheError(too_many_open_files(self.path)) from e
        header, data_start = self._parse_header(size)
        self.metadata: dict[str, Any] = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, torch.Tensor] = {}
        end_max = 0
        for name, want_dtype in SHARD_TENSORS.items():
            if name not in header:
                raise CacheError(f"shard {self.path}: tensor {name!r} missing from header")
            info = header[name]
            got = SAFETENSORS_DTYPE_CODES.get(info.get("dtype"))
            want = dtype if want_dtype is None else want_dtype
            if got != want:
                raise CacheError(
                    f"shard {self.path}: tensor {name!r} has dtype {info.get('dtype')}, expected {want}"
                )
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            count = 1
            for s in shape:
                count *= s
            if end - begin != count * want.itemsize or data_start + end > size:
                raise CacheError(
                    f"shard {self.path}: tensor {name!r} byte range {begin}..{end} does not "
                    f"match shape {shape} (file truncated or corrupted)"
                )
            end_max = max(end_max, end)
            if count:
                # Through numpy, whose array holds a buffer export of the mapping for as long as any
                # tensor or view over it lives: close() then cannot unmap memory still in use
                # (torch.frombuffer holds none, so a view outliving close() read freed pages).
                raw = np.frombuffer(self._mmap, dtype=np.uint8, count=end - begin, offset=data_start + begin)
                self.tensors[name] = torch.from_numpy(raw).view(want).view(shape)
            else:  # an empty tensor needs no mapping
                self.tensors[name] = torch.empty(shape, dtype=want)
        for name, info in header.items():  # others (a writer's own extras) are ignored, as the format says, but
            if name in SHARD_TENSORS:       # their bytes count: safetensors may put them after ours
                continue
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] and data_start + offsets[1] <= size):
                raise CacheError(f"shard {self.path}: tensor {name!r} has byte range {offsets}, outside the file "
                                 "(truncated or corrupted)")
            end_max = max(end_max, offsets[1])
        if data_start + end_max != size:
            raise CacheError(f"shard {self.path}: {size - data_start - end_max} unexpected trailing bytes")
        n = self.tensors["acts"].shape[0]
        if self.tensors["acts"].shape[1:] != row_shape:
            raise CacheError(
                f"shard {self.path}: acts rows have shape {tuple(self.tensors['acts'].shape[1:])}, "
                f"manifest says (n_models, n_hooks, d_model) = {row_shape}"
            )
        for name in ("seq", "pos", "token"):
            if self.tensors[name].shape != (n,):
                raise CacheError(f"shard {self.path}: {name} has shape {tuple(self.tensors[name].shape)}, expected ({n},)")
        if n_rows is not None and n != n_rows:
            raise CacheError(f"shard {self.path}: holds {n} rows, manifest says {n_rows}")
        self.n_rows = n

    def _parse_header(self, size: int) -> tuple[dict[str, Any], int]:
        if size < 8:
            raise CacheError(f"shard {self.path}: {size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", self._mmap[:8])
        if header_len > size - 8 or header_len > 100_000_000:
            raise CacheError(f"shard {self.path}: header length {header_len} exceeds the file (corrupted)")
        try:
            header = json.loads(bytes(self._mmap[8 : 8 + header_len]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"shard {self.path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CacheError(f"shard {self.path}: safetensors header is not an object")
        return header, 8 + header_len

    @property
    def acts(self) -> torch.Tensor:
        return self.tensors["acts"]

    @property
    def seq(self) -> torch.Tensor:
        return self.tensors["seq"]

    @property
    def pos(self) -> torch.Tensor:
        return self.tensors["pos"]

    @property
    def token(self) -> torch.Tensor:
        return self.tensors["token"]

    def close(self) -> bool:
        """Drop our tensors and unmap the file. Returns False if a tensor or view over the mapping
        is still alive elsewhere: the mapping then stays, valid, until that view and this reader
        are garbage-collected."""
        self.tensors.clear()
        try:
            self._mmap.close()
        except BufferError:
            return False
        return True

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
