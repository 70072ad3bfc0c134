"""
Tokenizer throughput: mingpt's GPT-2 BPE (Python and numpy) against tiktoken (Rust), on 1 MB of English.

    python bench/tokenizer.py [--mb 1] [--repeats 5] [--file path/to/text.txt]

Prints a markdown table. The text is War and Peace from ../shared/data when that exists, else tiny
shakespeare through mingpt's own download code. Rows:
- mingpt encode, cold: one pass over the text with an empty piece cache, i.e. what encoding a new
  corpus costs (the cache fills during the pass). This is the number to compare with tiktoken.
- mingpt encode, warm: the same text again, every piece already cached.
- tiktoken encode_ordinary: the reference.
Each row is the best of --repeats runs (runs are interleaved, so load on the machine hits all rows alike).
More rows (e.g. training a vocabulary) plug in as further entries of the `tasks` list in main().

Then a table of one long pre-token each, cold, best of 3 runs at most (BPE on a piece is O(n log n) in
its length): 300 KB of CJK ideographs with no space or punctuation, and a run of 300,000 'a's (every pair
ties with every other).

Two more tables (skip them with --no-train):
- training a vocabulary: mingpt.bpe_train.train_bpe (pure Python) against Hugging Face's `tokenizers`
  BpeTrainer (Rust), --train-vocab tokens (default 4096) on the same text; best of --train-repeats runs.
- compression: bytes per token of vocabularies trained on the first 90% of tiny shakespeare (4096 and 8192
  tokens) against GPT-2's 50257, on held-out text: the last 10% of tiny shakespeare (in domain), and War and
  Peace and WikiText-2 valid (out of domain).
"""

import argparse
import os
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from mingpt.bpe import get_encoder  # noqa: E402
from mingpt.bpe_train import train_bpe  # noqa: E402


def load_text(path, n_bytes):
    """The first n_bytes of a UTF-8 file (cut back to a character boundary), and where it came from."""
    if path is None:
        path = SHARED_DATA / 'warpeace.txt'
        if not path.is_file():
            from mingpt.download import get_tiny_shakespeare
            path = get_tiny_shakespeare()
    path = Path(path)
    data = path.read_bytes()[:n_bytes]
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


def long_piece_table(enc, tik, repeats):
    """Seconds to encode one long pre-token from a cold cache, mingpt against tiktoken (if installed); also
    mingpt's CPU seconds, which other work on the machine inflates less than the wall clock."""
    ideographs = random.Random(0).choices(range(0x4E00, 0x9FA6), k=100_000)
    texts = [('300 KB of CJK ideographs', ''.join(map(chr, ideographs))), ("300,000 x 'a'", 'a' * 300_000)]
    print(f'\nOne long pre-token, from a cold cache; best of {repeats}, load average {os.getloadavg()[0]:.1f}\n')
    print('| text | mingpt seconds | mingpt CPU seconds | tiktoken seconds |')
    print('|---|---:|---:|---:|')
    for label, text in texts:
        assert len(enc.pretokenize(text)) == 1
        if tik and enc.encode(text) != tik.encode_ordinary(text):
            sys.exit(f'mingpt and tiktoken disagree on {label}; not benchmarking a wrong tokenizer')
        wall, cpu, tik_wall = float('inf'), float('inf'), float('inf')
        for _ in range(repeats):
            enc.clear_cache()
            t0, c0 = time.perf_counter(), time.process_time()
            enc.encode(text)
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
            if tik:
                t0 = time.perf_counter()
                tik.encode_ordinary(text)
                tik_wall = min(tik_wall, time.perf_counter() - t0)
        print(f'| {label} | {wall:.3f} | {cpu:.3f} | ' + (f'{tik_wall:.3f} |' if tik else 'n/a |'))


def training_table(text, vocab_size, repeats):
    """Seconds to train a vocab_size vocabulary on text: mingpt against HF tokenizers (if installed)."""
    n_bytes = len(text.encode('utf-8'))
    tasks = [(f'mingpt bpe_train.train_bpe (Python), vocab {vocab_size}', lambda: train_bpe(text, vocab_size))]
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        def hf_train():
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
                vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tasks.append((f'HF tokenizers BpeTrainer (Rust), vocab {vocab_size}', hf_train))
    except ImportError:
        print('(tokenizers not installed: no Hugging Face row)\n')
    best = {name: float('inf') for name, _ in tasks}
    for _ in range(repeats):
        for name, fn in tasks:
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f'\nTraining a byte-level BPE vocabulary on the same {n_bytes:,} bytes; best of {repeats}, '
          f'load average {os.getloadavg()[0]:.1f}\n')
    print('| trainer | seconds | MB/s |')
    print('|---|---:|---:|')
    for name, _ in tasks:
        print(f'| {name} | {best[name]:.2f} | {n_bytes / best[name] / 1e6:.2f} |')


def compression_table(gpt2):
    """Bytes per token on held-out text: vocabularies trained on tiny shakespeare's first 90% vs GPT-2's."""
    shakespeare = SHARED_DATA / 'tinyshakespeare.txt'
    if not shakespeare.is_file():
        from mingpt.download import get_tiny_shakespeare
        shakespeare = get_tiny_shakespeare()
    text = shakespeare.read_text(encoding='utf-8')
    n = int(len(text) * 0.9)
    columns = [('GPT-2 (50257)', gpt2)]
    for vocab_size in (4096, 8192):
        t0 = time.perf_counter()
        vocab = train_bpe(text[:n], vocab_size)
        columns.append((f'ours {vocab_size} ({time.perf_counter() - t0:.0f}s to train)', vocab.to_encoder()))
    held_out = [('tiny shakespeare, last 10% (in domain)', text[n:])]
    for name, label in (('warpeace.txt', 'War and Peace (out of domain)'),
                        ('wikitext-2/valid.txt', 'WikiText-2 valid (out of domain)')):
        if (SHARED_DATA / name).is_file():
            held_out.append((label, (SHARED_DATA / name).read_text(encoding='utf-8')))
    print('\nCompression: UTF-8 bytes per token (higher is better) of vocabularies trained on the first 90% of '
          'tiny shakespeare, against GPT-2\'s\n')
    print('| held-out text | bytes | ' + ' | '.join(name for name, _ in columns) + ' |')
    print('|---|---:|' + '---:|' * len(columns))
    for label, t in held_out:
        n_bytes = len(t.encode('utf-8'))
        cells = [f'{n_bytes / len(enc.encode(t)):.2f}' for _, enc in columns]
        print(f'| {label} | {n_bytes:,} | ' + ' | '.join(cells) + ' |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mb', type=float, default=1.0, help='megabytes (10^6 bytes) of text to encode')
    parser.add_argument('--repeats', type=int, default=5, help='runs per row; the best is reported')
    parser.add_argument('--file', default=None, help='text file to encode (default: War and Peace)')
    parser.add_argument('--train-vocab', type=int, default=4096, help='vocabulary size of the training rows')
    parser.add_argument('--train-repeats', type=int, default=2, help='runs per training row; the best is reported')
    parser.add_argument('--no-train', action='store_true', help='skip the training and compression tables')
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
    long_piece_table(enc, tik, min(args.repeats, 3))

    if not args.no_train:
        training_table(text, args.train_vocab, args.train_repeats)
        compression_table(enc)


if __name__ == '__main__':
    main()
