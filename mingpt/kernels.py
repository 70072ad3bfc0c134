"""
mingpt's CPU kernels, in C (mingpt/kernels.c): what decoding one row spends its time on (products of a
row with a weight matrix, and a whole GPT-2 block for one new token), and, as torch ops in mingpt.ops,
GPT-2's GELU and causal self-attention for training. This module builds and loads the library.

    import mingpt.kernels as kernels
    if kernels.available():
        blocked = kernels.block(linear.weight)                     # once: a copy in the kernel's layout
        y = kernels.product(x, blocked, linear.out_features, linear.bias)   # x (..., in), few rows

Why products of our own: decoding one token reads every weight of the model once and does two flops
per weight, so a step takes as long as the weights take to stream from memory. torch's kernels are
built for many rows; for one row the fastest of them (oneDNN's) reads GPT-2's weights at ~25 GB/s on a
CPU whose memory gives ~30 GB/s. mingpt/kernels.c reads a copy of each weight laid out so that every
thread streams one contiguous run of memory (blocks of 8 output rows, interleaved along the input), at
~30 GB/s, fp32 or int8; int8 weights are widened to fp32 in registers, so the same loop reads a quarter
of the bytes and the activations are never quantized (bench/README.md, Generation).

Between its products a decode step runs ~25 small ops a layer (norms, attention, the KV-cache write,
reshapes, residual adds), each a torch call of a few microseconds: ~0.1 ms a layer, as long as GPT-2's
int8 products take. block_step runs a whole block in one call instead (model.Block uses it once packed
for one row): the same ops in C, the threads moving from one to the next at a barrier.

The C source ships with the package and is compiled here on first use with the system's C compiler
(cc, or $CC; ~0.5 s) for the vector instructions torch itself uses on this CPU (AVX-512 or AVX2, so
ATEN_CPU_CAPABILITY=avx2 emulates an AVX2 machine), into the mingpt cache ($MINGPT_CACHE or
~/.cache/mingpt). It links against the OpenMP runtime torch has loaded, so the two share one thread pool
and torch.set_num_threads. Where there is no compiler, no AVX2, not Linux on x86-64, or MINGPT_KERNELS=0
is set, available() is False and the model runs on torch's kernels, as it would anyway; one log line
says why.
"""

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name('kernels.c')
# products of up to this many rows take the kernel, by the weight's dtype: a decode step (1 row) and,
# in fp32, speculative decoding's check of a few drafted tokens. Past it, the arithmetic counts and
# torch's kernels win: fp32 weights are read once for all the rows, but int8 ones are widened to fp32
# again for each row (GPT-2's linears, 2 threads: fp32 ties oneDNN's at 16 rows, int8 loses to
# fbgemm's from 2 rows)
MAX_ROWS = {torch.float32: 8, torch.int8: 1}
# the compiler flags for each of torch's CPU capabilities this kernel has code for
ISA_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512dq', '-mavx512vl', '-mavx2', '-mfma'],
    'AVX2': ['-mavx2', '-mfma'],
}

_lib = None  # the loaded library, False once it proved unavailable
_lanes = None  # its vector width in floats (16 for AVX-512, 8 for AVX2)


# torch.compile calls this once while tracing and keeps its answer, rather than tracing the build
@torch._dynamo.assume_constant_result
def available():
    """ whether the kernels are built and loaded here (building them on the first call) """
    return _library() is not None


def supports(weight):
    """ whether the kernel takes this (out, in) weight: on a CPU, fp32 or int8, its input width a
    multiple of the kernel's vectors (what block() needs), the kernel available """
    return (weight.device.type == 'cpu' and weight.dtype in MAX_ROWS and not weight.is_meta
            and available() and weight.size(1) % _lanes == 0)


def usable(weight, x):
    """ whether x @ weight.T can take the kernel: fp32 rows, a weight it supports(), at most MAX_ROWS
    rows, nothing that needs gradients or autocast """
    # every Linear of a decode step asks this: the test most products fail (their rows) comes first
    return (0 < x.numel() <= MAX_ROWS.get(weight.dtype, 0) * x.size(-1) and x.dtype == torch.float32
            and x.device.type == 'cpu' and not torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu')
            and not torch.compiler.is_compiling() and supports(weight))


def block(weight):
    """
    (N, K) fp32 or int8 weight -> the kernel's layout, a new contiguous tensor of the same dtype:
    (ceil(N / rows), K / lanes, rows, lanes), the rows past N zero. Requires supports(weight).
    """
    lib = library()
    rows, lanes = lib.mingpt_gemv_rows(), lib.mingpt_gemv_lanes()
    N, K = weight.shape
    padded = -(-N // rows) * rows
    w = weight.detach()
    if padded != N:
        w = torch.cat([w, w.new_zeros(padded - N, K)])
    return w.reshape(padded // rows, rows, K // lanes, lanes).transpose(1, 2).contiguous()


def product(x, blocked, out_features, bias=None, scale=None):
    """ x (..., K) fp32 times the weight that block() laid out as blocked -> (..., out_features);
    scale (out_features,) multiplies each output of an int8 weight (before the bias) """
    lib = library()
    x = x.contiguous()
    K = x.size(-1)
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    # ctypes drops the GIL for the call, so other Python threads (a web server's) keep running
    if blocked.dtype == torch.int8:
        lib.mingpt_gemv_int8(x.data_ptr(), blocked.data_ptr(), scale.data_ptr(), bias_ptr, y.data_ptr(),
                             M, out_features, K, torch.get_num_threads())
    else:
        lib.mingpt_gemv_f32(x.data_ptr(), blocked.data_ptr(), bias_ptr, y.data_ptr(),
                            M, out_features, K, torch.get_num_threads())
    return y

# -----------------------------------------------------------------------------
# a whole block for one row

P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


class _LinearArgs(ctypes.Structure):  # kernels.c's struct linear
    _fields_ = [('weight', P), ('scale', P), ('bias', P), ('n', L), ('k', L), ('is_int8', I)]


class _BlockArgs(ctypes.Structure):  # kernels.c's struct block
    _fields_ = [('ln_1_weight', P), ('ln_1_bias', P), ('ln_2_weight', P), ('ln_2_bias', P),
                ('eps', ctypes.c_float), ('n_head', L),
                ('c_attn', _LinearArgs), ('attn_proj', _LinearArgs), ('c_fc', _LinearArgs), ('mlp_proj', _LinearArgs)]


# block -> (its _state, its _BlockArgs for mingpt_block_step, the tensors they point into)
_steps = weakref.WeakKeyDictionary()


def usable_step(x, kv_cache, pos):
    """ whether block_step can take this call: one fp32 row x (1, 1, C), a one-row fp32 cache with
    room at pos, nothing that needs gradients or autocast """
    k = kv_cache.k
    return (bool(_lib) and x.size(0) == 1 and x.dtype == torch.float32 and x.device.type == 'cpu' and k.size(0) == 1
            and k.dtype == torch.float32 and k.device.type == 'cpu' and 0 <= pos < k.size(2)
            and k.is_contiguous() and kv_cache.v.is_contiguous() and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling())


def block_step(block, x, kv_cache, pos):
    """
    A GPT-2 block's forward (mingpt.model.Block: LayerNorms, tanh GELU) for x (1, 1, C), one token at
    position pos of a one-row kv_cache (written there, as KVCache.update would), as one C call -> the
    block's output (1, 1, C), x unchanged; or None when a Linear has no one-row copy of its weight
    (one_row_weight()), and the caller runs the block in torch. See the module docstring for why.
    """
    key = _state(block)
    step = _steps.get(block)
    if step is None or step[0] != key:
        step = _steps[block] = (key, *_block_args(block.attn.n_head, *key[0]))
    args = step[1]
    if args is None:
        return None
    # the activations between the ops, and each head's scores: a buffer per call, so that threads
    # decoding with one model at once (each with its own cache) do not share one
    k = kv_cache.k
    work = torch.empty(5 * x.size(-1) + args.c_fc.n + block.attn.n_head * (k.size(2) + 2 * _lanes))
    y = x.clone(memory_format=torch.contiguous_format)  # the C step reads and writes it as C floats
    _lib.mingpt_block_step(y.data_ptr(), ctypes.addressof(args), k.data_ptr(), kv_cache.v.data_ptr(), k.size(2),
                           pos, work.data_ptr(), torch.get_num_threads())
    return y


def _state(block):
    """
    What block_step's arguments for block depend on: the layers it reads (in mingpt_block_step's
    order), and every tensor of theirs by version and address. The arguments are made again when
    this changes: a layer replaced, a tensor replaced or moved, a weight changed in place (the old
    tensors stay alive until then, so no address is reused). Read through _modules, _parameters and
    _buffers: module attribute access would cost ~20 us a layer a step.
    """
    mods = block._modules
    attn, mlp = mods['attn']._modules, mods['mlp']._modules
    layers = (mods['ln_1'], attn['c_attn'], attn['c_proj'], mods['ln_2'], mlp['c_fc'], mlp['c_proj'])
    state = [layers]
    for layer in layers:
        for t in itertools.chain(layer._parameters.values(), layer._buffers.values()):
            if t is not None:
                state += (t._version, t.data_ptr())
    return state


def release(block):
    """ forget block's arguments and the weight copies they keep (the block is being packed anew) """
    _steps.pop(block, None)


def _block_args(n_head, ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj):
    """ (_BlockArgs, the tensors they point into), or Nones where the C step cannot run this block:
    a Linear without a one-row copy of its weight (its one_row_weight() says), or a head size that
    is no multiple of the vector width """
    tensors = []

    def ptr(t):
        if t is None:
            return None
        t = t.detach().contiguous()
        tensors.append(t)
        return t.data_ptr()

    if (c_attn.in_features // n_head) % _lanes:
        return None, None  # a head's query and keys are read in whole vectors
    linears = []
    for layer in (c_attn, attn_proj, c_fc, mlp_proj):
        operands = layer.one_row_weight()
        if operands is None:
            return None, None
        blocked, scale = operands
        n, k = layer.weight.shape
        linears.append(_LinearArgs(ptr(blocked), ptr(scale), ptr(layer.bias), n, k, blocked.dtype == torch.int8))
    args = _BlockArgs(ptr(ln_1.weight), ptr(ln_1.bias), ptr(ln_2.weight), ptr(ln_2.bias), ln_1.eps, n_head, *linears)
    return args, tensors

# -----------------------------------------------------------------------------
# building and loading


def _library():
    global _lib, _lanes
    if _lib is None:
        try:
            _lib = _load()
            _lanes = _lib.mingpt_gemv_lanes()
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            logger.info("mingpt.kernels is unavailable (%s); the model runs on torch's kernels", e)
            _lib = False
    return _lib or None


def library():
    """ the loaded C library (ctypes; mingpt.ops calls it too); requires available() """
    lib = _library()
    if lib is None:
        raise RuntimeError("mingpt.kernels is unavailable here (the log says why); check kernels.available() first")
    return lib


def lanes():
    """ the library's vector width in floats: 16 for AVX-512, 8 for AVX2; requires available() """
    return _lanes


def _load():
    if os.environ.get('MINGPT_KERNELS', '1') == '0':
        raise RuntimeError("MINGPT_KERNELS=0")
    if not sys.platform.startswith('linux') or platform.machine() not in ('x86_64', 'AMD64'):
        raise RuntimeError(f"no kernel for {sys.platform} on {platform.machine()}")
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"torch's CPU capability is {isa}, and the kernel needs AVX2 or AVX-512")
    openmp = _openmp_runtime()
    from mingpt.download import cache_dir
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b'\0'.join([source, isa.encode(), str(openmp).encode()]))
    path = cache_dir() / 'kernels' / f'kernels-{isa.lower()}-{key.hexdigest()[:16]}.so'
    if not path.is_file():
        compiler = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
        if not compiler:
            raise RuntimeError("no C compiler (cc) found to build it; install one, or set CC")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            obj, lib = Path(tmp) / 'kernels.o', Path(tmp) / 'kernels.so'
            _run([compiler, '-O3', '-fPIC', '-fopenmp', *ISA_FLAGS[isa], '-c', str(SOURCE), '-o', str(obj)])
            # link the runtime torch loaded (by path: same soname, so the loader reuses it); without
            # one, the compiler's own
            link = [str(openmp)] if openmp else ['-fopenmp']
            _run([compiler, '-shared', str(obj), *link, '-o', str(lib)])
            os.replace(lib, path)  # whole or absent: another process may be building it too
        logger.info("built the single-row kernel for %s: %s", isa, path)
    lib = ctypes.CDLL(str(path))
    lib.mingpt_gemv_f32.argtypes = [P, P, P, P, L, L, L, I]
    lib.mingpt_gemv_int8.argtypes = [P, P, P, P, P, L, L, L, I]
    lib.mingpt_block_step.argtypes = [P, P, P, P, L, L, P, I]
    lib.mingpt_gelu.argtypes = [P, P, P, L, I]
    lib.mingpt_attention_forward.argtypes = [P, P, P, P, P, L, L, L, L, ctypes.c_float, P, I]
    lib.mingpt_attention_backward.argtypes = [P, P, P, P, P, P, P, P, P, L, L, L, L, ctypes.c_float, P, I]
    lib.mingpt_attention_work.argtypes, lib.mingpt_attention_work.restype = [L, L], L
    for name in ('mingpt_gemv_f32', 'mingpt_gemv_int8', 'mingpt_block_step', 'mingpt_gelu',
                 'mingpt_attention_forward', 'mingpt_attention_backward'):
        getattr(lib, name).restype = None
    return lib


def _openmp_runtime():
    """ the path of the OpenMP runtime this process has loaded (torch's), or None """
    try:
        maps = Path('/proc/self/maps').read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1]
        if '/libgomp' in path and '.so' in path:
            return path
    return None


def _run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
