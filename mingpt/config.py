"""
The checks of the configs a user writes. A GPT's: the sizes of the well-known models (the
model_type presets), the architecture options beyond GPT-2 (ARCH_OPTIONS) and the checks that make
a config one a GPT can be built from (resolve_config); mingpt.model imports these from here (and
still offers them as mingpt.model.PRESETS and mingpt.model.resolve_config). A Trainer's:
check_trainer_config, every field checked before a run starts (the fields and their defaults are in
Trainer.get_default_config).
"""

import math
import numbers

import torch

from mingpt.distributed import PARALLEL, require_fsdp
from mingpt.errors import ConfigError

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}  # Trainer's dtype

# -----------------------------------------------------------------------------
# the sizes of the well-known models, as minGPT names them

PRESETS = {
    # names follow the huggingface naming conventions
    # GPT-1
    'openai-gpt':   dict(n_layer=12, n_head=12, n_embd=768),  # 117M params
    # GPT-2 configs
    'gpt2':         dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    'gpt2-medium':  dict(n_layer=24, n_head=16, n_embd=1024), # 350M params
    'gpt2-large':   dict(n_layer=36, n_head=20, n_embd=1280), # 774M params
    'gpt2-xl':      dict(n_layer=48, n_head=25, n_embd=1600), # 1558M params
    # Gophers
    'gopher-44m':   dict(n_layer=8, n_head=16, n_embd=512),
    # (there are a number more...)
    # I made these tiny models up
    'gpt-mini':     dict(n_layer=6, n_head=6, n_embd=192),
    'gpt-micro':    dict(n_layer=4, n_head=4, n_embd=128),
    'gpt-nano':     dict(n_layer=3, n_head=3, n_embd=48),
}


# the architecture options of the modern recipe (modded-nanogpt, nanochat), each defaulting to GPT-2's
# own choice, so that a config without them is GPT-2 (GPT.get_default_config documents each)
ARCH_OPTIONS = dict(pos_emb='learned', rope_base=10000.0, norm='layernorm', qk_norm=False, mlp_act='gelu',
                    bias=True, zero_init_out=False, logit_softcap=None, value_embeds=False, token_shift=False)
# the options that only change the initial weights: a trained model with them is still a GPT-2
INIT_ONLY = ('zero_init_out',)


def non_gpt2_options(config):
    """ ["pos_emb='rope'", ...]: the options set away from GPT-2's architecture, which its formats cannot hold """
    return [f"{k}={getattr(config, k, v)!r}" for k, v in ARCH_OPTIONS.items()
            if k not in INIT_ONLY and k != 'rope_base' and getattr(config, k, v) != v]


def _check_options(config):
    """ the architecture options: each one of its values; ConfigError otherwise """
    def need(ok, k, what):
        if not ok:
            raise ConfigError(f"the model config has {k}={getattr(config, k)!r}, but it must be {what}")
    need(config.pos_emb in ('learned', 'rope'), 'pos_emb', "'learned' (GPT-2's wpe) or 'rope' (rotary)")
    need(isinstance(config.rope_base, numbers.Real) and not isinstance(config.rope_base, bool)
         and config.rope_base > 1, 'rope_base', "a number > 1, e.g. 10000.0")
    need(config.norm in ('layernorm', 'rmsnorm'), 'norm', "'layernorm' or 'rmsnorm'")
    need(config.mlp_act in ('gelu', 'relu2'), 'mlp_act', "'gelu' or 'relu2' (ReLU squared)")
    for k in ('qk_norm', 'bias', 'zero_init_out', 'value_embeds', 'token_shift'):
        need(isinstance(getattr(config, k), bool), k, "True or False")
    cap = config.logit_softcap
    need(cap is None or (isinstance(cap, numbers.Real) and not isinstance(cap, bool) and cap > 0),
         'logit_softcap', "None (no capping) or a number > 0, e.g. 15.0")
    if config.pos_emb == 'rope' and (config.n_embd // config.n_head) % 2:
        raise ConfigError(f"pos_emb='rope' rotates pairs of channels, so the head size n_embd / n_head must be "
                          f"even (got {config.n_embd} / {config.n_head} = {config.n_embd // config.n_head})")
    if config.zero_init_out and getattr(config, 'tie_weights', False):
        raise ConfigError("zero_init_out=True starts lm_head at zero, which tie_weights=True would do to the "
                          "token embedding too; set tie_weights=False (the recipe unties them)")


def resolve_config(config):
    """
    Fill n_layer/n_head/n_embd from config.model_type, checking that exactly one of a preset or
    explicit sizes was given, that every size is an int >= 1 and every dropout a probability.
    The architecture options a config lacks (one written before they existed) get their GPT-2
    defaults. Mutates and returns config. Anything else is a ConfigError (a ValueError), here rather than
    as an error deep inside torch, because a half-specified model is always a mistake the user
    wants to hear about.
    """
    if config.vocab_size is None or config.block_size is None:
        raise ConfigError("the model config needs vocab_size and block_size (got vocab_size="
                          f"{config.vocab_size}, block_size={config.block_size}); set both, e.g. "
                          "config.vocab_size = train_dataset.get_vocab_size()")
    sizes = {k: getattr(config, k) for k in ('n_layer', 'n_head', 'n_embd')}
    type_given = config.model_type is not None
    sizes_given = [k for k, v in sizes.items() if v is not None]
    presets = ', '.join(PRESETS)
    if type_given and sizes_given:
        raise ConfigError(f"give either model_type ({config.model_type!r}) or explicit sizes "
                          f"({', '.join(sizes_given)}), not both: set model_type=None to use "
                          "explicit sizes")
    if type_given:
        if config.model_type not in PRESETS:
            raise ConfigError(f"unknown model_type {config.model_type!r}; the presets are: {presets} "
                              "(or set model_type=None and give n_layer, n_head, n_embd)")
        config.merge_from_dict(PRESETS[config.model_type])
    elif len(sizes_given) < 3:
        missing = [k for k, v in sizes.items() if v is None]
        raise ConfigError(f"model_type is None, so n_layer, n_head and n_embd must all be set "
                          f"(missing: {', '.join(missing)}); or pick a preset: {presets}")
    for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size'):
        v = getattr(config, k)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"the model config has {k}={v!r}, but it must be an int >= 1")
    for k in ('embd_pdrop', 'resid_pdrop', 'attn_pdrop'):
        v = getattr(config, k)
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < 1):
            raise ConfigError(f"the model config has {k}={v!r}, but it must be a number in [0, 1) "
                              "(a dropout probability)")
    if config.n_embd % config.n_head != 0:
        raise ConfigError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    for k, v in ARCH_OPTIONS.items():
        if not hasattr(config, k):
            setattr(config, k, v)
    _check_options(config)
    return config

# -----------------------------------------------------------------------------
# the Trainer's config

def check_trainer_config(C, device_type, lora=False, fsdp=False):
    """
    Every field of a Trainer config, before anything runs: a value that cannot work is a ConfigError
    saying what to set. device_type: where it trains; lora: the model has adapters (mingpt.lora);
    fsdp: parallel='fsdp' over several processes.
    """
    is_int = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low
    is_number = lambda v, low: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                and math.isfinite(v) and v >= low)

    def need(ok, k, what):
        if not ok:
            raise ConfigError(f"trainer config {k}={getattr(C, k)!r} cannot work: set it to {what}")
    for k in ('batch_size', 'grad_accum_steps', 'eval_interval', 'eval_iters', 'checkpoint_interval'):
        need(is_int(getattr(C, k), 1), k, "an int >= 1")
    need(is_int(C.warmup_iters, 0), 'warmup_iters', "an int >= 0")
    need(C.max_iters is None or is_int(C.max_iters, 0), 'max_iters',
         "an int >= 0, or None to train until stopped")
    for k in ('lr_decay_iters', 'data_seed', 'num_workers', 'log_interval'):
        need(getattr(C, k) is None or is_int(getattr(C, k), 0), k, "an int >= 0, or None")
    need(C.checkpoint_minutes is None or is_number(C.checkpoint_minutes, 0), 'checkpoint_minutes',
         "a number of minutes >= 0, or None (0 and None: checkpoints by iterations only)")
    need(is_number(C.learning_rate, 0) and C.learning_rate > 0, 'learning_rate', "a number > 0, e.g. 3e-4")
    need(C.min_lr is None or is_number(C.min_lr, 0), 'min_lr', "a number >= 0, or None (a tenth of lr)")
    need(is_number(C.weight_decay, 0), 'weight_decay', "a number >= 0")
    need(not C.grad_norm_clip or is_number(C.grad_norm_clip, 0), 'grad_norm_clip', "a number > 0, or None")
    betas_ok = isinstance(C.betas, (tuple, list)) and len(C.betas) == 2
    need(betas_ok and all(is_number(b, 0) and b < 1 for b in C.betas), 'betas', "two numbers in [0, 1), "
         "like (0.9, 0.95)")
    need(C.lr_schedule in (None, 'cosine', 'wsd'), 'lr_schedule', "None (constant), 'cosine' or 'wsd'")
    need(is_number(C.cooldown_frac, 0) and 0 < C.cooldown_frac <= 1, 'cooldown_frac', "a number in (0, 1]")
    need(C.optimizer in ('adamw', 'muon'), 'optimizer', "'adamw' or 'muon'")
    need(is_number(C.muon_lr, 0) and C.muon_lr > 0, 'muon_lr', "a number > 0, e.g. 0.02")
    need(is_number(C.muon_momentum, 0) and C.muon_momentum < 1, 'muon_momentum', "a number in [0, 1), e.g. 0.95")
    need(is_int(C.muon_momentum_warmup, 0), 'muon_momentum_warmup', "an int >= 0, e.g. 300")
    need(is_number(C.muon_weight_decay, 0), 'muon_weight_decay', "a number >= 0")
    need(C.embedding_lr is None or (is_number(C.embedding_lr, 0) and C.embedding_lr > 0), 'embedding_lr',
         "a number > 0, or None (learning_rate)")
    need(C.resume in (False, True, 'auto'), 'resume', "False, True or 'auto'")
    need(C.parallel in PARALLEL, 'parallel', "'ddp' (a replica per process) or 'fsdp' (sharded)")
    if C.parallel == 'fsdp':
        require_fsdp()
    need(C.progress_bar in (None, False, True), 'progress_bar', "None (a bar when stderr is a terminal), "
         "True or False")
    need(isinstance(C.compile, bool), 'compile', "True or False")
    need(isinstance(C.activation_checkpointing, bool), 'activation_checkpointing', "True or False")
    if fsdp and lora:
        raise ConfigError("LoRA adapters train in one process or under parallel='ddp'; FSDP, for models "
                          "whose replica does not fit, is not needed when only the adapters train")
    if C.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {C.dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
    if C.dtype == 'float16' and device_type != 'cuda':
        raise ConfigError(f"dtype='float16' needs a CUDA device (its GradScaler is CUDA-only), but "
                          f"the device is {device_type!r}; use dtype='bfloat16' on CPU, or 'float32'")
    if C.dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use dtype='float16' (or 'float32')")
    if C.lr_schedule in ('cosine', 'wsd') and C.lr_decay_iters is None and C.max_iters is None:
        raise ConfigError(f"lr_schedule={C.lr_schedule!r} needs to know when to reach min_lr: set "
                          "lr_decay_iters or max_iters")
    if C.resume and C.work_dir is None:
        raise ConfigError(f"resume={C.resume!r} needs the work_dir that holds the checkpoint")
