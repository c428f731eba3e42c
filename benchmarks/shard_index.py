"""Indexing webdataset shards: reading every shard's tar headers (the first trial on a node)
against the node's shard-index cache (every later trial), side by side in one run.

Writes ``--shards`` uncompressed tar shards of ``--per-shard`` samples each (a tiny JPEG and a
caption per sample, as img2dataset lays them out), then times ``read_index`` without a cache,
with a cold cache (reads the tars and writes the cache) and with a warm one. Prints seconds,
samples/s and the ratio.
Run: .venv/bin/python benchmarks/shard_index.py [--shards 50] [--per-shard 2000]
"""
from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

from poison.datasets.shards import read_index

JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")  # a header only: indexing never decodes


def write_shards(folder: Path, shards: int, per_shard: int) -> list[Path]:
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", JPEG), (f"{key}.txt", f"a photo number {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--per-shard", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shards = write_shards(Path(folder), args.shards, args.per_shard)
        samples = args.shards * args.per_shard
        seconds = {}
        for name, cache in (("no cache (tar headers)", None), ("cold cache (tars, then written)", Path(folder) / "c"),
                            ("warm cache (every later trial)", Path(folder) / "c")):
            start = time.perf_counter()
            index = read_index(shards, cache=cache)
            seconds[name] = time.perf_counter() - start
            assert index.num_rows == samples
            print(f"{name:34s} {seconds[name]:7.2f} s  {samples / seconds[name]:12,.0f} samples/s")
        cold, warm = seconds["no cache (tar headers)"], seconds["warm cache (every later trial)"]
        print(f"{samples:,} samples in {args.shards} shards: warm / no cache = {warm / cold:.3f} ({cold / warm:.0f}x faster)")


if __name__ == "__main__":
    main()
