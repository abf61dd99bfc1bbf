"""Parquet shards: resumable verified download, offline corpus build, iteration, one-line errors."""

import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.common import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def parquet_bytes(texts: list[str], row_group_docs: int = 4) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_docs)
    return buf.getvalue()


class ShardServer:
    """Serves shard bytes from memory on localhost; `cut_once` names get half their bytes, then a closed
    connection, on their first request (a transfer killed half-way)."""

    def __init__(self, files: dict[str, bytes], cut_once: set[str] = frozenset()):
        self.files, self.cut_once, self.requests = files, set(cut_once), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_cli(*args: str, base: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -----------------------------------------------------------------------------
# Download


def shard_files(n: int) -> dict[str, bytes]:
    return {
        dataset.shard_name(i): parquet_bytes([f"shard {i} doc {j} " * 50 for j in range(40)])
        for i in range(n)
    }


def test_download_killed_transfer_then_rerun_completes_and_skips(base_dir, monkeypatch):
    files = shard_files(3)
    data_dir = base_dir / "base_data"
    with ShardServer(files, cut_once={"shard_00001.parquet"}) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        with pytest.raises(UserError, match="1 of 3 shards failed.*re-run to resume"):
            dataset.download(3, workers=2, attempts=1, backoff_s=0.0, timeout_s=10)
        assert sorted(p.name for p in data_dir.iterdir()) == ["shard_00000.parquet", "shard_00002.parquet"]
        # A process killed mid-transfer leaves its temp file; the re-run must not trip over it.
        (data_dir / "shard_00001.parquet.tmp").write_bytes(files["shard_00001.parquet"][:100])
        server.requests.clear()
        dataset.download(3, workers=2, attempts=1, backoff_s=0.0, timeout_s=10)
        assert server.requests == ["shard_00001.parquet"]  # present shards skipped
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(files)  # no .tmp left behind
    for name, data in files.items():
        assert (data_dir / name).read_bytes() == data


def test_download_retries_with_backoff_in_one_run(base_dir, monkeypatch):
    files = shard_files(2)
    with ShardServer(files, cut_once=set(files)) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        dataset.download(2, workers=1, attempts=3, backoff_s=0.01, timeout_s=10)
        assert sorted(server.requests) == sorted(list(files) * 2)  # each cut once, then fetched whole
    assert dataset.list_parquet_files() == [str(base_dir / "base_data" / n) for n in sorted(files)]


def test_download_rejects_non_parquet_and_gives_up_on_404(base_dir, monkeypatch):
    files = {"shard_00000.parquet": b"<html>not a shard</html>"}
    with ShardServer(files) as server:
        monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
        with pytest.raises(UserError, match="2 of 2 shards failed"):
            dataset.download(2, workers=1, attempts=3, backoff_s=0.0, timeout_s=10)
        # Garbage is retried (it may be a proxy hiccup); a 404 is not.
        assert server.requests.count("shard_00000.parquet") == 3
        assert server.requests.count("shard_00001.parquet") == 1
    assert list((base_dir / "base_data").iterdir()) == []


# -----------------------------------------------------------------------------
# Offline corpus


def all_docs(data_dir: Path | None = None) -> tuple[list[str], list[str]]:
    return tuple([t for batch in dataset.parquets_iter_batched(s, data_dir=data_dir) for t in batch]
                 for s in ("train", "val"))  # fmt: skip


def test_local_build_from_stdlib_with_cap(base_dir):
    dataset.build_local([], 300_000, 0.0, 0, 4, 600_000, 16000, False)
    files = dataset.list_parquet_files()
    assert len(files) >= 2
    train, val = all_docs()
    assert val and train
    assert sum(len(d) for d in train + val) >= 600_000
    assert sum("import " in d for d in train + val) > len(train + val) // 2  # Python sources
    manifest = json.loads((base_dir / "base_data" / "manifest.json").read_text())
    assert manifest["documents"] == len(train) + len(val) and manifest["shards"] == len(files)
    assert pq.ParquetFile(files[0]).num_row_groups > 1
    # Same arguments: nothing to do; other arguments on top of existing shards: refused without --force.
    dataset.build_local([], 300_000, 0.0, 0, 4, 600_000, 16000, False)
    with pytest.raises(UserError, match="--force"):
        dataset.build_local([], 300_000, 0.0, 1, 4, 600_000, 16000, False)
    dataset.build_local([], 300_000, 0.0, 1, 4, 600_000, 16000, True)
    train2, val2 = all_docs()
    assert sorted(train + val) == sorted(train2 + val2) and train != train2  # same files, other shuffle


def test_local_build_from_dir_is_deterministic_and_mixes_synthetic(tmp_path, base_dir, monkeypatch):
    src = tmp_path / "src"
    texts = {}
    for i in range(18):
        sub = src / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        name = sub / f"f{i}.{['txt', 'md', 'py'][i % 3]}"
        texts[name] = f"document {i}: " + "lorem ipsum dolor " * (20 + i)
        name.write_text(texts[name])
    (src / "image.bin").write_bytes(b"\x00\xff" * 10)  # not a text extension
    (src / ".git").mkdir()
    (src / ".git" / "HEAD.txt").write_text("hidden dirs are skipped")
    (src / "empty.txt").write_text("   \n")

    dataset.build_local([str(src)], 2000, 0.1, 5, 2, None, 3000, False)
    train, val = all_docs()
    real = [d for d in train + val if d.startswith("document ")]
    assert sorted(real) == sorted(texts.values())
    synthetic = [d for d in train + val if not d.startswith("document ")]
    assert len(synthetic) == 2  # 10% of the final 20 documents
    assert all(("pass key" in d) or ("Memorize these pairs" in d) or ("VAR " in d) for d in synthetic)
    assert len(dataset.list_parquet_files()) >= 2 and 0 < len(val) < len(train)

    other = tmp_path / "other"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(other))
    dataset.build_local([str(src)], 2000, 0.1, 5, 2, None, 3000, False)
    assert all_docs() == (train, val)  # deterministic


def test_assign_shards_always_two_nonempty():
    assert [len(s) for s in dataset.assign_shards(["a", "b" * 100], 10**9)] == [1, 1]
    shards = dataset.assign_shards([f"{i:010d}" for i in range(100)], 100)
    assert len(shards) == 10 and sum(map(len, shards)) == 100 and all(shards)


def test_row_group_sharding_is_disjoint_and_complete(tmp_path):
    for i in range(3):
        (tmp_path / dataset.shard_name(i)).write_bytes(parquet_bytes([f"s{i} d{j}" for j in range(10)], 2))
    everything = [t for b in dataset.parquets_iter_batched("train", data_dir=tmp_path) for t in b]
    assert len(everything) == 20 and len(set(everything)) == 20
    ranks = [[t for b in dataset.parquets_iter_batched("train", r, 3, tmp_path) for t in b] for r in range(3)]
    assert sorted(sum(ranks, [])) == sorted(everything)
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])
    assert [len(b) for b in dataset.parquets_iter_batched("val", data_dir=tmp_path)] == [2] * 5
    # Resume from a (shard, row group) position: the rest of that rank's sequence.
    rest = list(dataset.iter_row_groups("train", 1, 3, tmp_path, resume=(1, 1)))
    assert [(s, g) for s, g, _ in rest] == [(1, 1), (1, 4)]
    # The stride counts row groups across shards, so a stride longer than a shard still reaches every
    # group once: 7 ranks over 2 train shards of 5 groups; rank 0 reads split groups 0 and 7 = (0, 0) and
    # (1, 2), rank 6 only group 6 = (1, 1).
    where = [[(s, g) for s, g, _ in dataset.iter_row_groups("train", r, 7, tmp_path)] for r in range(7)]
    assert sorted(sum(where, [])) == [(s, g) for s in (0, 1) for g in range(5)]
    assert where[0] == [(0, 0), (1, 2)] and where[6] == [(1, 1)]
    assert list(dataset.iter_row_groups("train", 2, 7, tmp_path, resume=(1, 4)))[0][:2] == (1, 4)


def test_missing_text_column_and_single_shard(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"content": ["x"]}), buf)
    (tmp_path / "shard_00000.parquet").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="only one shard"):
        list(dataset.parquets_iter_batched("train", data_dir=tmp_path))
    (tmp_path / "shard_00001.parquet").write_bytes(parquet_bytes(["ok"]))
    with pytest.raises(UserError, match="shard_00000.parquet has no 'text' column"):
        list(dataset.parquets_iter_batched("train", data_dir=tmp_path))


# -----------------------------------------------------------------------------
# The CLI's one-line errors


def test_cli_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("--local", str(tmp_path / "empty"), base=tmp_path / "base")
    assert_one_line_error(proc, "no text files", str(tmp_path / "empty"))


def test_cli_no_shards_says_how_to_make_them(tmp_path):
    proc = run_cli("--verify", base=tmp_path / "base")
    assert_one_line_error(proc, "no parquet shards", "python -m nanochat.dataset -n", "--local")


def test_cli_non_parquet_shard_is_named(tmp_path):
    data_dir = tmp_path / "base" / "base_data"
    data_dir.mkdir(parents=True)
    (data_dir / "shard_00000.parquet").write_bytes(parquet_bytes(["fine"]))
    (data_dir / "shard_00001.parquet").write_text("this is not parquet")
    proc = run_cli("--verify", base=tmp_path / "base")
    assert_one_line_error(proc, "shard_00001.parquet is not a readable parquet file")
