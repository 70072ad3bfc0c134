"""
Byte-level BPE as used by GPT-2, with minGPT's API (get_encoder, Encoder, BPETokenizer).

The ids are identical to tiktoken's "gpt2" encoding on any text; Python and numpy, no compiled code of
its own (bench/tokenizer.py compares the speeds). How, in the order text flows through encode():

1. Pre-tokenize (mingpt/pretokenize.py): GPT-2's regex splits the text into pieces (words with their
   leading space, numbers, punctuation runs, whitespace runs); BPE never merges across pieces.
2. Each piece is looked up in a cache from piece (str) to its token ids. The loop over pieces is a
   C-level map() over the cache's __getitem__, so a hit never runs a line of Python. The cache starts out
   holding every token of the vocabulary (a piece that is a whole token is that one id, as in tiktoken).
   A long text goes through in chunks, so that no C call (which holds the GIL) takes long.
3. The pieces the cache lacks run BPE on their UTF-8 bytes (mingpt/bpe_merge.py): merge the adjacent
   pair whose concatenation has the lowest rank, until none makes a token; then a second lookup pass finds
   them all. A few new pieces are merged one at a time; many, as when a corpus is encoded, all together
   with numpy; a long piece (CJK text without spaces, a run of one character) alone, in O(n log n).

Vocabulary files are GPT-2's encoder.json (token string -> id, with bytes shown through bytes_to_unicode)
and vocab.bpe (the merges in order). Any vocabulary in that format works, e.g. one trained later on your
own data; tokens of encoder.json that are neither a single byte nor the result of a merge are special
tokens (GPT-2 has one, <|endoftext|> = 50256), produced only when allowed via allowed_special.
"""

import json
import logging
import threading
from itertools import chain, compress
from pathlib import Path

import numpy as np
import torch

from mingpt.bpe_merge import LONG_PIECE, PairMerger
from mingpt.download import gpt2_vocab_files
from mingpt.errors import ConfigError, MissingFileError, WeightsError
from mingpt.pretokenize import PAT, pretokenize, safe_chunks, special_tokens_regex, without_lone_surrogates

logger = logging.getLogger(__name__)

ENDOFTEXT = '<|endoftext|>'

MAX_CACHED_PIECES = 500_000  # past this many pieces the cache is emptied: bounds its memory on huge corpora
MAX_CACHED_LONG_BYTES = 1 << 24  # or past this many bytes of pieces over LONG_PIECE bytes, unbounded by a count
CHUNK_CHARS = 1 << 16  # longer texts are encoded a chunk at a time (see 2. above)
IDS = np.dtype('<u4')  # a piece's token ids in the cache: bytes, 4 a token


def bytes_to_unicode():
    """
    GPT-2's map from each of the 256 byte values to a printable unicode character, used to store tokens
    (which are byte strings) as readable text in encoder.json and vocab.bpe: printable latin-1 bytes map
    to themselves, the others (control characters, space, ...) to chr(256 + n). So 'Ġ' is a space.
    """
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _PieceCache(dict):
    """piece (str) -> its token ids as bytes (IDS): bytes, unlike tuples, are not tracked by the garbage
    collector, so caching a corpus's pieces never sets off a full collection (a walk over every object of
    the process, holding the GIL). A dict subclass so that hits never leave C: a lookup pass is
    list(map(cache.__getitem__, pieces)). A miss notes the piece in `pending` and gives None (stored, so
    later occurrences in the pass are hits too); Encoder._resolve then runs BPE on all of them at once.
    It starts out holding the vocabulary's tokens that are valid UTF-8, so only pieces that need merging miss.
    long_bytes counts the bytes of the pieces it has taken in that are over LONG_PIECE bytes."""
    __slots__ = ('initial', 'pending', 'long_bytes')

    def __init__(self, initial: dict):
        super().__init__(initial)
        self.initial, self.pending, self.long_bytes = initial, [], 0

    def __missing__(self, piece):
        self.pending.append(piece)
        self[piece] = None
        return None

    def reset(self):
        self.clear()
        self.update(self.initial)
        self.long_bytes = 0


class Encoder:

    def __init__(self, encoder: dict, bpe_merges: list):
        """encoder: token string (bytes shown via bytes_to_unicode) -> id, as in encoder.json.
        bpe_merges: the merges in order as (a, b) token string pairs, as in vocab.bpe."""
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self._untranslate = {ord(v): chr(k) for k, v in self.byte_encoder.items()}  # for str.translate
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.bpe_ranks = dict(zip(map(tuple, bpe_merges), range(len(bpe_merges))))
        self.pat = PAT  # minGPT's attribute: the pre-tokenizer's regex

        # Everything below works on bytes, not on the bytes_to_unicode strings of the files.
        to_bytes = self._to_bytes
        str_to_bytes = {}  # token string of the files -> its bytes, for the tokens BPE can produce
        for b in range(256):
            if self.byte_encoder[b] not in encoder:
                raise ConfigError(f'the vocabulary has no token for byte {b} ({self.byte_encoder[b]!r}); a byte-level '
                                  f'BPE vocabulary must contain all 256 single bytes')
            str_to_bytes[self.byte_encoder[b]] = bytes([b])
        # rank of a token = position of the merge that creates it. BPE runs on "rank ids" (mingpt/bpe_merge.py):
        # byte b is b, the token made by merge r is 256 + r.
        self._rank_id = {bytes([b]): b for b in range(256)}  # token bytes -> rank id
        for rank, (a, b) in enumerate(bpe_merges):
            merged = to_bytes(a + b)
            if a + b not in encoder:
                raise ConfigError(f'merge #{rank} {a!r} + {b!r} of vocab.bpe makes a token that encoder.json lacks; '
                                  f'encoder.json and vocab.bpe must come from the same vocabulary')
            self._rank_id.setdefault(merged, 256 + rank)
            str_to_bytes[a + b] = merged
        self._bytes_to_id = {tb: encoder[ts] for ts, tb in str_to_bytes.items()}  # the "ordinary" tokens
        self.special_tokens = {ts: i for ts, i in encoder.items() if ts not in str_to_bytes}
        self._id_to_bytes = {i: tb for tb, i in self._bytes_to_id.items()}
        self._id_to_bytes.update({i: ts.encode('utf-8') for ts, i in self.special_tokens.items()})
        n_rank_ids = 256 + len(bpe_merges)
        self._rank_id_bytes = [None] * n_rank_ids  # rank id -> token bytes (None: a merge that repeats a token)
        for tb, r in self._rank_id.items():
            self._rank_id_bytes[r] = tb
        # rank id -> token id (0 for a merge that repeats a token: no part ever has that rank id)
        self._rank_id_to_id = np.array([self._bytes_to_id.get(tb, 0) for tb in self._rank_id_bytes], IDS)
        self._n_rank_ids, self._merger = n_rank_ids, None  # the PairMerger, built on first use
        whole_tokens = {}
        for tb, i in self._bytes_to_id.items():
            try:
                whole_tokens[tb.decode('utf-8')] = i.to_bytes(IDS.itemsize, 'little')
            except UnicodeDecodeError:  # a token that is part of a multi-byte character is never a whole piece
                pass
        self._cache = _PieceCache(whole_tokens)
        self._lock = threading.Lock()  # one lookup pass and its pending pieces at a time (servers encode in threads)
        self.n_vocab = max(self.decoder) + 1  # the vocab_size a model needs for this tokenizer

    def clear_cache(self):
        """Forget the pieces seen so far (frees their memory; the next encode() starts cold)."""
        with self._lock:  # not in the middle of another thread's lookup pass
            self._cache.reset()

    def _to_bytes(self, token: str) -> bytes:
        """A token as written in encoder.json / vocab.bpe -> the bytes it stands for."""
        return token.translate(self._untranslate).encode('latin-1')

    # -------------------------------------------------------------------------
    # encoding

    def encode(self, text: str, allowed_special=frozenset()) -> list:
        """Text -> list of token ids, identical to tiktoken.get_encoding('gpt2') for the GPT-2 vocabulary.

        allowed_special: the special tokens ('<|endoftext|>') to recognize in text, or 'all'. By default
        none is: "<|endoftext|>" in text is ordinary text (as in minGPT and tiktoken's encode_ordinary; tiktoken's
        encode() raises instead), so text from users cannot inject control tokens.
        """
        if allowed_special == 'all':
            allowed = frozenset(self.special_tokens)
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise ConfigError(f'allowed_special contains {sorted(unknown)}, which are not special tokens of this '
                                  f'vocabulary; its special tokens are {sorted(self.special_tokens)}')
        if not allowed:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for m in special_tokens_regex(allowed).finditer(text):  # compiled once: re caches it
            ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_ordinary(self, text: str) -> list:
        """Text -> token ids, treating special tokens as plain text."""
        ids = []
        for chunk in safe_chunks(text, CHUNK_CHARS):  # they pre-tokenize into exactly the pieces of the whole
            try:
                ids += self._lookup(self.pretokenize(chunk))
            except UnicodeEncodeError:  # lone surrogates, which are not valid UTF-8
                ids += self._lookup(self.pretokenize(without_lone_surrogates(chunk)))
        return ids

    def _lookup(self, pieces: list) -> list:
        """pieces -> their ids, through the cache; the pieces it lacks are merged together, then looked up."""
        with self._lock:
            cache = self._cache
            if len(cache) > MAX_CACHED_PIECES or cache.long_bytes > MAX_CACHED_LONG_BYTES:  # between passes
                cache.reset()
            ids = list(map(cache.__getitem__, pieces))
            if cache.pending:
                self._resolve()
                ids = list(map(cache.__getitem__, pieces))
        return np.frombuffer(b''.join(ids), IDS).tolist()

    def _resolve(self):
        """Run BPE on every piece the last lookup pass missed and cache the results."""
        pending, self._cache.pending = self._cache.pending, []
        try:
            encoded = [piece.encode('utf-8') for piece in pending]
        except UnicodeEncodeError:
            for piece in pending:  # leave no None behind
                del self._cache[piece]
            raise
        merger, lengths = self._pair_merger(), list(map(len, encoded))
        if max(lengths) > LONG_PIECE:  # counted for the cache's bound on memory
            self._cache.long_bytes += sum(n for n in lengths if n > LONG_PIECE)
        if len(encoded) < 64:  # a few pieces (a prompt): one at a time (merge takes a long one to merge_long)
            merged = [merger.merge(b) for b in encoded]
            parts, counts = list(chain.from_iterable(merged)), list(map(len, merged))
        else:  # many (a corpus): all at once, where numpy pays off, but for pieces too long for that
            alone = set(merger.alone(lengths))
            for k in alone:
                self._cache[pending[k]] = self._rank_id_to_id[merger.merge_long(encoded[k])].tobytes()
            if alone:
                batched = [k not in alone for k in range(len(encoded))]
                pending, encoded = list(compress(pending, batched)), list(compress(encoded, batched))
            parts, counts = merger.merge_many(encoded) if encoded else ([], [])
        ids, end = self._rank_id_to_id[parts].tobytes(), 0  # every piece's ids, one after the other
        for piece, n in zip(pending, counts):
            start, end = end, end + n * IDS.itemsize
            self._cache[piece] = ids[start:end]

    def pretokenize(self, text: str) -> list:
        """The pieces GPT-2's pre-tokenizer cuts text into (mingpt.pretokenize): self.pat.findall(text), faster."""
        return pretokenize(text)

    def _pair_merger(self) -> PairMerger:
        """BPE's merge step for this vocabulary (mingpt/bpe_merge.py): merge, merge_long and merge_many
        take UTF-8 bytes and give parts as rank ids. Its table of pairs is built on first use."""
        if self._merger is None:
            self._merger = PairMerger(self._rank_id, self._n_rank_ids)
        return self._merger

    def merges(self) -> list:
        """The merges in rank order, as (a, b) token strings: the lines of vocab.bpe."""
        return sorted(self.bpe_ranks, key=self.bpe_ranks.get)

    def bpe(self, token: str) -> str:
        """minGPT's bpe(): one pre-token in bytes_to_unicode form -> its BPE parts joined by spaces."""
        b = self._to_bytes(token)
        parts = [b] if b in self._bytes_to_id else map(self._rank_id_bytes.__getitem__, self._pair_merger().merge(b))
        return ' '.join(''.join(self.byte_encoder[x] for x in p) for p in parts)

    def encode_and_show_work(self, text: str) -> dict:
        """Debugging aid from minGPT: like encode_ordinary, but also returns every intermediate step.
        Returns {'bpe_idx': ids, 'tokens': pre-tokens, 'parts': [per pre-token dict of
        token, token_bytes, token_translated, token_merged, token_ix]}."""
        bpe_idx, parts = [], []
        tokens = self.pat.findall(text)
        for token in tokens:  # the pre-token; its UTF-8 bytes; through bytes_to_unicode; after BPE; ids
            token_bytes = token.encode('utf-8')
            token_translated = ''.join(self.byte_encoder[b] for b in token_bytes)
            token_merged = self.bpe(token_translated).split(' ')
            token_ix = [self.encoder[t] for t in token_merged]
            bpe_idx.extend(token_ix)
            parts.append(dict(token=token, token_bytes=token_bytes, token_translated=token_translated,
                              token_merged=token_merged, token_ix=token_ix))
        return {'bpe_idx': bpe_idx, 'tokens': tokens, 'parts': parts}

    # -------------------------------------------------------------------------
    # decoding

    def decode(self, ids) -> str:
        """Token ids (a list, or anything with .tolist() such as a 1-D tensor) -> text. Byte sequences that
        are not valid UTF-8 (e.g. a multi-byte character cut in half) become U+FFFD, as in tiktoken."""
        if hasattr(ids, 'tolist'):
            ids = ids.tolist()
        try:
            data = b''.join(map(self._id_to_bytes.__getitem__, ids))
        except (KeyError, TypeError):
            bad = [i for i in ids if not isinstance(i, int) or i not in self._id_to_bytes]
            raise ConfigError(f'cannot decode {bad[:5]}: token ids must be ints in [0, {self.n_vocab})') from None
        return data.decode('utf-8', errors='replace')

    # -------------------------------------------------------------------------
    # files

    @classmethod
    def from_files(cls, encoder_path, vocab_path) -> 'Encoder':
        """Load encoder.json and vocab.bpe (GPT-2's format; HF calls them vocab.json and merges.txt)."""
        try:
            with open(encoder_path, encoding='utf-8') as f:
                encoder = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f'the tokenizer file {encoder_path} is not valid JSON ({e}): it is truncated or '
                               f'corrupt') from None
        if not isinstance(encoder, dict):
            raise WeightsError(f'the tokenizer file {encoder_path} must hold a JSON object of token -> id, not a '
                               f'{type(encoder).__name__}')
        with open(vocab_path, encoding='utf-8') as f:
            lines = f.read().split('\n')
        merges = []
        for lineno, line in enumerate(lines, 1):
            line = line.rstrip('\r')
            if not line or (lineno == 1 and line.startswith('#version')):
                continue
            pair = line.split(' ')
            if len(pair) != 2:
                raise WeightsError(f'{vocab_path}:{lineno}: expected a merge "a b", got {line!r}')
            merges.append(tuple(pair))
        return cls(encoder, merges)


def get_encoder(path=None) -> Encoder:
    """The GPT-2 tokenizer (its files ship with the package: download.gpt2_vocab_files), or the vocabulary
    in directory `path`, which must hold encoder.json and vocab.bpe in GPT-2's format."""
    if path is None:
        encoder_path, vocab_path = gpt2_vocab_files()
    else:
        path = Path(path)
        encoder_path, vocab_path = path / 'encoder.json', path / 'vocab.bpe'
        missing = [p.name for p in (encoder_path, vocab_path) if not p.is_file()]
        if missing:
            raise MissingFileError(f'{path} lacks {" and ".join(missing)}; a tokenizer directory must contain '
                                   f'encoder.json and vocab.bpe (GPT-2\'s format)')
    logger.debug('loading BPE vocabulary from %s and %s', encoder_path, vocab_path)
    return Encoder.from_files(encoder_path, vocab_path)


class BPETokenizer:
    """
    minGPT's tokenizer object, returning torch tensors.

        tok = BPETokenizer()
        idx = tok("Hello world")                   # (1, T) LongTensor
        tok.decode(idx[0])                         # 'Hello world'
        idx, mask = tok(["Hi", "Hello there"])     # (B, T) each, LEFT-padded
        tok.decode(idx, attention_mask=mask)       # ['Hi', 'Hello there']

    Batches are padded on the left with pad_token_id (<|endoftext|> = 50256 for GPT-2); attention_mask is 1
    on real tokens, 0 on padding. The last column is then every row's last real token: generation goes on there.
    """

    def __init__(self, path=None):
        self.encoder = get_encoder(path)
        self.pad_token_id = self.encoder.special_tokens.get(ENDOFTEXT)

    def __call__(self, text, return_tensors='pt', allowed_special=frozenset()):
        """str -> (1, T) LongTensor of ids; list of str -> (idx, attention_mask), both (B, T) LongTensors."""
        if return_tensors != 'pt':
            raise ConfigError(f"return_tensors={return_tensors!r} is not supported; only 'pt' (torch) is")
        if isinstance(text, str):
            return torch.tensor([self.encoder.encode(text, allowed_special)], dtype=torch.long)
        if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
            raise TypeError('BPETokenizer takes a str or a non-empty list of str')
        rows = [self.encoder.encode(t, allowed_special) for t in text]
        T = max(map(len, rows))
        if self.pad_token_id is None and any(len(r) != T for r in rows):
            raise ConfigError('this vocabulary has no <|endoftext|> token to pad with; set tokenizer.pad_token_id')
        idx = torch.full((len(rows), T), self.pad_token_id if self.pad_token_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:  # left padding: the real tokens occupy the last len(row) columns
                idx[i, T - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, T - len(row):] = 1
        return idx, mask

    def decode(self, idx, attention_mask=None):
        """(T,) ids -> str; (B, T) ids -> list of B str. Positions where attention_mask is 0 (the padding)
        are dropped; without a mask every id is decoded, padding included."""
        idx = torch.as_tensor(idx)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.shape != idx.shape:
                raise ConfigError(f'attention_mask has shape {tuple(attention_mask.shape)} '
                                  f'but idx has {tuple(idx.shape)}; they must match')
        if idx.ndim == 1:
            return self.encoder.decode(idx[attention_mask.bool()] if attention_mask is not None else idx)
        if idx.ndim == 2:
            masks = attention_mask if attention_mask is not None else [None] * len(idx)
            return [self.decode(row, mask) for row, mask in zip(idx, masks)]
        raise ConfigError(f'decode takes a 1-D (T,) or 2-D (B, T) tensor of ids, got shape {tuple(idx.shape)}')
