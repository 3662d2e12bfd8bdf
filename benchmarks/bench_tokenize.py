"""Tokenization throughput of `prepare` against its ceiling, and the peak memory of a large prepare.

Ceiling: tiktoken's own encode_ordinary_batch on the same documents with the same threads, text
already in memory, no file I/O. End to end: `prepare` on the files (reading, decoding, tokenizing,
writing the uint16 cache, holding out validation, checksums). Both in one run, alternating.

    python benchmarks/bench_tokenize.py --mb 40 --rss-mb 120
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from examplegpt.config import DataConfig
from examplegpt.data import prepare
from examplegpt.tokenizer import get_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_corpus(folder: Path, megabytes: int) -> list[Path]:
    """Real text (WikiText-2 and Tiny Shakespeare from ../shared/data), repeated into 1 MB files."""
    sources = [SHARED / "wikitext-2" / "valid.txt", SHARED / "wikitext-2" / "test.txt", SHARED / "tinyshakespeare.txt"]
    text = "".join(p.read_text() for p in sources if p.exists())
    if not text:
        sys.exit(f"no text in {SHARED}: this benchmark needs ../shared/data")
    folder.mkdir(parents=True, exist_ok=True)
    files, written, i = [], 0, 0
    while written < megabytes << 20:
        start = (i * 300_007) % len(text)
        chunk = (text[start:] + text[:start])[: 1 << 20]
        path = folder / f"{i:05d}.txt"
        path.write_text(chunk)
        files.append(path)
        written += len(chunk.encode())
        i += 1
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=40, help="corpus size for the throughput runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rss-mb", type=int, default=120, help="corpus size for the peak-memory run (0: skip)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp())
    try:
        files = make_corpus(scratch / "corpus", args.mb)
        megabytes = sum(f.stat().st_size for f in files) / 2**20
        encoding = get_tokenizer()
        ceiling, end_to_end = [], []
        for r in range(args.repeats):
            documents = [f.read_text() for f in files]
            start = time.perf_counter()
            encoding.encode_ordinary_batch(documents, num_threads=args.workers)
            ceiling.append(megabytes / (time.perf_counter() - start))
            del documents
            cache = scratch / f"cache{r}"
            start = time.perf_counter()
            prepare(DataConfig(data=str(scratch / "corpus"), cache_dir=str(cache), workers=args.workers), 1025)
            end_to_end.append(megabytes / (time.perf_counter() - start))
            shutil.rmtree(cache)
        print(
            f"corpus: {megabytes:.0f} MB of text in {len(files)} files, {args.workers} threads, median of {args.repeats}"
        )
        print(f"ceiling (tiktoken encode_ordinary_batch, in memory): {statistics.median(ceiling):.2f} MB/s")
        print(f"examplegpt prepare, end to end with the cache:      {statistics.median(end_to_end):.2f} MB/s")
        print(f"ratio: {statistics.median(end_to_end) / statistics.median(ceiling):.2f} of the ceiling")

        if args.rss_mb:
            big = make_corpus(scratch / "big", args.rss_mb)
            size = sum(f.stat().st_size for f in big) / 2**20
            command = [sys.executable, "-m", "examplegpt", "prepare", "--data", str(scratch / "big"),
                       "--cache-dir", str(scratch / "bigcache"), "--workers", str(args.workers)]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
            print(f"prepare of {size:.0f} MB: {seconds:.1f} s, peak resident memory {peak:.0f} MB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
