"""Draw the MegaAttention mask for a small sequence as a PNG (for docs/mega_attention.md).

    python -m scripts.render_mega_mask                      # N=64, K=4, W=8 -> docs/img/mega_mask.png

Left panel: the packed mask [T, T] (rows = queries, columns = keys; raw positions first, then the nodes
level by level), each visible cell coloured by the key's level. Right panel: the same rows for the raw
queries over raw time [N, N]: which level covers each past position (the pyramid; white = future).
Written with zlib + struct (no plotting library needed).
"""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import numpy as np

from megacontext.mega_attention import build_mega_layout, mega_mask
from nanochat.common import UserError, atomic_write_bytes, run_main

WHITE, GRID, GAP = (255, 255, 255), (200, 200, 200), 3
LEVEL_COLOURS = [(31, 78, 140), (230, 126, 34), (192, 57, 43), (142, 68, 173), (39, 174, 96), (90, 90, 90)]


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of image [H, W, 3] uint8: signature, IHDR, one IDAT, IEND."""
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate(
        [np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1
    )  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def render(N: int, K: int, W: int, path: Path, scale: int = 6, levels: int | None = None) -> None:
    lay = build_mega_layout(N, K, W, levels)
    mask = mega_mask(lay).numpy()
    spans = [lay.span(p) for p in range(lay.T)]
    key_level = np.array([s[0] for s in spans])
    colours = np.array(LEVEL_COLOURS, np.uint8)[np.minimum(key_level, len(LEVEL_COLOURS) - 1)]
    left = np.where(mask[:, :, None], colours[None, :, :], np.uint8(255)).astype(np.uint8)  # [T, T, 3]
    right = np.full((N, N, 3), 255, np.uint8)  # raw query i x raw position t: colour of the covering level
    for i in range(N):
        for p in np.flatnonzero(mask[i]):
            level, start, end = spans[p]
            right[i, start:end] = colours[p]
    canvas = np.full((lay.T, lay.T + GAP + N, 3), 255, np.uint8)
    canvas[:, : lay.T] = left
    canvas[:N, lay.T + GAP :] = right
    image = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    # 1-pixel grey separators (on white pixels only) between the raw block and each level's nodes
    for off in lay.offsets[1:]:
        px = off * scale - 1
        for line in (image[px, : lay.T * scale], image[: lay.T * scale, px]):
            line[(line == 255).all(-1)] = GRID
    atomic_write_bytes(path, png_bytes(image))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64, help="raw positions N")
    parser.add_argument("--k", type=int, default=4, help="block size K")
    parser.add_argument("--w", type=int, default=8, help="raw window W")
    parser.add_argument("--levels", type=int, default=None, help="node levels (default: as N needs)")
    parser.add_argument("--scale", type=int, default=6, help="pixels per cell")
    parser.add_argument("--out", default="docs/img/mega_mask.png", help="PNG path")
    args = parser.parse_args()
    if not 1 <= args.n <= 1024 or args.k < 2 or args.w < 0 or not 1 <= args.scale <= 32:
        raise UserError("need 1 <= --n <= 1024 (a picture), --k >= 2, --w >= 0, 1 <= --scale <= 32")
    render(args.n, args.k, args.w, Path(args.out), args.scale, args.levels)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
