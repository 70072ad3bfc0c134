"""
Benchmark batch-1 greedy generation on CPU: mingpt with the KV cache, mingpt without the cache,
and transformers' GPT2LMHeadModel.generate, all on the same random GPT-2 124M weights (saved by
transformers, loaded by mingpt), fp32, in one process.

    python bench/generate.py              # the full benchmark (a few minutes)
    python bench/generate.py --quick      # fewer tokens, to try a change

Each engine runs --repeats times (default 3), taking turns, and keeps its fastest run; even so,
numbers taken while other processes use the CPU are noisy (2 threads suffer most, since an
OpenMP thread waiting for a descheduled sibling stalls the whole op).

Batch-1 decoding reads every weight once per token (~0.5 GB for GPT-2 124M in fp32) and does
little arithmetic on it, so its speed limit is the memory bandwidth: the script measures that too
and reports which fraction of it the decode steps achieve.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mingpt.generate import stream  # noqa: E402
from mingpt.model import GPT  # noqa: E402


def memory_bandwidth(gigabytes=1.0, repeats=5):
    """ GB/s of reading a tensor much larger than any cache: the best of a few sums and GEMVs """
    x = torch.randn(int(gigabytes * 1e9 / 4))
    m = x[: (x.numel() // 4096) * 4096].view(-1, 4096)  # the GEMV is what decoding does
    v = torch.randn(4096)
    best = 0.0
    for f in (x.sum, lambda: torch.mv(m, v)):
        f()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_step(model):
    """ bytes of weights one decode step reads: everything but the embedding tables, plus the
    (tied) lm_head, which reads the whole token embedding; the embeddings only gather one row """
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    n = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def time_mingpt(model, idx, n, **kwargs):
    """ (seconds to the first new token, total seconds, the new tokens) """
    t0 = time.perf_counter()
    tokens = []
    for tok in stream(model, idx, n, **kwargs):
        tokens.append(int(tok))
        if len(tokens) == 1:
            ttft = time.perf_counter() - t0
    return ttft, time.perf_counter() - t0, tokens


def time_hf(hf, idx, n):
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """ generate() puts the prompt first, then each new token: note when the first comes """
        def __init__(self):
            self.puts, self.t = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.t = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                          streamer=streamer)
    total = time.perf_counter() - t0
    return streamer.t - t0, total, out[0, idx.size(1):].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer new tokens, for trying changes')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3, help='rounds; each engine keeps its best')
    parser.add_argument('--skip-uncached', action='store_true', help='skip mingpt without the cache')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = GPT.from_pretrained(d).eval()

    bandwidth = memory_bandwidth()
    step_bytes = weight_bytes_per_step(model)
    cases = [('a', 16, 128), ('b', 512, 64)]
    if args.quick:
        cases = [('a', 16, 32), ('b', 512, 16)]

    rows = []
    for name, T, n in cases:
        idx = torch.randint(0, cfg.vocab_size, (1, T))
        engines = {
            'mingpt, KV cache': lambda k: time_mingpt(model, idx, k),
            'mingpt, no cache': lambda k: time_mingpt(model, idx, k, use_cache=False),
            'transformers generate': lambda k: time_hf(hf, idx, k),
        }
        if args.skip_uncached:
            del engines['mingpt, no cache']
        # warm up every path (first-call allocations, oneDNN kernel selection) on this prompt
        for run in engines.values():
            run(2)
        # the best of a few rounds, the engines taking turns within each round, so that a busy
        # spell of the machine does not land on one engine only (the slow uncached one runs once)
        best = {}
        for r in range(args.repeats):
            for label, run in engines.items():
                if r > 0 and label == 'mingpt, no cache':
                    continue
                result = run(n)
                if label not in best or result[1] < best[label][1]:
                    best[label] = result
        ours = best['mingpt, KV cache']
        for label, (ttft, total, tokens) in best.items():
            same = 'yes' if tokens == ours[2] else 'NO'
            decode_s = (total - ttft) / (n - 1)  # per token after the first
            gbs = step_bytes / decode_s / 1e9
            rows.append((f'({name}) {T} -> {n}', label, n / total, 1 / decode_s, ttft * 1e3,
                         gbs, gbs / bandwidth, same))

    print(f"\nGPT-2 124M config, random weights, fp32, batch 1, greedy, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} threads")
    print(f"memory bandwidth (best of a 1 GB sum / GEMV): {bandwidth:.1f} GB/s; weights read per "
          f"decode step: {step_bytes / 1e9:.3f} GB\n")
    print('| prompt -> new | engine | tokens/s (all) | decode tokens/s | first token (ms) | '
          'weight GB/s per decode step | of bandwidth | same tokens as mingpt |')
    print('|---|---|---:|---:|---:|---:|---:|:---:|')
    for case, label, tps, dtps, ttft, gbs, frac, same in rows:
        print(f'| {case} | {label} | {tps:.1f} | {dtps:.1f} | {ttft:.0f} | {gbs:.1f} | '
              f'{frac:.0%} | {same} |')
    by = {(r[0], r[1]): r for r in rows}
    for case in dict.fromkeys(r[0] for r in rows):
        ours = by[(case, 'mingpt, KV cache')][2]
        line = f"{case} mingpt, KV cache: {ours / by[(case, 'transformers generate')][2]:.2f}x transformers"
        if (case, 'mingpt, no cache') in by:
            line += f", {ours / by[(case, 'mingpt, no cache')][2]:.1f}x mingpt without the cache"
        print(line)
    print(f"\ncommand: python bench/generate.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == '__main__':
    main()
