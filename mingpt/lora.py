"""
Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a model by training a small correction to some of
its Linears while every pretrained weight stays frozen.

A targeted Linear y = x W^T + b becomes y = x W^T + b + (dropout(x) A^T B^T) * alpha / r, with A (r, in)
and B (out, r). B starts at zero, so the adapted model starts as the pretrained one; only A and B train,
so AdamW keeps its two moments for them alone, and the gradients of the frozen weights are never made.

    add_lora(model, r=8, alpha=16, dropout=0.05, targets=('c_attn',))   adapters in, everything else frozen
    merge(model) / unmerge(model)          fold B A into W for inference (no extra cost per token), and back
    save_adapter(model, dir) / load_adapter(model, dir)   Hugging Face PEFT's adapter directory format
    checkpoint_reference / check_base      what a Trainer checkpoint of adapters records of its base, and the check

Parameter names are PEFT's without its wrapper prefix: transformer.h.0.attn.c_attn.lora_A.weight is
PEFT's base_model.model.transformer.h.0.attn.c_attn.lora_A.weight. Hugging Face's GPT-2 keeps its
projections in Conv1D layers, (in, out) weights, for which PEFT sets fan_in_fan_out=True; that setting
only transposes the merged B A, its lora_A and lora_B are stored (r, in) and (out, r) like nn.Linear's,
which is mingpt's layout too: adapter tensors need no transpose either way.
"""

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from mingpt.errors import CheckpointError, ConfigError, MissingFileError, WeightsError
from mingpt.hardware import Linear
from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)

TARGETS = ('c_attn', 'c_proj', 'c_fc', 'lm_head')  # the Linears of a GPT, by the last part of their name
CONV1D_TARGETS = ('c_attn', 'c_proj', 'c_fc')  # Conv1D in Hugging Face's GPT-2 (lm_head is an nn.Linear)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
PEFT_PREFIX = 'base_model.model.'

# -----------------------------------------------------------------------------

class LoRALinear(Linear):
    """
    A Linear with a low-rank adapter beside it. It holds the original layer's own weight and bias
    (the same Parameters, so the state dict keeps their names and a shared weight stays shared), so
    the frozen product keeps every speed path of mingpt.hardware.Linear, the oneDNN one included.
    """

    def __init__(self, base, r, alpha, dropout):
        nn.Module.__init__(self)  # not nn.Linear's: the weight is base's, not a new one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.packs = base.packs
        w = base.weight
        # nn.Linear's own init for A (Kaiming uniform, as PEFT does) and zeros for B: B A starts at 0
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.merged = False

    def forward(self, x):
        y = super().forward(x)  # (B, T, out)
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
                raise ConfigError("this model's adapters are merged into its weights, where they cannot "
                                  "train: call mingpt.lora.unmerge(model) before training")
            return y
        # (B, T, in) -> (B, T, r) -> (B, T, out): two thin products instead of a full (out, in) update
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def one_row_weight(self):
        # merged, the weight is the whole product; else the adapter's is not in mingpt.kernels' block step
        return super().one_row_weight() if self.merged else None

    def delta_weight(self):
        """ the (out, in) correction that the adapter adds to the weight: scaling * B A """
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def set_merged(self, merged):
        if merged == self.merged:
            return
        with torch.no_grad():  # in place: bumps the weight's version, which also re-packs a blocked copy
            delta = self.delta_weight().to(self.weight.dtype)
            self.weight.add_(delta if merged else -delta)
        self._packed = None  # and drop the blocked copy outright: it is the old weight's
        self.merged = merged

    def extra_repr(self):
        return super().extra_repr() + f', r={self.lora_A.out_features}, scaling={self.scaling:g}'


def adapters(model):
    """ (name, LoRALinear) of every adapted layer of model, in module order """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def is_adapter_key(name):
    """ whether a state dict key belongs to an adapter (and so to what a LoRA checkpoint stores) """
    return '.lora_A.' in name or '.lora_B.' in name


def adapter_state_dict(state_dict):
    """ the adapters' tensors of a state dict """
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}

# -----------------------------------------------------------------------------
# adding, merging

def add_lora(model, r=8, alpha=16, dropout=0.05, targets=('c_attn',), base=None):
    """
    Give the Linears of model whose name ends in one of targets (c_attn, c_proj, c_fc, lm_head) an
    adapter of rank r, scaled by alpha / r, with dropout on its input; freeze every other parameter.
    base names where the pretrained weights came from (a path or hub name; checkpoints record it
    with a fingerprint of the frozen weights, see mingpt.resume.load_lora_checkpoint). Returns the model.
    """
    if adapters(model):
        raise ConfigError("this model already has LoRA adapters; add them once, to the pretrained model")
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ConfigError(f"LoRA rank r={r!r} cannot work: set it to an int >= 1 (8 is usual)")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError(f"LoRA alpha={alpha!r} cannot work: set it to a number > 0 (often 2 * r)")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ConfigError(f"LoRA dropout={dropout!r} cannot work: set it to a number in [0, 1)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"LoRA targets {list(targets)}: each must be one of {', '.join(TARGETS)}")
    wte = getattr(getattr(model, 'transformer', None), 'wte', None)
    if 'lm_head' in targets and wte is not None and model.lm_head.weight is wte.weight:
        raise ConfigError("lm_head shares its weight with the token embedding (tie_weights): merging an "
                          "adapter into it would change the embedding too; load the model with "
                          "tie_weights=False, or leave lm_head out of the LoRA targets")

    fingerprint = base_fingerprint(model)
    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.rsplit('.', 1)[-1] in targets]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in chosen:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(layer, r, alpha, dropout).train(layer.training))  # eval stays eval
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets),
                             base=None if base is None else str(base), fingerprint=fingerprint)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d alpha=%g on %d layers: %d trainable parameters of %d (%.2f%%)", r, alpha,
                len(chosen), n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def merge(model):
    """ fold every adapter into its weight (W += scaling * B A): inference then costs what the base model's does """
    for _, layer in adapters(model):
        layer.set_merged(True)
    return model


def unmerge(model):
    """ take the adapters back out of the weights (to train on, or to save them alone); fp32-rounding exact """
    for _, layer in adapters(model):
        layer.set_merged(False)
    return model


def merge_and_unload(model):
    """
    The model with every adapter folded into its weight and its adapted layers plain Linears again,
    all parameters trainable: the fine-tuned model, as if it had been fine-tuned whole (PEFT's
    merge_and_unload). Returns the model.
    """
    for name, layer in adapters(model):
        layer.set_merged(True)
        plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain.train(layer.training))
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop('lora_config', None)
    return model


def base_fingerprint(model):
    """
    sha256 over the names, dtypes, shapes and bytes of model's state dict without its adapters: what
    tells that a checkpoint's adapters sit on the very weights they were trained on. Call it on an
    unmerged model.
    """
    h = hashlib.sha256()
    seen = set()
    for name, t in model.state_dict().items():
        if is_adapter_key(name) or (t.data_ptr(), t.shape) in seen:  # a tied tensor counts once
            continue
        seen.add((t.data_ptr(), t.shape))
        t = t.detach().to('cpu').contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()

# -----------------------------------------------------------------------------
# Hugging Face PEFT's adapter directory

def save_adapter(model, directory):
    """
    Write model's adapters as PEFT does: adapter_config.json and adapter_model.safetensors (keys
    base_model.model.<layer>.lora_A.weight ...), which peft.PeftModel.from_pretrained(base, directory)
    loads onto transformers' GPT2LMHeadModel of the same base. Returns the directory as a Path.
    """
    from safetensors.torch import save_file
    cfg = getattr(model, 'lora_config', None)
    if cfg is None:
        raise ConfigError("this model has no LoRA adapters to save; add them with mingpt.lora.add_lora")
    if any(layer.merged for _, layer in adapters(model)):
        raise ConfigError("the adapters are merged into the weights: unmerge(model) before saving them")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous()
               for k, v in adapter_state_dict(model.state_dict()).items()}
    peft_config = {
        'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': cfg['base'],
        'r': cfg['r'], 'lora_alpha': cfg['alpha'], 'lora_dropout': cfg['dropout'],
        'target_modules': list(cfg['targets']),
        # GPT-2's projections are Conv1D in transformers, which PEFT adapts with fan_in_fan_out=True
        'fan_in_fan_out': any(t in CONV1D_TARGETS for t in cfg['targets']),
        'bias': 'none', 'use_rslora': False, 'use_dora': False, 'modules_to_save': None,
        'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None,
        'rank_pattern': {}, 'alpha_pattern': {}, 'inference_mode': True,
    }
    metadata = {'format': 'pt', 'mingpt_base_fingerprint': cfg['fingerprint']}
    atomic_write(d / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(d / ADAPTER_CONFIG, json.dumps(peft_config, indent=2) + '\n')
    logger.info("saved %d adapter tensors to %s", len(tensors), d)
    return d


def read_adapter_config(directory):
    """ (r, alpha, dropout, targets, scaling) of a PEFT LoRA adapter directory; WeightsError for what mingpt cannot apply """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: an adapter directory holds {ADAPTER_CONFIG} and "
                               f"{ADAPTER_WEIGHTS} (what save_adapter and PEFT's save_pretrained write)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path} is not JSON ({e})") from e
    if cfg.get('peft_type') != 'LORA':
        raise WeightsError(f"{path} describes a {cfg.get('peft_type')!r} adapter; mingpt applies LoRA ones")
    plain = {'bias': 'none', 'use_dora': False, 'lora_bias': False, 'layers_to_transform': None,
             'rank_pattern': {}, 'alpha_pattern': {}}
    unsupported = [f"{k}={cfg[k]!r}" for k, v in plain.items() if cfg.get(k) not in (v, None)]
    if unsupported:
        raise WeightsError(f"{path}: mingpt applies plain LoRA adapters only; this one has {', '.join(unsupported)}")
    targets = cfg.get('target_modules') or []
    if isinstance(targets, str) or not set(targets) <= set(TARGETS):
        raise WeightsError(f"{path}: target_modules={targets!r}; mingpt adapts its Linears by name, a list "
                           f"drawn from {', '.join(TARGETS)}")
    r, alpha = int(cfg['r']), cfg['lora_alpha']
    # rank-stabilised LoRA scales by alpha / sqrt(r): expressed here as the alpha that gives that scaling
    alpha = alpha * r ** 0.5 if cfg.get('use_rslora') else alpha
    return dict(r=r, alpha=alpha, dropout=float(cfg.get('lora_dropout') or 0.0), targets=list(targets),
                base=cfg.get('base_model_name_or_path'))


def load_adapter(model, directory):
    """
    Apply the LoRA adapter in directory (PEFT's format, from save_adapter or peft's save_pretrained)
    to model: adds the adapters its config names (if the model has none yet) and loads their weights,
    every key and shape checked first. Returns the model.
    """
    from safetensors.torch import load_file
    cfg = read_adapter_config(directory)
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if not adapters(model):
        add_lora(model, cfg['r'], cfg['alpha'], cfg['dropout'], cfg['targets'], base=cfg['base'])
    tensors = {k.removeprefix(PEFT_PREFIX).replace('.default.', '.'): v for k, v in load_file(path).items()}
    # PEFT also writes the weights of a targeted layer that it deems an embedding (a tied lm_head) as
    # <layer>.base_layer.weight; they are loaded into that layer's own weight
    base_weights = {k.replace('.base_layer.', '.'): v for k, v in tensors.items() if '.base_layer.' in k}
    tensors = {k: v for k, v in tensors.items() if '.base_layer.' not in k}
    own = model.state_dict()
    problems = [f"{k}: {tuple(v.shape)} in the adapter, {tuple(own[k].shape)} in this model"
                for k, v in {**tensors, **base_weights}.items() if k in own and own[k].shape != v.shape]
    problems += [f"{k}: not in this model" for k in {**tensors, **base_weights} if k not in own]
    problems += [f"{k}: not in the adapter" for k in adapter_state_dict(own) if k not in tensors]
    if problems:
        raise WeightsError(f"the adapter in {directory} does not fit this model ({'; '.join(problems[:3])}"
                           f"{f'; and {len(problems) - 3} more' if len(problems) > 3 else ''}): was it "
                           "trained on another base model or with other targets?")
    with torch.no_grad():
        for k, v in {**base_weights, **tensors}.items():
            own[k].copy_(v)
    if base_weights:
        model.lora_config['fingerprint'] = base_fingerprint(model)
    logger.info("loaded the LoRA adapter of %s (%d tensors)", directory, len(tensors))
    return model

# -----------------------------------------------------------------------------
# Trainer checkpoints of adapters

def checkpoint_reference(model):
    """ what a checkpoint of a LoRA model records instead of its frozen weights (None without adapters) """
    cfg = getattr(model, 'lora_config', None)
    return None if cfg is None or not adapters(model) else dict(cfg)


def check_base(model, reference, where):
    """ CheckpointError unless model has the adapters and the base weights that the checkpoint at where was
    trained on (reference: what it recorded, None for a checkpoint of a whole model) """
    cfg = checkpoint_reference(model)
    if reference is None:
        raise CheckpointError(f"the checkpoint in {where} holds a whole model, this model has LoRA adapters: "
                              "resume it without add_lora, or use another work_dir")
    if cfg is None:
        raise CheckpointError(f"the checkpoint in {where} holds LoRA adapters (r={reference['r']}, targets "
                              f"{reference['targets']}) but this model has none: add_lora with those settings "
                              "first, or use mingpt.resume.load_lora_checkpoint")
    if cfg['fingerprint'] != reference['fingerprint']:
        raise CheckpointError(f"the checkpoint in {where} holds adapters trained on other base weights "
                              f"(base {reference['base']!r}, fingerprint {reference['fingerprint'][:12]}, this "
                              f"model's {cfg['fingerprint'][:12]}): load that base model, or use another work_dir")
    for k in ('r', 'alpha', 'targets'):
        if cfg[k] != reference[k]:
            raise CheckpointError(f"the checkpoint in {where} has LoRA {k}={reference[k]!r}, this model "
                                  f"{cfg[k]!r}: add the adapters with the checkpoint's settings")
