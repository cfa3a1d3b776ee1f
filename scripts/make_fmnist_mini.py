#!/usr/bin/env python3
"""Regenerate sequel-core/data/fmnist-mini/, the class-balanced Fashion-MNIST subset embedded
in sequel-core.

Selection (deterministic, no RNG): the first TRAIN_PER_CLASS images of each class in file order
of the official training files, and the first TEST_PER_CLASS images of each class in file order
of the official t10k files. Selected samples keep their original relative order.

Output files are gzipped IDX files written with mtime=0, so the result is byte-reproducible.

Usage: python3 scripts/make_fmnist_mini.py [SOURCE_DIR] [OUT_DIR]
  SOURCE_DIR  folder holding the four official files, raw or .gz
              (default /usr/share/datasets/fashion-mnist, Debian package dataset-fashion-mnist)
  OUT_DIR     default: sequel-core/data/fmnist-mini next to this script's repository root
Python 3 standard library only.
"""

import gzip
import os
import struct
import sys

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
NUM_CLASSES = 10
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_maybe_gz(directory, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            return path, data
    sys.exit(f"error: neither {name} nor {name}.gz found in {directory}")


def parse_images(path, data):
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        sys.exit(f"error: {path}: bad magic {magic:#010x}")
    size = rows * cols
    if len(data) != 16 + n * size:
        sys.exit(f"error: {path}: expected {16 + n * size} bytes, found {len(data)}")
    return [data[16 + i * size:16 + (i + 1) * size] for i in range(n)], rows, cols


def parse_labels(path, data):
    magic, n = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        sys.exit(f"error: {path}: bad magic {magic:#010x}")
    if len(data) != 8 + n:
        sys.exit(f"error: {path}: expected {8 + n} bytes, found {len(data)}")
    labels = list(data[8:])
    if any(l >= NUM_CLASSES for l in labels):
        sys.exit(f"error: {path}: label out of range")
    return labels


def select(images, labels, per_class):
    counts = [0] * NUM_CLASSES
    out_images, out_labels = [], []
    for image, label in zip(images, labels):
        if counts[label] < per_class:
            counts[label] += 1
            out_images.append(image)
            out_labels.append(label)
    if any(c < per_class for c in counts):
        sys.exit(f"error: not enough samples per class: {counts}")
    return out_images, out_labels


def write_gz(path, payload):
    # mtime=0 and no file name in the header: the output depends only on the payload.
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(payload)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "sequel-core", "data", "fmnist-mini")
    os.makedirs(out, exist_ok=True)
    total = 0
    for split, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        images, rows, cols = parse_images(*read_maybe_gz(src, f"{split}-images-idx3-ubyte"))
        labels = parse_labels(*read_maybe_gz(src, f"{split}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            sys.exit(f"error: {split}: {len(images)} images but {len(labels)} labels")
        sel_images, sel_labels = select(images, labels, per_class)
        n = len(sel_labels)
        img_path = os.path.join(out, f"{split}-images-idx3-ubyte.gz")
        lbl_path = os.path.join(out, f"{split}-labels-idx1-ubyte.gz")
        write_gz(img_path, struct.pack(">IIII", IMAGES_MAGIC, n, rows, cols) + b"".join(sel_images))
        write_gz(lbl_path, struct.pack(">II", LABELS_MAGIC, n) + bytes(sel_labels))
        for p in (img_path, lbl_path):
            size = os.path.getsize(p)
            total += size
            print(f"{os.path.normpath(p)}: {size} bytes")
    print(f"total: {total} bytes")


if __name__ == "__main__":
    main()
