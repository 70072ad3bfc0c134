"""
Train a byte-level BPE vocabulary on your own text, in GPT-2's format, so that the one Encoder of
mingpt/bpe.py encodes with it exactly as it encodes with GPT-2's.

    python -m mingpt.bpe_train --input input.txt --vocab-size 4096 --out tok/ [--special '<|endoftext|>']

    from mingpt.bpe_train import train_bpe
    vocab = train_bpe(text, 4096, special_tokens=['<|endoftext|>'])
    vocab.save('tok/')                   # encoder.json + vocab.bpe
    enc = get_encoder('tok/')            # mingpt.bpe.get_encoder: the same Encoder as GPT-2's

What is trained, in the order it happens:

1. The text is cut at the special tokens (no merge ever spans one), and each part is split into pieces by
   GPT-2's pre-tokenizer (mingpt/pretokenize.py, the one encoding uses, so the two cut text
   identically). BPE never merges across pieces, so only the distinct pieces and how often each
   occurs matter: the same words recur, so a text has far fewer distinct pieces ("words" below) than pieces.
2. Every word starts as its UTF-8 bytes. The 256 byte values are the first 256 tokens (id = byte value),
   so any text at all can be encoded.
3. Repeatedly, the most frequent adjacent pair of tokens (counted over all words, weighted by word count)
   is merged into a new token, in every word, left to right, until the vocabulary has vocab_size tokens.
   Special tokens take the last ids: vocab_size counts them, as GPT-2's 50257 counts <|endoftext|>.

Encoding agrees with training: Encoder.encode segments each piece of the training text exactly as training
left it (so it reproduces BPEVocab.train_tokens; tests/test_bpe_train.py checks every distinct piece). Why:
a merge acts the same on a word and on any run of whole tokens inside it, so two adjacent tokens whose
bytes concatenate to a token T are always the two that made T, and the Encoder's rule (merge the adjacent
pair whose concatenation has the lowest rank) replays the training merges in training order.

Ties: among pairs of equal count, the pair whose (left bytes, right bytes) is smallest (Python's bytes
ordering) is merged first. This depends on nothing but the text, so training is deterministic. Hugging
Face's `tokenizers` breaks ties by its internal token ids instead, which come from its own order of
first appearance: the two give the same merges up to ties, so similar but not identical vocabularies.

Speed (a pure-Python trainer; bench/tokenizer.py measures it): the pair counts are computed once and then
updated incrementally. An index pair -> words holding it means a merge only visits the words it changes,
and a max-heap of (count, pair) with lazy deletion picks the next pair without rescanning all pairs: an
entry is pushed whenever a pair's count grows, and a popped entry whose count is out of date (the pair's
count has since shrunk) is pushed back with its true count instead of being used.

The files: encoder.json maps each token (its bytes shown through bpe.bytes_to_unicode, plus the special
tokens as they are) to its id, vocab.bpe lists the merges in order. The Encoder recognises the special
tokens as the entries of encoder.json that no merge produces; they are only produced by
encode(text, allowed_special=...), never from plain text.
"""

import argparse
import heapq
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mingpt.bpe import Encoder, bytes_to_unicode
from mingpt.metrics import Progress
from mingpt.pretokenize import pretokenize, safe_chunks, special_tokens_regex, without_lone_surrogates
from mingpt.data import read_text_file
from mingpt.errors import ConfigError
from mingpt.tokenizers import save_tokenizer

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # the pre-tokenizer runs over ~1M characters at a time, to bound memory on big files

# -----------------------------------------------------------------------------
# the vocabulary a training run produces


@dataclass
class BPEVocab:
    """A trained vocabulary, in the form of GPT-2's two files."""
    encoder: dict  # token string (bytes through bytes_to_unicode; special tokens as they are) -> id
    merges: list  # [(a, b)] token strings, in merge order: the lines of vocab.bpe
    special_tokens: dict = field(default_factory=dict)  # special token -> id (also in encoder)
    train_tokens: int = 0  # tokens of the training text (special tokens excluded) at the end of training
    train_bytes: int = 0  # UTF-8 bytes of the training text (special tokens excluded)

    @property
    def vocab_size(self):
        return max(self.encoder.values()) + 1

    def to_encoder(self) -> Encoder:
        """The mingpt.bpe.Encoder for this vocabulary (what get_encoder(dir) returns after save(dir))."""
        return Encoder(self.encoder, self.merges)

    def save(self, directory) -> Path:
        """Write encoder.json and vocab.bpe into directory (created if needed, mingpt.tokenizers.save_tokenizer);
        returns it as a Path."""
        d = save_tokenizer(self.to_encoder(), directory)
        logger.info('saved a %d-token vocabulary (%d merges) to %s', self.vocab_size, len(self.merges), d)
        return d

# -----------------------------------------------------------------------------
# step 1: text -> {word (bytes): count}


def count_words(text: str, special_tokens=()) -> Counter:
    """The distinct pre-tokenized pieces of text and how often each occurs, as {utf-8 bytes: count}.
    Special tokens are cut out first. Lone surrogates (not valid UTF-8) become U+FFFD, as in encoding."""
    parts = special_tokens_regex(special_tokens).split(text) if special_tokens else [text]
    counts = Counter()
    for part in parts:
        if not _is_utf8(part):  # as Encoder.encode_ordinary does
            part = without_lone_surrogates(part)
        for chunk in safe_chunks(part, CHUNK_CHARS):
            counts.update(pretokenize(chunk))
    return Counter({piece.encode('utf-8'): n for piece, n in counts.items()})


def _is_utf8(s: str) -> bool:
    try:
        s.encode('utf-8')
        return True
    except UnicodeEncodeError:
        return False


# -----------------------------------------------------------------------------
# step 2 and 3: the merges


def train_bpe(text: str, vocab_size: int, special_tokens=(), progress: bool = False) -> BPEVocab:
    """Train a byte-level BPE vocabulary of vocab_size tokens (256 bytes + merges + special tokens) on text.

    special_tokens: strings such as '<|endoftext|>', given the last ids. Their occurrences in text are cut
    out before training (so no merge spans them) and count in neither train_tokens nor train_bytes.
    progress: show a tqdm bar over the merges.
    """
    if not isinstance(text, str):
        raise ConfigError(f'train_bpe trains on a str, not {type(text).__name__}; decode the text first '
                          f'(e.g. data.decode("utf-8"), or mingpt.data.read_text_file(path))')
    special_tokens = list(dict.fromkeys(special_tokens))  # unique, order kept
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise ConfigError(f'special tokens must be non-empty strings, got {s!r}')
    if type(vocab_size) is not int or vocab_size < 256 + len(special_tokens):
        raise ConfigError(f'vocab_size={vocab_size!r} is too small: a byte-level vocabulary needs the 256 single '
                          f'bytes plus {len(special_tokens)} special token(s), so at least '
                          f'{256 + len(special_tokens)}')
    n_ordinary = vocab_size - len(special_tokens)

    t0 = time.perf_counter()
    word_counts = count_words(text, special_tokens)
    logger.info('%d distinct pieces, %d in all (%.1fs)', len(word_counts), sum(word_counts.values()),
                time.perf_counter() - t0)
    merges, token_bytes, words, freqs = _learn_merges(word_counts, n_ordinary, progress)

    vocab = make_vocab(token_bytes, merges, special_tokens)
    vocab.train_tokens = sum(len(w) * f for w, f in zip(words, freqs))
    vocab.train_bytes = sum(len(w) * n for w, n in word_counts.items())
    if vocab.vocab_size < vocab_size:
        logger.warning('the text ran out of pairs to merge: the vocabulary has %d tokens, not %d; train on more '
                       'text or ask for fewer tokens', vocab.vocab_size, vocab_size)
    logger.info('trained %d merges in %.1fs', len(merges), time.perf_counter() - t0)
    return vocab


def make_vocab(token_bytes: list, merges: list, special_tokens=()) -> BPEVocab:
    """token_bytes (id -> bytes) and merges ([(id, id)]) -> a BPEVocab, with the special tokens after them."""
    b2u = bytes_to_unicode()
    show = [''.join(b2u[x] for x in tb) for tb in token_bytes]  # id -> token string of the files
    encoder = {s: i for i, s in enumerate(show)}
    special = {}
    for s in special_tokens:
        if s in encoder:  # the Encoder tells special tokens from ordinary ones by the string alone
            raise ConfigError(f'the special token {s!r} is also an ordinary token of the trained vocabulary; '
                              f'choose special tokens that cannot occur as plain text, like <|endoftext|>')
        special[s] = encoder[s] = len(encoder)
    return BPEVocab(encoder=encoder, merges=[(show[a], show[b]) for a, b in merges], special_tokens=special)


def _learn_merges(word_counts: dict, n_tokens: int, progress: bool = False):
    """
    The core of training. word_counts: {word bytes: count}. Merges until there are n_tokens tokens (or no
    pair is left). Returns (merges as [(id, id)], token_bytes: id -> bytes, words: the final segmentation of
    each word as a list of ids, freqs: each word's count).
    """
    token_bytes = [bytes([b]) for b in range(256)]
    bytes_to_id = {tb: i for i, tb in enumerate(token_bytes)}
    words = [list(w) for w in word_counts]  # each word as a list of token ids; at first id = byte value
    freqs = list(word_counts.values())

    # the pair counts and the pair -> words index, computed once
    counts = defaultdict(int)  # (a, b) -> occurrences in the text (each word weighted by its count)
    where = defaultdict(set)  # (a, b) -> indices of the words that hold it (may hold stale ones, see below)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(i)
    # max-heap via negated counts; then the bytes of the two tokens break ties (smallest first)
    heap = [(-c, token_bytes[a], token_bytes[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    merges = []
    # a bar on a terminal, plain lines about every 10 s when piped
    with Progress(max(0, n_tokens - len(token_bytes)), bar=sys.stderr.isatty(), enabled=progress,
                  what='merge', desc='merges', unit='merge') as bar:
        while len(token_bytes) < n_tokens and heap:
            neg, _, _, a, b = heapq.heappop(heap)
            c = counts.get((a, b), 0)
            if c != -neg:  # a stale entry: the pair's count shrank since it was pushed
                if c > 0:
                    heapq.heappush(heap, (-c, token_bytes[a], token_bytes[b], a, b))
                continue

            # the new token. Its bytes are never a token already: a pair (x, y) that concatenates to an existing
            # token T can never be adjacent, because whatever bytes T covers went through the same merges that
            # made T, wherever they occur (a merge acts the same on a word and on any run of whole tokens in it)
            new_bytes = token_bytes[a] + token_bytes[b]
            assert new_bytes not in bytes_to_id, (a, b)
            t = bytes_to_id[new_bytes] = len(token_bytes)
            token_bytes.append(new_bytes)
            merges.append((a, b))
            bar.advance(len(merges))

            # rewrite every word that holds (a, b), and collect how the pair counts change
            delta = defaultdict(int)
            for i in where.pop((a, b)):
                w = words[i]
                n = len(w)
                new, j = [], 0
                while j < n:
                    if w[j] == a and j + 1 < n and w[j + 1] == b:
                        new.append(t)
                        j += 2
                    else:
                        new.append(w[j])
                        j += 1
                if len(new) == n:
                    continue  # a stale index entry: an earlier merge took the pair from this word
                f = freqs[i]
                for pair in zip(w, w[1:]):
                    delta[pair] -= f
                for pair in zip(new, new[1:]):
                    delta[pair] += f
                    if t in pair:  # every pair new to this word contains t (the others were neighbours before)
                        where[pair].add(i)
                words[i] = new
            # words that lose a pair stay in its index (lazily): the rewrite above skips them
            for pair, d in delta.items():
                if d == 0:
                    continue
                c = counts[pair] + d
                if c > 0:
                    counts[pair] = c
                    if d > 0:  # the heap must hold an entry at least as large as every count
                        heapq.heappush(heap, (-c, token_bytes[pair[0]], token_bytes[pair[1]], pair[0], pair[1]))
                else:
                    del counts[pair]
            counts.pop((a, b), None)
    return merges, token_bytes, words, freqs

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.bpe_train',
                                     description='Train a byte-level BPE vocabulary (GPT-2 format) on a text file.')
    parser.add_argument('--input', required=True, help='UTF-8 text file to train on')
    parser.add_argument('--vocab-size', type=int, required=True,
                        help='tokens in all: 256 bytes + merges + special tokens')
    parser.add_argument('--out', required=True, help='directory to write encoder.json and vocab.bpe to')
    parser.add_argument('--special', action='append', default=[], metavar='TOKEN',
                        help="a special token, e.g. '<|endoftext|>' (repeat for more); gets one of the last ids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        text = read_text_file(args.input)
        t0 = time.perf_counter()
        vocab = train_bpe(text, args.vocab_size, special_tokens=args.special, progress=True)
        seconds = time.perf_counter() - t0
        out = vocab.save(args.out)
    except (ValueError, OSError) as e:
        parser.exit(2, f'error: {e}\n')
    print(f'{vocab.vocab_size} tokens ({len(vocab.merges)} merges, special: {vocab.special_tokens or "none"}) '
          f'trained in {seconds:.1f}s on {vocab.train_bytes:,} bytes -> {vocab.train_tokens:,} tokens '
          f'({vocab.train_bytes / max(1, vocab.train_tokens):.2f} bytes/token); wrote {out}/encoder.json and '
          f'{out}/vocab.bpe')


if __name__ == '__main__':
    main(sys.argv[1:])
