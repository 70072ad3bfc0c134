"""
The learning rate and the data order of a training run, both pure functions of the iteration number,
so that a resumed run needs nothing but iter_num (and the data seed) to carry on where it stopped.

- get_lr(it, config): linear warmup, then constant (minGPT), cosine or warmup-stable-decay down to min_lr;
  get_muon_momentum(it, config): Muon's momentum, raised over its own warmup.
- GlobalBatchSampler: the rows of iteration `it`, drawn from (seed, it) alone and split the same way
  over micro-steps and processes whatever their number.
- train_loader: the DataLoader of a run, minGPT's RandomSampler or the seeded global batches.
- eval_batches: the fixed validation batches that every evaluation of a run reads.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler

# -----------------------------------------------------------------------------
# learning rate

def get_lr(it, config):
    """
    the learning rate of iteration it (0-based): linear warmup, then constant, a cosine down to min_lr,
    or 'wsd' (warmup-stable-decay): constant, then a straight line down to min_lr over the last
    cooldown_frac of the iterations, as the modded-nanogpt speedrun and nanochat schedule theirs
    """
    lr = config.learning_rate
    if it < config.warmup_iters:
        return lr * (it + 1) / config.warmup_iters
    if config.lr_schedule is None:
        return lr
    decay_iters = config.lr_decay_iters if config.lr_decay_iters is not None else config.max_iters
    min_lr = lr / 10 if config.min_lr is None else config.min_lr
    if it >= decay_iters:
        return min_lr
    if config.lr_schedule == 'wsd':
        cooldown = config.cooldown_frac * (decay_iters - config.warmup_iters)
        left = decay_iters - it  # iterations before min_lr
        return lr if left >= cooldown else min_lr + (lr - min_lr) * left / cooldown
    ratio = (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)


# Muon's momentum at the start of muon_momentum_warmup (no higher than muon_momentum itself)
MUON_MOMENTUM_START = 0.85


def get_muon_momentum(it, config):
    """
    Muon's momentum at iteration it: from MUON_MOMENTUM_START in a straight line up to muon_momentum over
    the first muon_momentum_warmup iterations, as modded-nanogpt raises it (0.85 to 0.95 over 300). A
    shorter memory of gradients while the weights still move fast; then the long average
    """
    target, warmup = config.muon_momentum, config.muon_momentum_warmup
    if it >= warmup:
        return target
    start = min(MUON_MOMENTUM_START, target)
    return start + (target - start) * it / warmup

# -----------------------------------------------------------------------------
# data order

class GlobalBatchSampler:
    """
    A batch_sampler whose order is a pure function of (seed, iteration): iteration `it` draws one
    global batch of batch_size * grad_accum_steps * world_size indices, with replacement as in
    minGPT, and this process takes its slices of it. Micro-step m on rank r gets chunk m*W + r.

    So the global batch does not depend on how it is split: 1 process x 16 rows, 2 ranks x 8 rows
    and 4 micro-steps x 4 rows see the same 16 examples, and a run resumed at iteration k starts
    from exactly the batch the uninterrupted run would have drawn.
    """

    def __init__(self, n, batch_size, grad_accum_steps, seed, start_iter=0, rank=0, world_size=1):
        self.n, self.batch_size, self.grad_accum_steps = n, batch_size, grad_accum_steps
        self.seed, self.start_iter, self.rank, self.world_size = seed, start_iter, rank, world_size

    def global_batch(self, it):
        """ (batch_size * grad_accum_steps * world_size,) indices of iteration it """
        rng = np.random.default_rng([self.seed, it])  # SeedSequence mixes (seed, it) into a fresh stream
        return rng.integers(0, self.n, size=self.batch_size * self.grad_accum_steps * self.world_size)

    def __iter__(self):
        B, W = self.batch_size, self.world_size
        it = self.start_iter
        while True:
            idx = self.global_batch(it)
            for m in range(self.grad_accum_steps):
                chunk = m * W + self.rank
                yield idx[chunk * B:(chunk + 1) * B].tolist()
            it += 1


def draw_data_seed(world_size=1):
    """
    A data seed drawn from torch's RNG, like RandomSampler's own seed, so that set_seed fixes it.
    With several processes, rank 0's: every rank must slice the same global batches.
    """
    seed = int(torch.empty((), dtype=torch.int64).random_().item()) & (2**63 - 1)
    if world_size > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def eval_batches(n, rows, eval_iters):
    """
    The eval_iters global batches of `rows` validation indices out of n: the same ones at every
    evaluation, so that evaluations compare. Every example once when they fit.
    """
    if n <= rows * eval_iters:
        idx = np.arange(n)
    else:
        idx = np.random.default_rng(0).integers(0, n, size=rows * eval_iters)
    return [idx[i:i + rows] for i in range(0, len(idx), rows)]


def train_loader(dataset, batch_size, grad_accum_steps=1, data_seed=None, start_iter=0, rank=0,
                 world_size=1, num_workers=0, pin_memory=False):
    """
    The DataLoader of the training batches, drawn with replacement, so "epochs" never end. With
    data_seed None it is minGPT's (a RandomSampler seeded from torch's RNG as the iterator starts);
    with a seed, the batches of GlobalBatchSampler from iteration start_iter on.
    """
    if data_seed is None:
        sampler = RandomSampler(dataset, replacement=True, num_samples=int(1e10))
        return DataLoader(dataset, sampler=sampler, shuffle=False, pin_memory=pin_memory,
                          batch_size=batch_size, num_workers=num_workers)
    sampler = GlobalBatchSampler(len(dataset), batch_size, grad_accum_steps, data_seed,
                                 start_iter=start_iter, rank=rank, world_size=world_size)
    # its own generator: creating the iterator must not consume the global RNG that a resumed run
    # restores (it only seeds the workers)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(data_seed))
