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
import os
import re
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
    sizes = _sizes_from_config(_read_json(d / 'config.json'), d / 'config.json')
    return sizes, from_hf_tensors(_read_hf_tensors(d), sizes['n_layer'], sizes['n_embd'])

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
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tensors = {}
    for name, _, conv1d in param_names(model.config.n_layer):
        t = sd[name].detach().cpu()
        tensors[name] = (t.t() if conv1d else t).contiguous()
    if model.lm_head.weight is not model.transformer.wte.weight:
        tensors[LM_HEAD] = sd[LM_HEAD].detach().cpu().contiguous()

    weights = 'model.safetensors' if safe_serialization else 'pytorch_model.bin'
    # a stale weights file of the other kind would shadow (or be shadowed by) this one on load
    for stale in HF_WEIGHT_FILES:
        if stale != weights and (d / stale).is_file():
            logger.info("removing %s, replaced by %s", d / stale, weights)
            (d / stale).unlink()
    if safe_serialization:
        from safetensors.torch import save_file
        _atomic_write(d / weights, lambda p: save_file(tensors, p, metadata={'format': 'pt'}))
    else:
        _atomic_write(d / weights, lambda p: torch.save(tensors, p))
    config = json.dumps(hf_config(model), indent=2) + '\n'
    _atomic_write(d / 'config.json', lambda p: p.write_text(config, encoding='utf-8'))
    logger.info("saved %s (%d tensors) to %s", weights, len(tensors), d)
    return d

# -----------------------------------------------------------------------------
# format detection and the single entry point

def detect_format(source):
    """
    -> (format, path) with format one of 'hf', 'hub'. Raises WeightsError saying what was
    looked for when source is none of them.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / 'config.json').is_file():
            return 'hf', path
        raise WeightsError(f"{path}: not a checkpoint directory: looked for config.json (Hugging Face "
                           "format, mingpt's own checkpoints)")
    if path.is_file():
        if path.name in HF_WEIGHT_FILES and (path.parent / 'config.json').is_file():
            return 'hf', path.parent  # a weights file inside an HF directory
        raise WeightsError(f"{path}: not a recognised weights file: expected a Hugging Face "
                           f"{'/'.join(HF_WEIGHT_FILES)} next to its config.json")
    raise WeightsError(f"{source!r} is neither an existing path nor a known model name (the hub "
                       f"names are {', '.join(HUB_MODELS)})")


def load_pretrained(source, *, dtype=torch.float32, model_cls=GPT, **overrides):
    """
    A GPT with pretrained weights from source: a hub name ('gpt2', 'gpt2-medium', 'gpt2-large',
    'gpt2-xl', 'distilgpt2'), an HF-format directory (mingpt's own checkpoints are these), an
    OpenAI TensorFlow checkpoint directory, or an llm.c .bin file. Dropout comes from the
    checkpoint's config where it has one (mingpt's defaults otherwise); overrides may set
    embd_pdrop, resid_pdrop, attn_pdrop, tie_weights. dtype=None keeps the stored dtype.
    The model is returned in training mode, like any freshly built nn.Module: call .eval().
    """
    fmt, path = detect_format(source)
    readers = {'hf': read_hf}
    sizes, tensors = readers[fmt](path)
    model = build_model(sizes, tensors, path, dtype=dtype, model_cls=model_cls, **overrides)
    logger.info("loaded %s (%s format)", path, fmt)
    return model
