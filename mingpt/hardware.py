"""
Choices that depend on the machine, kept in one place so that the model and the trainer read as plain
PyTorch:

- Linear: nn.Linear whose fp32 CPU inference products run on oneDNN's kernel (MINGPT_ONEDNN=0 turns it off),
  and whose training backward computes the weight gradients of some shapes transposed, faster;
  pack_weights gives a model's Linears a second copy of their weights, laid out for products of many rows
  (oneDNN's blocked layout) or of one (mingpt.kernels').
- int8_kernel: which kernel an int8 Linear (mingpt.quantize) multiplies with on this machine.
- resolve_device: 'auto' made concrete, and any other device checked against this machine.
- training_device: the device a training process uses (one GPU per process under torchrun).
- fast_dtype: what Trainer(dtype='auto') trains in on this device.
- cpu_count, default_num_workers: the cores this process may use; DataLoader workers that pay for themselves.
"""

import logging
import os
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F

import mingpt.kernels as kernels
from mingpt.errors import ConfigError

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# the oneDNN linear

def _find_onednn_op(name):
    """ one of torch's oneDNN linear ops (those inductor's CPU backend calls), or None: absent, or turned off """
    if os.environ.get('MINGPT_ONEDNN', '1') == '0':
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, name, None)


_onednn_linear = _find_onednn_op('_linear_pointwise')
_onednn_pack = _find_onednn_op('_reorder_linear_weight')  # (out, in) weight -> oneDNN's blocked layout

# below this many weight elements (1 MB in fp32) the fixed cost of a oneDNN call outweighs its faster
# reads, so toy models' products stay with F.linear
ONEDNN_MIN_WEIGHT = 1 << 18


def transposed_weight_grad(out_features, in_features):
    """
    Whether a CPU fp32 weight gradient is faster computed as its transpose, x^T dy (in, out), than as
    dy^T x (out, in): torch's CPU matmul (MKL's GEMM) makes a short, wide result of up to 512 rows and at
    least 3x as many columns 5-20% slower than the same product tall and narrow (AVX2 and AVX512, 2 threads,
    bench/README.md). That is the MLP's down-projection of a GPT up to 512 wide, ~1.5% of gpt-mini's step.
    """
    return out_features <= 512 and out_features % 8 == 0 and in_features >= 3 * out_features


class _LinearTransposedGrad(torch.autograd.Function):
    """ F.linear(x, weight, bias) whose backward computes the weight's gradient as its transpose """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy_rows = dy.reshape(-1, dy.size(-1))  # (N, out)
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # (..., in)
        dw = (x.reshape(-1, x.size(-1)).t() @ dy_rows).t() if ctx.needs_input_grad[1] else None  # (out, in) view of (in, out)
        db = dy_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class Linear(nn.Linear):
    """
    nn.Linear whose fp32 CPU products run on faster kernels when nothing needs gradients, and whose
    training backward computes a weight gradient transposed where MKL is faster at that (transposed_weight_grad).

    Why: decoding one token makes every layer a matrix-vector product that reads its whole weight once,
    so a decode step runs at the speed weights stream from memory, and oneDNN's kernel reads
    nn.Linear's (out, in) weight faster than torch's default CPU path does on some CPUs (bench/README.md
    has the measurements). oneDNN takes the weight as it is, so parameters, state dict and init are
    nn.Linear's. Training (grad enabled), autocast, torch.compile, other devices and dtypes take
    F.linear, as do small weights unless packed for one row; the kernels agree with it to fp32 rounding.
    Training in fp32 on a CPU takes F.linear's forward too, and the same gradients, computed the faster
    way round for the shapes transposed_weight_grad names.

    pack(rows) (see pack_weights) has the layer keep one copy of its weight in a layout made for the
    products it will do, made at once and again whenever the weight has changed since:
    - rows='many': oneDNN's blocked layout, read by products of two rows or more (batched decoding);
    - rows='one': mingpt.kernels' layout, read by products of up to kernels.MAX_ROWS rows (decoding one
      sequence), the fastest way to stream a weight for one row (where mingpt.kernels is available), and by
      mingpt.kernels.block_step (one_row_weight), whatever the weight's size.
    Other products read the weight as it is.

    The oneDNN kernel is a private torch op: where it is missing, MINGPT_ONEDNN=0 is set, or a call
    fails (a torch whose op takes other arguments), those products take F.linear, the latter after
    one debug log line.
    """

    packs = None  # set by pack(): 'many' or 'one', the products a copy of the weight is kept for
    _packed = None  # ((rows, weight's version, its address), the copy)

    def pack(self, rows='many'):
        """ keep a copy of the weight laid out for products of many rows or of one (see above),
        made here already, so that the first such product does not wait """
        if rows not in ('many', 'one'):
            raise ConfigError(f"pack(rows={rows!r}): rows is 'many' or 'one'")
        self.packs = rows
        with torch.no_grad():
            self._packed_weight()

    def _fast_weight(self):
        w = self.weight
        return w.device.type == 'cpu' and w.dtype == torch.float32 and w.numel() >= ONEDNN_MIN_WEIGHT

    def forward(self, x):
        global _onednn_linear
        if self.packs == 'one' and kernels.usable(self.weight, x):
            return kernels.product(x, self._packed_weight(), self.weight.size(0), self.bias)
        w = self.weight
        if (_onednn_linear is not None and not torch.is_grad_enabled() and x.device.type == 'cpu'
                and x.dtype == torch.float32 and self._fast_weight() and w.is_contiguous()
                and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling()):
            if self.packs == 'many' and x.numel() >= 2 * x.size(-1):
                w = self._packed_weight()
            try:
                return _onednn_linear(x, w, self.bias, 'none', [], '')
            except (RuntimeError, TypeError) as e:
                logger.debug("oneDNN linear failed (%s); using F.linear from now on", e)
                _onednn_linear = None
        w = self.weight
        if (w.requires_grad and torch.is_grad_enabled() and x.device.type == 'cpu' and x.dtype == w.dtype == torch.float32
                and not torch.is_autocast_enabled('cpu') and transposed_weight_grad(*w.shape)):
            return _LinearTransposedGrad.apply(x, w, self.bias)
        return F.linear(x, w, self.bias)

    def one_row_weight(self):
        """ (mingpt.kernels' copy of the weight, None) when this layer is packed for one row, else None
        (mingpt.kernels.block_step reads it) """
        if self.packs == 'one' and kernels.supports(self.weight):
            return self._packed_weight(), None
        return None

    def _packed_weight(self):
        """ the copy of the weight pack() asked for, made anew if the weight changed in place (an
        optimizer step, load_state_dict) or was replaced; the weight itself where that layout is
        unavailable """
        global _onednn_pack
        w = self.weight
        key = (self.packs, w._version, w.data_ptr())
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # one copy at a time: the old one goes before the new one is made
            if self.packs == 'one' and kernels.supports(w):
                self._packed = (key, kernels.block(w))
            elif self.packs == 'many' and _onednn_pack is not None and self._fast_weight():
                try:
                    self._packed = (key, _onednn_pack(w.detach(), None))
                except (RuntimeError, TypeError) as e:
                    logger.debug("oneDNN weight packing failed (%s); products read the weight as it is", e)
                    _onednn_pack = None
        return w if self._packed is None else self._packed[1]

    def __getstate__(self):
        # a oneDNN tensor has no storage to copy or pickle: a copy of this layer packs its own
        state = super().__getstate__().copy()
        state.pop('_packed', None)
        return state


def pack_weights(model, rows='many'):
    """
    Have every Linear of model that takes a fast path keep a second copy of its weight, laid out for
    the products it is about to do (Linear.pack): rows='many' for batched decoding (a step's product
    has a row per sequence), rows='one' for decoding one sequence. Why: a matrix-vector product
    (one row) streams fastest from mingpt.kernels' layout, and with more rows the arithmetic starts to
    count and oneDNN's matmul kernel runs faster on weights in its own blocked layout (bench/README.md,
    Generation and Serving). The cost is memory: the big weights are held twice (one copy at a time:
    packing for the other kind of product replaces it). mingpt.decoder.Decoder calls this for the rows
    it decodes; training and every other path are unchanged. Packed for one row, a GPT-2 block runs
    its one-token steps in C (model.Block.pack, mingpt.kernels.block_step).
    """
    for m in model.modules():
        if callable(getattr(m, 'pack', None)):  # these Linears, mingpt.quantize's Int8Linear, model.Block
            m.pack(rows)

# -----------------------------------------------------------------------------
# the int8 linear: which kernel multiplies by an int8 weight with per-output-channel scales

def _fbgemm_prepare(weight, scale):
    """ int8 (out, in) weight + fp32 (out,) scales -> fbgemm's packed weight (its own blocked layout) """
    with warnings.catch_warnings():
        # torch deprecates its quantized tensor types; this one only carries the weight into the
        # packing, and where a torch no longer has them the kernel's probe fails and another is chosen
        warnings.simplefilter('ignore', UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            weight, scale.double(), torch.zeros(weight.size(0), dtype=torch.long), 0)
    engine = torch.backends.quantized.engine
    try:  # the engine that is current when packing decides the kernel the product will run
        torch.backends.quantized.engine = 'fbgemm'
        return torch.ops.quantized.linear_prepack(qweight, None)
    finally:
        torch.backends.quantized.engine = engine


def _fbgemm_product(reduce_range):
    def product(x, packed, bias):
        # x (..., in) is quantized per call to uint8 (one scale for the whole tensor); the products
        # sum in int32 and come back as fp32 rows, to which the bias is added here
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.size(-1)), packed, reduce_range)
        y = y.view(*x.shape[:-1], y.size(-1))
        return y if bias is None else y + bias
    return product


def _dequantized_product(x, prepared, bias):
    weight, scale = prepared
    return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


class Int8Kernel:
    """ prepare(weight int8 (out, in), scale (out,)) once, then product(x, prepared, bias) per call """

    def __init__(self, name, prepare, product):
        self.name, self.prepare, self.product = name, prepare, product

    def __repr__(self):
        return f'Int8Kernel({self.name!r})'


def _gemv_prepare(weight, scale):
    return kernels.block(weight), scale.float().contiguous()


def _gemv_product(x, prepared, bias):
    blocked, scale = prepared
    return kernels.product(x, blocked, scale.numel(), bias, scale=scale)


# products of a few rows (decoding) where mingpt.kernels is available: the int8 weight is widened to fp32
# in registers, so the activations are not quantized and a row's result is the exact dequantized
# product's up to fp32 rounding, however it is batched
GEMV_INT8 = Int8Kernel('gemv', _gemv_prepare, _gemv_product)

# in order of preference (bench/README.md, int8): fbgemm's dynamic linear quantizes the activations to
# uint8 per call and multiplies in int8, reading a quarter of fp32's bytes. Without VNNI (AVX2), its
# kernel adds pairs of uint8 x int8 products in int16 (vpmaddubsw), which saturates for 8-bit
# activations: 7-bit ones (reduce_range) fit. 'dequantize' is exact and runs anywhere, at below fp32's
# speed: the fallback.
INT8_KERNELS = {
    'fbgemm': Int8Kernel('fbgemm', _fbgemm_prepare, _fbgemm_product(False)),
    'fbgemm-7bit': Int8Kernel('fbgemm-7bit', _fbgemm_prepare, _fbgemm_product(True)),
    'dequantize': Int8Kernel('dequantize', lambda weight, scale: (weight, scale), _dequantized_product),
}
_int8_kernel = None


def _probe_int8_kernel(kernel):
    """
    Whether kernel multiplies correctly here: a product chosen to saturate int16 pair sums (every
    activation at its maximum, every weight at +-127) must match the exact dequantized product
    within what quantizing the activations may change: half a step of the activations' scale per
    input, times the weight's magnitude summed over the row.
    """
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randint(0, 2, (64, 256), generator=gen, dtype=torch.int8) * 2 - 1) * 127
    weight[:32] = 127  # rows whose products are all positive: the worst case for saturation
    scale = torch.rand(64, generator=gen) * 0.01 + 0.001
    x = torch.rand(3, 256, generator=gen) * 8
    x[0] = 8.0
    try:
        y = kernel.product(x, kernel.prepare(weight, scale), None)
    except (RuntimeError, TypeError, AttributeError) as e:
        logger.debug("int8 kernel %s is unavailable here: %s", kernel.name, e)
        return False
    exact = x @ (weight.float() * scale[:, None]).t()
    step = 8.0 / 127  # the activations' scale at 7 bits, the coarser of the two
    bound = step / 2 * (weight.float().abs() * scale[:, None]).sum(1) + 1e-4
    return bool(((y - exact).abs() <= bound).all())


def int8_kernel():
    """
    The kernel mingpt.quantize's Int8Linear multiplies with on this CPU: the first of INT8_KERNELS
    that is present and passes a product that would catch int16 saturation, chosen once per process.
    MINGPT_INT8_KERNEL=<name> asks for one by name (it is still checked, and refused if wrong here).
    """
    global _int8_kernel
    if _int8_kernel is None:
        wanted = os.environ.get('MINGPT_INT8_KERNEL')
        if wanted is not None and wanted not in INT8_KERNELS:
            raise ConfigError(f"MINGPT_INT8_KERNEL={wanted!r} is not an int8 kernel: use one of "
                              f"{', '.join(INT8_KERNELS)}, or unset it to choose automatically")
        names = [wanted] if wanted else list(INT8_KERNELS)
        for name in names:
            if _probe_int8_kernel(INT8_KERNELS[name]):
                _int8_kernel = INT8_KERNELS[name]
                break
        else:
            raise ConfigError(f"MINGPT_INT8_KERNEL={wanted!r}: that kernel is missing or multiplies "
                              "wrongly on this CPU; unset it to choose automatically")
        logger.info("int8 linears multiply with the %s kernel", _int8_kernel.name)
    return _int8_kernel

# -----------------------------------------------------------------------------
# devices and training

def resolve_device(device='auto'):
    """
    The device to run on: 'auto' is cuda when there is one, else cpu. Anything else must be a device
    torch knows and this machine has: a ConfigError now beats torch's error (an AssertionError for
    a torch built without CUDA) at the first tensor moved there.
    """
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device torch knows: use 'auto', 'cpu', 'cuda' "
                          "or 'cuda:N'") from e
    if d.type == 'cuda':
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device={device!r}: there is no CUDA device on this machine (or this torch "
                              "was built without CUDA); use 'cpu' or 'auto'")
        if d.index is not None and d.index >= n:
            raise ConfigError(f"device={device!r}: this machine has only {n} CUDA device(s), cuda:0 to "
                              f"cuda:{n - 1}; use one of those, or 'cpu' or 'auto'")
    if d.type == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r}: MPS (Apple's GPU) is not available here; use 'cpu' or 'auto'")
    return device


def training_device(device='auto', local_rank=0, world_size=1):
    """
    The device a training process uses (resolve_device). With several processes on CUDA, each
    takes the GPU of its local rank (and makes it current).
    """
    device = resolve_device(device)
    if world_size > 1 and device == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    return device


def fast_dtype(device_type):
    """
    What dtype='auto' trains in: 'bfloat16' where the hardware has bf16 arithmetic, else 'float32'.
    That is a CUDA GPU of compute capability 8 (Ampere) or newer, or a CPU with AVX512-BF16 or AMX
    instructions, where autocast's bf16 matmuls run at about twice the speed of fp32 ones. Without
    them the bf16 matmuls are emulated, and slower than fp32.
    """
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.get_device_capability()[0] >= 8 else 'float32'
    if device_type == 'cpu':
        # torch.cpu's feature checks are private; a torch without them just gets float32
        checks = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
        if any(check is not None and check() for check in checks):
            return 'bfloat16'
    return 'float32'


def cpu_count():
    """ the cores this process may run on (its affinity mask, which taskset and containers narrow) """
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def default_num_workers():
    """
    DataLoader workers that pay for themselves: each is a process that copies the dataset, and with
    only a couple of cores it competes with the training step itself. Keep one core for the main
    process and never go past 4.
    """
    return max(0, min(4, cpu_count() - 2))
