"""
llm.c's GPT-2 checkpoint (gpt2_124M.bin, what train_gpt2.c reads and writes): a 256 x int32 header
[magic, version, maxT, V, L, NH, C, Vp, 0...], then every parameter, flat, in the parameter table's
order, each per-layer row stacked over layers: wte (Vp, C), wpe (maxT, C), ln1w (L, C), ...,
fcprojb (L, C), lnfw (C,), lnfb (C,). Weights are nn.Linear's (out, in), like ours; the head is
always tied. Versions: 1 fp32 unpadded, 3 fp32 with wte padded to Vp rows, 5 the same in bf16.
"""

import logging
import math
from pathlib import Path

import torch

from mingpt.errors import ConfigError, WeightsError
from mingpt.formats import param_names, param_shapes, refuse_non_gpt2
from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)

LLMC_MAGIC = 20240326
LLMC_HEADER_INTS = 256
LLMC_VERSIONS = {1: torch.float32, 3: torch.float32, 5: torch.bfloat16}


def read_llmc(path):
    """ an llm.c .bin checkpoint -> (sizes, mingpt-layout tensors); padded vocab rows are dropped """
    import numpy as np
    path = Path(path)
    size = path.stat().st_size
    if size < 4 * LLMC_HEADER_INTS:
        raise WeightsError(f"{path}: {size} bytes, shorter than llm.c's {4 * LLMC_HEADER_INTS}-byte "
                           "header: the file is truncated")
    header = np.fromfile(path, dtype='<i4', count=LLMC_HEADER_INTS)
    magic, version, maxT, V, L, NH, C, Vp = (int(x) for x in header[:8])
    if magic != LLMC_MAGIC:
        raise WeightsError(f"{path}: not an llm.c checkpoint (magic number {magic}, expected {LLMC_MAGIC})")
    if version not in LLMC_VERSIONS:
        raise WeightsError(f"{path}: llm.c checkpoint version {version}; mingpt reads versions "
                           "1 and 3 (fp32) and 5 (bf16)")
    if version == 1:
        Vp = V  # before version 3 the vocabulary was not padded
    if min(maxT, V, L, NH, C) <= 0 or Vp < V:
        raise WeightsError(f"{path}: its header makes no sense (maxT={maxT}, V={V}, Vp={Vp}, L={L}, "
                           f"NH={NH}, C={C}): the file is corrupt")
    if C % NH != 0:
        raise WeightsError(f"{path}: its header does not describe a valid GPT: n_embd ({C}) must be "
                           f"divisible by n_head ({NH})")

    rows = param_shapes(C, V, maxT)
    rows[0] = (rows[0][0], (Vp, C), False)  # wte is stored with its padding rows
    numels = [math.prod(shape) * (L if per_layer else 1) for _, shape, per_layer in rows]
    dtype = LLMC_VERSIONS[version]
    itemsize = 2 if dtype == torch.bfloat16 else 4
    expected = 4 * LLMC_HEADER_INTS + itemsize * sum(numels)
    if size != expected:
        problem = 'truncated' if size < expected else 'followed by extra bytes'
        raise WeightsError(f"{path}: {size} bytes, but an llm.c version {version} checkpoint with these "
                           f"sizes (L={L}, C={C}, V={V}, Vp={Vp}, maxT={maxT}) has {expected}: it is {problem}")

    flat = np.fromfile(path, dtype='<f4' if itemsize == 4 else '<u2', offset=4 * LLMC_HEADER_INTS)
    flat = torch.from_numpy(flat)
    if dtype == torch.bfloat16:
        flat = flat.view(torch.int16).view(torch.bfloat16)  # same bits, reinterpreted
    tensors = {}
    for (name, shape, per_layer), chunk in zip(rows, flat.split(numels)):
        if per_layer:
            for i, t in enumerate(chunk.view(L, *shape)):
                tensors[name.format(i=i)] = t
        else:
            tensors[name] = chunk.view(shape)
    tensors['transformer.wte.weight'] = tensors['transformer.wte.weight'][:V]
    sizes = dict(n_layer=L, n_head=NH, n_embd=C, vocab_size=V, block_size=maxT, tie_weights=True)
    return sizes, tensors


def save_llmc(model, path, version=3):
    """
    Write model as an llm.c checkpoint: version 3 (fp32, vocabulary padded with zero rows to a
    multiple of 128, what llm.c's train_gpt2.c reads), 5 (the same in bf16) or 1 (fp32, unpadded).
    llm.c has no separate head, so the model must be tied (GPT-2 checkpoints are).
    """
    import numpy as np
    refuse_non_gpt2(model, "llm.c's format")
    if version not in LLMC_VERSIONS:
        raise ConfigError(f"llm.c checkpoint version must be one of {sorted(LLMC_VERSIONS)}, got {version}")
    if getattr(model, 'quantization', None):
        raise ConfigError(f"this model's linears are {model.quantization}, which llm.c's format cannot hold: "
                          "save the fp32 model, or this one with mingpt.quantize.save (GPT.from_pretrained reads it)")
    if model.lm_head.weight is not model.transformer.wte.weight and \
            not torch.equal(model.lm_head.weight, model.transformer.wte.weight):
        raise WeightsError("llm.c's format ties lm_head to wte, but this model has a separate lm_head; "
                           "only a model built with tie_weights=True (as GPT-2 is) can be saved in it")
    C = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    V = C.vocab_size
    Vp = V if version == 1 else (V + 127) // 128 * 128
    wte = sd['transformer.wte.weight']
    sd['transformer.wte.weight'] = torch.cat([wte, wte.new_zeros(Vp - V, wte.size(1))])  # (Vp, C)

    header = np.zeros(LLMC_HEADER_INTS, dtype='<i4')
    header[:8] = [LLMC_MAGIC, version, C.block_size, V, C.n_layer, C.n_head, C.n_embd, Vp if version != 1 else 0]
    dtype = LLMC_VERSIONS[version]

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(header.tobytes())
            for name, _, _ in param_names(C.n_layer):  # table order: per-layer rows come out stacked
                t = sd[name].to(dtype).contiguous()
                if dtype == torch.bfloat16:
                    t = t.view(torch.int16)  # numpy has no bf16: write the raw bits
                arr = t.numpy()
                f.write(arr.astype(arr.dtype.newbyteorder('<'), copy=False).tobytes())  # llm.c is little-endian

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    logger.info("saved llm.c version %d checkpoint to %s", version, path)
    return path
