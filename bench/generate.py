"""
Benchmark greedy generation on CPU: mingpt (with the KV cache, without it, and with int8 linears)
against transformers' GPT2LMHeadModel.generate and, where they are installed, CTranslate2 (fp32, int8)
and llama.cpp (f32, q8_0) through llama-cpp-python, all on the same random GPT-2 124M weights (saved by
transformers, loaded or converted by the others), each engine in a process of its own.

    python bench/generate.py                     # the full benchmark (several minutes)
    python bench/generate.py --quick             # fewer tokens, to try a change
    python bench/generate.py --quantize int8     # add mingpt with int8 linears (mingpt.quantize)
    pip install -e '.[bench]'                    # the peers: ctranslate2, llama-cpp-python, gguf

Cases: (a) batch 1, 16 -> 128 tokens, (b) batch 1, 512 -> 64, (c) batch --batch (16), 64 -> 128 on a
(B, 64) prompt batch (`generate` of each engine; llama-cpp-python decodes one sequence only). Each
round starts every engine in a fresh process, one after another, which runs each case once after a
warm-up; each engine keeps its fastest of --repeats rounds (default 3). Even so, numbers taken while
other processes use the CPU are noisy (2 threads suffer most, since an OpenMP thread waiting for a
descheduled sibling stalls the whole op). An engine that is not installed is skipped, and said so.

Decoding reads every weight once per step (~0.5 GB for GPT-2 124M in fp32, ~0.14 GB in int8) and, at
batch 1, does little arithmetic on it, so its speed limit is the memory bandwidth: the script measures
that (or takes --bandwidth) and reports which fraction of it each engine's decode steps achieve.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import peers  # noqa: E402
from mingpt.generate import stream  # noqa: E402
from mingpt.model import GPT  # noqa: E402
from mingpt.quantize import METHODS, quantize  # noqa: E402


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


def weight_bytes_per_step(model, q8_0=False):
    """ bytes of weights one decode step reads: every parameter and buffer but the embedding tables,
    which only gather a row, plus a head tied to wte, which reads all of it. q8_0: the matrices as
    llama.cpp's q8_0 stores them, 34 bytes per 32 weights """
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in embeddings}
    if model.lm_head.weight is model.transformer.wte.weight:
        tensors['head'] = model.lm_head.weight
    if q8_0:
        return sum(t.numel() * (34 / 32 if t.dim() == 2 else 4) for t in tensors.values())
    return sum(t.numel() * t.element_size() for t in tensors.values())


def time_generate(model, idx, n):
    """ a whole batch through GPT.generate: (nan, total seconds, the first row's new tokens) """
    t0 = time.perf_counter()
    out = model.generate(idx, n)
    return float('nan'), time.perf_counter() - t0, out[0, idx.size(1):].tolist()


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

    streamer = FirstToken() if idx.size(0) == 1 else None  # transformers streams one row only
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                          streamer=streamer)
    total = time.perf_counter() - t0
    return (streamer.t - t0 if streamer else float('nan')), total, out[0, idx.size(1):].tolist()


def make_engines(args, work):
    """
    {label: (make, batch sizes it runs)} for this command line: make() loads that engine from the
    transformers directory work/'hf' (converting it first where a peer needs its own format) ->
    run(idx, n). Also {family: why skipped}.
    """
    import transformers

    def mingpt(method=None):
        model = quantize(GPT.from_pretrained(work / 'hf').eval(), method)
        return lambda idx, n: time_mingpt(model, idx, n) if idx.size(0) == 1 else time_generate(model, idx, n)

    def hf():
        model = transformers.GPT2LMHeadModel.from_pretrained(work / 'hf').eval()
        return lambda idx, n: time_hf(model, idx, n)

    def uncached():
        model = GPT.from_pretrained(work / 'hf').eval()
        return lambda idx, n: time_mingpt(model, idx, n, use_cache=False)

    any_batch, one_row = (1, 2), (1,)  # 2: any batch size
    engines = {'mingpt, KV cache': (mingpt, any_batch)}
    if not args.skip_uncached:
        engines['mingpt, no cache'] = (uncached, one_row)
    engines['transformers generate'] = (hf, any_batch)
    if args.quantize:
        engines[f'mingpt {args.quantize}, KV cache'] = (lambda: mingpt(args.quantize), any_batch)
    skipped = {family: why for family, why in peers.available().items() if why}
    if args.no_peers:
        skipped = {family: '--no-peers' for family in ('ctranslate2', 'llama.cpp')}
    if 'ctranslate2' not in skipped:
        for compute in ('float32', 'int8'):
            def make(compute=compute):
                tokenizer = transformers.AutoTokenizer.from_pretrained(work / 'hf')
                gen = peers.ctranslate2_generator(work / 'hf', work / f'ct2-{compute}', compute, args.threads)
                return lambda idx, n: peers.time_ctranslate2(gen, tokenizer, idx, n)
            engines[f'CTranslate2 {compute}'] = (make, any_batch)
    if 'llama.cpp' not in skipped:
        for qtype in ('f32', 'q8_0'):
            def make(qtype=qtype):
                path = peers.write_gguf(work / 'hf', work / f'gpt2-{qtype}.gguf', qtype)
                llm = peers.llama_cpp_model(path, args.threads, n_ctx=1024)
                return lambda idx, n: peers.time_llama_cpp(llm, idx, n)
            engines[f'llama.cpp {qtype}'] = (make, one_row)
    return engines, skipped


def case_prompts(cases, vocab_size=50257):
    """ the (B, T) prompt of each case, the same in every process """
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (B, T), generator=gen) for _, B, T, _ in cases]


def worker(args, cases):
    """ one engine, in a process of its own: each case once, after a warm-up -> JSON on stdout """
    engines, _ = make_engines(args, Path(args.work))
    make, sizes = engines[args.worker]
    try:
        run = make()
    except Exception as e:  # a peer that cannot build here is skipped, with the reason
        print(json.dumps({'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'}))
        return
    results = {}
    for (name, B, T, n), idx in zip(cases, case_prompts(cases)):
        if B == 1 or 2 in sizes:
            run(idx, 2)  # warm up (first-call allocations, kernel selection, weight layouts)
            results[name] = run(idx, n)
    print(json.dumps({'results': results}))


def run_rounds(args, engines, cases, work):
    """
    {label: {case: (ttft, total, tokens)}}, the best of --repeats rounds; in each round every engine
    runs in a fresh process of its own, one after another. Why processes: engines sharing one
    process slow each other down (each brings its own OpenMP runtime and thread pool; here a loaded
    CTranslate2 model made mingpt's decode steps 1.6x slower, and llama.cpp ran at 60-75% of its own
    speed beside the others). Taking turns round by round still spreads a busy spell of the
    machine over every engine.
    """
    best, errors = {}, {}
    for r in range(args.repeats):
        for label in engines:
            if label in errors or (r > 0 and label == 'mingpt, no cache'):
                continue  # the slow uncached one runs once
            command = [sys.executable, os.path.abspath(__file__), '--worker', label, '--work', str(work),
                       '--threads', str(args.threads), '--batch', str(args.batch)]
            command += ['--quick'] * args.quick + ['--skip-uncached'] * args.skip_uncached
            command += ['--quantize', args.quantize] * bool(args.quantize) + ['--no-peers'] * args.no_peers
            done = subprocess.run(command, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                errors[label] = f'exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}'
                continue
            out = json.loads(lines[-1])
            if 'error' in out:
                errors[label] = out['error']
                continue
            for case, result in out['results'].items():
                if result[1] < best.setdefault(label, {}).get(case, (0, float('inf')))[1]:
                    best[label][case] = result
            print(f"round {r + 1}, {label}: " + ', '.join(f"{c} {v[1]:.2f} s" for c, v in out['results'].items()),
                  file=sys.stderr, flush=True)
    return best, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer new tokens, for trying changes')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3, help='rounds; each engine keeps its best')
    parser.add_argument('--skip-uncached', action='store_true', help='skip mingpt without the cache')
    parser.add_argument('--quantize', choices=METHODS, default=None, help='also run mingpt with int8 linears')
    parser.add_argument('--batch', type=int, default=16, help='rows of case (c); 0 skips it')
    parser.add_argument('--bandwidth', type=float, default=None, help='memory GB/s, instead of measuring it')
    parser.add_argument('--no-peers', action='store_true', help='skip CTranslate2 and llama.cpp')
    parser.add_argument('--worker', help=argparse.SUPPRESS)  # run one engine (run_rounds starts these)
    parser.add_argument('--work', help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [('a', 1, 16, 128), ('b', 1, 512, 64), ('c', args.batch, 64, 128)]
    if args.quick:
        cases = [('a', 1, 16, 32), ('b', 1, 512, 16), ('c', args.batch, 64, 32)]
    cases = [c for c in cases if c[1] > 0]
    if args.worker:
        return worker(args, cases)

    torch.manual_seed(0)
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(work / 'hf')
    peers.gpt2_tokenizer(work / 'hf')  # CTranslate2's converter and the peers' prompts read it
    model = GPT.from_pretrained(work / 'hf').eval()
    nbytes = {'fp32': weight_bytes_per_step(model)}
    if args.quantize:
        nbytes[args.quantize] = weight_bytes_per_step(quantize(GPT.from_pretrained(work / 'hf').eval(), args.quantize))
    nbytes['q8_0'] = weight_bytes_per_step(model, q8_0=True)
    del model
    bandwidth = args.bandwidth or memory_bandwidth()

    engines, skipped = make_engines(args, work)
    best, errors = run_rounds(args, engines, cases, work)
    skipped.update(errors)

    def step_bytes(label):
        if label.endswith('int8') or label.startswith(f'mingpt {args.quantize}'):
            return nbytes.get('int8', nbytes['fp32'] / 3.6)
        return nbytes['q8_0'] if label.endswith('q8_0') else nbytes['fp32']

    rows = []
    for name, B, T, n in cases:
        ours = best['mingpt, KV cache'][name][2]
        for label in engines:
            if name not in best.get(label, {}):
                continue
            ttft, total, tokens = best[label][name]
            # greedy tokens agree between exact engines; an int8 one may part from fp32's after a while
            same = next((i for i, (a, b) in enumerate(zip(tokens, ours)) if a != b), min(len(tokens), len(ours)))
            steps_per_s = (n - 1) / (total - ttft) if ttft == ttft else n / total  # nan ttft: whole batch
            gbs = step_bytes(label) * steps_per_s / 1e9
            rows.append((f'({name}) {B} x {T} -> {n}', label, B * n / total, B * steps_per_s, ttft * 1e3,
                         gbs, gbs / bandwidth, f'{same}/{n}'))

    print(f"\nGPT-2 124M config, random weights, greedy, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, each engine in a process of its own")
    print(f"memory bandwidth ({'given' if args.bandwidth else 'best of a 1 GB sum / GEMV'}): {bandwidth:.1f} GB/s; "
          f"weights read per decode step: fp32 {nbytes['fp32'] / 1e9:.3f} GB\n")
    print('| batch x prompt -> new | engine | tokens/s (all) | decode tokens/s | first token (ms) | '
          'weight GB/s per decode step | of bandwidth | tokens equal to mingpt fp32 |')
    print('|---|---|---:|---:|---:|---:|---:|:---:|')
    for case, label, tps, dtps, ttft, gbs, frac, same in rows:
        print(f'| {case} | {label} | {tps:.1f} | {dtps:.1f} | {ttft:.0f} | {gbs:.1f} | {frac:.0%} | {same} |')
    by = {(r[0], r[1]): r for r in rows}
    for case in dict.fromkeys(r[0] for r in rows):
        ref = by[(case, 'transformers generate')][2]
        print(f"{case}: " + ', '.join(f"{label} {r[2] / ref:.2f}x" for (c, label), r in by.items()
                                      if c == case and label != 'transformers generate') + ' transformers')
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    print(f"\ncommand: python bench/generate.py {' '.join(sys.argv[1:])}".rstrip())
    tmp.cleanup()


if __name__ == '__main__':
    main()
