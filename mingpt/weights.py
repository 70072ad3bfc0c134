"""
GPT-2 weights on disk, in every common format, into and out of mingpt's GPT.

    load_pretrained('gpt2', GPT)             a hub name: HF's model.safetensors + config.json, cached
    load_pretrained('path/to/hf_dir', GPT)   config.json + model.safetensors (sharded too) or pytorch_model.bin
    load_pretrained('models/124M', GPT)      OpenAI's TensorFlow checkpoint, read without TensorFlow
    load_pretrained('gpt2_124M.bin', GPT)    llm.c's checkpoint
    save_hf(model, dir) / save_mingpt(model, dir) / save_llmc(model, path)

GPT.from_pretrained and GPT.save_pretrained are the entry points; they pass the model class in, so
that nothing here (or in mingpt.formats) imports mingpt.model: the imports run one way, no circle.

mingpt's own checkpoints ARE Hugging Face directories (config.json + model.safetensors): one format
to read back, and transformers (or anything else in that ecosystem) reads ours. A model with the
architecture options GPT-2 has not (rotary positions, RMSNorm, ...) is saved as a mingpt directory
instead (save_mingpt: its GPT config and its own state dict), which the same reader loads.

Each format lives in mingpt.formats (hf, llmc, tf with its tf_bundle reader). Every reader returns
the same two things, sizes (a dict of GPT config fields) and tensors (a state dict in mingpt's
layout), and build_model, here, checks them and builds the model: every key and shape is checked
before a single weight is copied, so a load either gives a whole model or an error. Nothing is ever
unpickled: safetensors, torch.load(weights_only=True), or our own parsers.
"""

import logging
import struct
from pathlib import Path

import torch

from mingpt.checkpoint import check_one_save, read_state
from mingpt.config import resolve_config
from mingpt.errors import WeightsError
from mingpt.formats import LM_HEAD, check_sizes
from mingpt.formats import hf, llmc, tf, tf_bundle
from mingpt.formats.hf import HUB_MODELS, save_hf, save_mingpt
from mingpt.formats.llmc import save_llmc

__all__ = ['load_pretrained', 'detect_format', 'build_model', 'check_sizes', 'save_hf', 'save_mingpt', 'save_llmc',
           'WeightsError', 'HUB_MODELS', 'OVERRIDABLE']

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# sizes + tensors -> GPT: the one place where a checkpoint becomes a model

# what a caller may change at load time: regularisation, and untying a tied head for fine-tuning
OVERRIDABLE = ('embd_pdrop', 'resid_pdrop', 'attn_pdrop', 'tie_weights')


def build_model(model_cls, sizes, tensors, origin, dtype=torch.float32, quantization=None, **overrides):
    """
    model_cls: GPT or a subclass; sizes: GPT config fields (n_layer, n_head, n_embd, vocab_size,
    block_size, tie_weights and optionally the dropouts); tensors: mingpt-layout state dict, without
    lm_head.weight when tied. Checks every key and shape against the model the sizes describe, then
    loads strictly. origin names the checkpoint in error messages. quantization: the method
    (mingpt.quantize) the tensors were saved with, head included.
    """
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; a pretrained model's "
                        f"sizes come from its checkpoint, only these can be overridden: {', '.join(OVERRIDABLE)}")
    check_sizes(sizes, origin)
    last = f"transformer.h.{sizes['n_layer'] - 1}.ln_1.weight"
    if last not in tensors:  # checked before n_layer layers are built, which may be absurdly many
        raise WeightsError(f"{origin}: the config says n_layer={sizes['n_layer']} but the weights are "
                           f"missing {last}: the config and the weights do not belong together")
    config = model_cls.get_default_config()
    config.model_type = None  # sizes are explicit (distilgpt2 or a custom model has no preset)
    config.merge_from_dict(sizes)
    try:
        resolve_config(config)
    except ValueError as e:
        raise WeightsError(f"{origin}: its config does not describe a valid GPT: {e}") from None
    config.merge_from_dict(overrides)
    resolve_config(config)  # the caller's overrides: a ConfigError about their own values
    # on the meta device: no memory and no random init spent on weights we are about to replace
    with torch.device('meta'):
        model = model_cls(config)
    if quantization is not None:
        from mingpt.quantize import quantize
        quantize(model, quantization)
    tied = config.tie_weights and quantization is None  # a quantized head is an int8 copy, saved

    tensors = dict(tensors)
    wte = tensors.get('transformer.wte.weight')
    if tied:
        if LM_HEAD in tensors and wte is not None and not torch.equal(tensors[LM_HEAD], wte):
            logger.warning("%s: lm_head.weight differs from wte but the model ties them: using wte", origin)
        tensors.pop(LM_HEAD, None)
    elif LM_HEAD not in tensors and sizes.get('tie_weights') and wte is not None:
        tensors[LM_HEAD] = wte.clone()  # untied on request: the head starts as a copy of wte

    expected = {k: v.shape for k, v in model.state_dict().items()}
    if tied:
        del expected[LM_HEAD]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} is {tuple(tensors[k].shape)}, expected {tuple(s)}" for k, s in expected.items()
             if k in tensors and tensors[k].shape != s]
    if missing or unexpected or wrong:
        def few(xs):
            return ', '.join(xs[:4]) + (f' (and {len(xs) - 4} more)' if len(xs) > 4 else '')
        problems = ([f"missing {few(missing)}"] if missing else []) + \
                   ([f"unexpected {few(unexpected)}"] if unexpected else []) + \
                   ([f"wrong shape: {few(wrong)}"] if wrong else [])
        raise WeightsError(
            f"{origin}: the weights do not fit the GPT its config describes (n_layer={config.n_layer}, "
            f"n_head={config.n_head}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
            f"block_size={config.block_size}): {'; '.join(problems)}. The config and the weights "
            "do not belong together, or the file is not a GPT-2 checkpoint")

    if tied:
        tensors[LM_HEAD] = tensors['transformer.wte.weight']
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if tied:
        # assign=True gave lm_head its own Parameter object: share wte's again, as GPT.__init__ does
        model.lm_head.weight = model.transformer.wte.weight
    assert not any(t.is_meta for t in model.state_dict().values()), "a weight was left on meta"
    return model

# -----------------------------------------------------------------------------
# format detection and the single entry point

def detect_format(source):
    """
    -> (format, path) for load_pretrained: 'hf' (a directory with config.json, or a weights file
    inside one), 'tf' (hparams.json + model.ckpt.index), 'llmc' (a file starting with llm.c's magic
    number) or 'hub' (a known hub name, with no such local checkpoint). Anything else is a
    WeightsError that says what was looked for.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / 'config.json').is_file():
            return 'hf', path
        if (path / 'hparams.json').is_file() and tf_bundle.index_file(tf_bundle.checkpoint_prefix(path)).is_file():
            return 'tf', path
    elif path.is_file():
        with open(path, 'rb') as f:
            head = f.read(4)
        if len(head) == 4 and struct.unpack('<i', head)[0] == llmc.LLMC_MAGIC:
            return 'llmc', path
        if path.name in hf.HF_WEIGHT_FILES and (path.parent / 'config.json').is_file():
            return 'hf', path.parent  # a weights file inside an HF directory
        if path.name.endswith('.index') and (path.parent / 'hparams.json').is_file():
            return 'tf', path  # the index file of one checkpoint of a TF directory
    elif tf_bundle.index_file(path).is_file() and (path.parent / 'hparams.json').is_file():
        return 'tf', path  # a checkpoint prefix, as TF names them: models/124M/model.ckpt
    if str(source) in HUB_MODELS:
        return 'hub', str(source)
    what = ("looked for a Hugging Face directory (config.json + model.safetensors or "
            "pytorch_model.bin; mingpt's own checkpoints are these), an OpenAI TensorFlow checkpoint "
            "directory (hparams.json + model.ckpt.index + model.ckpt.data-*), an llm.c .bin file "
            f"(starting with magic number {llmc.LLMC_MAGIC}), or a hub name ({', '.join(HUB_MODELS)})")
    if path.exists():
        raise WeightsError(f"{path}: not a checkpoint mingpt can read: {what}")
    raise WeightsError(f"{source!r}: no such file or directory, and not a known model name: {what}")


def load_pretrained(source, model_cls, *, dtype=torch.float32, **overrides):
    """
    A model_cls (GPT or a subclass) with pretrained weights from source: a hub name ('gpt2', 'gpt2-medium', 'gpt2-large',
    'gpt2-xl', 'distilgpt2'; downloaded once into cache_dir()/hub), an HF-format directory
    (mingpt's own checkpoints are these), an OpenAI TensorFlow checkpoint directory, or an llm.c
    .bin file. Sizes come from the checkpoint; dropout from its config where it has one (the HF
    formats), mingpt's defaults otherwise; overrides may set embd_pdrop, resid_pdrop, attn_pdrop
    and tie_weights (False unties a tied head). dtype=None keeps the stored dtype. The model is
    returned in training mode, like any new nn.Module: call .eval() before inference.
    A Trainer checkpoint (an HF directory with a trainer.pt) must hold the files of one save; a LoRA
    run's holds only adapters, which come back merged into the base weights they name (mingpt.lora).
    """
    fmt, path = detect_format(source)
    if fmt == 'hf':
        from mingpt.quantize import read, saved_method  # a directory mingpt.quantize.save wrote: int8
        if saved_method(path) is not None:
            sizes, tensors, method = read(path)
            return build_model(model_cls, sizes, tensors, path, dtype=None, quantization=method, **overrides)
    if fmt == 'hub':
        path = hf.download_hub(path)
    if fmt == 'hf' and (path / 'trainer.pt').is_file():
        state = read_state(path, mmap=True, any_version=True)
        check_one_save(path, state)  # weights copied in from another run would load without a word
        if state.get('lora') is not None:  # the adapters alone: on their base, as one plain model
            from mingpt.lora import merge_and_unload
            from mingpt.resume import load_lora_checkpoint
            model = merge_and_unload(load_lora_checkpoint(path, model_cls))
            return model if dtype is None else model.to(dtype)
    readers = {'hf': hf.read_hf, 'hub': hf.read_hf, 'tf': tf.read_tf, 'llmc': llmc.read_llmc}
    sizes, tensors = readers[fmt](path)
    model = build_model(model_cls, sizes, tensors, path, dtype=dtype, **overrides)
    logger.info("loaded %s (%s format)", path, fmt)
    return model
