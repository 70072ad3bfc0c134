"""
Muon (MomentUm Orthogonalized by Newton-Schulz; Keller Jordan, 2024), the optimizer of the
modded-nanogpt speedrun and nanochat, for a network's hidden weight matrices, with AdamW for the
parameters it is not meant for, in one torch.optim.Optimizer.

Each Muon step takes the matrix's Nesterov momentum update and replaces it by the nearest
semi-orthogonal matrix (every singular value ~1, the singular vectors kept), computed with a few
Newton-Schulz iterations rather than an SVD. The update then moves the weight the same amount in
every direction its gradient points to, where SGD and Adam let a few dominant directions take
almost all of it. That is meaningful for a matrix that maps activations to activations (a block's
Linear layers), not for an embedding table (rows looked up one token at a time), the output head
or the gains and biases: those parameter groups (muon=False) take AdamW.

One optimizer rather than two, so that whatever steps, schedules and checkpoints an optimizer (the
Trainer, its learning-rate schedule scaling every group's lr, state_dict for exact resume) serves
both. Under DDP every rank holds the all-reduced gradient, so every rank computes the same update;
under FSDP every rank gathers each whole matrix's update for the Newton-Schulz iteration (the
momentum and AdamW's moments stay sharded).

    from mingpt.muon import Muon
    opt = Muon([{'params': matrices, 'muon': True, 'lr': 0.02},
                {'params': others, 'muon': False, 'lr': 3e-4, 'weight_decay': 0.1}])
"""

import math

import torch

from mingpt.errors import ConfigError

# the quintic's coefficients (Keller Jordan's): the steepest slope at 0 that still leaves every
# singular value of the result in about [0.7, 1.2] after 5 steps, which trains as well as exactly 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, eps=1e-7):
    """
    G (m, n) -> about U V^T for G = U S V^T, by `steps` Newton-Schulz iterations of the quintic
    X <- aX + b(XX^T)X + c(XX^T)^2 X, each of which pushes every singular value of X towards 1.
    Dividing by the Frobenius norm first puts all of them in (0, 1], where the iteration converges.
    fp32 on CPU; bf16 on CUDA, whose tensor cores make it cheap (the result is approximate anyway).
    Returns a tensor of G's shape in the working dtype.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T  # (m, m)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """
    Muon for the param groups with muon=True (2-D matrices only), AdamW for the others.

    Muon groups: lr, momentum (Nesterov's, nesterov=True), ns_steps, weight_decay (decoupled, as in
    AdamW: w <- w (1 - lr wd)). The orthogonalized update has a spectral norm near 1 whatever the
    gradient's scale; it is scaled by sqrt(max(1, rows / cols)), so that a tall matrix's update
    has the per-element size of a square one's (Keller Jordan's Muon, torch.optim.Muon's default).
    AdamW groups: lr, betas, eps, weight_decay: torch.optim.AdamW's arithmetic.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.95),
                 eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            shapes = [tuple(p.shape) for p in group['params'] if p.dim() != 2]
            if group['muon'] and shapes:
                raise ConfigError(f"Muon orthogonalizes 2-D weight matrices only, but a muon=True group holds "
                                  f"tensors of shapes {shapes[:3]}; put them in a group with muon=False (AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group['muon'] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group):
        lr, beta, wd = group['lr'], group['momentum'], group['weight_decay']
        for p in group['params']:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state['momentum_buffer'] = torch.zeros_like(p)
            buf = state['momentum_buffer']
            buf.lerp_(p.grad, 1 - beta)  # an average of the gradients, not a sum: NS ignores the scale
            update = p.grad.lerp(buf, beta) if group['nesterov'] else buf
            update = _whole(orthogonalize, update, group['ns_steps'])
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def _adamw_step(self, group):
        lr, (beta1, beta2), eps, wd = group['lr'], group['betas'], group['eps'], group['weight_decay']
        for p in group['params']:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state['step'] = torch.zeros((), dtype=torch.float32)
                state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['step'] += 1
            step = state['step'].item()
            exp_avg, exp_avg_sq = state['exp_avg'], state['exp_avg_sq']
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # the moments start at zero: divide by their total weight so far (bias correction)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


def _whole(fn, x, *args):
    """
    fn(x, *args) for a matrix x, which may be an FSDP shard (a DTensor holding this process's rows):
    then every process gathers the whole matrix, computes fn of it (the same result on each), and
    keeps its own rows of the result, which needs no further communication.
    """
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # a torch without DTensor shards nothing
        return fn(x, *args)
    if not isinstance(x, DTensor):
        return fn(x, *args)
    return distribute_tensor(fn(x.full_tensor(), *args), x.device_mesh, x.placements, src_data_rank=None)
