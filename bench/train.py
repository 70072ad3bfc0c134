"""
Training throughput: tokens/s of full training steps (forward + backward + grad clip + AdamW step)
of the gpt-mini config (n_layer 6, n_head 6, n_embd 192; batch 64, block 128, vocab 65, dropout 0),
mingpt against transformers.GPT2LMHeadModel of identical dims and identical initial weights, and
against nanoGPT's model.py when given its path (its GPT is read from that file, not installed).

    python bench/train.py                      # everything: a markdown table on stdout
    python bench/train.py --nanogpt ~/nanoGPT/model.py   # nanoGPT's step too
    python bench/train.py --only mingpt        # one configuration in this process (used for peak RSS)
    python bench/train.py --vocab 50257        # GPT-2's vocabulary, where the loss is most of a step
    python bench/train.py --attention          # one layer's attention alone, torch's kernel and mingpt's

Two measurements, because they answer different questions:
- speed: every configuration lives in one process and they take turns, one step each, so that
  whatever else the machine is doing slows them all alike; the median step of each is reported;
- memory: each configuration runs alone in a fresh subprocess (--only), whose peak RSS
  (getrusage ru_maxrss) is then that configuration's and nobody else's.

The mingpt step mirrors Trainer._step (zero_grad, autocast forward, backward, clip, step), with
the optimizer from GPT.configure_optimizers (fused AdamW; mingpt+muon: Trainer's optimizer='muon')
and, as the Trainer asks, the loss without the logits (return_logits=False, mingpt.loss; mingpt+logits:
the plain loss from the whole logits);
transformers gets a plain torch AdamW, nanoGPT its own configure_optimizers. nanoGPT ties lm_head to
wte; here its head is untied, as mingpt's and transformers' are, so that all start from one model.
MFU counts 6 * N + 12 * n_layer * block * n_embd FLOPs per token (N: the matmul weights, i.e.
Linear layers and lm_head) against the FLOP/s of a large fp32 matmul measured here, on the same
number of threads.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mingpt.model import GPT  # noqa: E402

N_LAYER, N_HEAD, N_EMBD = 6, 6, 192
BATCH, BLOCK, VOCAB = 64, 128, 65
LR = 3e-4

# name -> (library, torch.compile?, autocast dtype); the nanogpt ones only with --nanogpt
CONFIGS = {
    'transformers':         ('transformers', False, None),
    'nanogpt':              ('nanogpt', False, None),
    'nanogpt+compile':      ('nanogpt', True, None),
    'nanogpt+bf16':         ('nanogpt', False, torch.bfloat16),
    'mingpt':               ('mingpt', False, None),
    'mingpt+logits':        ('mingpt', False, None),
    'mingpt+muon':          ('mingpt', False, None),
    'mingpt+compile':       ('mingpt', True, None),
    'mingpt+bf16':          ('mingpt', False, torch.bfloat16),
    'mingpt+compile+bf16':  ('mingpt', True, torch.bfloat16),
}


def rss_mb(field='VmRSS'):
    """ the current (VmRSS) or peak (VmHWM) resident set size of this process, in MB """
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mb():
    # VmHWM belongs to this process image only: getrusage's ru_maxrss survives fork + exec on
    # Linux, so a child of a big driver would report the driver's peak
    try:
        return rss_mb('VmHWM')
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class MatmulPeak:
    """
    FLOP/s of an (n, n) @ (n, n) fp32 matmul: the ceiling MFU is measured against. It takes its
    turn with the configurations, so that it is measured under the same conditions as they are.
    """

    def __init__(self, n=2048):
        self.n, self.a, self.b = n, torch.randn(n, n), torch.randn(n, n)
        self.a @ self.b  # warm-up
        self.times = []

    def step(self):
        t0 = time.perf_counter()
        self.a @ self.b
        self.times.append(time.perf_counter() - t0)

    def flops(self):
        return 2 * self.n**3 / statistics.median(self.times)


def make_mingpt():
    torch.manual_seed(0)
    config = GPT.get_default_config()
    config.model_type = None
    config.n_layer, config.n_head, config.n_embd = N_LAYER, N_HEAD, N_EMBD
    config.vocab_size, config.block_size = VOCAB, BLOCK
    config.embd_pdrop = config.resid_pdrop = config.attn_pdrop = 0.0
    return GPT(config)


def make_transformers(reference):
    """ GPT2LMHeadModel of the same dims, with reference's (a mingpt GPT) weights copied in """
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config, attn_implementation='sdpa') if _takes_attn_impl() else \
        GPT2LMHeadModel._from_config(config, attn_implementation='sdpa')
    # the parameter names are the same; transformers' Conv1D stores these weights transposed
    transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    theirs = model.state_dict()
    with torch.no_grad():
        for k, v in reference.state_dict().items():
            theirs[k].copy_(v.t() if k.endswith(transposed) else v)
    return model


def make_nanogpt(reference, path):
    """ nanoGPT's GPT (its model.py at path) of the same dims, with reference's weights copied in """
    import importlib.util
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
                              dropout=0.0, bias=True)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        model = module.GPT(config)
    # untie lm_head from wte, as the other configurations are; the names and layouts are mingpt's
    model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, N_EMBD))
    with torch.no_grad():
        model.load_state_dict(reference.state_dict(), strict=True)
    return model


def _takes_attn_impl():
    import inspect
    from transformers import GPT2LMHeadModel
    return 'attn_implementation' in inspect.signature(GPT2LMHeadModel.__init__).parameters


def matmul_params(model):
    """ N of the 6N rule: the weights that take part in matmuls (Linear / Conv1D / lm_head) """
    n = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and 'wte' not in name and 'wpe' not in name:
            n += p.numel()
    return n


class Runner:
    """ one configuration: its model, optimizer and step function """

    def __init__(self, name, nanogpt=None):
        library, compile_, dtype = CONFIGS[name]
        self.name = name
        if library == 'nanogpt':
            self.model = make_nanogpt(make_mingpt(), nanogpt)
            with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter groups
                self.optimizer = self.model.configure_optimizers(0.1, LR, (0.9, 0.95), 'cpu')
            forward = torch.compile(self.model) if compile_ else self.model

            def loss_fn(x, y):
                return forward(x, y)[1]
        elif library == 'transformers':
            self.model = make_transformers(make_mingpt())
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.95),
                                               weight_decay=0.1)
            forward = self.model

            def loss_fn(x, y):
                logits = forward(input_ids=x).logits
                return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
        else:
            self.model = make_mingpt()  # seeded: every row starts from the same weights
            train_config = argparse.Namespace(learning_rate=LR, betas=(0.9, 0.95), weight_decay=0.1,
                                              optimizer='muon' if name == 'mingpt+muon' else 'adamw',
                                              muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)
            self.optimizer = self.model.configure_optimizers(train_config)
            forward = torch.compile(self.model) if compile_ else self.model

            def loss_fn(x, y):  # mingpt+logits: the loss from the whole logits, as minGPT's forward gives it
                return forward(x, y, return_logits=name == 'mingpt+logits')[1]
        self.loss_fn = loss_fn
        self.autocast = (lambda: torch.autocast('cpu', dtype=dtype)) if dtype else contextlib.nullcontext
        self.model.train()
        self.times = []

    def step(self, x, y):
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        loss = loss.item()
        return time.perf_counter() - t0, loss


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        data = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=g)
        yield data[:, :-1].contiguous(), data[:, 1:].contiguous()


def measure(names, warmup, steps, peak=None, nanogpt=None):
    """ the configurations in turn, one step each; returns {name: [step seconds]}, {name: first loss} """
    runners = [Runner(n, nanogpt) for n in names]
    losses = {}
    for i, (x, y) in enumerate(batches(warmup + steps)):
        if peak is not None and i >= warmup:
            peak.step()
        for r in runners:
            dt, loss = r.step(x, y)
            if i == 0:
                losses[r.name] = loss
            if i >= warmup:
                r.times.append(dt)
            print(f"  step {i:2d} {r.name:22s} {dt * 1000:8.1f} ms  loss {loss:.4f}", file=sys.stderr, flush=True)
    return {r.name: r.times for r in runners}, losses


def attention_times(steps, warmup):
    """ gpt-mini's attention alone, forward and backward, of one (B, T, 3, nh, hs) QKV projection as a GPT-2
    block makes it: torch's scaled_dot_product_attention (its CPU flash kernel) on its (B, nh, T, hs) views,
    and mingpt.ops.attention_packed (what the model calls), taking turns; the median ms of each """
    import mingpt.kernels as kernels
    import mingpt.ops as ops
    if not kernels.available():
        raise SystemExit("mingpt.kernels is unavailable here (MINGPT_KERNELS=0, or no C compiler)")
    qkv = torch.randn(BATCH, BLOCK, 3, N_HEAD, N_EMBD // N_HEAD, requires_grad=True)
    dy = torch.randn(BATCH, BLOCK, N_HEAD, N_EMBD // N_HEAD)
    ways = {'torch': lambda t: F.scaled_dot_product_attention(*t.permute(2, 0, 3, 1, 4).unbind(0),
                                                               is_causal=True).transpose(1, 2),
            'mingpt.ops': ops.attention_packed}
    times = {name: ([], []) for name in ways}
    for i in range(warmup + steps):
        for name, attend in ways.items():
            t0 = time.perf_counter()
            y = attend(qkv)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            qkv.grad = None
            if i >= warmup:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {name: (statistics.median(f) * 1e3, statistics.median(b) * 1e3) for name, (f, b) in times.items()}


def main():
    global VOCAB
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', choices=list(CONFIGS), help="run one configuration alone, print JSON")
    parser.add_argument('--configs', default=None, help="comma-separated subset (default: all; the nanogpt "
                        "ones with --nanogpt)")
    parser.add_argument('--nanogpt', metavar='PATH', help="nanoGPT's model.py, to measure its step too")
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--vocab', type=int, default=VOCAB, help="vocabulary size (default 65, tiny "
                        "shakespeare's characters; 50257: GPT-2's)")
    parser.add_argument('--no-rss', action='store_true', help="skip the per-configuration subprocesses")
    parser.add_argument('--attention', action='store_true', help="time one layer's attention alone: torch's "
                        "kernel and mingpt.ops'")
    args = parser.parse_args()
    VOCAB = args.vocab
    torch.set_num_threads(args.threads)
    if args.attention:
        print(f"| gpt-mini attention, one layer (batch {BATCH}, T {BLOCK}, {N_HEAD} heads of {N_EMBD // N_HEAD}; "
              f"{args.threads} threads) | forward (ms) | backward (ms) |\n|---|---:|---:|")
        for name, (fwd, bwd) in attention_times(args.steps, args.warmup).items():
            print(f"| {name} | {fwd:.1f} | {bwd:.1f} |")
        return
    names = args.configs.split(',') if args.configs else [n for n in CONFIGS
                                                          if args.nanogpt or CONFIGS[n][0] != 'nanogpt']
    for n in names + ([args.only] if args.only else []):
        if n not in CONFIGS:
            parser.error(f"unknown configuration {n!r}; the configurations are {', '.join(CONFIGS)}")
        if CONFIGS[n][0] == 'nanogpt' and not args.nanogpt:
            parser.error(f"{n} needs --nanogpt PATH, the path of nanoGPT's model.py")
    if args.nanogpt and not os.path.isfile(args.nanogpt):
        parser.error(f"--nanogpt {args.nanogpt}: no such file (give the path of nanoGPT's model.py)")
    nanogpt = ['--nanogpt', args.nanogpt] if args.nanogpt else []

    if args.only:
        if CONFIGS[args.only][0] == 'transformers':
            import transformers  # noqa: F401  (a library's import is not its training memory)
        base = rss_mb()
        times, _ = measure([args.only], args.warmup, args.steps, nanogpt=args.nanogpt)
        print(json.dumps({'name': args.only, 'median_s': statistics.median(times[args.only]),
                          'peak_rss_mb': peak_rss_mb(), 'rss_after_imports_mb': base}))
        return

    # memory first, while this driver is still small (its own peak is not the children's anyway)
    rss = {}
    if not args.no_rss:
        for n in names:
            cmd = [sys.executable, os.path.abspath(__file__), '--only', n, '--warmup', str(args.warmup),
                   '--steps', str(max(3, args.steps // 2)), '--threads', str(args.threads), '--vocab', str(VOCAB),
                   *nanogpt]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rss[n] = json.loads(out.strip().splitlines()[-1])
            print(f"  {n}: peak RSS {rss[n]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    matmul = MatmulPeak()
    times, first_losses = measure(names, args.warmup, args.steps, matmul, args.nanogpt)
    peak = matmul.flops()
    # the same weights and batch: every row's first loss must agree (bf16 approximately)
    ref = first_losses[names[0]]
    for n, l in first_losses.items():
        tol = 5e-2 if CONFIGS[n][2] is not None else 1e-3
        if abs(l - ref) > tol:
            raise RuntimeError(f"{n} starts from loss {l:.5f}, {names[0]} from {ref:.5f}: not the same model")

    tokens = BATCH * BLOCK
    flops_per_token = 6 * matmul_params(make_mingpt()) + 12 * N_LAYER * BLOCK * N_EMBD
    base = tokens / statistics.median(times['transformers']) if 'transformers' in times else None
    rows = [(n, tokens / statistics.median(times[n])) for n in names]
    best = max((r for r in rows if r[0].startswith('mingpt')), key=lambda r: r[1], default=rows[0])[0]
    nano = tokens / statistics.median(times['nanogpt']) if 'nanogpt' in times else None

    print(f"\ngpt-mini training step (n_layer {N_LAYER}, n_head {N_HEAD}, n_embd {N_EMBD}; batch {BATCH}, "
          f"block {BLOCK}, vocab {VOCAB}), torch {torch.__version__}, {args.threads} threads, median of "
          f"{args.steps} steps after {args.warmup} warm-up, configurations alternated step by step.")
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (fp32 2048^3, median, taking turns with the steps); "
          f"{flops_per_token / 1e6:.2f} MFLOP per token\n")
    vs_nano = (" vs nanoGPT |", "---:|") if nano else ("", "")
    print(f"| configuration | tokens/s | vs transformers |{vs_nano[0]} MFU | peak RSS (MB) | RSS after imports (MB) |")
    print(f"|---|---:|---:|{vs_nano[1]}---:|---:|---:|")
    for n, tps in rows:
        ratio = f"{tps / base:.2f}x" if base else "-"
        if nano:
            ratio += f" | {tps / nano:.2f}x"
        mfu = tps * flops_per_token / peak
        r = rss.get(n)
        rss_cols = f"{r['peak_rss_mb']:.0f} | {r['rss_after_imports_mb']:.0f}" if r else "- | -"
        label = f"**{n}** (best)" if n == best else n
        print(f"| {label} | {tps:,.0f} | {ratio} | {mfu:.1%} | {rss_cols} |")
    print(f"\ncommand: python bench/train.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == '__main__':
    main()
