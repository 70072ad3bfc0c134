"""
Loss and bits per byte of any model on any text file.

    python -m mingpt.evaluate --model out/chargpt/ckpt --data held_out.txt
    python -m mingpt.evaluate --model gpt2 --data wiki.txt --block-size 1024 --stride 512 --batch-size 4

    from mingpt.evaluate import evaluate, tokenizer_for_model
    evaluate(model, tokenizer, text)  # -> {'loss': nats/token, 'bits_per_byte': ..., 'tokens': ..., 'bytes': ...}

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the scored text. Unlike loss per token it does
not depend on the tokenizer, so a character-level model and a BPE model (or two BPE vocabularies) can be
compared on the same text.

Long text is scored with a sliding window (as in Hugging Face's perplexity guide): windows of block_size
tokens start every `stride` tokens, and each window scores only the tokens no earlier window scored, with
everything before them in the window as context. So every token is scored exactly once, and each (but
those of the first window) sees at least block_size - stride tokens of context: stride = block_size is
fastest (disjoint windows), a small stride gives more context at block_size / stride times the compute.
The first token of the text has no context and is not scored, and its bytes do not count, unless a
bos_token_id is given to condition it on (e.g. GPT-2's <|endoftext|>, as its training documents began).

Which tokenizer a model uses. A model directory (an HF-format directory from save_pretrained, or a trainer
checkpoint) may carry its tokenizer, looked for in this order:
- encoder.json + vocab.bpe: a byte-level BPE vocabulary in GPT-2's format (mingpt.bpe.get_encoder(dir),
  e.g. written by mingpt.bpe_train); Hugging Face's names for the same files, vocab.json + merges.txt,
  work too.
- chars.json: a character vocabulary, a JSON list of strings of one character each, the index of a
  character being its id, e.g. ["\\n", " ", "!", ..., "z"] (CharTokenizer below).
A trainer checkpoint (work_dir/ckpt, a directory with trainer.pt) is replaced whole at every save, so its
tokenizer files may instead sit in the run directory above it (work_dir). A model without tokenizer files is
assumed to use GPT-2's BPE when its vocab_size is 50257 (or 50304, GPT-2's vocabulary padded to a multiple
of 64 as nanoGPT and llm.c do). --tokenizer overrides all this.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mingpt.bpe import Encoder, get_encoder
from mingpt.data import read_text_file

logger = logging.getLogger(__name__)

CHARS_FILE = 'chars.json'
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's vocabulary, and the same padded to a multiple of 64

# -----------------------------------------------------------------------------
# tokenizers


class CharTokenizer:
    """Characters <-> ids: id i is chars[i]. Saved as chars.json, a JSON list of the characters."""

    def __init__(self, chars):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f'a character vocabulary must list single characters; got {bad[:5]!r}')
        if len(set(chars)) != len(chars):
            dups = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f'a character vocabulary lists each character once; {dups!r} appear more than once')
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.n_vocab = len(chars)

    @classmethod
    def from_text(cls, text):
        """The distinct characters of text, sorted (minGPT's chargpt order)."""
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, path):
        """From a chars.json file, or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / CHARS_FILE
        try:
            chars = json.loads(path.read_text(encoding='utf-8'))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f'cannot read the character vocabulary {path}: {e}') from None
        if not isinstance(chars, list):
            raise ValueError(f'{path} must hold a JSON list of characters (index = id), not a {type(chars).__name__}')
        return cls(chars)

    def save(self, directory):
        """Write directory/chars.json; returns its path."""
        path = Path(directory) / CHARS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.chars, ensure_ascii=False), encoding='utf-8')
        return path

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - self.stoi.keys())
            raise ValueError(f'the text has {len(missing)} character(s) that are not in the vocabulary: '
                             f'{"".join(missing[:20])!r} ({", ".join(map(repr, missing[:20]))}); the model knows '
                             f'only these {self.n_vocab}: {"".join(self.chars)!r}') from None

    def decode(self, ids):
        if hasattr(ids, 'tolist'):
            ids = ids.tolist()
        return ''.join(self.chars[i] for i in ids)


def find_tokenizer(directory):
    """The tokenizer whose files are in directory (see the module docstring), or None."""
    d = Path(directory)
    if (d / 'encoder.json').is_file() and (d / 'vocab.bpe').is_file():
        return get_encoder(d)
    if (d / 'vocab.json').is_file() and (d / 'merges.txt').is_file():  # Hugging Face's names
        return Encoder.from_files(d / 'vocab.json', d / 'merges.txt')
    if (d / CHARS_FILE).is_file():
        return CharTokenizer.load(d / CHARS_FILE)
    return None


def load_tokenizer(path):
    """'gpt2' (GPT-2's BPE), a directory with tokenizer files, or a file: a JSON list of characters (chars.json,
    or any name), or one of the BPE files (the vocabulary is then read from its directory)."""
    if str(path) == 'gpt2':
        return get_encoder()
    p = Path(path)
    if p.is_file() and p.suffix == '.json':
        try:
            content = json.loads(p.read_text(encoding='utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f'cannot read the tokenizer file {p}: {e}') from None
        if isinstance(content, list):
            return CharTokenizer(content)
    tokenizer = find_tokenizer(p if p.is_dir() else p.parent)
    if tokenizer is None:
        raise FileNotFoundError(f'no tokenizer at {path}: expected "gpt2", a directory with encoder.json + vocab.bpe '
                                f'(or vocab.json + merges.txt, or {CHARS_FILE}), or a {CHARS_FILE} file')
    return tokenizer


def tokenizer_for_model(source, vocab_size):
    """The tokenizer of the model loaded from source (a name or path): the tokenizer files of its directory
    (for a trainer checkpoint, a directory with trainer.pt, also of the run directory above it), else GPT-2's
    BPE for a GPT-2-sized vocabulary; a ValueError saying what to do otherwise."""
    p = Path(source).expanduser()
    if p.exists():
        d = p if p.is_dir() else p.parent
        places = [d, d.parent] if (d / 'trainer.pt').is_file() else [d]
        for place in places:
            tokenizer = find_tokenizer(place)
            if tokenizer is not None:
                logger.info('tokenizer: from %s', place)
                return tokenizer
    if vocab_size in GPT2_VOCAB_SIZES:
        logger.info('tokenizer: GPT-2 BPE (no tokenizer files with the model, and vocab_size=%d)', vocab_size)
        return get_encoder()
    raise ValueError(f'cannot tell which tokenizer {source} uses: it has no tokenizer files (encoder.json + '
                     f'vocab.bpe, or {CHARS_FILE}) and its vocab_size ({vocab_size}) is not GPT-2\'s. Put the '
                     f'tokenizer files in the model directory, or pass --tokenizer PATH')


def _token_bytes(tokenizer, i):
    """UTF-8 length of token i (a BPE token may be part of a character, so not via decode)."""
    if isinstance(tokenizer, Encoder):
        s = tokenizer.decoder[i]
        return len(s.encode('utf-8')) if s in tokenizer.special_tokens else len(s)  # one char per byte
    return len(tokenizer.decode([i]).encode('utf-8'))

# -----------------------------------------------------------------------------
# the sliding window


def windows(n_tokens, block_size, stride):
    """[(start, end, first)]: the window feeds ids[start:end] to predict ids[start+1:end+1], and scores the
    predictions of targets first..end (ids indices), those no earlier window scored."""
    out, done = [], 0  # done: the last target index scored so far (index 0 has no context)
    start = 0
    while done < n_tokens - 1:
        end = min(start + block_size, n_tokens - 1)
        out.append((start, end, done + 1))
        done = end
        start += stride
    return out


@torch.no_grad()
def evaluate(model, tokenizer, text, *, block_size=None, stride=None, batch_size=8, bos_token_id=None,
             progress=False):
    """
    Loss and bits per byte of model on text, tokenized by tokenizer (anything with encode(text) -> ids and
    decode(ids) -> text, and n_vocab: mingpt.bpe.Encoder, CharTokenizer).

    block_size: window length (default and maximum: the model's); stride: tokens between window starts
    (default block_size // 2; 1 <= stride <= block_size); batch_size: windows per forward pass (memory grows
    as batch_size * block_size * vocab_size floats). bos_token_id: an id to prepend, so that the first token
    of the text is scored too. Runs on the model's device; the model is left in the mode it was in.

    Returns {'loss': mean nats per scored token, 'bits_per_byte': total nats / ln 2 / bytes,
             'tokens': tokens scored, 'bytes': UTF-8 bytes of the text those tokens cover}.
    """
    if not isinstance(text, str) or not text:
        raise ValueError('there is no text to evaluate on: the text is empty')
    model_block, vocab_size = model.config.block_size, model.config.vocab_size
    block_size = model_block if block_size is None else block_size
    if not 1 <= block_size <= model_block:
        raise ValueError(f'block_size={block_size} must be between 1 and the model\'s block_size ({model_block})')
    stride = max(1, block_size // 2) if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f'stride={stride} must be between 1 and block_size ({block_size}): a larger stride '
                         f'would leave tokens between windows unscored')
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be at least 1')
    n_vocab = getattr(tokenizer, 'n_vocab', None)
    if n_vocab is not None and n_vocab > vocab_size:
        raise ValueError(f'the tokenizer has {n_vocab} tokens but the model only {vocab_size}: they do not belong '
                         f'together (ids >= {vocab_size} have no embedding). Use the tokenizer the model was '
                         f'trained with (--tokenizer PATH)')
    if n_vocab is not None and vocab_size - n_vocab >= 128:  # padding a vocabulary adds fewer than 128
        logger.warning('the model has %d tokens but the tokenizer only %d: is it the tokenizer the model was '
                       'trained with?', vocab_size, n_vocab)

    ids = tokenizer.encode(text)
    if ids and max(ids) >= vocab_size:
        raise ValueError(f'the tokenizer produced id {max(ids)} but the model has only {vocab_size} tokens; '
                         f'use the tokenizer the model was trained with')
    n_bytes = len(text.encode('utf-8'))
    if bos_token_id is not None:
        ids = [bos_token_id] + ids
    elif ids:
        n_bytes -= _token_bytes(tokenizer, ids[0])  # the first token is context only
    if len(ids) < 2:
        raise ValueError(f'the text is {len(ids)} token(s) long; scoring needs at least 2 (one to predict from)')
    ids = torch.tensor(ids, dtype=torch.long)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    spans = windows(len(ids), block_size, stride)
    total_nats, n_scored = 0.0, 0
    try:
        for i in tqdm(range(0, len(spans), batch_size), desc='evaluating', unit='batch',
                      disable=None if progress else True):  # None: only on a terminal
            batch = spans[i:i + batch_size]
            T = max(end - start for start, end, _ in batch)
            x = torch.zeros((len(batch), T), dtype=torch.long)
            y = torch.full((len(batch), T), -1, dtype=torch.long)  # -1: not scored (context or padding)
            for row, (start, end, first) in enumerate(batch):
                x[row, :end - start] = ids[start:end]
                y[row, first - start - 1:end - start] = ids[first:end + 1]
            logits, _ = model(x.to(device))  # (B, T, vocab_size); the padding at the end is never attended to
            y = y.to(device)
            total_nats += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                                          reduction='sum').item()
            n_scored += int((y != -1).sum())
    finally:
        model.train(was_training)
    assert n_scored == len(ids) - 1, (n_scored, len(ids))
    return {'loss': total_nats / n_scored, 'bits_per_byte': total_nats / math.log(2) / n_bytes,
            'tokens': n_scored, 'bytes': n_bytes}

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.evaluate',
                                     description='Loss (nats/token) and bits per byte of a model on a text file.')
    parser.add_argument('--model', required=True,
                        help='a model directory (save_pretrained, a trainer checkpoint), an llm.c .bin, an OpenAI '
                             'checkpoint directory, or a hub name (gpt2, ...)')
    parser.add_argument('--data', required=True, help='UTF-8 text file to evaluate on')
    parser.add_argument('--tokenizer', default=None,
                        help=f'"gpt2", a directory with encoder.json + vocab.bpe or {CHARS_FILE}, or a {CHARS_FILE} '
                             f'file (default: the files in the model directory, else GPT-2 for a 50257-token model)')
    parser.add_argument('--batch-size', type=int, default=8,
                        help='windows per forward pass (default 8); the logits take batch-size x block-size x '
                             'vocab-size floats, 1.6 GB for GPT-2 at 8 x 1024')
    parser.add_argument('--block-size', type=int, default=None, help="window length (default: the model's)")
    parser.add_argument('--stride', type=int, default=None,
                        help='tokens between window starts (default block-size/2; block-size = disjoint windows)')
    parser.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    from mingpt.download import DownloadError
    from mingpt.model import GPT
    try:
        text = read_text_file(args.data)
        model = GPT.from_pretrained(args.model)
        tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer is not None
                     else tokenizer_for_model(args.model, model.config.vocab_size))
        device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
        model.to(device)
        result = evaluate(model, tokenizer, text, block_size=args.block_size, stride=args.stride,
                          batch_size=args.batch_size, progress=True)
    except (ValueError, OSError, DownloadError) as e:
        parser.exit(2, f'error: {e}\n')
    r = result
    print(f'| model | data | tokens | bytes | bytes/token | loss (nats/token) | perplexity | bits/byte |\n'
          f'|---|---|---:|---:|---:|---:|---:|---:|\n'
          f'| {args.model} | {args.data} | {r["tokens"]:,} | {r["bytes"]:,} | {r["bytes"] / r["tokens"]:.3f} | '
          f'{r["loss"]:.4f} | {math.exp(r["loss"]):.2f} | {r["bits_per_byte"]:.4f} |')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
