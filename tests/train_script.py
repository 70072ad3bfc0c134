"""
A tiny training run for the Trainer's subprocess tests (resume after SIGKILL, DDP and FSDP under
torchrun). Rank 0 writes the final weights to --out/final.safetensors (not under FSDP, whose model
holds one rank's shards after the run: its weights are in work_dir/ckpt) and the per-iteration losses
to --out/losses.json.

    python tests/train_script.py --out DIR [--work_dir DIR --resume True --kill_at K]
    python -m torch.distributed.run --nproc_per_node=2 tests/train_script.py --out DIR --batch_size 8
    python tests/train_script.py --out DIR --shards SHARDS ...   # train on a prepared shard directory
    python tests/train_script.py --out DIR --val ...   # with a validation set of 33 rows
    python tests/train_script.py --out DIR --model pos_emb=rope ...   # GPT config overrides
    ... --still_clock_off_rank0   # the clock of checkpoint_minutes stands still on every rank but 0

Rank 0 also writes the iterations it checkpointed at to --out/checkpoints.json.
"""

import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mingpt.data import shard_windows  # noqa: E402
from mingpt.distributed import is_sharded  # noqa: E402
from mingpt import trainer as trainer_module  # noqa: E402
from mingpt.model import GPT  # noqa: E402
from mingpt.trainer import Trainer  # noqa: E402
from mingpt.utils import set_seed  # noqa: E402


class CountDataset(torch.utils.data.Dataset):
    """ windows of a noisy counting sequence; a few targets are -1 so loss weighting matters """

    def __init__(self, n=512, block=8, vocab=11, seed=1):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.data = (start + torch.arange(block + 1)) % vocab
        self.data[torch.rand(self.data.shape, generator=g) < 0.1] = -1
        self.data[:, 0] = self.data[:, 0].clamp(min=0)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i, :-1].clamp(min=0), self.data[i, 1:]
        return x, y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--trainer', nargs='*', default=[], help="trainer overrides, --key=value")
    parser.add_argument('--model', nargs='*', default=[], help="GPT config overrides, --key=value")
    parser.add_argument('--dropout', type=float, default=0.1)
    parser.add_argument('--tie_weights', action='store_true')
    parser.add_argument('--kill_at', type=int, default=None, help="SIGKILL self after this many iters")
    parser.add_argument('--shards', default=None, help="a directory of token shards to train on (mingpt.prepare)")
    parser.add_argument('--val', action='store_true', help="evaluate on 33 rows (an odd count: some rank gets none)")
    parser.add_argument('--still_clock_off_rank0', action='store_true',
                        help="ranks but 0 never see checkpoint_minutes pass: only rank 0's clock may decide")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same arithmetic in every process, and room for two of them

    dataset = CountDataset() if args.shards is None else shard_windows(args.shards, block_size=8)[0]
    set_seed(0)
    mc = GPT.get_default_config()
    mc.model_type = 'gpt-nano'
    mc.vocab_size, mc.block_size = (11 if args.shards is None else dataset.get_vocab_size()), 8
    mc.embd_pdrop = mc.resid_pdrop = mc.attn_pdrop = args.dropout
    mc.tie_weights = args.tie_weights
    mc.merge_from_args(['--' + a for a in args.model])
    model = GPT(mc)

    C = Trainer.get_default_config()
    C.device = 'cpu'
    C.num_workers = 0
    C.learning_rate = 3e-3
    C.progress_bar = False
    C.merge_from_args(['--' + a for a in args.trainer])
    trainer = Trainer(C, model, dataset, val_dataset=CountDataset(n=33, seed=2) if args.val else None)

    losses = {}
    def on_batch_end(t):
        losses[t.iter_num] = t.loss.item()
        # iter_num is the index of the step just taken: after it, iter_num + 1 steps are done
        if args.kill_at is not None and t.iter_num + 1 == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.add_callback('on_batch_end', on_batch_end)
    checkpoints = []
    trainer.add_callback('on_checkpoint', lambda t: checkpoints.append(t.iter_num))
    if args.still_clock_off_rank0 and trainer.rank != 0:
        trainer_module.clock = lambda: 0.0
    trainer.run()

    if trainer.is_master:
        from safetensors.torch import save_model
        os.makedirs(args.out, exist_ok=True)
        if not is_sharded(model):
            save_model(model, os.path.join(args.out, 'final.safetensors'))
        with open(os.path.join(args.out, 'losses.json'), 'w') as f:
            json.dump(losses, f)
        with open(os.path.join(args.out, 'checkpoints.json'), 'w') as f:
            json.dump(checkpoints, f)


if __name__ == '__main__':
    main()
