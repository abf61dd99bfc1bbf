"""Plot MegaContext focus maps (the working context's LOD layout over time) as a PNG.

    python -m scripts.focus_plot focus.txt -o focus.png

Input: one focus map per line as MegaContext telemetry writes them, `#<refocus> [L2 0:1024][L1 1024:1056]...`
(megacontext.telemetry.Telemetry.focus_maps; chat_eval through an MC session saves them under report/). Output: one
pixel row band per refocus (time runs down), the token timeline left to right; each position is coloured
by the level of detail that covers it: black = raw tokens (LOD0), then blue, orange, green, ... for LOD1,
LOD2, LOD3 gists; white = not yet in the history. So a conversation reads as a staircase that grows to the
right, and a zoom back in on old text shows as a dark patch far left.

The PNG is written with numpy and zlib (the format is small: a header chunk, deflated rows, an end chunk),
so plotting needs no matplotlib.
"""

from __future__ import annotations

import argparse
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from nanochat.common import UserError, atomic_write_bytes, run_main

ENTRY = re.compile(r"\[L(\d+) (\d+):(\d+)\]")
BACKGROUND = (255, 255, 255)
# LOD0 black; gists from a colour-blind-safe palette (Okabe-Ito), coarser = later in the list
LEVEL_COLORS = [(0, 0, 0), (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233)]


def parse_focus_map(line: str) -> tuple[int | None, list[tuple[int, int, int]]]:
    """(refocus number or None, [(level, start, end), ...]) of one rendered focus map."""
    line = line.strip()
    step = None
    m = re.match(r"#(\d+)\s", line)
    if m:
        step = int(m.group(1))
    entries = [(int(a), int(b), int(c)) for a, b, c in ENTRY.findall(line)]
    return step, entries


def lod_image(maps: list[list[tuple[int, int, int]]], width: int = 1024, row_height: int = 0) -> np.ndarray:
    """RGB uint8 image [rows * row_height, width, 3]: one band per map, timeline scaled to the longest."""
    maps = [m for m in maps if m]
    if not maps:
        raise UserError("no focus maps to plot (expected lines like `#3 [L1 0:32][L0 32:40]`)")
    horizon = max(e for m in maps for _, _, e in m)
    width = max(1, min(width, horizon))
    row_height = row_height or max(1, min(8, 800 // len(maps)))
    image = np.empty((len(maps), width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    scale = width / horizon
    for r, entries in enumerate(maps):
        for level, start, end in entries:
            lo, hi = int(start * scale), max(int(start * scale) + 1, int(end * scale))
            image[r, lo:hi] = LEVEL_COLORS[min(level, len(LEVEL_COLORS) - 1)]
    return np.repeat(image, row_height, axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an [H, W, 3] uint8 array."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 (RGB)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def plot_focus_maps(lines: list[str], out: str | Path, width: int = 1024) -> Path:
    """Parse focus-map lines and write the PNG (atomically); returns its path."""
    maps = [parse_focus_map(line)[1] for line in lines if line.strip()]
    out = Path(out)
    atomic_write_bytes(out, png_bytes(lod_image(maps, width)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="text file of focus maps, one per line")
    p.add_argument("-o", "--output", default="", help="PNG path (default: the input with .png)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (at most one per token)")
    args = p.parse_args(argv)
    src = Path(args.input)
    if not src.is_file():
        raise UserError(f"no focus-map file at {src}")
    out = plot_focus_maps(
        src.read_text(encoding="utf-8").splitlines(), args.output or src.with_suffix(".png"), args.width
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
