"""
Time to a validation loss: character-level tiny shakespeare (projects/chargpt), recipes trained on the
same data and machine, each run as a user runs it (python projects/chargpt/chargpt.py ..., a fresh
process, evaluations and samples included in its time):

    python bench/speedrun.py                       # the recipes, up to 15 minutes each
    python bench/speedrun.py --minutes 5 --only fast minGPT
    python bench/speedrun.py --only fast --seeds 3407 1 2      # each recipe once per seed
    python bench/speedrun.py --ablation --ablation-iters 400   # the fast recipe with each choice undone

- minGPT: minGPT's chargpt settings (gpt-mini, AdamW at a constant 5e-4, batch 64 x 128, dropout 0.1);
- nanoGPT: nanoGPT's shakespeare_char recipe (AdamW 1e-3 -> 1e-4 on a cosine, beta2 0.99, batch 64 x 256,
  dropout 0.2, no biases, tied head) at chargpt's model size, its schedule shortened from 5,000 steps to 350;
- default: chargpt's defaults (AdamW 2e-3 -> 2e-5, batch 32 x 128, no dropout);
- fast: chargpt --preset=fast (rotary positions, RMSNorm, QK-norm, ReLU^2, no biases, zero-initialised
  output projections, value embeddings, token shift, dropout 0.05, Muon with its momentum warmed up; batch 32 x 128).

A run that is not done after --minutes is stopped there; its curve ends at its last evaluation. The
validation loss is each recipe's own measure (the Trainer's: 20 batches of its windows). Writes
speedrun.png (val loss against minutes and against tokens), speedrun.json and a markdown table on stdout;
with --only, the other recipes' runs in an earlier speedrun.json of the same --out (same --minutes and
--dtype) join the table and the plot.

The ablation trains the fast recipe and, for each of its choices, the fast recipe with that choice undone,
all for the same --ablation-iters iterations (a schedule of that length, eager: compiling would take a
large share of so short a run): what each choice buys on its own.
Precision: --dtype (float32 by default: the case of a CPU without bf16 instructions).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARGPT = os.path.join(ROOT, 'projects', 'chargpt', 'chargpt.py')

RECIPES = {
    'minGPT': ['--model.model_type=gpt-mini', '--data.block_size=128', '--trainer.batch_size=64',
               '--trainer.learning_rate=5e-4', '--trainer.lr_schedule=None', '--trainer.warmup_iters=0',
               '--trainer.min_lr=None', '--model.embd_pdrop=0.1', '--model.resid_pdrop=0.1',
               '--model.attn_pdrop=0.1', '--trainer.max_iters=100000', '--trainer.eval_interval=100'],
    'nanoGPT': ['--data.block_size=256', '--trainer.batch_size=64', '--trainer.learning_rate=1e-3',
                '--trainer.min_lr=1e-4', '--trainer.warmup_iters=100', '--trainer.betas=(0.9, 0.99)',
                '--model.embd_pdrop=0.2', '--model.resid_pdrop=0.2', '--model.attn_pdrop=0.2',
                '--model.bias=False', '--model.tie_weights=True', '--trainer.max_iters=350',
                '--trainer.eval_interval=50'],
    'default': [],
    'fast': ['--preset=fast'],
}

# the fast recipe's choices, each undone on its own
ABLATIONS = {
    'learned positions': ['--model.pos_emb=learned'],
    'LayerNorm': ['--model.norm=layernorm'],
    'no QK-norm': ['--model.qk_norm=False'],
    'GELU': ['--model.mlp_act=gelu'],
    'biases': ['--model.bias=True'],
    'random output init': ['--model.zero_init_out=False'],
    'no value embeddings': ['--model.value_embeds=False'],
    'no token shift': ['--model.token_shift=False'],
    'AdamW only': ['--trainer.optimizer=adamw'],
    'no momentum warm-up': ['--trainer.muon_momentum_warmup=0'],
    'context 256': ['--data.block_size=256', '--trainer.batch_size=16'],
    'no dropout': ['--model.embd_pdrop=0', '--model.resid_pdrop=0'],
}


def train(name, args, work_dir, minutes, dtype):
    """ chargpt with args in a fresh process and work dir, stopped after minutes (None: never); the run with
    its evaluations (seconds since the start, iter, tokens, val loss) """
    work_dir = os.path.join(work_dir, name.replace(' ', '-'))
    argv = [sys.executable, CHARGPT, f'--system.work_dir={work_dir}', f'--trainer.dtype={dtype}'] + args
    shutil.rmtree(work_dir, ignore_errors=True)  # a run of this benchmark starts afresh, never resumes
    os.makedirs(work_dir)
    with open(os.path.join(work_dir, 'speedrun.log'), 'w') as log:
        start = time.time()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=None if minutes is None else minutes * 60)
            stopped = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = True
        seconds = time.time() - start
    if proc.returncode and not stopped:
        raise SystemExit(f"{name}: chargpt failed (exit {proc.returncode}); see {work_dir}/speedrun.log")
    with open(os.path.join(work_dir, 'config.json')) as f:
        config = json.load(f)
    tokens_per_iter = config['trainer']['batch_size'] * config['data']['block_size']
    evals = []
    with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
        for line in f:
            r = json.loads(line)
            if 'val_loss' in r:
                evals.append({'seconds': round(r['time'] - start, 1), 'iter': r['iter'],
                              'tokens': r['iter'] * tokens_per_iter, 'val_loss': r['val_loss']})
    return {'name': name, 'args': args, 'evals': evals, 'seconds': round(seconds, 1), 'stopped': stopped}


def first_below(run, target):
    """ the first evaluation of run at or below target, or None """
    return next((e for e in run['evals'] if e['val_loss'] <= target), None)


def table(runs, target):
    lines = [f"| recipe | best val loss | at | tokens | first <= {target} | wall time | command |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        if not run['evals']:
            lines.append(f"| {run['name']} | - | | | | {run['seconds'] / 60:.1f} min | |")
            continue
        best = min(run['evals'], key=lambda e: e['val_loss'])
        hit = first_below(run, target)
        reached = f"{hit['seconds'] / 60:.1f} min (iter {hit['iter']})" if hit else 'no'
        stop = ' (stopped)' if run['stopped'] else ''
        command = shlex.join(['chargpt.py'] + run['args'])
        at = f"{best['seconds'] / 60:.1f} min, iter {best['iter']}"
        lines.append(f"| {run['name']} | {best['val_loss']:.4f} | {at} | {best['tokens'] / 1e6:.2f}M | {reached} | "
                     f"{run['seconds'] / 60:.1f} min{stop} | `{command}` |")
    return '\n'.join(lines)


def ablation_table(runs):
    base = runs[0]['evals'][-1]['val_loss']
    lines = ["| fast recipe, with | val loss | change | wall time |", "|---|---:|---:|---:|"]
    for run in runs:
        loss = run['evals'][-1]['val_loss']
        lines.append(f"| {run['name']} | {loss:.4f} | {loss - base:+.4f} | {run['seconds'] / 60:.1f} min |")
    return '\n'.join(lines)


def plot(runs, path, target):
    """ val loss against minutes and against tokens, one line per run; False without matplotlib """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    losses = [x['val_loss'] for r in runs for x in r['evals']]
    if not losses:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in runs:
        e = run['evals']
        axes[0].plot([x['seconds'] / 60 for x in e], [x['val_loss'] for x in e], marker='.', label=run['name'])
        axes[1].plot([x['tokens'] / 1e6 for x in e], [x['val_loss'] for x in e], marker='.', label=run['name'])
    for ax, xlabel in zip(axes, ('wall time (minutes)', 'tokens trained on (millions)')):
        ax.axhline(target, color='gray', linestyle='--', linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('validation loss (nats/char)')
    axes[0].set_ylim(top=min(2.6, max(losses)))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def earlier_runs(path, args, skip):
    """ the runs of the recipes not run now from an earlier speedrun.json in the same --out, if it measured
    the same budget and dtype: --only reruns some recipes and the table and plot still show all """
    try:
        with open(path) as f:
            earlier = json.load(f)
    except FileNotFoundError:
        return []
    if (earlier['dtype'], earlier['minutes']) != (args.dtype, args.minutes):
        return []
    return [r for r in earlier['runs'] if r['name'] not in skip]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, default=15.0, help='wall-time budget of each recipe')
    p.add_argument('--only', nargs='+', choices=list(RECIPES), default=list(RECIPES))
    p.add_argument('--seeds', type=int, nargs='+', help="run each recipe once per seed (--system.seed; default: "
                   "chargpt's one seed)")
    p.add_argument('--target', type=float, default=1.47, help="the val loss whose time is reported (nanoGPT's)")
    p.add_argument('--ablation', action='store_true', help='the ablation instead of the recipes')
    p.add_argument('--ablation-iters', type=int, default=400)
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'auto'])
    p.add_argument('--out', default='out/speedrun')
    args = p.parse_args()

    if args.ablation:
        n = args.ablation_iters
        short = [f'--trainer.max_iters={n}', f'--trainer.eval_interval={n}', '--trainer.warmup_iters=50',
                 '--trainer.compile=False', '--sample.max_new_tokens=0']
        variants = {'nothing undone': []} | ABLATIONS
        runs = [train(name, ['--preset=fast'] + short + extra, os.path.join(args.out, 'ablation'), None, args.dtype)
                for name, extra in variants.items()]
        print(f"\nThe fast recipe for {n} iterations, {args.dtype}:\n")
        print(ablation_table(runs))
        name = 'ablation'
    else:
        todo = [(name, RECIPES[name]) for name in args.only]
        if args.seeds:
            todo = [(f'{name} seed {s}', extra + [f'--system.seed={s}']) for name, extra in todo for s in args.seeds]
        runs = [train(name, extra, args.out, args.minutes, args.dtype) for name, extra in todo]
        runs += earlier_runs(os.path.join(args.out, 'speedrun.json'), args, skip=[name for name, _ in todo])
        print(f"\nUp to {args.minutes:g} minutes each, {args.dtype}:\n")
        print(table(runs, args.target))
        if plot(runs, os.path.join(args.out, 'speedrun.png'), args.target):
            print(f"\nplot: {os.path.join(args.out, 'speedrun.png')}")
        name = 'speedrun'
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
        json.dump({'dtype': args.dtype, 'minutes': args.minutes, 'runs': runs}, f, indent=1)


if __name__ == '__main__':
    main()
