"""
Corpus preparation throughput: `mingpt.prepare` (read, tokenize with GPT-2's BPE, write uint16 shards) in MB
of text per second per core, against tiktoken encoding the same files, in one run.

    python bench/prepare.py [--repeats 3] [--workers N] [FILE ...]

The files default to ../shared/data's War and Peace, tiny shakespeare and WikiText-2 (test and valid) when
that folder exists, else tiny shakespeare through mingpt's own download code. Rows:
- mingpt prepare, 1 worker: the whole command's work in this process (reading, tokenizing, writing
  shards and meta.json), with a fresh tokenizer every run, so every piece is new to its cache (cold).
- mingpt prepare, N workers (default: every core): the same with N tokenizing processes; per core divides
  by N, so it also shows what sharing out the tasks costs.
- tiktoken encode_ordinary: each file read, decoded and encoded on one thread (no shards written).
Runs take turns, so that load on the machine hits every row alike; each row keeps its best of --repeats.
Before timing, the script checks that prepare's shards hold tiktoken's ids.

A prepare run has a start-up cost that does not grow with the corpus (loading GPT-2's vocabulary, writing
its copy next to the shards, starting the workers, each building its merge table on first use), which
weighs on a corpus of a few MB and not on one of GBs. The column "start-up" is the time prepare takes on
the first 1 KB of the text with as many workers.
"""

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from bench.tokenizer import SHARED_DATA, get_tiktoken  # noqa: E402
from mingpt.data import open_shard  # noqa: E402
from mingpt.hardware import cpu_count  # noqa: E402
from mingpt.prepare import prepare  # noqa: E402

SHARED_FILES = ('warpeace.txt', 'tinyshakespeare.txt', 'wikitext-2/test.txt', 'wikitext-2/valid.txt')


def default_files():
    files = [SHARED_DATA / name for name in SHARED_FILES if (SHARED_DATA / name).is_file()]
    if not files:
        from mingpt.download import get_tiny_shakespeare
        files = [Path(get_tiny_shakespeare())]
    return files


def run_prepare(files, workers):
    """ seconds to prepare files into a fresh directory, and the ids it wrote (in stream order) """
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        meta = prepare(files, out, workers=workers, progress=False)
        seconds = time.perf_counter() - t0
        ids = np.concatenate([open_shard(Path(out) / s['file']) for s in meta['shards']])
    return seconds, ids


def startup_seconds(files, workers, repeats):
    """ the best time of prepare on the first 1 KB of the text: what a run costs whatever its size """
    with tempfile.TemporaryDirectory() as d:
        small = Path(d) / 'small.txt'
        small.write_bytes(files[0].read_bytes()[:1000])
        return min(run_prepare([small], workers)[0] for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('files', nargs='*', type=Path, help='text files (default: ../shared/data, see above)')
    parser.add_argument('--repeats', type=int, default=3, help='runs per row; the best is reported')
    parser.add_argument('--workers', type=int, default=cpu_count(), help='workers of the parallel row')
    args = parser.parse_args()
    files = args.files or default_files()
    n_bytes = sum(f.stat().st_size for f in files)

    print('command: `' + ' '.join(['python'] + [shlex.quote(a) for a in sys.argv]) + '`\n')
    tik = get_tiktoken()
    _, ids = run_prepare(files, 1)
    if tik is not None:
        expected = [i for f in files for i in [tik.eot_token] + tik.encode_ordinary(f.read_text(encoding='utf-8'))]
        if ids.tolist() != expected:
            sys.exit("prepare's shards do not hold tiktoken's ids; not benchmarking a wrong tokenizer")

    def tiktoken_encode():
        t0 = time.perf_counter()
        for f in files:
            np.array(tik.encode_ordinary(f.read_bytes().decode('utf-8')), dtype=np.uint16)
        return time.perf_counter() - t0

    # (name, cores, function that returns the seconds of its run)
    tasks = [('mingpt prepare, 1 worker', 1, lambda: run_prepare(files, 1)[0]),
             (f'mingpt prepare, {args.workers} workers', args.workers, lambda: run_prepare(files, args.workers)[0])]
    if tik is not None:
        tasks.append(('tiktoken encode_ordinary (Rust), 1 thread', 1, tiktoken_encode))
    best = {name: float('inf') for name, _, _ in tasks}
    for _ in range(args.repeats):
        for name, _, fn in tasks:
            best[name] = min(best[name], fn())

    startup = {1: startup_seconds(files, 1, args.repeats), args.workers: startup_seconds(files, args.workers, args.repeats)}
    tik_per_core = n_bytes / best[tasks[-1][0]] / 1e6 if tik is not None else None
    print(f'text: {len(files)} files, {n_bytes:,} bytes, {len(ids):,} tokens; best of {args.repeats}; Python '
          f'{sys.version.split()[0]}, {cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n')
    print('| tokenizer | cores | seconds | MB/s | MB/s per core | per core vs tiktoken | start-up (s) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for name, cores, _ in tasks:
        per_core = n_bytes / best[name] / 1e6 / cores
        ratio = f'{per_core / tik_per_core:.2f}x' if tik_per_core else 'n/a'
        s0 = f'{startup[cores]:.2f}' if name.startswith('mingpt') else '-'
        print(f'| {name} | {cores} | {best[name]:.2f} | {per_core * cores:.2f} | {per_core:.2f} | {ratio} | {s0} |')


if __name__ == '__main__':
    main()
