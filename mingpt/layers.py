"""
The layers of the modern recipe (modded-nanogpt, nanochat) that GPT-2 has not: rotary position
embeddings, RMSNorm as the block's norm, the ReLU^2 activation, RWKV's token shift. mingpt.model builds
them when its config asks (pos_emb='rope', norm='rmsnorm', mlp_act='relu2', token_shift=True).

Shapes in comments: B batch, T time, nh heads, hs head size.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------

def make_norm(config, size):
    """ the block's normalisation: GPT-2's LayerNorm, or RMSNorm (no mean subtracted, no bias); both with a gain """
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(size, eps=1e-5)
    return nn.LayerNorm(size, bias=config.bias)


def rotary_angles(pos, head_size, base):
    """
    pos (T,) or (B, T) position ids -> (cos, sin), each (T, hs/2) or (B, T, hs/2), in fp32. Channel
    pair i turns by pos * base^(-2i/hs): fast pairs tell near positions apart, slow ones far ones.
    Computed from the same position ids the learned wpe reads, so the rows of a batched decode step,
    each at its own position ((B, 1) ids), rotate exactly as their tokens sit.
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos.float()[..., None] * inv_freq  # (..., T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """
    x (B, nh, T, hs) -> x with its two halves (x1, x2) turned as complex numbers by the angles:
    the dot product of a query and a key then depends only on how far apart their positions are
    """
    if cos.dim() == 3:  # a position per row: (B, T, hs/2) -> (B, 1, T, hs/2), broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ReLUSquared(nn.Module):
    """ relu(x)^2 (So et al., Primer): sparse like ReLU, smooth at 0, and cheaper than GELU """

    def forward(self, x):
        return F.relu(x).square()


class TokenShift(nn.Module):
    """
    RWKV's token shift: each position's embedding plus a learned share, per channel, of the previous
    position's. The first block then sees the previous token without spending attention on fetching
    it (for characters, the pair already says much about the next). mix starts at zero: the embedding
    as it was.
    """

    def __init__(self, n_embd):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(n_embd))

    def forward(self, x, before=None):
        """ x (B, T, C) embeddings; before (B, C): the embedding preceding x's first position (None: zeros,
        as at the start of a sequence) """
        first = torch.zeros_like(x[:, :1]) if before is None else before[:, None]
        return x + self.mix * torch.cat([first, x[:, :-1]], dim=1)
