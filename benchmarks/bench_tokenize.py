"""Tokenization throughput and peak memory of `prepare` on four shapes of corpus, against its ceiling.

Shapes (built from ../shared/data): one file in WikiText's format (WikiText-2 valid repeated), one
file with no newline at all (the same text, newlines turned into spaces), one prose file (Tiny
Shakespeare repeated), and many 1 MB files.

Ceiling: tiktoken's own encode_ordinary_batch with the same threads, the text already in memory and
already split into documents (a single file: into 1 MB pieces at spaces), no file I/O. End to end:
`prepare` on the files in a fresh process (reading, decoding, cutting, tokenizing, writing the uint16
cache, holding out validation, checksums), timed around the call, with that process's peak resident
memory. Per shape, the two alternate `--repeats` times and each keeps its fastest run (this machine is
shared: a neighbour's burst slows one run, never speeds one up); the peak memory is the largest seen.

    python benchmarks/bench_tokenize.py --mb 200 --files 200
    python benchmarks/bench_tokenize.py --memory 100,1000 --shapes none   # peak memory against file size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from examplegpt.tokenizer import get_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DOCUMENT_CHARS = 1 << 20
CHILD = """
import json, re, sys, time
from examplegpt.config import DataConfig
from examplegpt.data import check_cache, prepare
data, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
folder = prepare(DataConfig(data=data, cache_dir=cache, workers=workers), 1025)
seconds = time.perf_counter() - start
manifest = check_cache(folder)
# VmHWM, not ru_maxrss: Linux carries the parent's resident size at fork into ru_maxrss across exec
peak_mb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "forced_cuts": manifest["forced_cuts"]}))
"""


def shared_text(name: str) -> str:
    path = SHARED / name
    if not path.exists():
        sys.exit(f"no {path}: this benchmark needs ../shared/data")
    return path.read_text()


def write_repeated(path: Path, text: str, megabytes: int) -> None:
    """`text` repeated into one file of about `megabytes` MB, written in blocks."""
    encoded = text.encode()
    with open(path, "wb") as f:
        for _ in range(max(1, (megabytes << 20) // len(encoded))):
            f.write(encoded)


def write_files(folder: Path, text: str, count: int) -> None:
    """`count` files of 1 MB, each a different rotation of `text`."""
    folder.mkdir()
    doubled = text + text[:DOCUMENT_CHARS]  # every rotation has a full MB
    for i in range(count):
        start = (i * 300_007) % len(text)
        (folder / f"{i:05d}.txt").write_text(doubled[start : start + DOCUMENT_CHARS])


def documents_of(source: Path) -> list[str]:
    """The ceiling's documents: each file, and a big file cut into ~1 MB pieces at spaces."""
    docs = []
    for path in sorted(source.glob("*.txt")) if source.is_dir() else [source]:
        text = path.read_text()
        start = 0
        while start < len(text):
            end = text.find(" ", start + DOCUMENT_CHARS) if len(text) - start > DOCUMENT_CHARS else -1
            end = len(text) if end < 0 else end
            docs.append(text[start:end])
            start = end
    return docs


def ceiling_seconds(source: Path, workers: int) -> float:
    """tiktoken's encode_ordinary_batch over the documents in memory (in groups, so the token lists of
    the whole corpus never exist at once)."""
    docs = documents_of(source)
    encoding, group = get_tokenizer(), 8 * workers
    start = time.perf_counter()
    for i in range(0, len(docs), group):
        encoding.encode_ordinary_batch(docs[i : i + group], num_threads=workers)
    return time.perf_counter() - start


def prepare_in_child(source: Path, cache: Path, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(source), str(cache), str(workers)], env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    shutil.rmtree(cache)
    return json.loads(out.splitlines()[-1])


def size_mb(source: Path) -> float:
    files = list(source.glob("*.txt")) if source.is_dir() else [source]
    return sum(f.stat().st_size for f in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="size of each single-file shape")
    parser.add_argument("--files", type=int, default=200, help="number of 1 MB files in the many-files shape")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per shape; the fastest counts")
    parser.add_argument("--shapes", default="wikitext,no-newline,prose,files", help="comma-separated, or 'none'")
    parser.add_argument("--memory", default="", help="MB sizes of WikiText-format files for peak memory, e.g. 100,1000")
    parser.add_argument("--scratch", default=None, help="folder for the generated corpora (default: a temp folder)")
    args = parser.parse_args()

    wikitext, prose = shared_text("wikitext-2/valid.txt"), shared_text("tinyshakespeare.txt")
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        builders = {
            "wikitext": lambda p: write_repeated(p, wikitext, args.mb),
            "no-newline": lambda p: write_repeated(p, wikitext.replace("\n", " "), args.mb),
            "prose": lambda p: write_repeated(p, prose, args.mb),
            "files": lambda p: write_files(p, wikitext + prose, args.files),
        }
        shapes = [s for s in args.shapes.split(",") if s in builders]
        if shapes:
            print(f"{args.workers} threads; MB/s of text; ratio = prepare / ceiling")
            print(
                f"{'shape':<12} {'MB':>6} {'ceiling':>8} {'prepare':>8} {'ratio':>6} {'peak RSS MB':>12} {'forced':>7}"
            )
        ratios = []
        for shape in shapes:
            source = scratch / (shape if shape == "files" else f"{shape}.txt")
            builders[shape](source)
            mb = size_mb(source)
            ceiling_runs, prepare_runs = [], []
            for _ in range(args.repeats):
                ceiling_runs.append(ceiling_seconds(source, args.workers))
                prepare_runs.append(prepare_in_child(source, scratch / "cache", args.workers))
            ceiling = mb / min(ceiling_runs)
            child = min(prepare_runs, key=lambda run: run["seconds"])
            child["peak_mb"] = max(run["peak_mb"] for run in prepare_runs)
            end_to_end = mb / child["seconds"]
            ratios.append(end_to_end / ceiling)
            print(f"{shape:<12} {mb:>6.0f} {ceiling:>8.2f} {end_to_end:>8.2f} {ratios[-1]:>6.2f} "
                  f"{child['peak_mb']:>12.0f} {child['forced_cuts']:>7}", flush=True)  # fmt: skip
            shutil.rmtree(source) if source.is_dir() else source.unlink()
        if ratios:
            print(f"worst ratio: {min(ratios):.2f}")
        for megabytes in [int(m) for m in args.memory.split(",") if m]:
            source = scratch / f"memory-{megabytes}.txt"
            write_repeated(source, wikitext, megabytes)
            child = prepare_in_child(source, scratch / "cache", args.workers)
            print(f"prepare of one {size_mb(source):.0f} MB WikiText-format file: {child['seconds']:.1f} s, "
                  f"peak resident memory {child['peak_mb']:.0f} MB", flush=True)  # fmt: skip
            source.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
