"""
int8 linears (mingpt.quantize): the candidate CPU kernels side by side, and what int8 costs in bits per byte.

    python bench/int8.py kernels                 # every candidate, GPT-2 124M's products, 1 and 16 rows
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python bench/int8.py kernels
    python bench/int8.py quality --model out/chargpt/ckpt --data held_out.txt
    python bench/int8.py quality --model out/gpt2-cpu/ckpt_best --data data/shards   # the shards' val split

kernels: one decode step of GPT-2 124M is 49 products (per layer c_attn 768 -> 2304, c_proj 768 -> 768,
c_fc 768 -> 3072, c_proj 3072 -> 768; then the head 768 -> 50257), each with a weight of its own (random;
~2 GB in every candidate's layout). Each candidate runs all of them at 1 row
(batch-1 decoding) and 16 rows (a batched step), best of --rounds rounds in which the kernels take turns,
and is checked against the exact product with the dequantized weight: "ok" when within what quantizing the activations may change (half a 7-bit
step of the input's range, times the row's weights summed), "WRONG" beyond it (int16 saturation on CPUs
without VNNI). The environment variables above make this CPU behave as an AVX2-only one for torch,
oneDNN and fbgemm (and inductor, which reads ATEN_CPU_CAPABILITY).

quality: bits per byte (mingpt.evaluate) of a trained model in fp32, with mingpt.quantize's int8 on this
CPU's kernel, with the exact kernel (weights alone rounded, per output row), and with weights rounded per
block of 32 inputs (llama.cpp's q8_0 scheme, simulated with dequantized weights).
"""

import argparse
import copy
import os
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mingpt import kernels, hardware  # noqa: E402
from mingpt.quantize import Int8Linear, quantize, quantize_rows  # noqa: E402

SHAPES = [((768, 2304), 12), ((768, 768), 12), ((768, 3072), 12), ((3072, 768), 12), ((768, 50257), 1)]


def onednn(weight_of):
    op = torch.ops.mkldnn._linear_pointwise
    return lambda x, d: op(x, weight_of(d), None, 'none', [], '')


def int_mm_per_row(x, d):
    """ torch._int_mm with the activations quantized per row, symmetric, to int8 """
    sx = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    xq = torch.round(x / sx).to(torch.int8)
    return torch._int_mm(xq, d['q'].t()) * sx * d['s']


def onednn_qlinear(x, d):
    """ oneDNN's int8 linear (torch.ops.onednn) with uint8 activations, one scale per call """
    lo, hi = torch.aminmax(x)
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = (hi - lo).clamp_min(1e-12) / 255
    zero = torch.round(-lo / scale).long()
    xq = torch.clamp(torch.round(x / scale) + zero, 0, 255).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise.tensor(xq, scale, zero, d['qpack'], d['s'], d['zeros'], None,
                                                     1.0, 0, torch.float32, 'none', [], '')


def compiled_reduction():
    """ inductor's C++ code for the dequantize-multiply-sum, one row: a GEMV that reads int8 """
    f = torch.compile(lambda x, q, s: (x[:, None, :] * q.to(x.dtype)).sum(-1) * s, dynamic=False)
    return lambda x, d: f(x, d['q'], d['s'])


def candidates(with_compile):
    fbgemm = hardware.INT8_KERNELS
    c = {
        'fp32, oneDNN (mingpt Linear)': onednn(lambda d: d['w']),
        'fp32, oneDNN blocked (pack_weights)': onednn(lambda d: d['w_blocked']),
        'fp32, mingpt.kernels (decoding one row)': lambda x, d: kernels.product(x, d['gemv_w'], d['s'].numel()),
        'mingpt.kernels int8, fp32 activations (decoding one row)':
            lambda x, d: kernels.product(x, d['gemv_q'], d['s'].numel(), scale=d['s']),
        'aten._weight_int8pack_mm': lambda x, d: torch.ops.aten._weight_int8pack_mm(x, d['q'], d['s']),
        'torch._int_mm, int8 activations per row': int_mm_per_row,
        'onednn.qlinear_pointwise, uint8 activations': onednn_qlinear,
        'fbgemm linear_dynamic, 8-bit activations': lambda x, d: fbgemm['fbgemm'].product(x, d['fbgemm'], None),
        'fbgemm linear_dynamic, 7-bit activations': lambda x, d: fbgemm['fbgemm-7bit'].product(x, d['fbgemm'], None),
        'dequantize + F.linear (exact fallback)': lambda x, d: hardware._dequantized_product(x, (d['q'], d['s']), None),
        'bf16 weights, oneDNN': onednn(lambda d: d['w_bf16']),
    }
    c['bf16 weights, oneDNN'] = lambda x, d, f=c['bf16 weights, oneDNN']: f(x.bfloat16(), d).float()
    if with_compile:
        c['torch.compile dequantize-multiply-sum (1 row)'] = compiled_reduction()
    return c


def prepare(K, N):
    w = torch.randn(N, K) * 0.02
    q, s = quantize_rows(w)
    d = dict(w=w, q=q, s=s, zeros=torch.zeros(N, dtype=torch.long))
    for name, make in (('w_blocked', lambda: torch.ops.mkldnn._reorder_linear_weight(w, None)),
                       ('qpack', lambda: torch.ops.onednn.qlinear_prepack(q, None)),
                       ('fbgemm', lambda: hardware._fbgemm_prepare(q, s)),
                       ('w_bf16', lambda: w.bfloat16()),
                       ('gemv_w', lambda: kernels.block(w)), ('gemv_q', lambda: kernels.block(q))):
        try:
            d[name] = make()
        except (RuntimeError, AttributeError) as e:
            d[name] = e
    return d


def error_ratio(name, f, xs, ds):
    """ the largest error of f against the exact dequantized product, over what is allowed (<= 1: ok) """
    worst = 0.0
    for x, d in zip(xs, ds):
        exact = x @ (d['q'].float() * d['s'][:, None]).t()
        step = (x.max().clamp_min(0) - x.min().clamp_max(0)) / 127
        allowed = step / 2 * (d['q'].float().abs() * d['s'][:, None]).sum(1) + 1e-4
        if name.startswith(('fp32', 'bf16')):  # these read the unrounded weight
            allowed = allowed + d['s'] / 2 * x.abs().sum(1, keepdim=True)
        worst = max(worst, float(((f(x, d) - exact).abs() / allowed).max()))
    return worst


def bench_kernels(args):
    torch.manual_seed(0)
    # a weight of its own for each of the 49 products, as in a model: the step streams them all from
    # memory, rather than reading one matrix per shape again and again from the cache
    ds = [[prepare(K, N) for _ in range(count)] for (K, N), count in SHAPES]
    print(f"torch {torch.__version__}, {args.threads} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
          f"FBGEMM_ENABLE_INSTRUCTIONS={os.environ.get('FBGEMM_ENABLE_INSTRUCTIONS')}; mingpt chooses: "
          f"{hardware.int8_kernel().name}; best of {args.rounds} rounds, the kernels taking turns\n")
    print('| kernel | rows | ms per GPT-2 step (49 products) | vs fp32 oneDNN | max error / allowed |')
    print('|---|---:|---:|---:|---:|')
    for M in (1, 16):
        xs = [torch.randn(M, K) for (K, _), _ in SHAPES]
        runs, errors = {}, {}
        for name, f in candidates(args.compile).items():
            if 'compile' in name and M > 1:
                continue
            try:
                errors[name] = error_ratio(name, f, xs, [copies[0] for copies in ds])
                runs[name] = f
            except Exception as e:
                print(f'| {name} | {M} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |')
        # rounds in which every kernel runs once, so that a busy spell of a shared machine does not
        # land on one kernel only; each keeps its fastest round
        best = dict.fromkeys(runs, float('inf'))
        for _ in range(args.rounds):
            for name, f in runs.items():
                t0 = time.perf_counter()
                for x, copies in zip(xs, ds):
                    for d in copies:
                        f(x, d)
                best[name] = min(best[name], time.perf_counter() - t0)
        base = best.get('fp32, oneDNN (mingpt Linear)')
        for name, t in best.items():
            verdict = 'ok' if errors[name] <= 1 else 'WRONG'
            print(f'| {name} | {M} | {t * 1e3:.2f} | {base / t:.2f}x | {errors[name]:.2f} {verdict} |', flush=True)


def round_blocks(weight, block=32):
    """ the weight as q8_0 would store it: int8 per block of `block` inputs, one scale each """
    out, inp = weight.shape
    w = weight.detach().float().view(out, inp // block, block)
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(w / scale).clamp(-127, 127) * scale).view(out, inp)


def held_out_shard_text(directory, tokenizer):
    """ the text of the validation shards mingpt.prepare wrote in directory, decoded """
    from pathlib import Path
    from mingpt.data import open_shard, read_meta
    meta = read_meta(directory)
    ids = [i for s in meta['shards'] if s['split'] == 'val' for i in open_shard(Path(directory) / s['file']).tolist()]
    return tokenizer.decode(ids)


def bench_quality(args):
    from mingpt.data import read_text_file
    from mingpt.evaluate import evaluate_text
    from mingpt.model import GPT
    from mingpt.tokenizers import tokenizer_for_model
    model = GPT.from_pretrained(args.model).eval()
    tokenizer = tokenizer_for_model(args.model, model.config.vocab_size)
    if os.path.isdir(args.data):  # token shards: their validation split, which training never reads
        text = held_out_shard_text(args.data, tokenizer)
    else:
        text = read_text_file(args.data)
        if args.last_fraction < 1:
            text = text[int(len(text) * (1 - args.last_fraction)):]

    def bpb(m):
        return evaluate_text(m, tokenizer, text, block_size=m.block_size)['bits_per_byte']

    blocks = copy.deepcopy(model)
    with torch.no_grad():
        for m in blocks.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.size(1) % 32 == 0:
                m.weight = torch.nn.Parameter(round_blocks(m.weight))  # a tied head gets its own copy
    int8 = quantize(copy.deepcopy(model), 'int8')
    rows = [('fp32', bpb(model)), (f'int8, per output row, {hardware.int8_kernel().name} kernel', bpb(int8))]
    saved = hardware._int8_kernel
    hardware._int8_kernel = hardware.INT8_KERNELS['dequantize']
    rows.append(('int8, per output row, weights only (exact kernel)', bpb(int8)))
    hardware._int8_kernel = saved
    rows.append(('int8, per block of 32 (q8_0-like), weights only', bpb(blocks)))
    part = 'its validation split' if os.path.isdir(args.data) else f'last {args.last_fraction:.0%}'
    print(f"{args.model} on {args.data} ({part}: {len(text.encode())} bytes)\n")
    print('| weights | bits per byte | vs fp32 |')
    print('|---|---:|---:|')
    for name, value in rows:
        print(f'| {name} | {value:.5f} | {value / rows[0][1] - 1:+.3%} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='what', required=True)
    k = sub.add_parser('kernels', help='the candidate kernels side by side')
    k.add_argument('--threads', type=int, default=2)
    k.add_argument('--rounds', type=int, default=15, help='timing rounds; each kernel keeps its best')
    k.add_argument('--compile', action='store_true', help='also torch.compile (inductor C++) of the dequantize-sum')
    q = sub.add_parser('quality', help='bits per byte in fp32 and int8')
    q.add_argument('--model', required=True)
    q.add_argument('--data', required=True, help='a text file, or a directory of token shards (its val split)')
    q.add_argument('--last-fraction', type=float, default=0.1, help='score the last part of the text (held out)')
    args = parser.parse_args()
    if args.what == 'kernels':
        torch.set_num_threads(args.threads)
        bench_kernels(args)
    else:
        bench_quality(args)
    print(f"\ncommand: python bench/int8.py {' '.join(sys.argv[1:])}")


if __name__ == '__main__':
    main()
