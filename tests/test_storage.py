"""Tree storage: the on-disk format, crash recovery rules, named errors, and RAM/disk agreement."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch

from megacontext.storage import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    DiskStorage,
    RamStorage,
    TreeConfigError,
    TreeCorruptError,
    TreeError,
    TreeModelMismatchError,
    model_hash,
)

K, D = 4, 8


def filled(path, dtype="fp16", model_id="gistnet-a", n_tokens=40, commit=True):
    """A disk store with n_tokens tokens and n_tokens // K LOD1 gists, committed."""
    s = DiskStorage(path, K=K, d=D, dtype=dtype, model_id=model_id)
    s.append(0, np.arange(n_tokens) * 7)
    s.append(1, np.arange(n_tokens // K * D, dtype=np.float32).reshape(-1, D) / 8)
    if commit:
        s.commit()
    return s


def test_header_and_record_layout(tmp_path):
    filled(tmp_path).close()
    raw = (tmp_path / "LOD0.ctx").read_bytes()
    assert len(raw) == HEADER_SIZE + 40 * 4
    magic, version, level, k, d, code, count, mhash = HEADER.unpack(raw[:60])
    assert (magic, version, level, k, d, code, count) == (MAGIC, 1, 0, K, D, 0, 40)
    assert mhash == model_hash("gistnet-a") and len(mhash) == 16
    assert struct.unpack("<I", raw[60:64])[0] == zlib.crc32(raw[:60])
    np.testing.assert_array_equal(np.frombuffer(raw[HEADER_SIZE:], "<u4"), np.arange(40) * 7)
    # LOD1 node i sits at a computed offset: header + i * d * 2 bytes (fp16)
    raw1 = (tmp_path / "LOD1.ctx").read_bytes()
    assert HEADER.unpack(raw1[:60])[2:7] == (1, K, D, 1, 10)
    node3 = np.frombuffer(raw1[HEADER_SIZE + 3 * D * 2 : HEADER_SIZE + 4 * D * 2], "<f2")
    np.testing.assert_array_equal(node3, np.arange(3 * D, 4 * D) / 8)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["K"], m["d"], m["dtype"], m["model_id"], m["counts"]) == (K, D, "fp16", "gistnet-a", [40, 10])


def test_reads_are_memory_mapped_copies(tmp_path):
    s = filled(tmp_path)
    assert isinstance(s._view(0), np.memmap)  # a whole level is never read into RAM
    out = s.read(0, 5, 9)
    assert not isinstance(out, np.memmap) and out.dtype == np.int64
    np.testing.assert_array_equal(out, np.arange(5, 9) * 7)
    np.testing.assert_allclose(s.read_rows(1, [9, 0]), np.stack([np.arange(72, 80), np.arange(8)]) / 8)
    with pytest.raises(IndexError):
        s.read(0, 0, 41)
    with pytest.raises(IndexError):
        s.read_rows(1, [10])
    s.close()


def test_reopen_continues(tmp_path):
    filled(tmp_path).close()
    s = DiskStorage(tmp_path)  # everything taken from the manifest
    assert (s.K, s.d, s.dtype, s.model_id) == (K, D, "fp16", "gistnet-a")
    assert (s.num_records(0), s.num_records(1)) == (40, 10)
    s.append(0, [1, 2, 3])
    s.close()
    s = DiskStorage(tmp_path, K=K, d=D, dtype="fp16", model_id="gistnet-a")
    np.testing.assert_array_equal(s.read(0, 38, 43), [38 * 7, 39 * 7, 1, 2, 3])
    s.close()


@pytest.mark.parametrize("offset", [0, 7, 8, 10, 12, 16, 20, 24, 32, 40, 55, 59, 60, 63])
@pytest.mark.parametrize("level", [0, 1])
def test_flipped_header_byte_is_corrupt(tmp_path, offset, level):
    filled(tmp_path).close()
    p = tmp_path / f"LOD{level}.ctx"
    raw = bytearray(p.read_bytes())
    raw[offset] ^= 0x10
    p.write_bytes(bytes(raw))
    with pytest.raises(TreeCorruptError, match=f"LOD{level}.ctx"):
        DiskStorage(tmp_path)


def test_wrong_model_id_is_refused(tmp_path):
    filled(tmp_path).close()
    with pytest.raises(TreeModelMismatchError, match="gistnet-a"):
        DiskStorage(tmp_path, model_id="gistnet-b")
    DiskStorage(tmp_path, model_id="gistnet-a").close()
    # a level file copied in from another model's tree is caught by its header hash
    filled(tmp_path / "other", model_id="gistnet-b").close()
    (tmp_path / "LOD1.ctx").write_bytes((tmp_path / "other" / "LOD1.ctx").read_bytes())
    with pytest.raises(TreeModelMismatchError, match="LOD1.ctx"):
        DiskStorage(tmp_path)


@pytest.mark.parametrize("kw", [{"K": 8}, {"d": 16}, {"dtype": "bf16"}])
def test_config_mismatch(tmp_path, kw):
    filled(tmp_path).close()
    with pytest.raises(TreeConfigError):
        DiskStorage(tmp_path, **kw)


def test_bad_config_and_missing_size(tmp_path):
    with pytest.raises(TreeConfigError, match="K and d"):
        DiskStorage(tmp_path / "new")
    with pytest.raises(TreeConfigError):
        DiskStorage(tmp_path / "new2", K=1, d=8)
    with pytest.raises(TreeConfigError):
        RamStorage(K, D, dtype="int8")


def test_torn_and_uncommitted_tails_are_cut(tmp_path):
    s = filled(tmp_path)
    s.append(0, np.arange(8))  # never committed: lost on a crash, as promised
    s.append(1, np.ones((2, D), np.float32))
    s._release()  # simulate a crash: drop the handles without commit
    with open(tmp_path / "LOD0.ctx", "ab") as f:
        f.write(b"\x01\x02")  # a torn half record
    assert (tmp_path / "LOD0.ctx").stat().st_size == HEADER_SIZE + 48 * 4 + 2
    s = DiskStorage(tmp_path)
    assert (s.num_records(0), s.num_records(1)) == (40, 10)
    assert (tmp_path / "LOD0.ctx").stat().st_size == HEADER_SIZE + 40 * 4
    assert (tmp_path / "LOD1.ctx").stat().st_size == HEADER_SIZE + 10 * D * 2
    s.append(0, [99])
    s.commit()
    np.testing.assert_array_equal(s.read(0, 39, 41), [39 * 7, 99])
    s.close()


def test_level_file_created_but_never_committed(tmp_path):
    s = filled(tmp_path, n_tokens=40)
    s.append(0, np.arange(24))  # 64 tokens: room for LOD2
    s.append(1, np.zeros((6, D), np.float32))
    s.append(2, np.zeros((1, D), np.float32))
    s._release()
    s = DiskStorage(tmp_path)
    assert [s.num_records(lv) for lv in range(3)] == [40, 10, 0]
    s.append(1, np.zeros((6, D), np.float32))
    s.close()


def test_lost_committed_data_and_bad_manifests(tmp_path):
    filled(tmp_path).close()
    p = tmp_path / "LOD0.ctx"
    p.write_bytes(p.read_bytes()[:-4])  # one committed record gone
    with pytest.raises(TreeCorruptError, match="data was lost"):
        DiskStorage(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TreeCorruptError, match="manifest.json"):
        DiskStorage(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(TreeCorruptError, match="missing"):
        DiskStorage(tmp_path)


def test_stale_manifest_temp_is_removed(tmp_path):
    filled(tmp_path).close()
    (tmp_path / ".manifest.json.abc.tmp").write_text("{half")
    DiskStorage(tmp_path).close()
    assert not (tmp_path / ".manifest.json.abc.tmp").exists()


def test_one_writer_at_a_time(tmp_path):
    s = filled(tmp_path)
    with pytest.raises(TreeError, match="another process"):
        DiskStorage(tmp_path)
    s.close()
    s.close()  # closing twice is harmless
    with pytest.raises(TreeError, match="closed"):
        s.append(0, [1])
    DiskStorage(tmp_path).close()


@pytest.mark.parametrize("dtype,rtol", [("fp32", 0), ("fp16", 2**-11), ("bf16", 2**-8)])
def test_gist_dtypes_round_trip(tmp_path, dtype, rtol):
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0)).numpy() * 10
    for s in (RamStorage(K, D, dtype), DiskStorage(tmp_path, K=K, d=D, dtype=dtype)):
        s.append(0, np.arange(20))
        s.append(1, x)
        got = s.read(1, 0, 5)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, x, rtol=rtol, atol=0)
        if dtype == "bf16":  # stored exactly as torch rounds to bfloat16
            np.testing.assert_array_equal(got, torch.from_numpy(x).bfloat16().float().numpy())
        s.close()


def test_refuses_non_finite_and_fp16_overflow():
    s = RamStorage(K, D, "fp16")
    s.append(0, np.arange(8))
    with pytest.raises(TreeError, match="overflow fp16"):
        s.append(1, np.full((1, D), 1e5, np.float32))
    with pytest.raises(TreeError, match="non-finite"):
        s.append(1, np.full((1, D), np.nan, np.float32))
    with pytest.raises(ValueError, match="uint32"):
        s.append(0, [-1])
    with pytest.raises(ValueError, match="before level"):
        s.append(3, np.zeros((1, D), np.float32))
    assert s.num_records(1) == 0


def test_ram_and_disk_agree(tmp_path):
    rng = np.random.default_rng(0)
    ram, disk = RamStorage(K, D, "bf16"), DiskStorage(tmp_path, K=K, d=D, dtype="bf16")
    for step in range(30):
        ids = rng.integers(0, 2**32 - 1, size=int(rng.integers(0, 3000)), dtype=np.int64)
        gists = rng.standard_normal((int(rng.integers(0, 200)), D)).astype(np.float32)
        for s in (ram, disk):
            s.append(0, ids)
            s.append(1, gists)
            if step % 7 == 0:
                s.commit()
        rows = rng.integers(0, ram.num_records(1), size=50)
        np.testing.assert_array_equal(
            ram.read(0, 0, ram.num_records(0)), disk.read(0, 0, disk.num_records(0))
        )
        np.testing.assert_array_equal(ram.read_rows(1, rows), disk.read_rows(1, rows))
    disk.close()
    disk = DiskStorage(tmp_path)
    np.testing.assert_array_equal(ram.read(1, 0, ram.num_records(1)), disk.read(1, 0, disk.num_records(1)))
    disk.close()
