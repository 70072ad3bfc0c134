"""
int8 weights: every big Linear of a GPT holds its weight as int8 with one fp32 scale per output
channel, a quarter of fp32's bytes, which is what decoding one token at a time is bound by.

    from mingpt.quantize import quantize, save
    quantize(model, 'int8')          # in place; returns the model
    save(model, 'out/gpt2-int8')     # config.json + model.int8.safetensors (int8 weights and their scales)
    GPT.from_pretrained('out/gpt2-int8')   # the quantized model again

Row n of a weight W (out, in) is stored as q[n] = round(W[n] / s[n]) with s[n] = max|W[n]| / 127, so
every weight is off by at most s[n] / 2 and q stays in [-127, 127] (symmetric, no zero point). One
scale per row rather than per block of 32 inputs (llama.cpp's q8_0): the fast int8 kernels that torch
has take per-row scales, and on a trained model the two differ by little in bits per byte
(bench/README.md).

Single-row products (decoding) run on mingpt.kernels' single-row product where it is available:
it widens the int8 weights to fp32 in registers, so it reads a quarter of fp32's bytes and quantizes
nothing else. Larger products run on mingpt.hardware.int8_kernel's choice for this CPU, in one place:
fbgemm's int8 x int8 product with the activations quantized per call where that is correct here, else
an exact dequantize-and-multiply. fbgemm quantizes the activations with one scale per product, so a
row's result depends a little on the other rows multiplied with it (a batch, a prompt's positions);
the other two kernels' do not. The embeddings stay fp32 (a step gathers one row of each); a head
tied to wte gets an int8 copy of wte, since the head reads all of it every step.
"""

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

import mingpt.kernels as kernels
from mingpt.hardware import GEMV_INT8, int8_kernel
from mingpt.errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

METHODS = ('int8',)
CONFIG_KEY = 'mingpt_quantization'  # in config.json; transformers knows nothing of it
WEIGHTS_FILE = 'model.int8.safetensors'  # not model.safetensors: transformers must not take it for fp32


def quantize_rows(weight):
    """ (out, in) float weight -> (int8 (out, in), fp32 scales (out,)), symmetric, one scale per row """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zeros
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """
    A Linear for inference whose weight is int8 (out, in) with fp32 scales (out,), the bias fp32.
    weight and weight_scale are buffers (not trained); the bias is a Parameter, as nn.Linear's.

    fp32 CPU products without gradients run on GEMV_INT8 (one row) or int8_kernel() (more), each
    with the weight prepared (packed) for it once, and again whenever the weight changes
    (load_state_dict); anything else (gradients, another dtype or device) multiplies by the
    dequantized weight, which is exact.
    """

    def __init__(self, in_features, out_features, bias=True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer('weight', torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer('weight_scale', torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._prepared = {}  # kernel name -> ((weight's version and address), what kernel.prepare made)

    @classmethod
    def from_linear(cls, linear):
        w = linear.weight
        layer = cls(w.size(1), w.size(0), bias=linear.bias is not None, device=w.device)
        if w.is_meta:  # a model built on meta (weights.build_model): shapes only, loaded later
            return layer
        q, scale = quantize_rows(w)
        with torch.no_grad():
            layer.weight.copy_(q)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        return layer

    def dequantized(self):
        """ the fp32 (out, in) weight these int8 values and scales stand for """
        return self.weight.float() * self.weight_scale[:, None]

    def pack(self, rows='many'):
        """ prepare the weight now for the kernel of products of many rows or of one, so that the
        first product does not wait (hardware.pack_weights calls this, as it packs fp32 Linears) """
        if self.weight.device.type == 'cpu' and not self.weight.is_meta:
            self._kernel_weight(GEMV_INT8 if rows == 'one' and kernels.supports(self.weight) else int8_kernel())

    def forward(self, x):
        if kernels.usable(self.weight, x):
            return GEMV_INT8.product(x, self._kernel_weight(GEMV_INT8), self.bias)
        if (x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling()):
            kernel = int8_kernel()
            return kernel.product(x, self._kernel_weight(kernel), self.bias)
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def one_row_weight(self):
        """ (mingpt.kernels' copy of the int8 weight, its scales), or None where that kernel cannot take it """
        return self._kernel_weight(GEMV_INT8) if kernels.supports(self.weight) else None

    def _kernel_weight(self, kernel):
        key = (self.weight._version, self.weight.data_ptr(), self.weight_scale._version)
        if kernel.name not in self._prepared or self._prepared[kernel.name][0] != key:
            self._prepared[kernel.name] = (key, kernel.prepare(self.weight, self.weight_scale))
        return self._prepared[kernel.name][1]

    def __getstate__(self):
        # a packed weight is a torch class instance with no storage to copy: a copy prepares its own
        state = super().__getstate__().copy()
        state['_prepared'] = {}
        return state

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8'


def quantize(model, method='int8'):
    """
    Replace every nn.Linear of model (mingpt's Linears, lm_head included) with an Int8Linear, in
    place, and return the model. A head tied to the token embedding gets its own int8 copy of it;
    the embedding itself stays as it is. For inference: the int8 weights are not trained.
    method None leaves the model as it is (a command line's --quantize left out).
    """
    if method is None:
        return model
    if method not in METHODS:
        raise ConfigError(f"quantize(model, {method!r}): unknown method; use one of {', '.join(METHODS)}")
    if is_quantized(model):
        if getattr(model, 'quantization', None) == method:
            return model  # e.g. a saved int8 model loaded with --quantize int8
        raise ConfigError(f"this model is quantized already ({getattr(model, 'quantization', 'in part')}); "
                          "quantize an fp32 model")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    model.quantization = method
    logger.info("quantized the linears to %s", method)
    return model


def is_quantized(model):
    return any(isinstance(m, Int8Linear) for m in model.modules())

# -----------------------------------------------------------------------------
# on disk: config.json (GPT-2's, plus CONFIG_KEY) + WEIGHTS_FILE in mingpt's own layout


def save(model, directory):
    """
    Write a quantized model to directory: config.json (GPT-2's, which says the method under
    'mingpt_quantization') and model.int8.safetensors, the state dict as it is (int8 weights, their
    scales, the fp32 rest). GPT.from_pretrained makes the quantized model again; transformers cannot
    read it (save the fp32 model with save_pretrained for that).
    """
    from safetensors.torch import save_file
    from mingpt.formats import refuse_non_gpt2
    from mingpt.formats.hf import HF_WEIGHT_FILES, hf_config
    from mingpt.utils import atomic_write
    if not is_quantized(model):
        raise ConfigError("mingpt.quantize.save writes quantized models; call quantize(model) first, or "
                          "save an fp32 model with model.save_pretrained")
    refuse_non_gpt2(model, "the int8 format (GPT-2's config.json)")  # the config says GPT-2's sizes only
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(model)
    # the head is an int8 copy of wte, not wte itself, yet the model it came from was tied
    config.update(tie_word_embeddings=bool(model.config.tie_weights), dtype='float32')
    config[CONFIG_KEY] = {'method': model.quantization, 'scales': 'per output channel'}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={'format': 'pt'}))
    atomic_write(directory / 'config.json', json.dumps(config, indent=2) + '\n')
    for stale in HF_WEIGHT_FILES:  # an fp32 checkpoint left here would contradict this config
        if (directory / stale).is_file():
            (directory / stale).unlink()
    logger.info("saved the %s model to %s", model.quantization, directory)
    return directory


def saved_method(directory):
    """ the quantization method a model directory was saved with (save), or None for any other """
    config = Path(directory) / 'config.json'
    if not (Path(directory) / WEIGHTS_FILE).is_file() or not config.is_file():
        return None
    entry = json.loads(config.read_text()).get(CONFIG_KEY)
    return entry.get('method') if isinstance(entry, dict) else None


def read(directory):
    """ (sizes, tensors, method) of a directory that save() wrote: GPT.from_pretrained builds the model """
    from mingpt.formats.hf import _sizes_from_config, read_safetensors
    directory = Path(directory)
    method = saved_method(directory)
    if method not in METHODS:
        raise WeightsError(f"{directory}: not a quantized mingpt model (config.json + {WEIGHTS_FILE} "
                           f"with a known '{CONFIG_KEY}'); load fp32 models with GPT.from_pretrained")
    sizes = _sizes_from_config(json.loads((directory / 'config.json').read_text()), directory)
    return sizes, read_safetensors(directory / WEIGHTS_FILE), method
