"""Tiny data sets in torchvision's on-disk formats, for tests that must not depend on downloaded data."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

NUM_TRAIN, NUM_TEST = 100, 30


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an uncompressed idx file (big-endian magic ``0x0800 + ndim`` and dimensions)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def fabricate_mnist(root: Path, folder: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a tiny MNIST-format data set under ``root/folder/raw``; pixels (0, 0) and (0, 1) encode the index."""
    generator = torch.Generator().manual_seed(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    splits = {}
    for prefix, count, offset in [("train", NUM_TRAIN, 0), ("t10k", NUM_TEST, 1000)]:
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        ids = torch.arange(count) + offset
        images[:, 0, 0] = (ids % 256).to(torch.uint8)
        images[:, 0, 1] = (ids // 256).to(torch.uint8)
        labels = (torch.arange(count) % 10).to(torch.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = (images, labels)
    return splits
