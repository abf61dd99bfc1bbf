"""Where the MegaContext tree's levels live: growable arrays in RAM, or memory-mapped files on disk.

Each level is one append-only array of fixed-size records (level 0: uint32 token ids; level >= 1: gist
vectors of size d as fp16, bf16 (kept as uint16 bit patterns, numpy has no bfloat16) or fp32), so node i
of a level is at a computed offset and nothing needs an index.

Disk layout of a tree directory:
    manifest.json   K, d, dtype, model_id and the *committed* record count per level; replaced atomically.
    LOD0.ctx ...    a 64-byte self-describing header (see HEADER) followed by the records.
    lock            flock'd while a process has the tree open: one writer at a time.

Crash rule: a record is acknowledged once commit() returned (data fsync'd, then the manifest replaced).
On open every level file is cut back to the manifest's count. Bytes past it were never acknowledged: a torn
tail, or whole records that may be garbage after a power loss (the filesystem can grow a file before its
data reaches the disk), so keeping them could keep wrong gists. Nothing acknowledged is ever cut.
Reads go through numpy memmaps, so the process only holds the pages it touches, not whole levels.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from nanochat.common import UserError, atomic_write_json, fsync_dir

MAGIC = b"MEGACTX\x00"
FORMAT_VERSION = 1
# magic, format version, level, K, d, dtype code, record count (informational), model id hash, padding;
# then a crc32 of those 60 bytes so a flipped header byte is caught before it misreads a whole file.
HEADER = struct.Struct("<8sHHIIB3xQ16s12x")
HEADER_SIZE = HEADER.size + 4
assert HEADER_SIZE == 64
TOKEN_DTYPE = np.dtype("<u4")
GIST_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}
DTYPE_CODES = {"tokens": 0, "fp16": 1, "bf16": 2, "fp32": 3}
MANIFEST_FORMAT = "megacontext-tree"


class TreeError(UserError):
    """Base of every tree/storage error; a UserError so scripts print it as one line."""


class TreeCorruptError(TreeError):
    """A tree file is damaged or inconsistent with the manifest."""


class TreeModelMismatchError(TreeError):
    """The tree's gists were made by a different GistNet than the one asked for; mixing would be silent garbage."""


class TreeConfigError(TreeError):
    """K, d or dtype are invalid or differ from the stored tree's."""


def model_hash(model_id: str) -> bytes:
    """16 bytes that identify the GistNet checkpoint in every file header."""
    return hashlib.sha256(model_id.encode("utf-8")).digest()[:16]


def encode_gists(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 [n, d] -> storage records."""
    if dtype == "bf16":  # torch rounds to nearest even; the bit pattern is stored as uint16
        bits = (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
        )
        return bits.numpy().view(GIST_DTYPES["bf16"])
    with np.errstate(over="ignore"):  # the caller checks for overflow and names it
        return x.astype(GIST_DTYPES[dtype])


def decode_gists(raw: np.ndarray, dtype: str) -> np.ndarray:
    """storage records -> float32 (a copy, never a view into a memmap)."""
    if dtype == "bf16":
        return (np.array(raw, dtype=np.uint32) << 16).view(np.float32)
    return np.array(raw, dtype=np.float32)


class Storage:
    """The interface both backends share; subclasses provide _write (append raw records) and _view."""

    def __init__(self, K: int, d: int, dtype: str, model_id: str):
        if K < 2 or d < 1:
            raise TreeConfigError(f"need K >= 2 and d >= 1, got K={K} d={d}")
        if dtype not in GIST_DTYPES:
            raise TreeConfigError(f"gist dtype must be one of {sorted(GIST_DTYPES)}, got {dtype!r}")
        self.K, self.d, self.dtype, self.model_id = K, d, dtype, model_id
        self._counts: list[int] = [0]

    def record_dtype(self, level: int) -> np.dtype:
        return TOKEN_DTYPE if level == 0 else GIST_DTYPES[self.dtype]

    def record_shape(self, level: int) -> tuple[int, ...]:
        return () if level == 0 else (self.d,)

    def num_levels(self) -> int:
        """1 + the highest level that has ever been written (possibly with zero records)."""
        return len(self._counts)

    def num_records(self, level: int) -> int:
        return self._counts[level] if level < len(self._counts) else 0

    def append(self, level: int, records: np.ndarray) -> None:
        """Append token ids (level 0, any int array) or float gists [n, d] (level >= 1). Not durable until commit()."""
        if not 0 <= level <= len(self._counts):
            raise ValueError(f"cannot append to level {level} before level {level - 1} exists")
        records = np.asarray(records)
        if level == 0:
            if records.ndim != 1:
                raise ValueError(f"token ids must be 1-D, got shape {records.shape}")
            if records.size and (records.min() < 0 or records.max() > np.iinfo(np.uint32).max):
                raise ValueError("token ids must fit in uint32")
            raw = records.astype(TOKEN_DTYPE)
        else:
            if records.ndim != 2 or records.shape[1] != self.d:
                raise ValueError(f"gists must be [n, {self.d}], got shape {records.shape}")
            if not np.isfinite(records).all():
                raise TreeError(f"refusing to store non-finite LOD{level} gists (NaN/inf from the GistNet)")
            raw = encode_gists(records, self.dtype)
            if self.dtype == "fp16" and not np.isfinite(raw).all():
                raise TreeError(
                    f"LOD{level} gists overflow fp16 (|x| > 65504); open the tree with dtype bf16 or fp32"
                )
        if raw.shape[0] == 0:
            return
        if level == len(self._counts):
            self._counts.append(0)
        self._write(level, np.ascontiguousarray(raw))
        self._counts[level] += raw.shape[0]

    def read(self, level: int, start: int, end: int) -> np.ndarray:
        """Records [start, end) as int64 tokens or float32 gists (a copy)."""
        n = self.num_records(level)
        if not 0 <= start <= end <= n:
            raise IndexError(f"LOD{level} range [{start}, {end}) outside [0, {n})")
        return self._decode(level, self._view(level)[start:end])

    def read_rows(self, level: int, rows: np.ndarray) -> np.ndarray:
        """Records at arbitrary indices (a gather that touches only their pages)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = self.num_records(level)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(
                f"LOD{level} index out of range [0, {n}): {rows[(rows < 0) | (rows >= n)][:5].tolist()}"
            )
        return self._decode(level, self._view(level)[rows])

    def _decode(self, level: int, raw: np.ndarray) -> np.ndarray:
        return np.array(raw, dtype=np.int64) if level == 0 else decode_gists(raw, self.dtype)

    def commit(self) -> None:
        """Make every appended record durable (a no-op in RAM)."""

    def close(self) -> None:
        """Commit and release resources."""
        self.commit()

    def _write(self, level: int, raw: np.ndarray) -> None:
        raise NotImplementedError

    def _view(self, level: int) -> np.ndarray:
        raise NotImplementedError


class RamStorage(Storage):
    """Levels as numpy arrays grown by doubling (amortised O(1) appends); used for per-sequence training trees."""

    def __init__(self, K: int, d: int, dtype: str = "fp32", model_id: str = ""):
        super().__init__(K, d, dtype, model_id)
        self._bufs: list[np.ndarray] = []

    def _write(self, level: int, raw: np.ndarray) -> None:
        if level == len(self._bufs):
            self._bufs.append(
                np.empty((max(1024, len(raw)),) + self.record_shape(level), self.record_dtype(level))
            )
        n = self._counts[level]
        buf = self._bufs[level]
        if n + len(raw) > len(buf):
            grown = np.empty((max(2 * len(buf), n + len(raw)),) + buf.shape[1:], buf.dtype)
            grown[:n] = buf[:n]
            self._bufs[level] = buf = grown
        buf[n : n + len(raw)] = raw

    def _view(self, level: int) -> np.ndarray:
        if level >= len(self._bufs):
            return np.empty((0,) + self.record_shape(level), self.record_dtype(level))
        return self._bufs[level][: self._counts[level]]


class DiskStorage(Storage):
    """Levels as memory-mapped files in a directory; create it, or continue the tree already there.

    K, d, dtype and model_id may be None to take the stored tree's values (required when creating).
    A different model_id than the stored one raises TreeModelMismatchError.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        K: int | None = None,
        d: int | None = None,
        dtype: str | None = None,
        model_id: str | None = None,
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise TreeError(f"tree {self.path} is open in another process; close it there first") from None
        self._fds: dict[int, int] = {}
        self._maps: dict[int, np.memmap] = {}
        self._dirty: set[int] = set()
        self._new_file = False
        try:
            counts = self._load_or_create_manifest(K, d, dtype, model_id)
            self._recover(counts)
            self._fd(0)  # LOD0.ctx always exists, so a tree directory describes itself
            self.commit()
        except BaseException:
            self._release()
            raise

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def level_path(self, level: int) -> Path:
        return self.path / f"LOD{level}.ctx"

    def _level_files(self) -> dict[int, Path]:
        found = {}
        for p in self.path.glob("LOD*.ctx"):
            if p.stem[3:].isdigit():
                found[int(p.stem[3:])] = p
        return found

    def _load_or_create_manifest(self, K, d, dtype, model_id) -> list[int]:
        for stale in self.path.glob(".manifest.json.*.tmp"):  # left by a writer killed mid-replace
            stale.unlink()
        if not self.manifest_path.exists():
            if self._level_files():
                raise TreeCorruptError(
                    f"{self.manifest_path} is missing but {self.path} holds LOD files; "
                    "restore the manifest or delete the directory to start over"
                )
            if K is None or d is None:
                raise TreeConfigError(f"{self.path} holds no tree yet: K and d are needed to create one")
            super().__init__(K, d, dtype or "fp16", model_id or "")
            self._write_manifest()
            return [0]
        try:
            m = json.loads(self.manifest_path.read_text())
            if m.get("format") != MANIFEST_FORMAT or m.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"format {m.get('format')!r} v{m.get('version')}, expected v{FORMAT_VERSION}"
                )
            sK, sd, sdtype, smodel = int(m["K"]), int(m["d"]), str(m["dtype"]), str(m["model_id"])
            counts = [int(c) for c in m["counts"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TreeCorruptError(f"{self.manifest_path} is not a valid tree manifest ({e})") from None
        for name, want, have in (("K", K, sK), ("d", d, sd), ("dtype", dtype, sdtype)):
            if want is not None and want != have:
                raise TreeConfigError(f"tree {self.path} has {name}={have}, but {name}={want} was asked for")
        if model_id is not None and model_id != smodel:
            raise TreeModelMismatchError(
                f"tree {self.path} holds gists of model {smodel!r}, not {model_id!r}; "
                "open it with the model that built it, or build a new tree"
            )
        super().__init__(sK, sd, sdtype, smodel)
        return counts

    def _write_manifest(self) -> None:
        manifest = dict(format=MANIFEST_FORMAT, version=FORMAT_VERSION, K=self.K, d=self.d, dtype=self.dtype)
        atomic_write_json(self.manifest_path, {**manifest, "model_id": self.model_id, "counts": self._counts})

    def _header(self, level: int, count: int) -> bytes:
        code = DTYPE_CODES["tokens" if level == 0 else self.dtype]
        body = HEADER.pack(
            MAGIC, FORMAT_VERSION, level, self.K, self.d, code, count, model_hash(self.model_id)
        )
        return body + struct.pack("<I", zlib.crc32(body))

    def _check_header(self, p: Path, raw: bytes, level: int) -> None:
        if len(raw) < HEADER_SIZE:
            raise TreeCorruptError(f"{p}: header is cut short ({len(raw)} of {HEADER_SIZE} bytes)")
        body, (crc,) = raw[: HEADER.size], struct.unpack("<I", raw[HEADER.size : HEADER_SIZE])
        if zlib.crc32(body) != crc:
            raise TreeCorruptError(f"{p}: header checksum mismatch, the file is damaged")
        magic, version, lvl, K, d, code, _count, mhash = HEADER.unpack(body)
        if magic != MAGIC:
            raise TreeCorruptError(f"{p}: not a MegaContext tree file (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise TreeCorruptError(f"{p}: format version {version}, this code reads {FORMAT_VERSION}")
        want_code = DTYPE_CODES["tokens" if level == 0 else self.dtype]
        if (lvl, K, d, code) != (level, self.K, self.d, want_code):
            raise TreeCorruptError(
                f"{p}: header says level={lvl} K={K} d={d} dtype code={code}, the manifest "
                f"says level={level} K={self.K} d={self.d} dtype code={want_code}"
            )
        if mhash != model_hash(self.model_id):
            raise TreeModelMismatchError(
                f"{p} was written by a different model than the manifest's {self.model_id!r}"
            )

    def _recover(self, committed: list[int]) -> None:
        """Validate every level file and cut it back to its committed count (see the module docstring)."""
        files = self._level_files()
        top = max([len(committed) - 1, *files])
        for level in range(1, top + 1):
            if level < len(committed) and committed[level] > committed[level - 1] // self.K:
                raise TreeCorruptError(
                    f"{self.manifest_path}: {committed[level]} LOD{level} gists but only "
                    f"{committed[level - 1]} LOD{level - 1} nodes"
                )
        self._counts = []
        for level in range(top + 1):
            n = committed[level] if level < len(committed) else 0
            p = self.level_path(level)
            if level not in files:
                if n:
                    raise TreeCorruptError(f"{p} is missing but the manifest commits {n} records to it")
                self._counts.append(0)
                continue
            fd = self._fd(level)
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE and n == 0:  # killed while creating the file: nothing was ever in it
                os.pwrite(fd, self._header(level, 0), 0)
            else:
                self._check_header(p, os.pread(fd, HEADER_SIZE, 0), level)
            rec = self.record_dtype(level).itemsize * (1 if level == 0 else self.d)
            whole = (max(size, HEADER_SIZE) - HEADER_SIZE) // rec
            if whole < n:
                raise TreeCorruptError(
                    f"{p} holds {whole} records but the manifest committed {n}: data was lost"
                )
            if size != HEADER_SIZE + n * rec:
                os.ftruncate(fd, HEADER_SIZE + n * rec)
                os.fsync(fd)
            self._counts.append(n)
        while len(self._counts) > 1 and self._counts[-1] == 0 and len(self._counts) - 1 not in files:
            self._counts.pop()

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise TreeError(f"tree {self.path} is closed")

    def _fd(self, level: int) -> int:
        if level not in self._fds:
            self._check_open()
            p = self.level_path(level)
            existed = p.exists()
            self._fds[level] = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            if not existed:
                os.pwrite(self._fds[level], self._header(level, 0), 0)
                self._new_file = True
                self._dirty.add(level)  # so commit() fsyncs the new header too
        return self._fds[level]

    def _write(self, level: int, raw: np.ndarray) -> None:
        offset = HEADER_SIZE + self._counts[level] * (raw.nbytes // len(raw))
        data = memoryview(raw.view(np.uint8).reshape(-1))
        fd = self._fd(level)
        while data:  # pwrite may write less than asked
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        self._dirty.add(level)

    def _view(self, level: int) -> np.ndarray:
        n = self.num_records(level)
        if n == 0:
            return np.empty((0,) + self.record_shape(level), self.record_dtype(level))
        mm = self._maps.get(level)
        if mm is None or mm.shape[0] != n:  # the file grew: map it again (the old map's pages are let go)
            self._check_open()
            shape = (n,) + self.record_shape(level)
            mm = np.memmap(self.level_path(level), self.record_dtype(level), "r", HEADER_SIZE, shape)
            self._maps[level] = mm
        return mm

    def commit(self) -> None:
        """fsync the data of every level written since the last commit, then replace the manifest."""
        if not self._dirty and not self._new_file:
            return
        for level in sorted(self._dirty):
            os.pwrite(self._fds[level], self._header(level, self._counts[level]), 0)  # informational count
            os.fsync(self._fds[level])
        if self._new_file:
            fsync_dir(self.path)
        self._write_manifest()  # the commit point: these counts are now acknowledged
        self._dirty.clear()
        self._new_file = False

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        try:
            self.commit()
        finally:
            self._release()

    def _release(self) -> None:
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1
