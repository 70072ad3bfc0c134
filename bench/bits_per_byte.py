"""
Character vs BPE tokenizers on the same text, compared in bits per byte: the same small GPT is trained
with each tokenizer on the first 90% of tiny shakespeare for the same number of iterations, then scored
by mingpt.evaluate on the last 10% (which none of them trained on).

    python bench/bits_per_byte.py                  # characters, BPE 1024, BPE 4096; ~5 minutes on 2 cores
    python bench/bits_per_byte.py --iters 1000 --vocab 1024 --vocab 8192

Bits per byte (total nats / ln 2 / UTF-8 bytes of the scored text) does not depend on how the text is cut
into tokens, which is what makes the rows comparable; loss per token does not. Equal iterations are not
equal compute: a BPE step covers several times more text than a character step.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mingpt.bpe_train import train_bpe  # noqa: E402
from mingpt.data import read_text_file, split_windows, training_text  # noqa: E402
from mingpt.evaluate import evaluate_text  # noqa: E402
from mingpt.model import GPT  # noqa: E402
from mingpt.tokenizers import CharTokenizer  # noqa: E402
from mingpt.trainer import Trainer  # noqa: E402
from mingpt.utils import set_seed  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data',
                      'tinyshakespeare.txt')


def train_and_score(tokenizer, train_text, held_out, args):
    """ a fresh GPT trained on train_text through tokenizer; returns (params, evaluate_text's result) """
    set_seed(args.seed)
    ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    train_dataset, _ = split_windows(ids, args.block_size, val_fraction=0.0)
    C = GPT.get_default_config()
    C.model_type = None
    C.n_layer, C.n_head, C.n_embd = args.n_layer, args.n_head, args.n_embd
    C.vocab_size, C.block_size = tokenizer.n_vocab, args.block_size
    C.embd_pdrop = C.resid_pdrop = C.attn_pdrop = 0.0
    model = GPT(C)
    T = Trainer.get_default_config()
    T.max_iters, T.batch_size = args.iters, args.batch_size
    T.learning_rate, T.min_lr, T.warmup_iters, T.lr_schedule = 2e-3, 2e-4, 100, 'cosine'
    T.log_interval = None
    Trainer(T, model, train_dataset).run()
    params = sum(p.numel() for p in model.parameters())
    return params, evaluate_text(model.eval(), tokenizer, held_out, batch_size=16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--iters', type=int, default=400)
    parser.add_argument('--vocab', type=int, action='append', help='BPE vocabulary sizes (default 1024, 4096)')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--block-size', type=int, default=128)
    parser.add_argument('--n-layer', type=int, default=4)
    parser.add_argument('--n-head', type=int, default=4)
    parser.add_argument('--n-embd', type=int, default=128)
    parser.add_argument('--seed', type=int, default=3407)
    args = parser.parse_args()
    vocabs = args.vocab or [1024, 4096]

    text = read_text_file(SHARED) if os.path.isfile(SHARED) else training_text()
    n = int(len(text) * 0.9)
    train_text, held_out = text[:n], text[n:]

    tokenizers = [('characters', CharTokenizer.from_text(text))]
    for v in vocabs:
        tokenizers.append((f'BPE {v} (trained on the 90%)', train_bpe(train_text, v).to_encoder()))

    rows = []
    for name, tokenizer in tokenizers:
        t0 = time.time()
        params, result = train_and_score(tokenizer, train_text, held_out, args)
        rows.append((name, tokenizer.n_vocab, params, result, time.time() - t0))
        print(f"{name}: {result['bits_per_byte']:.3f} bits/byte ({time.time() - t0:.0f} s)", file=sys.stderr)

    print(f"\ntiny shakespeare, {args.n_layer} layers x {args.n_embd} wide, block {args.block_size}, "
          f"batch {args.batch_size}, {args.iters} iterations, lr 2e-3 cosine to 2e-4, seed {args.seed}; "
          f"scored on the last 10% ({len(held_out.encode('utf-8')):,} bytes)\n")
    print('| tokenizer | vocab | params | loss (nats/token) | bytes/token | bits/byte | train + score (s) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for name, vocab, params, r, seconds in rows:
        print(f"| {name} | {vocab} | {params / 1e6:.2f}M | {r['loss']:.3f} | {r['bytes'] / r['tokens']:.2f} | "
              f"{r['bits_per_byte']:.3f} | {seconds:.0f} |")
    print(f"\ncommand: python bench/bits_per_byte.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == '__main__':
    main()
