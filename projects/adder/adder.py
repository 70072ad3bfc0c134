"""
Trains a GPT to add n-digit numbers.

    python projects/adder/adder.py                    # 2-digit addition, stops at 100% on the test split
    python projects/adder/adder.py --data.ndigit=3 --model.n_layer=3 --model.n_embd=64 \
        --trainer.learning_rate=2e-3 --trainer.max_iters=5000 --trainer.eval_interval=250 \
        --system.work_dir=out/adder3    # a run of another model: its own work dir

The task is minGPT's: "85 + 50 = 135" is written as the digits 8550531 (the sum reversed, because
addition produces its low digit first), and the model is only trained on, and scored on, the sum.
"""

import logging
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from mingpt.errors import ConfigError
from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.distributed import process_group
from mingpt.utils import run_script, start_run, CfgNode as CN

logger = logging.getLogger('adder')

# -----------------------------------------------------------------------------

def get_config():

    C = CN()

    # system
    C.system = CN()
    C.system.seed = 3407
    C.system.work_dir = './out/adder'
    # torch threads: this model's matrices are too small to be worth splitting across cores, and
    # on a busy machine a second thread that waits for a core makes every step many times slower
    C.system.num_threads = 1  # None: torch's default (one per core)

    # data
    C.data = AdditionDataset.get_default_config()

    # model: gpt-nano's width, but 2 layers (enough to add with carries), 4 heads and no dropout,
    # which learn in fewer steps and seconds on a CPU
    C.model = GPT.get_default_config()
    C.model.model_type = None
    C.model.n_layer = 2
    C.model.n_head = 4
    C.model.n_embd = 48
    C.model.embd_pdrop = 0.0
    C.model.resid_pdrop = 0.0
    C.model.attn_pdrop = 0.0

    # trainer: a high learning rate after a short warmup, decayed along a cosine to a tenth of it
    # at max_iters. The decay is what gets the last hard carries right, so a shorter schedule
    # solves the task sooner; the run stops as soon as the test split is solved (the README says
    # after how many iterations)
    C.trainer = Trainer.get_default_config()
    C.trainer.learning_rate = 5e-3
    C.trainer.warmup_iters = 50
    C.trainer.lr_schedule = 'cosine'
    C.trainer.max_iters = 700
    C.trainer.batch_size = 128
    C.trainer.weight_decay = 0.0
    C.trainer.eval_interval = 100  # also how often exact-match accuracy is measured
    C.trainer.eval_iters = 4  # batches of the test split whose loss is tracked (for the plot)
    C.trainer.checkpoint_interval = 1000
    C.trainer.resume = 'auto'  # a rerun continues from work_dir/ckpt instead of refusing to start

    # evaluation: exact-match accuracy on the whole test split and on a fixed random subset of the
    # train split (a check on memorisation, not the result; None: all of it)
    C.eval = CN()
    C.eval.train_problems = 1000
    C.eval.show_mistakes = 5  # how many wrong answers to log per evaluation
    C.eval.stop_at = 1.0  # stop once test accuracy reaches this (None: train to max_iters)

    return C

# -----------------------------------------------------------------------------

class AdditionDataset(Dataset):
    """
    All (10^ndigit)^2 problems a + b with a, b < 10^ndigit, split once into a test set of
    test_size problems (drawn at random with a fixed seed) and a train set of all the others, so
    the two never overlap. For ndigit=2 the train set holds 8000 problems and the test set 2000.

    A problem is a sequence of 3 * ndigit + 1 digits: a and b padded to ndigit digits each, then
    a + b padded to ndigit + 1 digits and reversed. The model sees it shifted by one (x predicts
    y), and the targets of the first 2 * ndigit - 1 positions are -1 (ignored): predicting the
    next digit of a random operand is noise, only the sum is learnable.
    """

    @staticmethod
    def get_default_config():
        C = CN()
        C.ndigit = 2
        C.test_size = None  # None: 20% of all problems, at most 10000
        C.split_seed = 1337  # which problems are held out; keep it fixed to compare runs
        return C

    def __init__(self, config, split):
        if split not in ('train', 'test'):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        if not (isinstance(config.ndigit, int) and 1 <= config.ndigit <= 9):
            raise ConfigError(f"data.ndigit must be an int in 1..9, got {config.ndigit!r}")
        self.config = config
        self.split = split
        n = config.ndigit
        self.num = (10 ** n) ** 2  # problem i is a = i // 10^n, b = i % 10^n
        test_size = min(int(self.num * 0.2), 10000) if config.test_size is None else config.test_size
        if not 0 < test_size < self.num:
            raise ConfigError(f"data.test_size must be in 1..{self.num - 1} for ndigit={n}, got {test_size}")
        # sample the test problems without materialising a permutation of all of them
        # (10^8 problems for ndigit=4)
        rng = np.random.default_rng(config.split_seed)
        self.test_ids = np.sort(rng.choice(self.num, size=test_size, replace=False))
        # train problem j is the j-th id that is not a test id: with t = test_ids (sorted),
        # t[k] - k counts the train ids below t[k], so j lands after the k test ids for which
        # t[k] - k <= j
        self._test_shift = self.test_ids - np.arange(test_size)

    def get_vocab_size(self):
        return 10  # digits 0..9

    def get_block_size(self):
        # a, b and the n+1 digits of the sum, minus one: the last digit is only ever a target
        return 3 * self.config.ndigit + 1 - 1

    def __len__(self):
        return len(self.test_ids) if self.split == 'test' else self.num - len(self.test_ids)

    def problem_ids(self, idx):
        """ (B,) int64 ids of the problems at positions idx (B,) of this split """
        idx = np.asarray(idx, dtype=np.int64)
        if self.split == 'test':
            return self.test_ids[idx]
        return idx + np.searchsorted(self._test_shift, idx, side='right')

    def operands(self, ids):
        """ (a, b): the two operands of problems ids, two (B,) arrays """
        return np.divmod(ids, 10 ** self.config.ndigit)

    def encode(self, ids):
        """ (B, 3 * ndigit + 1) LongTensor of problems ids: the digits of a, of b, then of a + b reversed """
        n = self.config.ndigit
        a, b = self.operands(np.asarray(ids, dtype=np.int64))
        powers = 10 ** np.arange(n + 1, dtype=np.int64)  # 1, 10, 100, ...

        def digits(v, k):  # the k lowest digits of each of v, lowest first: (B, k)
            return v[:, None] // powers[:k] % 10

        seq = np.concatenate([digits(a, n)[:, ::-1], digits(b, n)[:, ::-1], digits(a + b, n + 1)], axis=1)
        return torch.from_numpy(seq)

    def __getitems__(self, indices):
        # the DataLoader fetches whole batches through this: one vectorised encode per batch
        # instead of a Python __getitem__ per example, which cost a sixth of the training step
        seq = self.encode(self.problem_ids(indices))
        x = seq[:, :-1]
        y = seq[:, 1:].clone()
        y[:, :2 * self.config.ndigit - 1] = -1  # only the sum is predicted
        return list(zip(x, y))

    def __getitem__(self, idx):
        return self.__getitems__([idx])[0]

# -----------------------------------------------------------------------------

@torch.no_grad()
def exact_match(model, dataset, max_problems=None, batch_size=2000, show_mistakes=0):
    """
    Fraction of dataset's problems whose whole sum the model gets right with greedy decoding,
    over all of them or a fixed random subset of max_problems. Wrong answers (up to show_mistakes)
    are logged.
    """
    n = dataset.config.ndigit
    idx = np.arange(len(dataset))
    if max_problems is not None and len(idx) > max_problems:
        idx = np.sort(np.random.default_rng(0).choice(len(idx), size=max_problems, replace=False))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, mistakes = 0, []
    for start in range(0, len(idx), batch_size):
        ids = dataset.problem_ids(idx[start:start + batch_size])
        seqs = dataset.encode(ids).to(device)  # (B, 3n+1)
        out = model.generate(seqs[:, :2 * n], n + 1)[:, 2 * n:]  # (B, n+1): the sum reversed, greedy
        ok = (out == seqs[:, 2 * n:]).all(dim=1).cpu()
        correct += int(ok.sum())
        for i in (~ok).nonzero().flatten()[:show_mistakes - len(mistakes)].tolist():
            a, b = dataset.operands(ids[i])
            claim = int(''.join(map(str, out[i].flip(0).tolist())))  # the sum, read back in order
            mistakes.append((int(a), int(b), claim))
    model.train(was_training)
    for a, b, claim in mistakes:
        logger.info("  %s: GPT claims that %d + %d = %d but it is %d", dataset.split, a, b, claim, a + b)
    return correct / len(idx)

# -----------------------------------------------------------------------------

def main(args):
    t_start = time.time()
    config = get_config()
    config.merge_from_args(args)
    config.trainer.work_dir = config.system.work_dir  # checkpoints and metrics.jsonl live there too
    run = start_run(config, logger, script='projects/adder/adder.py')

    # the two splits, and a model sized for them
    train_dataset = AdditionDataset(config.data, split='train')
    test_dataset = AdditionDataset(config.data, split='test')
    logger.info("%d-digit addition: %d train problems, %d held-out test problems",
                config.data.ndigit, len(train_dataset), len(test_dataset))
    config.model.vocab_size = train_dataset.get_vocab_size()
    config.model.block_size = train_dataset.get_block_size()
    model = GPT(config.model)

    # the trainer measures the test loss every eval_interval iterations; we add exact-match accuracy
    trainer = Trainer(config.trainer, model, train_dataset, val_dataset=test_dataset)
    best_dir = os.path.join(config.system.work_dir, 'best')
    results = {'best_test_acc': -1.0}

    def eval_accuracy(trainer):
        # every rank measures (the same weights give the same accuracy, so all ranks stop together);
        # rank 0 logs and saves
        ev = config.eval
        train_acc = exact_match(model, train_dataset, ev.train_problems, show_mistakes=ev.show_mistakes)
        test_acc = exact_match(model, test_dataset, show_mistakes=ev.show_mistakes)
        logger.info("iter %d: exact match train %.2f%%, test %.2f%%", trainer.iter_num,
                    100 * train_acc, 100 * test_acc)
        if test_acc > results['best_test_acc']:
            # the model to keep is the one that adds best, whatever its loss
            results.update(best_test_acc=test_acc, train_acc=train_acc, iter=trainer.iter_num,
                           seconds=round(time.time() - t_start, 1))
            if run.rank0:
                model.save_pretrained(best_dir)
        if ev.stop_at is not None and test_acc >= ev.stop_at:
            logger.info("test accuracy %.2f%% reached %.2f%%: stopping", 100 * test_acc, 100 * ev.stop_at)
            trainer.stop()

    trainer.add_callback('on_eval_end', eval_accuracy)
    run.train(trainer)

    trainer.plot(os.path.join(config.system.work_dir, 'loss.png'))
    results.update(ndigit=config.data.ndigit, iters=trainer.iter_num,
                   total_seconds=round(time.time() - t_start, 1), best_model=best_dir)
    if not run.finish(results):
        return results  # rank 0 reports the run
    print(f"best test accuracy {100 * results['best_test_acc']:.2f}% at iteration {results.get('iter')} "
          f"({results.get('seconds')} s); {trainer.iter_num} iterations in {results['total_seconds']} s; "
          f"best model in {best_dir}")
    return results


if __name__ == '__main__':
    with process_group():  # under torchrun: every rank runs this script, rank 0 reports
        run_script(main, sys.argv[1:])
