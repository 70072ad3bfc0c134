"""
Speculative decoding on trained models: how many tokens each forward of the model gives, and the speed
of greedy generation with and without drafts, in one process.

    python bench/speculative.py                         # trains a target and a draft on tiny shakespeare first
    python bench/speculative.py --target out/chargpt/ckpt_best --draft out/draft/ckpt_best   # or any two GPTs

Two cases, each greedy (so every mode gives the same tokens, which the script checks):
- a trained target with a smaller draft model (assistant_model=), continuing held-out text;
- prompt lookup (prompt_lookup_num_tokens=) on an input-grounded task: the prompt holds a passage and the
  start of it again, so the continuation quotes the passage, as a summary or an edit of a given text does.

Without --target/--draft, a character-level gpt-mini (target) and gpt-nano (draft) are trained on the first
90% of tiny shakespeare for --iters iterations each; prompts come from the last 10%.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mingpt.data import read_text_file, split_windows, training_text  # noqa: E402
from mingpt.model import GPT  # noqa: E402
from mingpt.tokenizers import CharTokenizer, load_tokenizer  # noqa: E402
from mingpt.trainer import Trainer  # noqa: E402
from mingpt.utils import set_seed  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data',
                      'tinyshakespeare.txt')


def train(model_type, tokenizer, text, iters, block_size=128):
    set_seed(3407)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    dataset, _ = split_windows(ids, block_size, val_fraction=0.0)
    C = GPT.get_default_config()
    C.model_type, C.vocab_size, C.block_size = model_type, tokenizer.n_vocab, block_size
    C.embd_pdrop = C.resid_pdrop = C.attn_pdrop = 0.0
    model = GPT(C)
    T = Trainer.get_default_config()
    T.max_iters, T.batch_size, T.learning_rate = iters, 32, 2e-3
    T.lr_schedule, T.warmup_iters, T.min_lr, T.log_interval = 'cosine', 50, 2e-4, None
    Trainer(T, model, dataset).run()
    return model.eval()


class CountForwards:
    def __init__(self, model):
        self.n = 0
        self.hook = model.register_forward_pre_hook(lambda *a: setattr(self, 'n', self.n + 1))


def run(model, prompts, n, repeats, **kw):
    """ (best tokens/s, tokens per forward of model, the outputs) over the prompts, one at a time """
    counter, best, outs = CountForwards(model), 0.0, None
    try:
        for _ in range(repeats):
            counter.n, t0 = 0, time.perf_counter()
            outs = [model.generate(p[None], n, **kw)[0, -n:].tolist() for p in prompts]
            best = max(best, len(prompts) * n / (time.perf_counter() - t0))
    finally:
        counter.hook.remove()
    return best, len(prompts) * n / counter.n, outs  # counter.n: the forwards of the last round


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', help='a model directory GPT.from_pretrained reads (its tokenizer beside it)')
    parser.add_argument('--draft', help='the assistant: a smaller model with the same vocabulary')
    parser.add_argument('--iters', type=int, default=1500, help='training iterations, without --target')
    parser.add_argument('--new-tokens', type=int, default=64, help='must leave room for a prompt in the context')
    parser.add_argument('--prompts', type=int, default=6)
    parser.add_argument('--draft-tokens', type=int, default=5, help='num_assistant_tokens')
    parser.add_argument('--lookup-tokens', type=int, default=10, help='prompt_lookup_num_tokens')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = read_text_file(SHARED) if os.path.isfile(SHARED) else training_text()
    cut = int(len(text) * 0.9)
    if args.target:
        target, draft = GPT.from_pretrained(args.target).eval(), GPT.from_pretrained(args.draft).eval()
        tokenizer = load_tokenizer(args.target)
    else:
        tokenizer = CharTokenizer.from_text(text)
        t0 = time.time()
        target = train('gpt-mini', tokenizer, text[:cut], args.iters)
        draft = train('gpt-nano', tokenizer, text[:cut], args.iters)
        print(f"trained gpt-mini and gpt-nano for {args.iters} iterations each in {time.time() - t0:.0f} s",
              file=sys.stderr)
    held = text[cut:]
    room = target.block_size - args.new_tokens  # speculation drafts only while the sequence fits the context
    if room < 16:
        parser.error(f"--new-tokens {args.new_tokens} leaves {room} tokens of the {target.block_size}-token context "
                     "for the prompt; use fewer")
    starts = [i * (len(held) // args.prompts) for i in range(args.prompts)]
    plain_prompts = [torch.tensor(tokenizer.encode(held[s:s + room // 2])) for s in starts]
    # input-grounded: a passage, a blank line, then the passage's first words again
    passage = max(8, (room - 2) * 2 // 3)
    quoted = [torch.tensor(tokenizer.encode(held[s:s + passage] + '\n\n' + held[s:s + room - passage - 2]))
              for s in starts]

    rows = []
    for case, prompts, modes in [
            ('trained target, smaller draft', plain_prompts,
             [('plain', {}), (f'assistant_model (k={args.draft_tokens})',
                              dict(assistant_model=draft, num_assistant_tokens=args.draft_tokens))]),
            ('input-grounded (quoting the prompt)', quoted,
             [('plain', {}), (f'prompt_lookup_num_tokens={args.lookup_tokens}',
                              dict(prompt_lookup_num_tokens=args.lookup_tokens))])]:
        base = None
        for name, kw in modes:
            speed, per_forward, outs = run(target, prompts, args.new_tokens, args.repeats, **kw)
            base = base or (speed, outs)
            assert outs == base[1], f"{name} changed the greedy tokens"
            rows.append((case, name, speed, per_forward, speed / base[0]))

    cpu = 'unknown CPU'
    if os.path.exists('/proc/cpuinfo'):
        flags = open('/proc/cpuinfo').read()
        cpu = 'AVX512-BF16' if 'avx512_bf16' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'
    print(f"\ntorch {torch.__version__}, {args.threads} threads, {cpu}, fp32; greedy, {args.new_tokens} new tokens "
          f"x {args.prompts} prompts, best of {args.repeats}; target {sum(p.numel() for p in target.parameters()):,} "
          f"params, draft {sum(p.numel() for p in draft.parameters()):,}\n")
    print("| case | mode | tokens/s | tokens per forward of the target | speed-up |")
    print("|---|---|---:|---:|---:|")
    for case, name, speed, per_forward, ratio in rows:
        print(f"| {case} | {name} | {speed:.0f} | {per_forward:.2f} | {ratio:.2f}x |")


if __name__ == '__main__':
    main()
