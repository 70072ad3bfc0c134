"""
Loss and bits per byte of any model on any text file.

    python -m mingpt.evaluate --model out/chargpt/ckpt --data held_out.txt
    python -m mingpt.evaluate --model gpt2 --data wiki.txt --block-size 1024 --stride 512 --batch-size 4

    from mingpt.evaluate import evaluate_text
    from mingpt.tokenizers import tokenizer_for_model
    evaluate_text(model, tokenizer, text)  # -> {'loss': nats/token, 'bits_per_byte': ..., 'tokens': ..., 'bytes': ...}
    bits_per_byte(loss * n_tokens, token_byte_lengths(tokenizer)[ids].sum())  # ids scored elsewhere (shards)

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

The tokenizer is the model's own (mingpt.tokenizers.tokenizer_for_model: the tokenizer files in its
directory, else GPT-2's BPE for a GPT-2-sized vocabulary); --tokenizer overrides it.
"""

import argparse
import logging
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from mingpt.bpe import Encoder
from mingpt.data import read_text_file
from mingpt.errors import ConfigError
from mingpt.hardware import resolve_device
from mingpt.metrics import track
from mingpt.tokenizers import CHARS_FILE, load_tokenizer, tokenizer_for_model

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# the sliding window, and scoring through it


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


def _token_bytes(tokenizer, i):
    """UTF-8 length of token i (a BPE token may be part of a character, so not via decode)."""
    if isinstance(tokenizer, Encoder):
        s = tokenizer.decoder[i]
        return len(s.encode('utf-8')) if s in tokenizer.special_tokens else len(s)  # one char per byte
    return len(tokenizer.decode([i]).encode('utf-8'))


def token_byte_lengths(tokenizer):
    """(n_vocab,) int64: the UTF-8 bytes of text each token id stands for, 0 for special tokens. For scoring
    token ids that were never text, such as prepare's shards, where <|endoftext|> separates documents: the
    bytes of a stretch of ids are token_byte_lengths(tokenizer)[ids].sum()."""
    special = set(getattr(tokenizer, 'special_tokens', {}).values())
    return np.array([0 if i in special else _token_bytes(tokenizer, i) for i in range(tokenizer.n_vocab)],
                    dtype=np.int64)


def bits_per_byte(nats, n_bytes):
    """Bits per byte of text whose tokens cost nats in all: nats / ln 2 / n_bytes."""
    return nats / math.log(2) / n_bytes


@torch.no_grad()
def evaluate_text(model, tokenizer, text, *, block_size=None, stride=None, batch_size=8, bos_token_id=None,
                  progress=False):
    """
    Loss and bits per byte of model on text, tokenized by tokenizer (anything with encode(text) -> ids and
    decode(ids) -> text, and n_vocab: mingpt.bpe.Encoder, mingpt.tokenizers.CharTokenizer).

    block_size: window length (default and maximum: the model's); stride: tokens between window starts
    (default block_size // 2; 1 <= stride <= block_size); batch_size: windows per forward pass (memory grows
    as batch_size * block_size * vocab_size floats). bos_token_id: an id to prepend, so that the first token
    of the text is scored too. Runs on the model's device; the model is left in the mode it was in.

    Returns {'loss': mean nats per scored token, 'bits_per_byte': total nats / ln 2 / bytes,
             'tokens': tokens scored, 'bytes': UTF-8 bytes of the text those tokens cover}.
    """
    if not isinstance(text, str) or not text:
        raise ConfigError('there is no text to evaluate on: the text is empty')
    model_block, vocab_size = model.config.block_size, model.config.vocab_size
    block_size = model_block if block_size is None else block_size
    if not 1 <= block_size <= model_block:
        raise ConfigError(f'block_size={block_size} must be between 1 and the model\'s block_size ({model_block})')
    stride = max(1, block_size // 2) if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ConfigError(f'stride={stride} must be between 1 and block_size ({block_size}): a larger stride '
                          f'would leave tokens between windows unscored')
    if batch_size < 1:
        raise ConfigError(f'batch_size={batch_size} must be at least 1')
    n_vocab = getattr(tokenizer, 'n_vocab', None)
    if n_vocab is not None and n_vocab > vocab_size:
        raise ConfigError(f'the tokenizer has {n_vocab} tokens but the model only {vocab_size}: they do not belong '
                          f'together (ids >= {vocab_size} have no embedding). Use the tokenizer the model was '
                          f'trained with (--tokenizer PATH)')
    if n_vocab is not None and vocab_size - n_vocab >= 128:  # padding a vocabulary adds fewer than 128
        logger.warning('the model has %d tokens but the tokenizer only %d: is it the tokenizer the model was '
                       'trained with?', vocab_size, n_vocab)

    ids = tokenizer.encode(text)
    if ids and max(ids) >= vocab_size:
        raise ConfigError(f'the tokenizer produced id {max(ids)} but the model has only {vocab_size} tokens; '
                          f'use the tokenizer the model was trained with')
    n_bytes = len(text.encode('utf-8'))
    if bos_token_id is not None:
        ids = [bos_token_id] + ids
    elif ids:
        n_bytes -= _token_bytes(tokenizer, ids[0])  # the first token is context only
    if len(ids) < 2:
        raise ConfigError(f'the text is {len(ids)} token(s) long; scoring needs at least 2 (one to predict from)')
    ids = torch.tensor(ids, dtype=torch.long)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    spans = windows(len(ids), block_size, stride)
    total_nats, n_scored = 0.0, 0
    try:
        starts = range(0, len(spans), batch_size)
        for i in track(starts, len(starts), 'evaluating: batch', desc='evaluating', unit='batch', enabled=progress):
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
    return {'loss': total_nats / n_scored, 'bits_per_byte': bits_per_byte(total_nats, n_bytes),
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

    from mingpt.model import GPT
    try:
        device = resolve_device(args.device)
        text = read_text_file(args.data)
        model = GPT.from_pretrained(args.model)
        tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer is not None
                     else tokenizer_for_model(args.model, model.config.vocab_size))
        model.to(device)
        result = evaluate_text(model, tokenizer, text, block_size=args.block_size, stride=args.stride,
                               batch_size=args.batch_size, progress=True)
    except (ValueError, OSError) as e:  # a DownloadError is an OSError
        parser.exit(2, f'error: {e}\n')
    r = result
    print(f'| model | data | tokens | bytes | bytes/token | loss (nats/token) | perplexity | bits/byte |\n'
          f'|---|---|---:|---:|---:|---:|---:|---:|\n'
          f'| {args.model} | {args.data} | {r["tokens"]:,} | {r["bytes"]:,} | {r["bytes"] / r["tokens"]:.3f} | '
          f'{r["loss"]:.4f} | {math.exp(r["loss"]):.2f} | {r["bits_per_byte"]:.4f} |')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
