"""Manifest and poison plan of a 3,000,000-pair CSV dataset: seconds and peak memory of each.

The target: the plan builds in at most 3 s and 1 GB. The manifest is built by the
``csv`` loader's own code (``read_index``: Arrow's CSV reader and path resolution, then
``poison.datasets.files``: seeded selection, skipping, the manifest) from a generated TSV
of local paths and captions (0.1% empty captions); only the decoding of 3M images is
left out (each image reported decoded, 0.1% of them undecodable, so skipping runs at
scale). The csv loader's pairs have no classes, so, as a CC3M backdoor evaluated on ImageNet
is, the pairs are then joined to a labelled evaluation set of 1,000 classes (``data.zeroshot``:
``poison.datasets.zeroshot.with_zeroshot``, which labels every caption by the class it names;
11 of the names are caption words, the rest are not). The plan is the ``backdoor`` attack's
(inject, captions drawn from the training captions that name the target, patch trigger).

Seconds are of a plain call. Memory is measured on a second call in a forked child (Linux):
the peak it allocated, Arrow's (in a memory pool of its own) plus numpy's and Python's
(tracemalloc), and the growth of the resident set.
Run: .venv/bin/python benchmarks/manifest_3m.py [--rows 3000000] [--poison-count 3000]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from poison import DataSpec, make_attack
from poison.datasets import files
from poison.datasets.csv_pairs import read_index
from poison.datasets.zeroshot import with_zeroshot
from poison.manifest import Dataset, make_manifest

WORDS = ("a photo of the dog cat man woman child car street beach tree house city red blue green old new "
         "small large on in at with near under over running sitting standing view night day").split()
PLAN_TARGET_SECONDS, PLAN_TARGET_MB = 3.0, 1024


def write_tsv(path: Path, rows: int, rng: np.random.Generator) -> None:
    """A CC3M-like TSV: ``filepath`` (relative, zero-padded) and an 8-word ``caption``."""
    digits = (np.arange(rows)[:, None] // 10 ** np.arange(6, -1, -1)) % 10
    name = np.full((rows, 18), ord("."), np.uint8)
    name[:, :7] = np.frombuffer(b"images/", np.uint8)
    name[:, 7:14] = digits + ord("0")
    name[:, 14:] = np.frombuffer(b".jpg", np.uint8)
    filepath = pa.StringArray.from_buffers(rows, pa.py_buffer(np.arange(rows + 1, dtype=np.int32) * 18),
                                           pa.py_buffer(name.tobytes()))
    vocab = pa.array(WORDS)
    words = [vocab.take(pa.array(rng.integers(len(WORDS), size=rows))) for _ in range(8)]
    caption = pc.binary_join_element_wise(*words, " ")
    caption = pc.if_else(pa.array(rng.random(rows) < 0.001), "", caption)  # 0.1% empty captions
    pacsv.write_csv(pa.table({"filepath": filepath, "caption": caption}), path,
                    pacsv.WriteOptions(delimiter="\t", quoting_style="none"))


def evaluation_set(classes: int, images: int) -> Dataset:
    """A labelled test set of ``classes`` names (11 of them words the captions use), black images."""
    names = ["dog", "cat", "man", "woman", "child", "car", "street", "beach", "tree", "house", "city view"]
    names += [f"class {i}" for i in range(classes - len(names))]
    label = np.arange(images) % classes
    manifest = make_manifest(image=np.arange(images), caption=[f"a photo of a {names[i]}." for i in label],
                             label=label, split=["test"] * images)
    return Dataset(name="evaluation", manifest=manifest, classnames=names, templates=["a photo of a {}."],
                   image_size=32, _render=lambda: np.zeros((images, 32, 32, 3), np.uint8))


def fake_decode(rng: np.random.Generator):
    """Stands in for decoding: every image decoded (pixels all zero, no memory) but 0.1% undecodable."""
    def decode_images(table: pa.Table, spec: DataSpec, sources: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        n, side = table.num_rows, spec.image_size
        status = np.where(rng.random(n) < 0.001, files.UNDECODABLE, files.OK).astype(np.int8)
        return np.broadcast_to(np.zeros((1, side, side, 3), np.uint8), (n, side, side, 3)), status
    return decode_images


class Cost:
    """Seconds and peak memory of one call of ``fn``.

    The seconds come from a plain call (its result is kept). The memory comes from a
    second call in a forked child, so the instruments slow nothing that is timed and the
    phase before leaves no freed pages to reuse: what Arrow allocated, in a memory pool
    this process has not used (its peak is the call's), plus what numpy and Python
    allocated (tracemalloc), and the growth of the resident set.
    """

    def __init__(self, fn: Callable[[], object], pool: str) -> None:
        start = time.perf_counter()
        self.result = fn()
        self.seconds = time.perf_counter() - start
        self.arrow_mb, self.python_mb, self.rss_mb = _in_child(fn, pool)

    @property
    def mb(self) -> float:
        """Allocated peak: Arrow's plus Python's (an upper bound: the two need not peak together)."""
        return self.arrow_mb + self.python_mb

    def line(self) -> str:
        return (f"  build {self.seconds:6.2f} s   peak {self.mb:7,.0f} MB allocated (Arrow {self.arrow_mb:,.0f} + "
                f"numpy/Python {self.python_mb:,.0f}); resident set +{self.rss_mb:,.0f} MB")


def _in_child(fn: Callable[[], object], pool: str) -> tuple[float, float, float]:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without cleaning up
        try:
            arena = getattr(pa, f"{pool}_memory_pool")()
            pa.set_memory_pool(arena)
            exact = _reset_peak()
            base = _status_kb("VmRSS")
            tracemalloc.start()
            fn()
            python = tracemalloc.get_traced_memory()[1]
            peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            os.write(writer, json.dumps([arena.max_memory() / 2**20, python / 2**20, (peak - base) / 1024]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return tuple(json.loads(text)) if text else (float("nan"),) * 3


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--poison-count", type=int, default=3_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.tsv"
        start = time.perf_counter()
        write_tsv(path, args.rows, rng)
        print(f"wrote {args.rows:,} rows to a TSV of {path.stat().st_size / 1e6:,.0f} MB "
              f"in {time.perf_counter() - start:.1f} s (not timed)")
        files.decode_images = fake_decode(rng)
        spec = DataSpec(dataset="csv", path=str(path), size=None, test_size=args.test_size, image_size=32)
        manifest_cost = Cost(lambda: files.load_index(read_index(path), spec, sources=[path]), "jemalloc")
        pairs = manifest_cost.result
    labelled = Cost(lambda: with_zeroshot(pairs, evaluation_set(1000, args.test_size)), "jemalloc")
    dataset = labelled.result
    attack = make_attack({"kind": "backdoor", "target": "dog", "poison_count": args.poison_count,
                          "caption_source": "dataset", "trigger": {"kind": "patch", "size": 4}})
    plan_cost = Cost(lambda: attack.plan(dataset, seed=0), "jemalloc")
    plan = plan_cost.result
    print(f"manifest: {pairs.manifest.num_rows:,} pairs ({pairs.num_train:,} train), "
          f"{pairs.skipped:,} skipped {pairs.skip_reasons}; {pairs.manifest.nbytes / 2**20:,.0f} MB")
    print(manifest_cost.line())
    labels = dataset.split("train")["label"].to_numpy()
    print(f"zero-shot join: {len(dataset.classnames):,} classes; captions naming exactly one: "
          f"{np.mean(labels >= 0):.1%} (dog: {np.sum(labels == 0):,})")
    print(labelled.line())
    print(f"plan: {plan.num_rows:,} poisoned pairs, {plan.nbytes / 2**20:.2f} MB")
    print(plan_cost.line())
    met = plan_cost.seconds <= PLAN_TARGET_SECONDS and plan_cost.mb <= PLAN_TARGET_MB
    print(f"plan against the target (<= {PLAN_TARGET_SECONDS:g} s, <= {PLAN_TARGET_MB:,} MB): "
          f"{plan_cost.seconds / PLAN_TARGET_SECONDS:.2f}x of the time, {plan_cost.mb / PLAN_TARGET_MB:.2f}x of the "
          f"memory: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
