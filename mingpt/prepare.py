"""
A corpus -> tokenized shards that training streams from disk (mingpt.data.shard_windows), on every core,
restartable.

    python -m mingpt.prepare INPUT... --out DIR [--tokenizer gpt2|DIR] [--shard-tokens N] [--val-tokens N]
    python -m mingpt.prepare --fetch tinyshakespeare warpeace --out DIR   # public corpora, downloaded once

    from mingpt.prepare import prepare
    meta = prepare(['books/', 'web.jsonl'], 'data/shards')

An INPUT is a text file (one document), a JSONL file (name ending in .jsonl: one document per line, its
"text" field, the shape FineWeb and OpenWebText come in), or a directory, whose files are read in sorted
order at any depth (hidden ones skipped). Each document is tokenized with GPT-2's BPE or the vocabulary in
--tokenizer DIR (e.g. from `python -m mingpt.bpe_train ... --special '<|endoftext|>'`), preceded by the
<|endoftext|> token as in GPT-2's and llm.c's data: it separates documents, and it is what a model is
prompted with to write one from scratch. Empty documents are skipped.

The stream of ids is cut into shards of --shard-tokens (the file format is in mingpt/data.py). --val-tokens
of it are the validation split (val_000000.bin, ...), taken from the whole corpus, not only its start (which
would be one input, or one part of an ordered one: a validation loss of the first book in a pile of books
and web pages says little about the rest). The input bytes are divided into val_regions equal parts; where
part k begins, the first task (see below) that starts there opens a region of val_tokens / val_regions
tokens for validation, the tokens that follow in the stream. So each input gives validation text in
proportion to its size, from evenly spaced places in it, deterministically: the same inputs and settings
give the same split. val_regions is val_tokens / MIN_VAL_REGION_TOKENS, at most VAL_REGIONS, so that a
region holds many windows of a model's context; regions whose places fall into one task merge into one.
Everything else is the training split (train_000000.bin, ...); a region starts and ends shards of both.
DIR also gets the tokenizer's files and meta.json: the tokenizer, the inputs, the tokens of each shard and
in all.

How, in the order it happens:
1. This process reads the inputs and cuts them into tasks of about TASK_BYTES (less for a corpus too small to
   have a few tasks per validation region, see task_size): a batch of JSONL lines, or
   a stretch of a text file that ends at a "safe cut" (mingpt/pretokenize.py), where tokenizing the
   stretches one at a time gives exactly the ids of the whole file.
2. --workers processes tokenize the tasks. Their results are taken back in task order, so the shards are
   the same whatever the number of workers; at most two tasks per worker are in flight, so memory stays
   bounded however large the corpus.
3. This process appends the ids to the current shard, writes each full shard atomically (a temporary file
   renamed into place), then meta.json, which lists the shards done and where the stream stands: (task,
   ids of it already in shards). The same command run again after a crash checks that the inputs,
   tokenizer and sizes are unchanged, keeps the shards listed and tokenizes only from that task on.
"""

import argparse
import json
import logging
import multiprocessing
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from mingpt.bpe import ENDOFTEXT
from mingpt.data import META_FILE, decode_text, read_shard_header, shard_dtype, write_shard
from mingpt.download import CORPORA, get_dataset
from mingpt.errors import ConfigError, DataError
from mingpt.hardware import cpu_count
from mingpt.metrics import PLAIN_PROGRESS_EVERY, duration
from mingpt.pretokenize import last_safe_cut
from mingpt.tokenizers import find_tokenizer, load_tokenizer, save_tokenizer
from mingpt.utils import atomic_write, log_to_stderr, run_script

logger = logging.getLogger(__name__)

META_VERSION = 2  # 2: validation regions across the corpus (1: the start of the stream)
TASK_BYTES = 1 << 20  # input bytes per task: sending it to a worker costs far less than tokenizing it
MIN_TASK_BYTES = 1 << 16  # ... or fewer, down to this, for a small corpus (task_size)
SHARD_TOKENS = 100_000_000  # llm.c's shard size: 200 MB of uint16 ids
VAL_TOKENS = 1 << 20  # the default validation split, for a corpus of more than ~40 MB ...
BYTES_PER_VAL_TOKEN = 40  # ... and below that one token per 40 input bytes: about a tenth of the tokens
VAL_REGIONS = 64  # the places across the corpus the validation split is taken from, at most ...
MIN_VAL_REGION_TOKENS = 8192  # ... and at least this many tokens each: windows of 1024 fit with room

# -----------------------------------------------------------------------------
# the inputs, cut into tasks

TEXT, JSONL = 'text', 'jsonl'  # the kinds of piece a task holds


def input_files(inputs, out=None):
    """ the files of inputs, in order: a file as given, a directory's files sorted by path (at any depth,
    hidden ones and the output directory out skipped) """
    out = Path(out).resolve() if out is not None else None
    files = []
    for given in map(Path, inputs):
        if given.is_file():
            files.append(given)
        elif given.is_dir():
            found = sorted(f for f in given.rglob('*') if f.is_file()
                           and not any(part.startswith('.') for part in f.relative_to(given).parts)
                           and (out is None or out not in f.resolve().parents))
            if not found:
                raise DataError(f'{given} is a directory with no files to read in it')
            files += found
        else:
            raise FileNotFoundError(f'{given}: no such file or directory')
    return files


def task_size(total_bytes, regions):
    """ input bytes per task: TASK_BYTES, or fewer for a small corpus, so that it has about four tasks per
    validation region: a region opens where a task starts """
    return min(TASK_BYTES, max(MIN_TASK_BYTES, total_bytes // (4 * regions)))


def text_stretches(path, task_bytes):
    """ (bytes, offset) stretches of the text file at path, about task_bytes each, every one but the last
    ending at a safe cut (a stretch grows until it holds one: a file without ASCII spaces is one stretch) """
    with open(path, 'rb') as f:
        carry, offset = b'', 0
        while True:
            block = f.read(task_bytes)
            data = carry + block
            cut = last_safe_cut(data, len(carry)) if block else len(data)
            if cut:
                yield data[:cut], offset
                data, offset = data[cut:], offset + cut
            if not block:
                return
            carry = data


def jsonl_lines(path):
    """ (line, line number) of the lines of a JSONL file, as bytes """
    with open(path, 'rb') as f:
        for lineno, line in enumerate(f, 1):
            yield line, lineno


def tasks(files, task_bytes):
    """ the corpus as tasks, in order: lists of pieces (kind, bytes, path, where) of about task_bytes in
    all. where is a JSONL line's number, or a text stretch's byte offset (0: a document starts there) """
    task, size = [], 0
    for path in files:
        if path.suffix == '.jsonl':
            pieces = ((JSONL, line, n) for line, n in jsonl_lines(path))
        else:
            pieces = ((TEXT, data, offset) for data, offset in text_stretches(path, task_bytes))
        for kind, data, where in pieces:
            task.append((kind, data, str(path), where))
            size += len(data)
            if size >= task_bytes:
                yield task
                task, size = [], 0
    if task:
        yield task

# -----------------------------------------------------------------------------
# tokenizing a task (in a worker process)


def json_text(line, path, lineno):
    """ the "text" field of one JSONL line, or a DataError naming the line """
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise DataError(f'{path}:{lineno} is not valid JSON ({e}); a JSONL input holds one '
                        f'{{"text": "..."}} object per line') from None
    text = record.get('text') if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f'{path}:{lineno} has no "text" string; a JSONL input holds one {{"text": "..."}} '
                        f'object per line')
    return text


def tokenize_task(task, tokenizer):
    """ ((N,) ids of the task with <|endoftext|> before each document, documents in it) """
    eot = tokenizer.special_tokens[ENDOFTEXT]
    ids, documents = [], 0
    for kind, data, path, where in task:
        if kind == JSONL and not data.strip():
            continue  # a blank line
        text = json_text(data, path, where) if kind == JSONL else decode_text(data, path, where)
        if kind == JSONL or where == 0:  # a document starts
            if not text:
                continue
            ids.append(eot)
            documents += 1
        ids += tokenizer.encode(text)
    return np.array(ids, dtype=shard_dtype(tokenizer.n_vocab)), documents


_worker_tokenizer = None  # a worker process's tokenizer, loaded once by _start_worker


def _start_worker(tokenizer_dir):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _tokenize_in_worker(task):
    return tokenize_task(task, _worker_tokenizer)


def tokenized(numbered_tasks, tokenizer, tokenizer_dir, workers):
    """ (index, input bytes, ids, documents) of each (index, task), in order; in `workers` processes (this
    one when 1), which inherit the tokenizer when forked, else load it from tokenizer_dir """
    if workers == 1:
        for i, task in numbered_tasks:
            yield (i, sum(len(p[1]) for p in task), *tokenize_task(task, tokenizer))
        return
    global _worker_tokenizer
    context = multiprocessing.get_context()
    forked = context.get_start_method() == 'fork'
    _worker_tokenizer = tokenizer if forked else None
    try:
        with context.Pool(workers, None if forked else _start_worker, (str(tokenizer_dir),)) as pool:
            in_flight = deque()
            for i, task in numbered_tasks:
                in_flight.append((i, sum(len(p[1]) for p in task), pool.apply_async(_tokenize_in_worker, (task,))))
                while len(in_flight) >= 2 * workers or (in_flight and in_flight[0][2].ready()):
                    i0, n_bytes, result = in_flight.popleft()
                    yield (i0, n_bytes, *result.get())
            for i0, n_bytes, result in in_flight:
                yield (i0, n_bytes, *result.get())
    finally:
        _worker_tokenizer = None

# -----------------------------------------------------------------------------
# the shards, and meta.json


def val_regions(val_tokens):
    """ how many places across the corpus the validation split of val_tokens is taken from """
    return max(1, min(VAL_REGIONS, val_tokens // MIN_VAL_REGION_TOKENS))


class ShardWriter:
    """
    The stream of ids -> shards of shard_tokens: val_*.bin for the ids in a validation region, train_*.bin
    for the rest. After each shard, meta.json records it and where the stream continues, meta['next'] =
    {task, offset}: the first id not yet in a shard is id `offset` of task `task`'s ids.

    Which split an id goes to is a function of what meta.json records, so a restart continues exactly:
    the validation tokens due once a task starting at input byte b is reached (val_due), against the
    validation tokens in shards so far.
    """

    def __init__(self, out, meta):
        self.out, self.meta = out, meta
        self.buf = np.empty(meta['shard_tokens'], dtype=meta['dtype'])  # the shard being filled
        self.fill = 0
        self.split = None  # the split of the ids in buf

    def val_due(self, start_byte):
        """ validation tokens due when the stream reaches a task that starts at input byte start_byte: those
        of every region whose place (k / val_regions of the input bytes, k = 0, 1, ...) is at or before it """
        meta = self.meta
        regions, total_bytes = meta['val_regions'], max(1, sum(f['bytes'] for f in meta['inputs']))
        opened = min(regions, start_byte * regions // total_bytes + 1)
        return meta['val_tokens'] * opened // regions

    def tokens(self, split):
        """ ids of split in shards and in buf """
        return self.meta['tokens'][split] + (self.fill if self.split == split else 0)

    def add(self, ids, task, offset, start_byte):
        """ append ids, the ids of task `task` from id `offset` on; the task starts at input byte start_byte """
        shard_tokens, val_due = self.meta['shard_tokens'], self.val_due(start_byte)
        while len(ids):
            val_left = val_due - self.tokens('val')
            split = 'val' if val_left > 0 else 'train'
            if self.fill and split != self.split:  # a region starts or ends: so does a shard
                self.flush(task, offset)
            self.split = split
            room = shard_tokens - self.fill
            if split == 'val':
                room = min(room, val_left)
            take = ids[:room]
            self.buf[self.fill:self.fill + len(take)] = take
            self.fill, offset, ids = self.fill + len(take), offset + len(take), ids[room:]
            if self.fill == shard_tokens:
                self.flush(task, offset)

    def flush(self, task, offset):
        """ write the shard filled so far (if any ids), then meta.json, saying the stream continues at (task, offset) """
        meta = self.meta
        if self.fill:
            split = self.split
            name = f"{split}_{sum(s['split'] == split for s in meta['shards']):06d}.bin"
            write_shard(self.out / name, self.buf[:self.fill], meta['vocab_size'])
            meta['shards'].append({'file': name, 'split': split, 'tokens': self.fill})
            meta['tokens'][split] += self.fill
            meta['tokens']['total'] += self.fill
            self.fill = 0
        meta['next'] = {'task': task, 'offset': offset}
        atomic_write(self.out / META_FILE, json.dumps(meta, indent=1) + '\n')


def fresh_meta(settings):
    return {'version': META_VERSION, 'complete': False, **settings, 'documents': 0, 'bytes': 0,
            'tokens': {'train': 0, 'val': 0, 'total': 0}, 'shards': [], 'next': {'task': 0, 'offset': 0}}


def resumed_meta(out, settings, tokenizer):
    """ the meta.json of an earlier run into out with these settings and tokenizer, its shards checked;
    None if there is none; a DataError if there is one of another corpus, or a damaged shard """
    try:
        meta = json.loads((out / META_FILE).read_text(encoding='utf-8'))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = {}
    theirs = find_tokenizer(out)
    same_tokenizer = (theirs is not None and getattr(theirs, 'encoder', None) == tokenizer.encoder
                      and theirs.merges() == tokenizer.merges())
    changed = ([] if meta.get('version') == META_VERSION else ['format version'])
    changed += [k for k in settings if meta.get(k) != settings[k]] + ([] if same_tokenizer else ['tokenizer'])
    if changed:
        raise DataError(f'{out} holds shards of another corpus or other settings ({", ".join(changed)} '
                        f'differ); give another --out, or delete {out} to prepare it afresh')
    for shard in meta['shards']:
        try:
            read_shard_header(out / shard['file'])
        except (OSError, DataError) as e:
            raise DataError(f'{e} (a finished shard of {out} was removed or damaged): delete {out} and run '
                            f'the prepare command again') from None
    return meta

# -----------------------------------------------------------------------------
# what a person watching sees


class Progress:
    """ a tqdm bar over the input bytes (MB/s) with documents/s and tokens/s; when stderr is not a terminal
    (bar False), a log line about every PLAIN_PROGRESS_EVERY seconds instead """

    def __init__(self, total_bytes, done_bytes, bar):
        self.total, self.done, self.t_start = total_bytes, done_bytes, time.monotonic()
        self.t_line, self.bytes, self.documents, self.tokens = self.t_start, 0, 0, 0  # this run's work
        self.bar = None
        if bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, initial=done_bytes, unit='B', unit_scale=True, desc='prepare',
                            dynamic_ncols=True)

    def update(self, n_bytes, documents, tokens):
        self.bytes, self.documents, self.tokens = self.bytes + n_bytes, self.documents + documents, self.tokens + tokens
        seconds = max(time.monotonic() - self.t_start, 1e-9)
        rates = f'{self.documents / seconds:,.0f} docs/s, {self.tokens / seconds:,.0f} tokens/s'
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
            self.bar.update(n_bytes)
        elif time.monotonic() - self.t_line >= PLAIN_PROGRESS_EVERY:
            self.t_line = time.monotonic()
            done = self.done + self.bytes
            eta = duration((self.total - done) * seconds / max(self.bytes, 1))
            logger.info('%.1f/%.1f MB, %.2f MB/s, %s, ETA %s', done / 1e6, self.total / 1e6,
                        self.bytes / seconds / 1e6, rates, eta)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.t_start

# -----------------------------------------------------------------------------
# the whole


def prepare(inputs, out, tokenizer='gpt2', shard_tokens=SHARD_TOKENS, val_tokens=None, workers=None,
            progress=None):
    """
    Tokenize the inputs (text files, .jsonl files, directories of them) into shards in the directory out,
    or finish what an interrupted call with the same arguments started; returns the final meta.json as a
    dict. tokenizer: 'gpt2' or a directory with a BPE vocabulary that has <|endoftext|>. val_tokens: the
    ids held out for validation, from val_regions places across the corpus (None: 2^20, or one per 40 input
    bytes if that is fewer).
    workers: processes that tokenize (None: every core). progress: the tqdm bar (None: on a terminal).
    """
    for name, value, low in (('shard_tokens', shard_tokens, 1), ('val_tokens', val_tokens, 0), ('workers', workers, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f'{name}={value!r} cannot work: give an integer >= {low}')
    out = Path(out)
    files = input_files(inputs, out)
    tok = load_tokenizer(tokenizer)
    if ENDOFTEXT not in getattr(tok, 'special_tokens', {}):
        raise ConfigError(f'the tokenizer {tokenizer} has no {ENDOFTEXT} token to put between documents; train '
                          f"one that has: python -m mingpt.bpe_train ... --special '{ENDOFTEXT}'")
    inputs_meta = [{'path': str(f.resolve()), 'bytes': f.stat().st_size, 'mtime_ns': f.stat().st_mtime_ns}
                   for f in files]
    total_bytes = sum(f['bytes'] for f in inputs_meta)
    if val_tokens is None:
        val_tokens = min(VAL_TOKENS, total_bytes // BYTES_PER_VAL_TOKEN)
    settings = {'tokenizer': str(tokenizer) if str(tokenizer) == 'gpt2' else str(Path(tokenizer).resolve()),
                'vocab_size': tok.n_vocab, 'eot': tok.special_tokens[ENDOFTEXT],
                'dtype': shard_dtype(tok.n_vocab).name, 'shard_tokens': shard_tokens, 'val_tokens': val_tokens,
                'val_regions': val_regions(val_tokens), 'inputs': inputs_meta}
    settings['task_bytes'] = task_size(total_bytes, settings['val_regions'])

    out.mkdir(parents=True, exist_ok=True)
    meta = resumed_meta(out, settings, tok)
    if meta is not None and meta['complete']:
        logger.info('%s is already prepared: %d shards, %d tokens', out, len(meta['shards']), meta['tokens']['total'])
        return meta
    if meta is None:
        save_tokenizer(tok, out)  # before meta.json: a restart compares the tokenizer with this copy
        meta = fresh_meta(settings)
    else:
        logger.info('carrying on in %s: %d shards done, from task %d', out, len(meta['shards']), meta['next']['task'])
    for tmp in out.glob('*.tmp'):  # what a crash mid-write left; no name of a finished file
        tmp.unlink()

    workers = workers or cpu_count()
    start, skip = meta['next']['task'], meta['next']['offset']
    writer = ShardWriter(out, meta)
    bar = Progress(total_bytes, meta['bytes'], sys.stderr.isatty() if progress is None else progress)
    n_tasks = start
    try:
        numbered = ((i, task) for i, task in enumerate(tasks(files, meta['task_bytes'])) if i >= start)
        for i, n_bytes, ids, documents in tokenized(numbered, tok, out, workers):
            offset = skip if i == start else 0  # ids of the task already in shards
            writer.add(ids[offset:], i, offset, meta['bytes'])  # meta['bytes']: the input bytes before task i
            meta['documents'] += documents
            meta['bytes'] += n_bytes
            bar.update(n_bytes, documents, len(ids) - offset)
            n_tasks = i + 1
    finally:
        seconds = bar.close()
    if not writer.tokens('train'):
        raise DataError(f"the inputs hold only {writer.tokens('val'):,} tokens, all taken by the validation "
                        f'split (val_tokens={val_tokens:,}); give more text or a smaller --val-tokens')
    meta['complete'] = True
    writer.flush(n_tasks, 0)
    logger.info('%s: %d documents, %.1f MB -> %d tokens (%d validation) in %d shards, %.2f MB/s with %d workers (%s)',
                out, meta['documents'], meta['bytes'] / 1e6, meta['tokens']['total'], meta['tokens']['val'],
                len(meta['shards']), bar.bytes / max(seconds, 1e-9) / 1e6, workers, duration(seconds))
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.prepare', description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('inputs', nargs='*', metavar='INPUT', help='text files, .jsonl files, or directories of them')
    parser.add_argument('--fetch', nargs='+', default=[], metavar='NAME', choices=CORPORA, help='public '
                        f'corpora to add before the INPUTs, downloaded once into the mingpt cache: {", ".join(CORPORA)}')
    parser.add_argument('--out', required=True, help='directory for the shards and meta.json')
    parser.add_argument('--tokenizer', default='gpt2', help="'gpt2' (default) or a directory with encoder.json + "
                        "vocab.bpe that has <|endoftext|>, e.g. from python -m mingpt.bpe_train")
    parser.add_argument('--shard-tokens', type=int, default=SHARD_TOKENS, help=f'ids per shard (default {SHARD_TOKENS:,})')
    parser.add_argument('--val-tokens', type=int, default=None, help='ids held out for validation, from up to '
                        f'{VAL_REGIONS} places across the corpus (default {VAL_TOKENS:,}, or one per {BYTES_PER_VAL_TOKEN} input bytes if fewer)')
    parser.add_argument('--workers', type=int, default=None, help='tokenizing processes (default: every core)')
    args = parser.parse_args(argv)
    if not args.inputs and not args.fetch:
        parser.error('give the INPUTs to tokenize, or --fetch NAME...')
    log_to_stderr()
    inputs = [get_dataset(name) for name in args.fetch] + args.inputs
    meta = prepare(inputs, args.out, args.tokenizer, args.shard_tokens, args.val_tokens, args.workers)
    n = {split: sum(s['split'] == split for s in meta['shards']) for split in ('train', 'val')}
    print(f"{meta['documents']:,} documents -> {meta['tokens']['train']:,} training tokens in {n['train']} shards, "
          f"{meta['tokens']['val']:,} validation tokens in {n['val']}; {Path(args.out) / META_FILE}")


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
