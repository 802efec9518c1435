"""Pictures without a plotting library: a PNG writer and a 2-D decision-boundary map.

>>> import numpy as np, os, tempfile
>>> folder = tempfile.TemporaryDirectory(); path = os.path.join(folder.name, "red.png")
>>> save_png(path, np.full((2, 3, 3), [255, 0, 0], dtype=np.uint8))
>>> open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
True
>>> folder.cleanup()
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=float)


def save_png(path, rgb: np.ndarray) -> None:
    """Write an (h, w, 3) uint8 image as a PNG file (zlib-compressed, 8-bit RGB)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"save_png needs an (h, w, 3) array, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def decision_boundary(model, X, y, path, size: int = 240, margin: float = 0.5) -> None:
    """Colour the plane by the model's predicted class and draw the points on top."""
    X, y = np.asarray(X, dtype=float), np.asarray(y)
    lo, hi = X.min(0) - margin, X.max(0) + margin
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], size), np.linspace(hi[1], lo[1], size))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    out = model.predict(grid)
    cls = out.argmax(1) if out.shape[1] > 1 else (out[:, 0] > 0).astype(int)
    img = 0.35 * PALETTE[cls % len(PALETTE)] + 0.65 * 255
    img = img.reshape(size, size, 3)
    px = ((X[:, 0] - lo[0]) / (hi[0] - lo[0]) * (size - 1)).astype(int)
    py = ((hi[1] - X[:, 1]) / (hi[1] - lo[1]) * (size - 1)).astype(int)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            img[np.clip(py + dy, 0, size - 1), np.clip(px + dx, 0, size - 1)] = PALETTE[y % len(PALETTE)]
    save_png(path, img.astype(np.uint8))
