"""
Text in, training examples out: what a script that trains a GPT needs between its data and the Trainer,
for a text file held in memory and for a corpus tokenized into shards on disk (by mingpt/prepare.py).

    text = training_text(path)                              # path, else ./input.txt, else tiny shakespeare
    ids = torch.tensor(tokenizer.encode(text))              # (N,) token ids
    train_dataset, val_dataset = split_windows(ids, block_size=128, val_fraction=0.1)

    train_dataset, val_dataset = shard_windows('data/shards', block_size=1024)  # python -m mingpt.prepare

A language-model example is a window of block_size + 1 consecutive tokens: x is its first block_size,
y the same shifted by one, so every position predicts the next token. The validation split of a text is
its END (nanoGPT's 90/10), not a random sample of windows, which would overlap the training ones; prepare
sets a corpus's validation tokens apart in shards of their own.

A token shard is a file of token ids behind a 32-byte little-endian header, so that a file that is not a
shard, or one cut short, is an error rather than garbage tokens:

    magic b'MGPTSHRD' | version u32 | bytes per token u32 (2: uint16, 4: uint32) | tokens u64 | vocab_size u64

A directory of shards has a meta.json listing them (see mingpt/prepare.py); ShardWindows memory-maps them.
"""

import hashlib
import json
import logging
import numbers
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mingpt.errors import ConfigError, DataError, MissingFileError
from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)


def read_text_file(path) -> str:
    """A UTF-8 text file, or an error that says why it cannot be trained (or evaluated) on."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f'{path} is a directory, not a file; give the path of a text file')
    if not path.is_file():
        raise MissingFileError(f'{path}: no such file')
    data = path.read_bytes()
    if not data:
        raise DataError(f'{path} is empty; give a file with some text in it')
    return decode_text(data, path)


def decode_text(data: bytes, where, offset=0) -> str:
    """data, the bytes of the file `where` from byte `offset` on, as text; a DataError if it is not UTF-8 text."""
    if b'\x00' in data:
        raise DataError(f'{where} contains NUL bytes (at byte {offset + data.index(0)}), so it is binary, not '
                        f'text; give a UTF-8 text file')
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise DataError(f'{where} is not valid UTF-8 (bad byte at offset {offset + e.start}); convert it to '
                        f'UTF-8 first, e.g. iconv -f latin1 -t utf-8') from None


def training_text_path(path=None):
    """
    The file to train on: path; else input.txt in the working directory (minGPT's chargpt
    convention); else tiny shakespeare, downloaded once into the mingpt cache (a DownloadError when
    that fails, e.g. offline, that says to give a file).
    """
    if path is None and os.path.isfile('input.txt'):
        path = 'input.txt'
    if path is None:
        from mingpt.download import DownloadError, get_tiny_shakespeare  # only this case needs them
        try:
            path = get_tiny_shakespeare()
        except DownloadError as e:
            raise DownloadError(f"no text file was given and there is no input.txt here, so tiny "
                                f"shakespeare was to be downloaded, which failed:\n{e}\nGive the path "
                                f"of a text file to train on (the projects' --data.path=...).") from e
    logger.info("training on %s", path)
    return path


def training_text(path=None) -> str:
    """ the text of training_text_path(path) """
    return read_text_file(training_text_path(path))


class TokenWindows(Dataset):
    """ every window of block_size + 1 tokens of ids (N,): item i is (ids[i:i+T], ids[i+1:i+T+1]) """

    def __init__(self, ids, block_size, vocab_size=None):
        if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigError(f"block_size={block_size!r} cannot work: it must be an int >= 1, the "
                              "length of a training window in tokens")
        if len(ids) <= block_size:
            raise ConfigError(f"{len(ids)} tokens are too few for windows of block_size={block_size}; "
                              "use more text or a smaller block_size")
        self.ids = ids  # (N,) LongTensor
        self.block_size = block_size
        self.vocab_size = vocab_size

    # minGPT's dataset interface, from which its scripts size the model
    def get_vocab_size(self):
        return self.vocab_size

    def get_block_size(self):
        return self.block_size

    def __len__(self):
        return len(self.ids) - self.block_size

    def __getitem__(self, idx):
        chunk = self.ids[idx:idx + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def split_windows(ids, block_size, val_fraction=0.1, vocab_size=None):
    """ (train, val) TokenWindows over the first 1 - val_fraction of ids (N,) and the rest (val None if 0) """
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise ConfigError(f"val_fraction={val_fraction!r} cannot work: it must be in [0, 1), the fraction of "
                          "the tokens (at the end) kept for validation, e.g. 0.1")
    n_val = int(len(ids) * val_fraction)
    train = TokenWindows(ids[:len(ids) - n_val], block_size, vocab_size)
    return train, (TokenWindows(ids[len(ids) - n_val:], block_size, vocab_size) if n_val else None)

# -----------------------------------------------------------------------------
# token shards

SHARD_MAGIC = b'MGPTSHRD'
SHARD_VERSION = 1
SHARD_HEADER = struct.Struct('<8sIIQQ')  # magic, version, bytes per token, tokens, vocab_size: 32 bytes
META_FILE = 'meta.json'  # a shard directory's list of shards, written by mingpt/prepare.py
FINGERPRINT_BYTES = 4096  # of each end of a shard, in its fingerprint


def shard_dtype(vocab_size):
    """ the dtype of a shard's ids: uint16 when every id fits (GPT-2's 50257 tokens do), else uint32 """
    return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<u4')


def write_shard(path, ids, vocab_size):
    """ write ids, (N,) of shard_dtype(vocab_size), as a shard at path; atomically, so a crash mid-write
    leaves no file there that could pass for a finished shard """
    ids = np.asarray(ids)
    assert ids.ndim == 1 and ids.dtype == shard_dtype(vocab_size), (ids.shape, ids.dtype, vocab_size)

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, ids.dtype.itemsize, len(ids), vocab_size))
            ids.tofile(f)
    return atomic_write(path, write)


def read_shard_header(path):
    """ (tokens, dtype, vocab_size) of the shard at path, once its header and length are checked """
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(SHARD_HEADER.size)
    if len(head) < SHARD_HEADER.size or not head.startswith(SHARD_MAGIC):
        raise DataError(f'{path} is not a token shard (it does not start with {SHARD_MAGIC.decode()}); give '
                        f'the shards that python -m mingpt.prepare wrote')
    _, version, itemsize, n, vocab_size = SHARD_HEADER.unpack(head)
    if version != SHARD_VERSION:
        raise DataError(f'{path} is a token shard of format version {version}; this mingpt reads version '
                        f'{SHARD_VERSION}: prepare the corpus again with it')
    if itemsize not in (2, 4):
        raise DataError(f'{path} has a corrupt header ({itemsize} bytes per token); prepare the corpus again')
    expected = SHARD_HEADER.size + n * itemsize
    if size != expected:
        what = 'cut short' if size < expected else 'longer than its header says'
        raise DataError(f'{path} is {what}: its {n:,} tokens take {expected:,} bytes, the file has {size:,}; '
                        f'run the prepare command again to rewrite it')
    return n, np.dtype(f'<u{itemsize}'), vocab_size


def open_shard(path):
    """ the ids of the shard at path, (N,) uint16 or uint32, memory-mapped read-only (nothing is loaded) """
    n, dtype, _ = read_shard_header(path)
    if n == 0:
        return np.empty(0, dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode='r', offset=SHARD_HEADER.size, shape=(n,))


def read_meta(directory):
    """ the meta.json of a shard directory that prepare finished; a DataError saying what to do otherwise """
    d = Path(directory)
    try:
        meta = json.loads((d / META_FILE).read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise DataError(f'{d} has no {META_FILE}, so it is not a directory of token shards; make one with '
                        f'python -m mingpt.prepare INPUT... --out {d}') from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f'{d / META_FILE} is corrupt ({e}); run the prepare command again') from None
    if not meta.get('complete'):
        raise DataError(f'{d} is not fully prepared (prepare stopped before the end): run the same '
                        f'python -m mingpt.prepare command again, it carries on where it stopped')
    return meta


def shard_windows(directory, block_size):
    """ (train, val) ShardWindows over the shards prepare wrote in directory (val None if it wrote none) """
    meta = read_meta(directory)
    paths = {split: [Path(directory) / s['file'] for s in meta['shards'] if s['split'] == split]
             for split in ('train', 'val')}
    train = ShardWindows(paths['train'], block_size)
    return train, (ShardWindows(paths['val'], block_size) if paths['val'] else None)


def shard_fingerprint(paths):
    """
    A hex digest that changes when a shard set does: each shard's name, token count, vocabulary size and
    its first and last FINGERPRINT_BYTES. Two prepare runs on the same inputs and settings write the same
    shards, and so the same fingerprint; reading a few pages per shard keeps it instant at any corpus size.
    """
    h = hashlib.sha256()
    for path in map(Path, paths):
        n, dtype, vocab_size = read_shard_header(path)
        h.update(f'{path.name}\0{n}\0{dtype.itemsize}\0{vocab_size}\0'.encode())
        size = SHARD_HEADER.size + n * dtype.itemsize
        with open(path, 'rb') as f:
            f.seek(SHARD_HEADER.size)
            h.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(SHARD_HEADER.size, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()[:16]


class ShardWindows(Dataset):
    """
    Every window of block_size + 1 tokens inside each of the token shards at paths: item i is (x, y),
    two (block_size,) LongTensors, as for TokenWindows. Windows stay inside a shard, so a shard of n
    tokens holds n - block_size of them, and item i is in the first shard whose running total of
    windows passes i.

    Memory stays flat however large the corpus: each shard is a read-only np.memmap, opened when first
    read, so an item costs the pages of its window (page cache the OS can drop), never a copy of a shard.

    Its place in the data is no state of its own, and an exact resume needs none: the dataset is
    map-style, so a batch is whatever indices the sampler asks for, and the Trainer's GlobalBatchSampler
    draws the indices of iteration `it` from (data_seed, it) alone, both kept in the checkpoint. A run
    resumed at iteration k reads exactly the windows the uninterrupted run read from k on, given the same
    shards (prepare writes the same shards from the same inputs). Under DDP, rank r takes its own slices
    of each global batch, so the ranks read different windows that together make the one global batch.

    "Given the same shards" is what state_dict() records: the fingerprint of the shard set (fingerprint)
    and the windows it makes. A run that saved it next to its checkpoint hands it to load_state_dict()
    when it resumes, which refuses other shards (another corpus, other prepare settings, a shard
    rewritten): an index into them would be a window of other data, a resume that is silently not one.
    """

    def __init__(self, paths, block_size, vocab_size=None):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError('no token shards to read: give at least one shard file')
        headers = [read_shard_header(p) for p in self.paths]
        vocab_sizes = sorted({v for _, _, v in headers})
        if len(vocab_sizes) > 1:
            raise DataError(f'the shards come from tokenizers of different sizes ({vocab_sizes}); give the '
                            f'shards of one prepare run')
        windows = np.array([max(0, n - block_size) for n, _, _ in headers], dtype=np.int64)
        if windows.sum() == 0:
            raise DataError(f'the shards hold too few tokens for windows of block_size={block_size} (the largest '
                            f'has {max(n for n, _, _ in headers)}); use more text or a smaller block_size')
        self.block_size = block_size
        self.vocab_size = vocab_sizes[0] if vocab_size is None else vocab_size
        self.tokens = sum(n for n, _, _ in headers)
        self.ends = np.cumsum(windows)  # (S,) windows in shards 0..s
        self._maps = {}  # shard index -> its memmap, opened on first read
        self.fingerprint = shard_fingerprint(self.paths)

    # minGPT's dataset interface, from which its scripts size the model
    def get_vocab_size(self):
        return self.vocab_size

    def get_block_size(self):
        return self.block_size

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, idx):
        if not 0 <= idx < len(self):
            raise IndexError(f'window {idx} of {len(self)}')
        s = int(np.searchsorted(self.ends, idx, side='right'))
        start = int(idx - (self.ends[s - 1] if s else 0))
        shard = self._maps.get(s)
        if shard is None:
            shard = self._maps[s] = open_shard(self.paths[s])
        chunk = torch.from_numpy(shard[start:start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def state_dict(self):
        """ what a resumed run must find again: the shard set (its fingerprint) and the windows it makes """
        return {'shards': self.fingerprint, 'files': len(self.paths), 'tokens': self.tokens,
                'block_size': self.block_size, 'windows': len(self)}

    def load_state_dict(self, state):
        """ check that state, the state_dict() of the run being resumed, is this dataset's: the same shards
        cut into the same windows; a DataError saying what differs otherwise """
        mine = self.state_dict()
        differ = [f'{k} {state.get(k)!r} then, {mine[k]!r} now' for k in mine if state.get(k) != mine[k]]
        if differ:
            raise DataError(f'the run being resumed was trained on other token shards ({"; ".join(differ)}): '
                            f'its data order indexes windows of those shards, not of {self.paths[0].parent}. '
                            f'Resume on the shards it was trained on, or start a new run in another work_dir')

    def __getstate__(self):
        # DataLoader workers started by spawn get the dataset pickled: a memmap would pickle as a copy of
        # its whole shard, so each worker opens its own
        return {**self.__dict__, '_maps': {}}
