"""
Tokenizer throughput: mingpt's pure-Python GPT-2 BPE against tiktoken (Rust), on 1 MB of English.

    python bench/tokenizer.py [--mb 1] [--repeats 5] [--file path/to/text.txt]

Prints a markdown table. The text is War and Peace from ../shared/data when that exists, else tiny
shakespeare through mingpt's own download code. Rows:
- mingpt encode, cold: one pass over the text with an empty piece cache, i.e. what encoding a new
  corpus costs (the cache fills during the pass). This is the number to compare with tiktoken.
- mingpt encode, warm: the same text again, every piece already cached.
- tiktoken encode_ordinary: the reference.
Each row is the best of --repeats runs (runs are interleaved, so load on the machine hits all rows alike).
More rows (e.g. training a vocabulary) plug in as further entries of the `tasks` list in main().
"""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from mingpt.bpe import get_encoder  # noqa: E402


def load_text(path, n_bytes):
    """The first n_bytes of a UTF-8 file (cut back to a character boundary), and where it came from."""
    if path is None:
        path = SHARED_DATA / 'warpeace.txt'
        if not path.is_file():
            from mingpt.download import get_tiny_shakespeare
            path = get_tiny_shakespeare()
    data = Path(path).read_bytes()[:n_bytes]
    return data.decode('utf-8', errors='ignore'), path


def get_tiktoken():
    """tiktoken's gpt2 encoding, or None if tiktoken or its vocabulary files are not available."""
    cache = SHARED_DATA / 'tiktoken_cache'
    if cache.is_dir():
        os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(cache))
    try:
        import tiktoken
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # not installed, or no network to fetch its files
        print(f'(tiktoken unavailable: {e})\n')
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mb', type=float, default=1.0, help='megabytes (10^6 bytes) of text to encode')
    parser.add_argument('--repeats', type=int, default=5, help='runs per row; the best is reported')
    parser.add_argument('--file', default=None, help='text file to encode (default: War and Peace)')
    args = parser.parse_args()

    print('command: `' + ' '.join(['python'] + [shlex.quote(a) for a in sys.argv]) + '`\n')
    text, path = load_text(args.file, int(args.mb * 1e6))
    n_bytes = len(text.encode('utf-8'))
    # the GPT-2 vocabulary from ../shared/data when present (no network), else mingpt's cache / download
    enc = get_encoder(SHARED_DATA if (SHARED_DATA / 'encoder.json').is_file() else None)
    tik = get_tiktoken()
    reference = tik.encode_ordinary(text) if tik else None
    if reference is not None and enc.encode(text) != reference:
        sys.exit('mingpt and tiktoken disagree on this text; not benchmarking a wrong tokenizer')

    # (name, function to time, setup run untimed before each run or None)
    tasks = [
        ('mingpt encode, cold (one pass, cache fills)', lambda: enc.encode(text), enc.clear_cache),
        ('mingpt encode, warm (cache full)', lambda: enc.encode(text), None),
    ]
    if tik:
        tasks.append(('tiktoken encode_ordinary', lambda: tik.encode_ordinary(text), None))
    best = {name: float('inf') for name, _, _ in tasks}
    for _ in range(args.repeats):
        for name, fn, setup in tasks:
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    tik_time = best.get('tiktoken encode_ordinary')
    print(f'text: {n_bytes:,} bytes of {path.name}, {len(reference or enc.encode(text)):,} tokens; '
          f'best of {args.repeats}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, '
          f'load average {os.getloadavg()[0]:.1f} (other work on the machine slows pure Python the most)\n')
    print('| tokenizer | seconds | MB/s | vs tiktoken |')
    print('|---|---:|---:|---:|')
    for name, _, _ in tasks:
        seconds = best[name]
        ratio = f'{tik_time / seconds:.2f}x' if tik_time else 'n/a'
        print(f'| {name} | {seconds:.3f} | {n_bytes / seconds / 1e6:.2f} | {ratio} |')


if __name__ == '__main__':
    main()
