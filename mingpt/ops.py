"""
GPT-2's GELU and causal self-attention for training on a CPU, in C (mingpt/kernels.c, built and
loaded by mingpt.kernels), as torch ops: mingpt::gelu, mingpt::attention and mingpt::attention_packed,
each with its backward, so that torch.compile calls them too rather than tracing through ctypes.
model.py calls gelu() and attention() and falls back to torch's own where they do not apply.

gelu: torch's CPU kernel for GPT-2's tanh GELU takes ~2.5x the time of its erf GELU, ~5% of a small
GPT's training step; the same function as x sigmoid(2y) with a vectorised exp, one pass in C forward
and one backward, takes less than either (bench/README.md, Training).

attention: torch's CPU attention (flash attention: blocks of keys, an online softmax) is built for
long contexts; at the contexts a CPU trains on (a few hundred positions) it runs far below the speed of
the matrix products, ~20% of gpt-mini's step for ~10% of its FLOPs. kernels.c holds each (batch, head)
pair's whole score matrix in the cache instead, forward and backward in about a third of the time.
"""

import ctypes

import torch
from torch.nn import functional as F

from mingpt.kernels import available, lanes, library

P, L = ctypes.c_void_p, ctypes.c_long

# -----------------------------------------------------------------------------
# GPT-2's GELU for training

# below this many elements torch's call costs less than ours (ctypes, autograd.Function)
GELU_MIN_NUMEL = 1 << 14


# a torch op (mingpt::gelu), so that torch.compile calls the kernel too instead of tracing through ctypes
@torch.library.custom_op('mingpt::gelu', mutates_args=())
def _gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    library().mingpt_gelu(x.data_ptr(), None, y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


@torch.library.custom_op('mingpt::gelu_backward', mutates_args=())
def _gelu_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    library().mingpt_gelu(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel(), torch.get_num_threads())
    return dx


@_gelu.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gelu_backward.register_fake
def _(x, dy):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    return _gelu_backward(ctx.saved_tensors[0], dy)


_gelu.register_autograd(_backward, setup_context=_setup_context)


def gelu(x):
    """ GPT-2's GELU, F.gelu(x, approximate='tanh') to fp32 rounding: in C for large fp32 CPU tensors
    (see the module docstring), else torch's own """
    if x.dtype == torch.float32 and x.device.type == 'cpu' and x.numel() >= GELU_MIN_NUMEL and available():
        return _gelu(x)
    return F.gelu(x, approximate='tanh')

# -----------------------------------------------------------------------------
# causal self-attention for training

# the longest context the kernel takes: each thread holds two (T, T) fp32 matrices, 2 MB at 512. Past
# what the cache holds torch's flash kernel wins (6 heads of 64, AVX2, 2 threads, forward and backward:
# 33 against 61 ms at T = 512, 69 against 46 ms at T = 1024)
ATTENTION_MAX_T = 512


class _Strided(ctypes.Structure):  # kernels.c's struct strided: a (B, H, T, D) tensor's pointer and strides
    _fields_ = [('p', P), ('b', L), ('h', L), ('t', L)]


def _strided(x):
    """ a (B, H, T, D) tensor, each row contiguous, as kernels.c's struct strided """
    return ctypes.byref(_Strided(x.data_ptr(), *x.stride()[:3]))


def _heads(qkv):
    """ (B, T, 3, H, D) -> its queries, keys and values, three (B, H, T, D) views """
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _attention_work(T, D):
    """ (threads, work): each thread's room for its scores and transposes, forward or backward """
    threads = torch.get_num_threads()
    return threads, torch.empty(threads * library().mingpt_attention_work(T, D))


def _attention_forward(q, k, v):
    B, H, T, D = q.shape
    out, lse = q.new_empty(B, T, H, D), q.new_empty(B, H, T)
    threads, work = _attention_work(T, D)
    library().mingpt_attention_forward(_strided(q), _strided(k), _strided(v), out.data_ptr(), lse.data_ptr(),
                                  B, H, T, D, D ** -0.5, work.data_ptr(), threads)
    return out, lse


# two torch ops for one kernel: q, k, v apart, and the three as the QKV projection's output, whose gradient
# then comes back whole, in that layout (apart, autograd assembles it from three views: a copy of it)
@torch.library.custom_op('mingpt::attention', mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(q, k, v)


@torch.library.custom_op('mingpt::attention_packed', mutates_args=())
def _attention_packed(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(*_heads(qkv))


@torch.library.custom_op('mingpt::attention_backward', mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        dout: torch.Tensor) -> torch.Tensor:
    B, H, T, D = q.shape
    dout, dqkv = dout.contiguous(), q.new_empty(B, T, 3, H, D)
    dq, dk, dv = _heads(dqkv)
    threads, work = _attention_work(T, D)
    library().mingpt_attention_backward(_strided(q), _strided(k), _strided(v), out.data_ptr(), lse.data_ptr(),
                                   dout.data_ptr(), _strided(dq), _strided(dk), _strided(dv),
                                   B, H, T, D, D ** -0.5, work.data_ptr(), threads)
    return dqkv


@_attention.register_fake
def _(q, k, v):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T)


@_attention_packed.register_fake
def _(qkv):
    B, T, _, H, D = qkv.shape
    return qkv.new_empty(B, T, H, D), qkv.new_empty(B, H, T)


@_attention_backward.register_fake
def _(q, k, v, out, lse, dout):
    B, H, T, D = q.shape
    return q.new_empty(B, T, 3, H, D)


def _attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _attention_grad(ctx, dout, dlse):
    # the three gradients side by side in one (B, T, 3, H, D) tensor; q, k, v get views of it
    return _heads(_attention_backward(*ctx.saved_tensors, dout))


def _attention_packed_grad(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward(*_heads(qkv), out, lse, dout)


_attention.register_autograd(_attention_grad, setup_context=_attention_setup_context)
_attention_packed.register_autograd(_attention_packed_grad, setup_context=_attention_setup_context)


def usable_attention(q, k, v):
    """ whether attention() takes these (B, H, T, D) queries, keys and values: fp32 on the CPU, one shape,
    D a whole number of vectors, T at most ATTENTION_MAX_T, each row contiguous """
    return (q.device.type == 'cpu' and q.dtype == k.dtype == v.dtype == torch.float32 and q.dim() == 4
            and q.shape == k.shape == v.shape and q.size(2) <= ATTENTION_MAX_T and available()
            and q.size(-1) % lanes() == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def attention(q, k, v):
    """
    Causal self-attention of (B, H, T, D) queries, keys and values (any strides, each row contiguous),
    softmax scale 1/sqrt(D): what F.scaled_dot_product_attention(q, k, v, is_causal=True) computes, as
    (B, T, H, D), the heads side by side for the output projection. Differentiable. Requires
    usable_attention(q, k, v).
    """
    return _attention(q, k, v)[0]


def attention_packed(qkv):
    """ attention() of the queries, keys and values side by side in one (B, T, 3, H, D) tensor, as a
    GPT-2 block's QKV projection makes them; the gradient comes back as one tensor of that layout """
    return _attention_packed(qkv)[0]
