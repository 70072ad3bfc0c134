"""
GPT-2 weights on disk, in every common format, into and out of mingpt's GPT.

    load_pretrained('gpt2')                  a hub name: HF's model.safetensors + config.json, cached
    load_pretrained('path/to/hf_dir')        config.json + model.safetensors (sharded too) or pytorch_model.bin
    load_pretrained('models/124M')           OpenAI's TensorFlow checkpoint, read without TensorFlow
    load_pretrained('gpt2_124M.bin')         llm.c's checkpoint
    save_hf(model, dir) / save_llmc(model, path)

mingpt's own checkpoints ARE Hugging Face directories (config.json + model.safetensors): one format
to read back, and transformers (or anything else in that ecosystem) reads ours.

Every reader returns the same two things, sizes (a dict of GPT config fields) and tensors (a state
dict in mingpt's layout), and one function checks them and builds the model: every key and shape
is checked before a single weight is copied, so a load either gives a whole model or an error.
Nothing is ever unpickled: safetensors, torch.load(weights_only=True), or our own parsers.
"""

import json
import logging
import math
import os
import re
import struct
from pathlib import Path

import torch

from mingpt.model import GPT

logger = logging.getLogger(__name__)


# the pretrained GPT-2s of the Hugging Face hub that load_pretrained knows by name
HUB_MODELS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'distilgpt2')


class WeightsError(ValueError):
    """ a checkpoint that cannot be loaded: missing, corrupt, or not the shape its config says """

# -----------------------------------------------------------------------------
# the parameter names, written once. Our names are Hugging Face's; OpenAI's TensorFlow code named
# them differently, and both HF and TF store the four projections as Conv1D, (in, out), which is
# the transpose of our nn.Linear's (out, in) weight. The row order is llm.c's file order too.

_TABLE = [
    # mingpt / HF name                        OpenAI TF name              Conv1D
    ('transformer.wte.weight',                'model/wte',                False),  # (V, C)
    ('transformer.wpe.weight',                'model/wpe',                False),  # (T, C)
    ('transformer.h.{i}.ln_1.weight',         'model/h{i}/ln_1/g',        False),  # (C,)
    ('transformer.h.{i}.ln_1.bias',           'model/h{i}/ln_1/b',        False),  # (C,)
    ('transformer.h.{i}.attn.c_attn.weight',  'model/h{i}/attn/c_attn/w', True),   # (3C, C)
    ('transformer.h.{i}.attn.c_attn.bias',    'model/h{i}/attn/c_attn/b', False),  # (3C,)
    ('transformer.h.{i}.attn.c_proj.weight',  'model/h{i}/attn/c_proj/w', True),   # (C, C)
    ('transformer.h.{i}.attn.c_proj.bias',    'model/h{i}/attn/c_proj/b', False),  # (C,)
    ('transformer.h.{i}.ln_2.weight',         'model/h{i}/ln_2/g',        False),  # (C,)
    ('transformer.h.{i}.ln_2.bias',           'model/h{i}/ln_2/b',        False),  # (C,)
    ('transformer.h.{i}.mlp.c_fc.weight',     'model/h{i}/mlp/c_fc/w',    True),   # (4C, C)
    ('transformer.h.{i}.mlp.c_fc.bias',       'model/h{i}/mlp/c_fc/b',    False),  # (4C,)
    ('transformer.h.{i}.mlp.c_proj.weight',   'model/h{i}/mlp/c_proj/w',  True),   # (C, 4C)
    ('transformer.h.{i}.mlp.c_proj.bias',     'model/h{i}/mlp/c_proj/b',  False),  # (C,)
    ('transformer.ln_f.weight',               'model/ln_f/g',             False),  # (C,)
    ('transformer.ln_f.bias',                 'model/ln_f/b',             False),  # (C,)
]
# lm_head.weight (V, C) is not in the table: GPT-2 ties it to wte, so TF and llm.c never store it,
# and HF stores it only for a model that unties it.
LM_HEAD = 'lm_head.weight'


def param_names(n_layer):
    """ [(mingpt name, OpenAI TF name, is Conv1D)] for every stored tensor, in llm.c's file order """
    rows = []
    for name, tf_name, conv1d in _TABLE:
        layers = range(n_layer) if '{i}' in name else [None]
        rows += [(name.format(i=i), tf_name.format(i=i), conv1d) for i in layers]
    return rows

# -----------------------------------------------------------------------------
# sizes + tensors -> GPT: the one place where a checkpoint becomes a model

# what a caller may change at load time: regularisation, and untying a tied head for fine-tuning
OVERRIDABLE = ('embd_pdrop', 'resid_pdrop', 'attn_pdrop', 'tie_weights')


def check_sizes(sizes, origin):
    """ the sizes a checkpoint's config gives must be positive integers; returns them """
    bad = [f"{k}={sizes.get(k)!r}" for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size')
           if type(sizes.get(k)) is not int or sizes[k] <= 0]
    if bad:
        raise WeightsError(f"{origin}: the sizes must be positive integers, got {', '.join(bad)}; "
                           "the config is corrupt")
    return sizes


def build_model(sizes, tensors, origin, dtype=torch.float32, model_cls=GPT, **overrides):
    """
    sizes: GPT config fields (n_layer, n_head, n_embd, vocab_size, block_size, tie_weights and
    optionally the dropouts); tensors: mingpt-layout state dict, without lm_head.weight when tied.
    Checks every key and shape against the model the sizes describe, then loads strictly.
    origin names the checkpoint in error messages.
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
    config.merge_from_dict(overrides)
    try:
        # on the meta device: no memory and no random init spent on weights we are about to replace
        with torch.device('meta'):
            model = model_cls(config)
    except ValueError as e:
        raise WeightsError(f"{origin}: its config does not describe a valid GPT: {e}") from None

    tensors = dict(tensors)
    wte = tensors.get('transformer.wte.weight')
    if config.tie_weights:
        if LM_HEAD in tensors and wte is not None and not torch.equal(tensors[LM_HEAD], wte):
            logger.warning("%s: lm_head.weight differs from wte but the model ties them: using wte", origin)
        tensors.pop(LM_HEAD, None)
    elif LM_HEAD not in tensors and sizes.get('tie_weights') and wte is not None:
        tensors[LM_HEAD] = wte.clone()  # untied on request: the head starts as a copy of wte

    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_weights:
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

    if config.tie_weights:
        tensors[LM_HEAD] = tensors['transformer.wte.weight']
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_weights:
        # assign=True gave lm_head its own Parameter object: share wte's again, as GPT.__init__ does
        model.lm_head.weight = model.transformer.wte.weight
    assert not any(t.is_meta for t in model.state_dict().values()), "a weight was left on meta"
    return model

# -----------------------------------------------------------------------------
# Hugging Face directory: config.json + model.safetensors / shards / pytorch_model.bin

HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json',
                   'pytorch_model.bin', 'pytorch_model.bin.index.json')

# the causal-mask buffers that older GPT-2 checkpoints (the hub's gpt2 among them) carry: not weights
_HF_BUFFER = re.compile(r'(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$')

# what GPT2Config fills in when config.json leaves a field out
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                    resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True)


def _read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read it as JSON ({e}); the file is corrupt, replace it") from None


def read_safetensors(path):
    """ a whole .safetensors file -> {name: tensor} """
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error type for a broken header or a short file
        raise WeightsError(f"{path}: not a readable safetensors file ({e}); it is corrupt or "
                           "truncated: delete it and save or download it again") from None


def read_torch_bin(path):
    """ a pytorch_model.bin -> {name: tensor}, refusing anything but plain tensors """
    import pickle
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refusing to load it: it holds Python objects other than tensors, "
                           f"and unpickling those could run arbitrary code ({str(e).splitlines()[0]}). "
                           "If you trust it, convert it to safetensors yourself") from None
    except Exception as e:
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({e}); it is corrupt or "
                           "truncated: delete it and save or download it again") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a flat dict of tensors (a state dict), got {type(sd).__name__}")
    return sd


def _read_hf_tensors(directory):
    """ the tensors of an HF directory, whichever of the weight files it has """
    d = Path(directory)
    readers = {'.safetensors': read_safetensors, '.bin': read_torch_bin}
    for name in HF_WEIGHT_FILES:
        path = d / name
        if not path.is_file():
            continue
        if not name.endswith('.index.json'):
            return readers[path.suffix](path)
        # sharded: the index maps every tensor name to the shard file that holds it
        weight_map = _read_json(path).get('weight_map')
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{path}: no 'weight_map' in this shard index; the file is corrupt")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).is_file():
                raise WeightsError(f"{path} lists the shard {shard}, which is not in {d}; "
                                   "the checkpoint is incomplete: copy or download the missing shard")
            tensors.update(readers[Path(shard).suffix](d / shard))
        return tensors
    raise WeightsError(f"{d}: has a config.json but no weights: looked for {', '.join(HF_WEIGHT_FILES)}")


def _sizes_from_config(cfg, path):
    """ config.json (HF GPT2Config, or a dumped mingpt GPT config) -> GPT config fields """
    if isinstance(cfg.get('model'), dict) and 'block_size' in cfg['model']:
        cfg = cfg['model']  # a whole run config (setup_logging's config.json): its model part
    if 'block_size' in cfg:
        # mingpt's own GPT config, dumped with to_dict(); resolve_config fills sizes from a preset
        config = GPT.get_default_config()
        config.merge_from_dict({k: v for k, v in cfg.items() if k in config.to_dict()})
        if all(config.to_dict().get(k) is not None for k in ('n_layer', 'n_head', 'n_embd')):
            config.model_type = None
        from mingpt.model import resolve_config
        try:
            config = resolve_config(config)
        except ValueError as e:
            raise WeightsError(f"{path}: {e}") from None
        keys = ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size', 'tie_weights',
                'embd_pdrop', 'resid_pdrop', 'attn_pdrop')
        return {k: getattr(config, k) for k in keys}

    model_type = cfg.get('model_type', 'gpt2')
    if model_type != 'gpt2':
        raise WeightsError(f"{path}: model_type is {model_type!r}; mingpt's GPT is GPT-2 and loads "
                           "model_type 'gpt2' checkpoints only")
    # the GPT-2 variants the HF config can describe but our GPT does not compute
    unsupported = []
    if cfg.get('n_inner') not in (None, 4 * cfg.get('n_embd', _HF_DEFAULTS['n_embd'])):
        unsupported.append(f"n_inner={cfg['n_inner']} (the MLP is 4 * n_embd wide)")
    if cfg.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
        unsupported.append(f"activation_function={cfg['activation_function']!r} (GELU, tanh approximation)")
    if cfg.get('layer_norm_epsilon', 1e-5) != 1e-5:
        unsupported.append(f"layer_norm_epsilon={cfg['layer_norm_epsilon']} (1e-5)")
    if not cfg.get('scale_attn_weights', True) or cfg.get('scale_attn_by_inverse_layer_idx', False):
        unsupported.append("non-standard attention scaling (1/sqrt(head size))")
    if cfg.get('add_cross_attention', False):
        unsupported.append("add_cross_attention=true (decoder-only)")
    if unsupported:
        raise WeightsError(f"{path}: this GPT-2 variant is not supported by mingpt's GPT: "
                           + '; '.join(unsupported))
    c = {**_HF_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    return dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], vocab_size=c['vocab_size'],
                block_size=c['n_positions'], tie_weights=bool(c['tie_word_embeddings']),
                embd_pdrop=c['embd_pdrop'], resid_pdrop=c['resid_pdrop'], attn_pdrop=c['attn_pdrop'])


def from_hf_tensors(tensors, n_layer, n_embd):
    """
    HF GPT-2 state dict -> mingpt layout: `transformer.` prefix restored (GPT2Model checkpoints like
    the hub's gpt2 leave it out), mask buffers dropped, Conv1D weights transposed. A state dict
    that is already in nn.Linear layout (a raw mingpt state_dict) is recognised by the shape of
    c_attn, (3C, C) rather than (C, 3C), and left as it is.
    """
    out = {}
    for k, v in tensors.items():
        if _HF_BUFFER.match(k):
            continue
        if not (k.startswith('transformer.') or k == LM_HEAD):
            k = 'transformer.' + k
        out[k] = v
    c_attn = out.get('transformer.h.0.attn.c_attn.weight')
    if c_attn is not None and tuple(c_attn.shape) == (n_embd, 3 * n_embd):
        conv1d = {name for name, _, is_conv1d in param_names(n_layer) if is_conv1d}
        out = {k: v.t() if k in conv1d else v for k, v in out.items()}
    return out


def read_hf(directory):
    """ an HF-format directory -> (sizes, mingpt-layout tensors) """
    d = Path(directory)
    sizes = check_sizes(_sizes_from_config(_read_json(d / 'config.json'), d / 'config.json'), d / 'config.json')
    tensors = _read_hf_tensors(d)
    # a layer count the weights cannot back is reported by build_model, before any work per layer
    n_layer = min(sizes['n_layer'], len(tensors))
    return sizes, from_hf_tensors(tensors, n_layer, sizes['n_embd'])

# -----------------------------------------------------------------------------
# the Hugging Face hub: a name becomes a cached HF directory

HF_BASE_URL = 'https://huggingface.co'
HUB_FILES = ('config.json', 'model.safetensors')


def hub_url(name, filename):
    """ where the hub serves a file; $MINGPT_HF_BASE_URL points it at a mirror (or a test server) """
    base = os.environ.get('MINGPT_HF_BASE_URL') or HF_BASE_URL
    return f"{base.rstrip('/')}/{name}/resolve/main/{filename}"


def _hub_sha256(url):
    """
    The sha256 the hub announces for a file, or None. For files stored in git LFS (the weights)
    a HEAD request on the resolve URL answers with a redirect that carries the LFS object id, which
    is the file's sha256, in X-Linked-Etag (and in ETag on some mirrors); small files get a git
    blob id there instead, which is no sha256 and is ignored.
    """
    import requests
    try:
        r = requests.head(url, allow_redirects=False, timeout=10)
    except requests.RequestException:
        return None  # the download itself will fail with the real reason, and say what to do
    for header in ('X-Linked-Etag', 'ETag'):
        etag = r.headers.get(header, '').removeprefix('W/').strip('"')
        if re.fullmatch(r'[0-9a-f]{64}', etag):
            return etag
    return None


def download_hub(name):
    """
    cache_dir()/hub/<name> with the hub's config.json and model.safetensors, downloading whichever
    is not there yet (a file in the cache is used without touching the network). Returns the path.
    """
    from mingpt.download import cache_dir, cached_download
    directory = cache_dir() / 'hub' / name
    for filename in HUB_FILES:
        if (directory / filename).is_file():
            continue
        url = hub_url(name, filename)
        cached_download(url, filename, sha256=_hub_sha256(url), subdir=f'hub/{name}', desc=f'{name}/{filename}')
    return directory

# -----------------------------------------------------------------------------
# llm.c's checkpoint (gpt2_124M.bin): a 256 x int32 header, then every parameter, flat, in the
# table's order, each per-layer row stacked over layers: wte (Vp, C), wpe (maxT, C), ln1w (L, C),
# ..., fcprojb (L, C), lnfw (C,), lnfb (C,). Weights are nn.Linear's (out, in), like ours; the head
# is always tied. Versions: 1 fp32 unpadded, 3 fp32 with wte padded to Vp rows, 5 the same in bf16.

LLMC_MAGIC = 20240326
LLMC_HEADER_INTS = 256
LLMC_VERSIONS = {1: torch.float32, 3: torch.float32, 5: torch.bfloat16}


def _llmc_shapes(n_layer, n_head, n_embd, vocab_size, block_size, origin):
    """ [(name, shape of one layer's tensor, is per-layer)] in file order, from a meta-device GPT """
    config = GPT.get_default_config()
    config.merge_from_dict(dict(model_type=None, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                vocab_size=vocab_size, block_size=block_size))
    try:
        with torch.device('meta'):
            shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    except ValueError as e:
        raise WeightsError(f"{origin}: its header does not describe a valid GPT: {e}") from None
    return [(name, shapes[name.format(i=0)], '{i}' in name) for name, _, _ in _TABLE]


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

    rows = _llmc_shapes(L, NH, C, V, maxT, path)
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
    if version not in LLMC_VERSIONS:
        raise ValueError(f"llm.c checkpoint version must be one of {sorted(LLMC_VERSIONS)}, got {version}")
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
    _atomic_write(path, write)
    logger.info("saved llm.c version %d checkpoint to %s", version, path)
    return path

# -----------------------------------------------------------------------------
# OpenAI's TensorFlow checkpoint, read without TensorFlow. A TF2-style checkpoint (a "tensor
# bundle") is model.ckpt.index, an SSTable (LevelDB's table format) mapping each variable name to
# a BundleEntryProto (dtype, shape, shard, offset, size, crc32c), and model.ckpt.data-0000x-of-0000n,
# the raw little-endian bytes of the tensors. The readers below are what those formats need, no more.

_SSTABLE_MAGIC = 0xdb4775248b80fb57
_TF_DTYPES = {1: '<f4', 2: '<f8', 3: '<i4', 4: 'u1', 5: '<i2', 6: 'i1', 9: '<i8', 10: '?',
              14: 'bfloat16', 19: '<f2'}  # tensorflow/core/framework/types.proto


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data):
    """
    CRC-32C (Castagnoli) of bytes. Byte by byte in Python is far too slow for GB checkpoints, so
    large inputs are cut into K equal chunks whose CRCs advance together as one numpy vector, four
    bytes per step; since the CRC register is linear over GF(2), the chunk CRCs are then chained
    with the operator "advance over L zero bytes", precomputed as four 256-entry tables.
    """
    import numpy as np
    buf = np.frombuffer(data, dtype=np.uint8)
    n, crc = len(buf), 0xFFFFFFFF
    K = min(1 << 16, n // 1024)  # chunks (vector lanes); a few thousand bytes each at least
    L = n // K // 4 * 4 if K >= 64 else 0  # bytes per chunk, whole 32-bit words
    if L:
        T = np.array(_CRC_TABLE, dtype=np.uint32)

        def zero_bytes(x, count):  # advance registers x over `count` zero bytes
            for _ in range(count):
                x = T[x & 0xFF] ^ (x >> 8)
            return x

        # feeding a little-endian word w into register s is advancing s ^ w over 4 zero bytes, a
        # linear map of 32 bits: split into two 16-bit lookups
        v = np.arange(1 << 16, dtype=np.uint32)
        lo_table, hi_table = zero_bytes(v, 4), zero_bytes(v << 16, 4)
        words = buf[:K * L].view('<u4').reshape(K, L // 4).T.copy()  # (L/4, K): step j, every chunk
        state, lo, tmp = np.zeros(K, np.uint32), np.empty(K, np.uint32), np.empty(K, np.uint32)
        for w in words:
            state ^= w
            np.bitwise_and(state, 0xFFFF, out=lo)
            np.right_shift(state, 16, out=state)
            np.take(hi_table, state, out=tmp)
            np.take(lo_table, lo, out=state)
            state ^= tmp
        # chain the chunks: crc <- advance(crc over L bytes) ^ chunk crc (each computed from 0)
        basis = zero_bytes(np.array([1 << b for b in range(32)], dtype=np.uint32), L)
        bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
        advance = [np.bitwise_xor.reduce(np.where(bits, basis[8 * k:8 * k + 8], 0), axis=1).tolist()
                   for k in range(4)]
        for c in state.tolist():
            crc = (advance[0][crc & 0xFF] ^ advance[1][(crc >> 8) & 0xFF] ^
                   advance[2][(crc >> 16) & 0xFF] ^ advance[3][crc >> 24] ^ c)
    for b in buf[K * L if L else 0:].tolist():
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_unmask(masked):
    """ LevelDB and TF store CRCs "masked" (rotated, offset) so that CRCs of CRCs stay well-behaved """
    rot = (masked - 0xa282ead8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(buf, pos):
    """ a protobuf / LevelDB base-128 varint at buf[pos] -> (value, position after it) """
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _proto_fields(buf):
    """ the (field number, value) pairs of a protobuf message; ints for varints and fixed, bytes for the rest """
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from('<Q', buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + n]), pos + n
        elif wire == 5:
            value, pos = struct.unpack_from('<I', buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


def _block_handle(buf, pos=0):
    """ a BlockHandle, (varint offset, varint size), at buf[pos] -> (offset, size, position after it) """
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _sstable_block(data, offset, size):
    """ the contents of the block at data[offset:offset+size], after checking its trailer """
    if offset + size + 5 > len(data):
        raise ValueError(f"the block at byte {offset} runs past the end of the file")
    # a 5-byte trailer: compression type (0 = none; TF writes bundles uncompressed) and masked crc32c
    kind, crc = data[offset + size], struct.unpack_from('<I', data, offset + size + 1)[0]
    if kind != 0:
        raise ValueError(f"block compressed with type {kind}; only uncompressed tables are supported")
    if crc32c(data[offset:offset + size + 1]) != _crc_unmask(crc):
        raise ValueError(f"the block at byte {offset} fails its crc32c check")
    return data[offset:offset + size]


def _sstable_entries(block):
    """ the (key, value) entries of a block: each key shares a prefix with the one before it """
    num_restarts = struct.unpack_from('<I', block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts  # the restart-point array is only a search index: skip it
    pos, key = 0, b''
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n, pos = _varint(block, pos)
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        yield key, bytes(block[pos:pos + n])
        pos += n


def read_sstable(path):
    """ {key: value} of a whole SSTable file (LevelDB's table format, which TF's .index files use) """
    data = memoryview(Path(path).read_bytes())
    # the 48-byte footer: metaindex and index block handles, zero padding, then the magic number
    if len(data) < 48 or struct.unpack_from('<Q', data, len(data) - 8)[0] != _SSTABLE_MAGIC:
        raise ValueError("it does not end in an SSTable footer: truncated, or not a TF index file")
    _, _, pos = _block_handle(data, len(data) - 48)  # the metaindex: TF writes an empty one
    index = _sstable_block(data, *_block_handle(data, pos)[:2])
    table = {}
    for _, handle in _sstable_entries(index):  # the index: last key of each data block -> its handle
        table.update(_sstable_entries(_sstable_block(data, *_block_handle(handle)[:2])))
    return table


def _bundle_entry(value):
    """ a BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto) -> dict """
    entry = dict(dtype=0, shape=[], shard_id=0, offset=0, size=0, crc32c=None, sliced=False)
    for field, v in _proto_fields(value):
        if field == 1:
            entry['dtype'] = v
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2, whose int64 size = 1
            entry['shape'] = [dict(_proto_fields(dim)).get(1, 0) for f, dim in _proto_fields(v) if f == 2]
        elif field in (3, 4, 5):
            entry[{3: 'shard_id', 4: 'offset', 5: 'size'}[field]] = v
        elif field == 6:
            entry['crc32c'] = v
        elif field == 7:
            entry['sliced'] = True  # a partitioned variable, stored as slices elsewhere
    return entry


def _tf_prefix(path):
    """ the checkpoint prefix ('.../model.ckpt') of a checkpoint directory or prefix """
    path = Path(path)
    if path.is_dir():
        name = 'model.ckpt'
        if (path / 'checkpoint').is_file():  # the text file saying which checkpoint is the latest
            m = re.search(r'^model_checkpoint_path:\s*"(.+)"', (path / 'checkpoint').read_text(), re.M)
            name = Path(m.group(1)).name if m else name  # relative: the directory may have moved
        return path / name
    return path.with_name(path.name.removesuffix('.index'))


def _tf_index(prefix):
    return prefix.with_name(prefix.name + '.index')


def read_tf_index(path):
    """ the variables of a TF checkpoint (directory or prefix) -> (prefix, {name: entry}, number of data files) """
    prefix = _tf_prefix(path)
    index_path = _tf_index(prefix)
    if not index_path.is_file():
        raise WeightsError(f"{index_path}: not found; a TensorFlow checkpoint needs its .index file")
    try:
        table = read_sstable(index_path)
        header = dict(_proto_fields(table.pop(b'', b'')))  # BundleHeaderProto under the empty key
        entries = {k.decode('utf-8'): _bundle_entry(v) for k, v in table.items()}
    except (ValueError, IndexError, struct.error) as e:  # UnicodeDecodeError is a ValueError
        raise WeightsError(f"{index_path}: not a readable TensorFlow checkpoint index ({e}); the file "
                           "is corrupt: download it again") from None
    if header.get(2, 0) != 0:
        raise WeightsError(f"{index_path}: a big-endian checkpoint; only little-endian ones are supported")
    return prefix, entries, header.get(1, 1)


def read_tf_checkpoint(path, names=None, verify=True):
    """
    {variable name: numpy array} of a TensorFlow checkpoint (a directory with a `checkpoint`
    file, or the prefix such as models/124M/model.ckpt), without TensorFlow. names: only these
    variables (default: all). verify: check each tensor's crc32c, as TF does.
    """
    import numpy as np
    prefix, entries, num_shards = read_tf_index(path)
    index_path = _tf_index(prefix)
    names = list(entries) if names is None else names
    missing = [n for n in names if n not in entries]
    if missing:
        raise WeightsError(f"{index_path}: the checkpoint has no variable {', '.join(missing[:4])}"
                           + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else ''))
    # every data file must be as long as the index says, whichever variables we read from it
    data_paths = [prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]
    for shard, data_path in enumerate(data_paths):
        if not data_path.is_file():
            raise WeightsError(f"{data_path}: not found; the checkpoint is incomplete")
        need = max([e['offset'] + e['size'] for e in entries.values() if e['shard_id'] == shard], default=0)
        if data_path.stat().st_size < need:
            raise WeightsError(f"{data_path}: too short: {data_path.stat().st_size} bytes, but the index "
                               f"places tensors up to byte {need}; it is truncated: download it again")
    out, files = {}, {}
    try:
        for name in names:
            e = entries[name]
            if e['sliced'] or e['dtype'] not in _TF_DTYPES or not 0 <= e['shard_id'] < num_shards:
                raise WeightsError(f"{index_path}: variable {name} is partitioned, in a shard that does "
                                   f"not exist or of an unsupported dtype ({e['dtype']})")
            data_path = data_paths[e['shard_id']]
            if data_path not in files:
                files[data_path] = open(data_path, 'rb')
            f = files[data_path]
            buf = bytearray(e['size'])
            f.seek(e['offset'])
            if f.readinto(buf) != e['size']:
                raise WeightsError(f"{data_path}: too short: variable {name} needs bytes {e['offset']} to "
                                   f"{e['offset'] + e['size']} but the file has {data_path.stat().st_size}; "
                                   "it is truncated: download it again")
            if verify and e['crc32c'] is not None and crc32c(buf) != _crc_unmask(e['crc32c']):
                raise WeightsError(f"{data_path}: variable {name} fails its crc32c check: the file is "
                                   "corrupt: download it again")
            dtype = _TF_DTYPES[e['dtype']]
            if dtype == 'bfloat16':  # numpy has no bf16: widen the bits to float32's upper half
                arr = (np.frombuffer(buf, dtype='<u2').astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(buf, dtype=dtype)
            if arr.size != math.prod(e['shape']):
                raise WeightsError(f"{index_path}: variable {name} has {arr.size} values for shape {e['shape']}")
            out[name] = arr.reshape(e['shape'])
    finally:
        for f in files.values():
            f.close()
    return out


def read_tf(path):
    """
    OpenAI's GPT-2 TensorFlow checkpoint (its directory, or a checkpoint prefix in it) -> (sizes,
    mingpt-layout tensors); the sizes come from the hparams.json beside it
    """
    prefix = _tf_prefix(path)
    hparams_path = prefix.parent / 'hparams.json'
    hparams = _read_json(hparams_path)
    missing = [k for k in ('n_vocab', 'n_ctx', 'n_embd', 'n_head', 'n_layer') if not isinstance(hparams.get(k), int)]
    if missing:
        raise WeightsError(f"{hparams_path}: missing or not an integer: {', '.join(missing)}")
    last = f"model/h{hparams['n_layer'] - 1}/ln_1/g"
    if last not in read_tf_index(prefix)[1]:  # before listing n_layer layers' names, which may be absurd
        raise WeightsError(f"{hparams_path} says n_layer={hparams['n_layer']} but the checkpoint "
                           f"has no variable {last}: they do not belong together")
    names = param_names(hparams['n_layer'])
    arrays = read_tf_checkpoint(prefix, names=[tf_name for _, tf_name, _ in names])
    tensors = {}
    for name, tf_name, conv1d in names:
        t = torch.from_numpy(arrays[tf_name])
        if conv1d and t.dim() == 3 and t.size(0) == 1:
            t = t[0].t()  # Conv1D's [1, nx, nf] -> nn.Linear's (nf, nx)
        tensors[name] = t
    sizes = dict(n_layer=hparams['n_layer'], n_head=hparams['n_head'], n_embd=hparams['n_embd'],
                 vocab_size=hparams['n_vocab'], block_size=hparams['n_ctx'], tie_weights=True)
    return sizes, tensors

# -----------------------------------------------------------------------------
# export

def _atomic_write(path, write):
    """ write(tmp_path), then rename over path: a crash mid-save never leaves a half-written file """
    tmp = path.with_name(path.name + '.tmp')
    write(tmp)
    os.replace(tmp, path)


def hf_config(model):
    """ the transformers GPT2Config (as a dict) that describes this model """
    C = model.config
    tied = model.lm_head.weight is model.transformer.wte.weight
    cfg = dict(
        architectures=['GPT2LMHeadModel'], model_type='gpt2',
        vocab_size=C.vocab_size, n_positions=C.block_size, n_ctx=C.block_size,
        n_embd=C.n_embd, n_layer=C.n_layer, n_head=C.n_head, n_inner=None,
        activation_function='gelu_new', layer_norm_epsilon=1e-5, initializer_range=0.02,
        resid_pdrop=C.resid_pdrop, embd_pdrop=C.embd_pdrop, attn_pdrop=C.attn_pdrop,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=tied, use_cache=True,
        dtype=str(model.lm_head.weight.dtype).removeprefix('torch.'),
    )
    if C.vocab_size > 50256:  # GPT-2's <|endoftext|>, only meaningful with its vocabulary
        cfg.update(bos_token_id=50256, eos_token_id=50256)
    return cfg


def save_hf(model, directory, safe_serialization=True):
    """
    Write model as a Hugging Face GPT-2 directory: config.json + model.safetensors (or
    pytorch_model.bin with safe_serialization=False), Conv1D weights transposed as HF stores
    them and, for a tied model, no lm_head.weight (HF re-ties it to wte). This is also mingpt's
    own checkpoint format. Returns the directory as a Path.
    """
    def own(t):  # a contiguous tensor with a storage of its own (safetensors refuses shared ones)
        t = t.detach().cpu().contiguous()
        return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tensors = {}
    for name, _, conv1d in param_names(model.config.n_layer):
        tensors[name] = own(sd[name].t() if conv1d else sd[name])
    if model.lm_head.weight is not model.transformer.wte.weight:
        tensors[LM_HEAD] = own(sd[LM_HEAD])

    weights = 'model.safetensors' if safe_serialization else 'pytorch_model.bin'
    if safe_serialization:
        from safetensors.torch import save_file
        _atomic_write(d / weights, lambda p: save_file(tensors, p, metadata={'format': 'pt'}))
    else:
        _atomic_write(d / weights, lambda p: torch.save(tensors, p))
    config = json.dumps(hf_config(model), indent=2) + '\n'
    _atomic_write(d / 'config.json', lambda p: p.write_text(config, encoding='utf-8'))
    # a stale weights file of another kind (or shards) would shadow, or be shadowed by, this one
    for stale in HF_WEIGHT_FILES:
        if stale != weights and (d / stale).is_file():
            logger.info("removing %s, replaced by %s", d / stale, weights)
            (d / stale).unlink()
    logger.info("saved %s (%d tensors) to %s", weights, len(tensors), d)
    return d

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
        if (path / 'hparams.json').is_file() and _tf_index(_tf_prefix(path)).is_file():
            return 'tf', path
    elif path.is_file():
        with open(path, 'rb') as f:
            head = f.read(4)
        if len(head) == 4 and struct.unpack('<i', head)[0] == LLMC_MAGIC:
            return 'llmc', path
        if path.name in HF_WEIGHT_FILES and (path.parent / 'config.json').is_file():
            return 'hf', path.parent  # a weights file inside an HF directory
        if path.name.endswith('.index') and (path.parent / 'hparams.json').is_file():
            return 'tf', path  # the index file of one checkpoint of a TF directory
    elif _tf_index(path).is_file() and (path.parent / 'hparams.json').is_file():
        return 'tf', path  # a checkpoint prefix, as TF names them: models/124M/model.ckpt
    if str(source) in HUB_MODELS:
        return 'hub', str(source)
    what = ("looked for a Hugging Face directory (config.json + model.safetensors or "
            "pytorch_model.bin; mingpt's own checkpoints are these), an OpenAI TensorFlow checkpoint "
            "directory (hparams.json + model.ckpt.index + model.ckpt.data-*), an llm.c .bin file "
            f"(starting with magic number {LLMC_MAGIC}), or a hub name ({', '.join(HUB_MODELS)})")
    if path.exists():
        raise WeightsError(f"{path}: not a checkpoint mingpt can read: {what}")
    raise WeightsError(f"{source!r}: no such file or directory, and not a known model name: {what}")


def load_pretrained(source, *, dtype=torch.float32, model_cls=GPT, **overrides):
    """
    A GPT with pretrained weights from source: a hub name ('gpt2', 'gpt2-medium', 'gpt2-large',
    'gpt2-xl', 'distilgpt2'; downloaded once into cache_dir()/hub), an HF-format directory
    (mingpt's own checkpoints are these), an OpenAI TensorFlow checkpoint directory, or an llm.c
    .bin file. Sizes come from the checkpoint; dropout from its config where it has one (the HF
    formats), mingpt's defaults otherwise; overrides may set embd_pdrop, resid_pdrop, attn_pdrop
    and tie_weights (False unties a tied head). dtype=None keeps the stored dtype. The model is
    returned in training mode, like any new nn.Module: call .eval() before inference.
    """
    fmt, path = detect_format(source)
    if fmt == 'hub':
        path = download_hub(path)
    readers = {'hf': read_hf, 'hub': read_hf, 'tf': read_tf, 'llmc': read_llmc}
    sizes, tensors = readers[fmt](path)
    model = build_model(sizes, tensors, path, dtype=dtype, model_cls=model_cls, **overrides)
    logger.info("loaded %s (%s format)", path, fmt)
    return model
