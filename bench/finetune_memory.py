"""
What fine-tuning costs with every weight trained (AdamW on all of them), with LoRA, and with LoRA plus
activation checkpointing, on the CPU, at the same batch:

- memory and time: GPT-2 124M's and GPT-2 medium's shapes (random weights: the cost does not depend on
  their values), fp32, batch 4 x 128 tokens (projects/finetune's default); peak memory is the peak RSS of
  a process that does only that (getrusage's ru_maxrss, so it includes torch itself: the 'runtime' column
  is that process's RSS before the model is built), seconds per step the median after the first step;
- loss: a small GPT (4 layers, 128 wide, GPT-2's vocabulary) pretrained briefly on War and Peace, then
  fine-tuned each way on the finetune project's text (tiny shakespeare) for the same steps; the
  validation loss each reaches (both texts from ../shared/data when it is there).

    python bench/finetune_memory.py                       # both tables (the memory one: ~3 minutes on 2 cores)
    python bench/finetune_memory.py --models gpt2 --steps 2 --no-loss
    python bench/finetune_memory.py --no-memory --pretrain-text my_base_text.txt

LoRA: rank 8, alpha 16, dropout 0.05 on c_attn (projects/finetune's --lora.r=8), and on every Linear but
lm_head in the loss table's last row.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mingpt import lora  # noqa: E402
from mingpt.bpe import get_encoder  # noqa: E402
from mingpt.data import read_text_file, split_windows, training_text  # noqa: E402
from mingpt.model import GPT  # noqa: E402
from mingpt.trainer import Trainer  # noqa: E402
from mingpt.utils import set_seed  # noqa: E402

SHARED = os.path.join(REPO, '..', 'shared', 'data')
MODES = {  # name: (LoRA targets or None for every weight, activation checkpointing)
    'full': (None, False),
    'lora': (('c_attn',), False),
    'lora+ckpt': (('c_attn',), True),
}


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class RandomTokens(torch.utils.data.Dataset):
    """ windows of random GPT-2 token ids: the cost of a step does not depend on the text """

    def __init__(self, block_size, n=256):
        self.ids = torch.randint(0, 50257, (n, block_size + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i, :-1], self.ids[i, 1:]


def measure(model_type, mode, batch_size, block_size, steps):
    """ in this process: build, train `steps` steps; {'runtime', 'peak', 'sec_per_step'} """
    runtime = peak_rss_gb()
    C = GPT.get_default_config()
    C.model_type, C.vocab_size, C.block_size, C.tie_weights = model_type, 50257, 1024, True
    model = GPT(C)
    targets, checkpointing = MODES[mode]
    if targets:
        lora.add_lora(model, targets=targets)
    T = Trainer.get_default_config()
    T.device, T.max_iters, T.batch_size, T.num_workers = 'cpu', steps, batch_size, 0
    T.activation_checkpointing, T.log_interval, T.progress_bar = checkpointing, None, False
    trainer = Trainer(T, model, RandomTokens(block_size))
    times = []
    trainer.add_callback('on_batch_end', lambda t: times.append(t.iter_dt))
    trainer.run()
    # iter_dt of step i ends at step i's callback: the first one also holds the loop's setup
    return {'runtime': runtime, 'peak': peak_rss_gb(), 'sec_per_step': statistics.median(times[1:] or times)}


def memory_table(args):
    rows = []
    for model_type in args.models:
        full = None
        for mode in MODES:
            cmd = [sys.executable, __file__, '--one', model_type, mode, '--batch-size', str(args.batch_size),
                   '--block-size', str(args.block_size), '--steps', str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            full = r['peak'] if mode == 'full' else full
            rows.append(f"| {model_type} | {mode} | {r['peak']:.2f} | {r['runtime']:.2f} | "
                        f"{r['peak'] / full:.0%} | {r['sec_per_step']:.1f} |")
            print(rows[-1], flush=True)
    return ['| model shape | fine-tuning | peak RSS (GB) | of which runtime (GB) | of full | s/step |',
            '|---|---|---:|---:|---:|---:|'] + rows


def loss_table(args):
    """ pretrain a small GPT on War and Peace, then fine-tune it each way on the project's text """
    enc = get_encoder()
    base_ids = torch.tensor(enc.encode(read_text_file(args.pretrain_text)[:1_000_000]))
    ids = torch.tensor(enc.encode(training_text(args.text)))
    block = 64
    set_seed(0)
    C = GPT.get_default_config()
    C.model_type, C.n_layer, C.n_head, C.n_embd = None, 4, 4, 128
    C.vocab_size, C.block_size, C.tie_weights = 50257, block, True
    base = GPT(C)
    T = Trainer.get_default_config()
    T.device, T.batch_size, T.num_workers, T.log_interval, T.progress_bar = 'cpu', 8, 0, None, False
    T.max_iters, T.learning_rate, T.lr_schedule, T.warmup_iters = args.pretrain_steps, 2e-3, 'cosine', 20
    Trainer(T, base, split_windows(base_ids, block, 0.0)[0]).run()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    train, val = split_windows(ids, block, 0.1)
    rows = []
    for name, targets, checkpointing, lr in [('full', None, False, args.full_lr),
                                             ('lora', ('c_attn',), False, args.lora_lr),
                                             ('lora+ckpt', ('c_attn',), True, args.lora_lr),
                                             ('lora, c_attn c_proj c_fc', ('c_attn', 'c_proj', 'c_fc'), False,
                                              args.lora_lr)]:
        set_seed(0)
        model = GPT(C)
        model.load_state_dict(state)
        if targets:
            lora.add_lora(model, targets=targets)
        T.max_iters, T.learning_rate, T.warmup_iters = args.finetune_steps, lr, 10
        T.activation_checkpointing, T.eval_iters = checkpointing, 20
        trainer = Trainer(T, model, train, val_dataset=val)
        before = trainer.evaluate()
        trainer.run()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(f"| {name} | {trained:,} | {lr:g} | {before:.3f} | {trainer.evaluate():.3f} |")
        print(rows[-1], flush=True)
    return [f'| fine-tuning ({args.finetune_steps} steps of {T.batch_size} x {block} tokens) | trained parameters | lr | '
            'val loss before | after |', '|---|---:|---:|---:|---:|'] + rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['gpt2', 'gpt2-medium'])
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--block-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--no-loss', action='store_true', help='no loss table')
    parser.add_argument('--no-memory', action='store_true', help='no memory and time table')
    parser.add_argument('--pretrain-text', default=os.path.join(SHARED, 'warpeace.txt'),
                        help="the small model's pretraining text (its first 1 MB)")
    shakespeare = os.path.join(SHARED, 'tinyshakespeare.txt')
    parser.add_argument('--text', default=shakespeare if os.path.isfile(shakespeare) else None,
                        help="the fine-tuning text (default: tiny shakespeare, as projects/finetune's)")
    parser.add_argument('--pretrain-steps', type=int, default=200)
    parser.add_argument('--finetune-steps', type=int, default=60)
    parser.add_argument('--full-lr', type=float, default=3e-4)
    parser.add_argument('--lora-lr', type=float, default=3e-3)
    parser.add_argument('--one', nargs=2, metavar=('MODEL', 'MODE'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.batch_size, args.block_size, args.steps)))
        return
    lines = [] if args.no_memory else memory_table(args) + ['']
    if not args.no_loss:
        lines += loss_table(args)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
