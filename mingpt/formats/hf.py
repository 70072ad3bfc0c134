"""
The Hugging Face GPT-2 format: a directory with config.json (transformers' GPT2Config) and the
weights in model.safetensors, in shards listed by model.safetensors.index.json, or in
pytorch_model.bin (shards too). Both GPT2LMHeadModel names (transformer.h.0...) and GPT2Model names
(h.0..., what the hub's gpt2 stores) load; the four projections are Conv1D, stored (in, out).

mingpt's own checkpoints ARE these directories (save_hf, GPT.save_pretrained): one format to read
back, and transformers (or anything else in that ecosystem) reads ours. A model with architecture
options GPT-2 has not is written as a mingpt directory instead (save_mingpt): the same files, holding
its GPT config and its own state dict, which read_hf recognises and transformers does not read. A hub name such as 'gpt2'
is such a directory downloaded once into the cache (download_hub).
"""

import json
import logging
import os
import re
from pathlib import Path

import torch

from mingpt.config import ARCH_OPTIONS, PRESETS
from mingpt.errors import ConfigError, WeightsError
from mingpt.formats import LM_HEAD, check_sizes, param_names, read_json, refuse_non_gpt2
from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# reading a directory: config.json + model.safetensors / shards / pytorch_model.bin

HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json',
                   'pytorch_model.bin', 'pytorch_model.bin.index.json')

# the causal-mask buffers that older GPT-2 checkpoints (the hub's gpt2 among them) carry: not weights
_HF_BUFFER = re.compile(r'(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$')

# what GPT2Config fills in when config.json leaves a field out
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                    resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True)


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
        weight_map = read_json(path).get('weight_map')
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
        # mingpt's own GPT config, dumped with to_dict(): explicit sizes, or a preset's
        keys = ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size', 'tie_weights',
                'embd_pdrop', 'resid_pdrop', 'attn_pdrop', *ARCH_OPTIONS)
        sizes = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        if not all(k in sizes for k in ('n_layer', 'n_head', 'n_embd')):
            preset = PRESETS.get(cfg.get('model_type'))
            if preset is None:
                raise WeightsError(f"{path}: the model config gives neither n_layer, n_head and n_embd nor "
                                   f"a known model_type (got {cfg.get('model_type')!r}; the presets are: "
                                   f"{', '.join(PRESETS)}); the config is corrupt")
            sizes.update(preset)
        return sizes

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
    sizes = check_sizes(_sizes_from_config(read_json(d / 'config.json'), d / 'config.json'), d / 'config.json')
    tensors = _read_hf_tensors(d)
    # a layer count the weights cannot back is reported by build_model, before any work per layer
    n_layer = min(sizes['n_layer'], len(tensors))
    return sizes, from_hf_tensors(tensors, n_layer, sizes['n_embd'])

# -----------------------------------------------------------------------------
# writing a directory

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


def _own(t):
    """ a contiguous CPU tensor with a storage of its own (safetensors refuses shared ones) """
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_hf(model, directory, safe_serialization=True):
    """
    Write model as a Hugging Face GPT-2 directory: config.json + model.safetensors (or
    pytorch_model.bin with safe_serialization=False), Conv1D weights transposed as HF stores
    them and, for a tied model, no lm_head.weight (HF re-ties it to wte). This is also mingpt's
    own checkpoint format. Returns the directory as a Path. A model with architecture options GPT-2
    has not (rotary positions, RMSNorm, ...) is a ConfigError: transformers would compute another model.
    """
    if getattr(model, 'quantization', None):  # int8 weights: transformers would read them as numbers
        raise ConfigError(f"this model's linears are {model.quantization}, which Hugging Face's GPT-2 format "
                          "cannot hold: save it with mingpt.quantize.save(model, directory) (GPT.from_pretrained "
                          "reads that back), or save the fp32 model")
    refuse_non_gpt2(model, "Hugging Face's GPT-2 format")
    sd = model.state_dict()
    tensors = {}
    for name, _, conv1d in param_names(model.config.n_layer):
        tensors[name] = _own(sd[name].t() if conv1d else sd[name])
    if model.lm_head.weight is not model.transformer.wte.weight:
        tensors[LM_HEAD] = _own(sd[LM_HEAD])
    return _write_directory(directory, tensors, hf_config(model), safe_serialization)


def save_mingpt(model, directory, safe_serialization=True):
    """
    Write model as a mingpt directory: config.json (its GPT config, every field) + model.safetensors
    (or pytorch_model.bin) of its state dict as it is, a tied lm_head left out. It holds any GPT,
    whatever its architecture options; GPT.from_pretrained reads it back (read_hf: a config with a
    block_size is mingpt's), transformers does not. Returns the directory as a Path.
    """
    tied = model.lm_head.weight is model.transformer.wte.weight
    tensors = {k: _own(v) for k, v in model.state_dict().items() if not (tied and k == LM_HEAD)}
    return _write_directory(directory, tensors, model.config.to_dict(), safe_serialization)


def _write_directory(directory, tensors, config, safe_serialization):
    """ tensors into model.safetensors (or pytorch_model.bin), config into config.json; the directory as a Path """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = 'model.safetensors' if safe_serialization else 'pytorch_model.bin'
    if safe_serialization:
        from safetensors.torch import save_file
        atomic_write(d / weights, lambda p: save_file(tensors, p, metadata={'format': 'pt'}))
    else:
        atomic_write(d / weights, lambda p: torch.save(tensors, p))
    atomic_write(d / 'config.json', json.dumps(config, indent=2) + '\n')
    # a stale weights file of another kind (or shards) would shadow, or be shadowed by, this one
    for stale in HF_WEIGHT_FILES:
        if stale != weights and (d / stale).is_file():
            logger.info("removing %s, replaced by %s", d / stale, weights)
            (d / stale).unlink()
    logger.info("saved %s (%d tensors) to %s", weights, len(tensors), d)
    return d

# -----------------------------------------------------------------------------
# the hub: a name becomes a cached HF directory

# the pretrained GPT-2s of the Hugging Face hub that load_pretrained knows by name
HUB_MODELS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'distilgpt2')
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
