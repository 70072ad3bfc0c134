"""
What every checkpoint format shares: the parameter names, and the contract of a reader.

A reader (formats.hf.read_hf, formats.llmc.read_llmc, formats.tf.read_tf) turns a checkpoint into
two things, sizes (a dict of GPT config fields: n_layer, n_head, n_embd, vocab_size, block_size,
tie_weights, and the dropouts where the format stores them) and tensors (a state dict in mingpt's
layout, without lm_head.weight when the head is tied). mingpt.weights.build_model turns those into
a GPT. A writer walks the same table to put the tensors back in its format's order and layout.

This package imports none of its format modules, so that each of them can import it; none of them
imports mingpt.model (nor mingpt.weights): the model reaches the formats, never the other way round.
"""

import json

from mingpt.config import non_gpt2_options
from mingpt.errors import ConfigError, WeightsError

# -----------------------------------------------------------------------------
# the parameter names, written once. Our names are Hugging Face's; OpenAI's TensorFlow code named
# them differently, and both HF and TF store the four projections as Conv1D, (in, out), which is
# the transpose of our nn.Linear's (out, in) weight. The row order is llm.c's file order too.

TABLE = [
    # mingpt / HF name                        OpenAI TF name              Conv1D  shape, as nn.Linear holds it
    ('transformer.wte.weight',                'model/wte',                False, ('V', 'C')),
    ('transformer.wpe.weight',                'model/wpe',                False, ('T', 'C')),
    ('transformer.h.{i}.ln_1.weight',         'model/h{i}/ln_1/g',        False, ('C',)),
    ('transformer.h.{i}.ln_1.bias',           'model/h{i}/ln_1/b',        False, ('C',)),
    ('transformer.h.{i}.attn.c_attn.weight',  'model/h{i}/attn/c_attn/w', True,  ('3C', 'C')),
    ('transformer.h.{i}.attn.c_attn.bias',    'model/h{i}/attn/c_attn/b', False, ('3C',)),
    ('transformer.h.{i}.attn.c_proj.weight',  'model/h{i}/attn/c_proj/w', True,  ('C', 'C')),
    ('transformer.h.{i}.attn.c_proj.bias',    'model/h{i}/attn/c_proj/b', False, ('C',)),
    ('transformer.h.{i}.ln_2.weight',         'model/h{i}/ln_2/g',        False, ('C',)),
    ('transformer.h.{i}.ln_2.bias',           'model/h{i}/ln_2/b',        False, ('C',)),
    ('transformer.h.{i}.mlp.c_fc.weight',     'model/h{i}/mlp/c_fc/w',    True,  ('4C', 'C')),
    ('transformer.h.{i}.mlp.c_fc.bias',       'model/h{i}/mlp/c_fc/b',    False, ('4C',)),
    ('transformer.h.{i}.mlp.c_proj.weight',   'model/h{i}/mlp/c_proj/w',  True,  ('C', '4C')),
    ('transformer.h.{i}.mlp.c_proj.bias',     'model/h{i}/mlp/c_proj/b',  False, ('C',)),
    ('transformer.ln_f.weight',               'model/ln_f/g',             False, ('C',)),
    ('transformer.ln_f.bias',                 'model/ln_f/b',             False, ('C',)),
]
# lm_head.weight (V, C) is not in the table: GPT-2 ties it to wte, so TF and llm.c never store it,
# and HF stores it only for a model that unties it.
LM_HEAD = 'lm_head.weight'


def param_names(n_layer):
    """ [(mingpt name, OpenAI TF name, is Conv1D)] for every stored tensor, in llm.c's file order """
    rows = []
    for name, tf_name, conv1d, _ in TABLE:
        layers = range(n_layer) if '{i}' in name else [None]
        rows += [(name.format(i=i), tf_name.format(i=i), conv1d) for i in layers]
    return rows


def param_shapes(n_embd, vocab_size, block_size):
    """ [(name template, shape of one layer's tensor, is per-layer)] in the table's order """
    dims = {'V': vocab_size, 'T': block_size, 'C': n_embd, '3C': 3 * n_embd, '4C': 4 * n_embd}
    return [(name, tuple(dims[d] for d in shape), '{i}' in name) for name, _, _, shape in TABLE]

# -----------------------------------------------------------------------------
# what readers check before they trust a checkpoint's sizes

def check_sizes(sizes, origin):
    """ the sizes a checkpoint's config gives must be positive integers; returns them """
    bad = [f"{k}={sizes.get(k)!r}" for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size')
           if type(sizes.get(k)) is not int or sizes[k] <= 0]
    if bad:
        raise WeightsError(f"{origin}: the sizes must be positive integers, got {', '.join(bad)}; "
                           "the config is corrupt")
    return sizes


def read_json(path):
    """ a checkpoint's JSON file (HF's config.json, OpenAI's hparams.json) -> its content """
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read it as JSON ({e}); the file is corrupt, replace it") from None


def refuse_non_gpt2(model, fmt):
    """ a ConfigError naming the options of model's config that GPT-2's format fmt cannot hold """
    options = non_gpt2_options(model.config)
    if options:
        raise ConfigError(f"{fmt} holds GPT-2's architecture only, but this model has {', '.join(options)}; "
                          "save it as a mingpt directory instead, model.save_pretrained(path, format='mingpt') "
                          "(GPT.from_pretrained reads it back), or train a model without these options")
