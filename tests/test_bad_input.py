"""
A sweep of bad inputs across every command-line tool and the public API. Each must end in one clear
line: a command prints "error: ..." on stderr, nothing else, and exits with status 2 (argparse's own
usage errors: its usage line, then its error line); a library call raises an exception of
mingpt.errors (a MinGPTError that is also a ValueError or an OSError) whose message is one line. No
traceback, and no file created, changed or removed that the failing command had no business touching
(the config.json and args.txt of an existing run above all).

CASES is the table: one bad input per row, with where it goes (a project script, a module's command
line, or API for a library call), the bad input itself (the arguments, or a function of the fixtures
that makes the call) and a regex the message must match, naming the problem and, where it is not
obvious, what to do. Each row is a test of its own. Commands run in this process, as their
`__main__` blocks run them (a script's main under run_script, a module's main(argv)), which keeps
the sweep fast; the rows marked subprocess=True also run through the real entry points.

Every case runs in a fresh working directory, and the whole tree under the class's temporary
directory (the fixtures and every case's directory) is compared before and after: paths, sizes and
modification times (the fixtures are dated in the past, so that any rewrite shows).
"""

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import unittest
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from mingpt.bpe import BPETokenizer, get_encoder
from mingpt.bpe_train import train_bpe
from mingpt.chat import ChatTokenizer, add_chat_tokens, check_messages, load_chat_model, stream_reply
from mingpt.data import read_text_file, split_windows
from mingpt.errors import (CheckpointError, ConfigError, DataError, MinGPTError, MissingFileError, PromptTooLong,
                           WeightsError)
from mingpt.evaluate import evaluate_text
from mingpt.formats.llmc import save_llmc
from mingpt.model import GPT
from mingpt.serve import create_app
from mingpt.tokenizers import CharTokenizer, load_tokenizer, save_tokenizer, tokenizer_for_model
from mingpt.trainer import Trainer
from mingpt.utils import CfgNode, run_script
from tests.common import REPO, edit_json, free_port_url, patched_env, shakespeare, slow, tiny_gpt
from tests.test_chat import make_chat_model_dir, small_encoder

TF_FIXTURE = REPO / 'tests' / 'fixtures' / 'tf_gpt2_tiny'
PAST = 1_000_000_000  # 2001: the fixtures' mtime, so that a rewrite is always a change

# how each command is run: its file (a project script) or module, and whether its __main__ block wraps
# main in run_script (the others turn errors into parser.exit(2, ...) themselves)
SCRIPTS = {
    'adder': 'projects/adder/adder.py',
    'chargpt': 'projects/chargpt/chargpt.py',
    'finetune': 'projects/finetune/finetune.py',
    'chat/base': 'projects/chat/base.py',
    'chat/make_data': 'projects/chat/make_data.py',
    'chat/sft': 'projects/chat/sft.py',
}
MODULES = {'mingpt.evaluate': False, 'mingpt.bpe_train': False, 'mingpt.chat': True, 'mingpt.serve': False}
PACKAGES = ('mingpt.chat', 'mingpt.serve')  # whose command is their __main__.py
API = 'api'

# arguments every run of a project script starts with (a case's own come after, and win): tiny sizes,
# the CPU, one iteration, so that a bad input that went unnoticed would show as a quick exit 0
SCRIPT_ARGS = {
    'adder': ['--system.work_dir=out', '--model.n_layer=1', '--model.n_head=2', '--model.n_embd=16',
              '--trainer.device=cpu', '--trainer.max_iters=1', '--trainer.eval_iters=1',
              '--eval.train_problems=10'],
    'chargpt': ['--system.work_dir=out', '--data.path={fx}/text.txt', '--data.block_size=16',
                '--trainer.device=cpu', '--trainer.dtype=float32', '--trainer.max_iters=1',
                '--trainer.eval_iters=1', '--sample.max_new_tokens=1'],
    'finetune': ['--system.work_dir=out', '--model.init_from={fx}/gpt2_vocab_model', '--data.path={fx}/text.txt',
                 '--data.block_size=16', '--trainer.device=cpu', '--trainer.dtype=float32',
                 '--trainer.max_iters=1', '--trainer.eval_iters=1', '--sample.max_new_tokens=1'],
    'chat/base': ['--system.work_dir=out', '--data.path={fx}/text.txt', '--data.n_merges=50',
                  '--data.block_size=16', '--model.n_layer=1', '--model.n_head=2', '--model.n_embd=16',
                  '--trainer.device=cpu', '--trainer.max_iters=1', '--trainer.eval_iters=1'],
    'chat/make_data': ['--path', '{fx}/play.txt', '--out', 'data'],
    'chat/sft': ['--system.work_dir=out', '--model.init_from={fx}/base_model', '--data.train={fx}/conv.jsonl',
                 '--data.val={fx}/conv.jsonl', '--trainer.device=cpu', '--trainer.max_iters=1',
                 '--trainer.eval_iters=1', '--trainer.batch_size=2', '--sample.n_prompts=1',
                 '--sample.max_new_tokens=1'],
}
CHARGPT_TINY = ['--model.n_layer=1', '--model.n_head=2', '--model.n_embd=16']


@dataclass
class Case:
    target: str  # a key of SCRIPTS or MODULES, or API
    bad: object  # the arguments ('{fx}' is the fixtures directory), or for API a function of the fixtures
    expect: str  # a regex the message must match (re.search)
    error: type = None  # API: the exception the call must raise
    usage: bool = False  # an argparse usage error: a usage line and then the error line
    subprocess: bool = False  # also run it through the real entry point


def cmd(target, *args, expect, usage=False, subprocess=False):
    return Case(target, list(args), expect, usage=usage, subprocess=subprocess)


def call(error, fn, expect):
    return Case(API, fn, expect, error=error)

# -----------------------------------------------------------------------------
# calls the API cases make (f is the Fixtures)


def model_config(**changes):
    """ a tiny GPT's config, changed """
    c = GPT.get_default_config()
    c.model_type, c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size = None, 1, 2, 16, 13, 16
    c.merge_from_dict(changes)
    return c


def trainer(model=None, dataset=None, **changes):
    """ a Trainer of a tiny GPT on random ids, its config changed """
    c = Trainer.get_default_config()
    c.device, c.max_iters = 'cpu', 1
    c.merge_from_dict(changes)
    dataset = dataset if dataset is not None else split_windows(torch.randint(0, 13, (64,)), 16, 0)[0]
    return Trainer(c, model if model is not None else tiny_gpt(), dataset)


def ids(*values):
    """ a (1, T) tensor of ids """
    return torch.tensor([values])


CASES = [
    # --- adder: config values of the wrong type or out of range, unknown keys, malformed overrides
    cmd('adder', '--trainer.batch_size=abc', subprocess=True,
        expect=r"^--trainer\.batch_size=abc: expected an integer, like its default 128$"),
    cmd('adder', '--trainer.learning_rate=abc', expect=r"--trainer\.learning_rate=abc: expected a number"),
    cmd('adder', '--trainer.compile=yes', expect=r"--trainer\.compile=yes: expected True or False"),
    cmd('adder', '--system.seed=1.5', expect=r"--system\.seed=1\.5: expected an integer"),
    cmd('adder', '--trainer.betas=0.9', expect=r"--trainer\.betas=0\.9: expected a tuple, like its default \(0\.9, "),
    cmd('adder', '--trainer.batch_size=0', expect=r"batch_size=0 cannot work: set it to an int >= 1"),
    cmd('adder', '--trainer.batch_size=-4', expect=r"batch_size=-4 cannot work: set it to an int >= 1"),
    cmd('adder', '--trainer.max_iters=-5', expect=r"max_iters=-5 cannot work: set it to an int >= 0"),
    cmd('adder', '--trainer.grad_accum_steps=0', expect=r"grad_accum_steps=0 cannot work: set it to an int >= 1"),
    cmd('adder', '--trainer.warmup_iters=-1', expect=r"warmup_iters=-1 cannot work: set it to an int >= 0"),
    cmd('adder', '--trainer.eval_iters=0', expect=r"eval_iters=0 cannot work: set it to an int >= 1"),
    cmd('adder', '--trainer.learning_rate=-1', expect=r"learning_rate=-1\.0 cannot work: set it to a number > 0"),
    cmd('adder', '--trainer.grad_norm_clip=-1', expect=r"grad_norm_clip=-1\.0 cannot work: set it to a number > 0"),
    cmd('adder', '--trainer.dtype=float8', expect=r"unknown dtype 'float8'; use one of float32, bfloat16, float16"),
    cmd('adder', '--trainer.dtype=float16', expect=r"dtype='float16' needs a CUDA device .* use dtype='bfloat16'"),
    cmd('adder', '--trainer.lr_schedule=linear',
        expect=r"lr_schedule='linear' cannot work: set it to None \(constant\), 'cosine' or 'wsd'"),
    cmd('adder', '--trainer.resume=maybe', expect=r"resume='maybe' cannot work: set it to False, True or 'auto'"),
    cmd('adder', '--trainer.device=tpu9', expect=r"device='tpu9' is not a device torch knows: use 'auto', 'cpu'"),
    cmd('adder', '--trainer.device=cuda:99',
        expect=r"device='cuda:99': (there is no CUDA device|this machine has only \d+ CUDA device).*'cpu'"),
    cmd('adder', '--trainer.batchsize=4',
        expect=r"unknown config key 'trainer\.batchsize': no 'batchsize' under 'trainer'; valid keys there are: "
               r".*batch_size"),
    cmd('adder', '--nosuch.key=1', expect=r"unknown config key 'nosuch\.key': no 'nosuch' at the top level"),
    cmd('adder', '--trainer=4', expect=r"'trainer' is a group of settings, not a value; set one of its keys"),
    cmd('adder', 'trainer.batch_size=4',
        expect=r"expected an override of the form --key=value, got 'trainer\.batch_size=4'"),
    cmd('adder', '--trainer.batch_size',
        expect=r"expected an override of the form --key=value, got '--trainer\.batch_size'"),
    cmd('adder', '--model.n_embd=30', '--model.n_head=4', expect=r"n_embd \(30\) must be divisible by n_head \(4\)"),
    cmd('adder', '--model.n_layer=0', expect=r"the model config has n_layer=0, but it must be an int >= 1"),
    cmd('adder', '--model.embd_pdrop=1.5',
        expect=r"the model config has embd_pdrop=1\.5, but it must be a number in \[0, 1\)"),
    cmd('adder', '--model.model_type=gpt-nano',
        expect=r"give either model_type \('gpt-nano'\) or explicit sizes \(n_layer, n_head, n_embd\), not both"),
    cmd('adder', '--data.ndigit=0', expect=r"data\.ndigit must be an int in 1\.\.9, got 0"),
    cmd('adder', '--data.test_size=0', expect=r"data\.test_size must be in 1\.\.9999 for ndigit=2, got 0"),

    # --- chargpt: the data file, the sampling options, the model, resuming an existing run
    cmd('chargpt', '--data.path={fx}/missing.txt', expect=r"missing\.txt: no such file"),
    cmd('chargpt', '--data.path={fx}', expect=r"fx is a directory, not a file; give the path of a text file"),
    cmd('chargpt', '--data.path={fx}/empty.txt', expect=r"empty\.txt is empty; give a file with some text in it"),
    cmd('chargpt', '--data.path={fx}/binary.bin', expect=r"binary\.bin contains NUL bytes .*give a UTF-8 text file"),
    cmd('chargpt', '--data.path={fx}/latin1.txt', expect=r"latin1\.txt is not valid UTF-8 .*convert it to UTF-8"),
    cmd('chargpt', '--data.path={fx}/short.txt',
        expect=r"\d+ tokens are too few for windows of block_size=16; use more text or a smaller block_size"),
    cmd('chargpt', '--data.block_size=0', expect=r"block_size=0 cannot work: it must be an int >= 1"),
    cmd('chargpt', '--data.val_fraction=1.5', expect=r"val_fraction=1\.5 cannot work: it must be in \[0, 1\)"),
    cmd('chargpt', '--sample.prompt=ROMEO: €',
        expect=r"--sample\.prompt='ROMEO: €': the text has 1 character\(s\) that are not in the vocabulary"),
    cmd('chargpt', '--sample.temperature=-1', expect=r"temperature must be >= 0 \(got -1\.0\)"),
    cmd('chargpt', '--sample.top_k=0', expect=r"top_k must be an int >= 1 or None \(got 0\)"),
    cmd('chargpt', '--sample.max_new_tokens=-1', expect=r"max_new_tokens must be an int >= 0 \(got -1\)"),
    cmd('chargpt', '--model.model_type=gpt-huge', expect=r"unknown model_type 'gpt-huge'; the presets are: "),
    cmd('chargpt', '--model.model_type=gpt-nano', '--model.n_layer=2', expect=r"give either model_type"),
    cmd('chargpt', '--model.n_layer=two', expect=r"--model\.n_layer=two: expected an integer"),
    cmd('chargpt', '--system.work_dir={fx}/run', *CHARGPT_TINY[:2], '--model.n_embd=32',
        expect=r"the checkpoint in .*run/ckpt was written by a model of another size"),
    cmd('chargpt', '--system.work_dir={fx}/run', *CHARGPT_TINY, '--data.path={fx}/euro.txt',
        expect=r"run holds a run on a text with another vocabulary .*use another --system\.work_dir"),
    cmd('chargpt', '--system.work_dir={fx}/run', *CHARGPT_TINY, '--trainer.resume=False',
        expect=r"run already holds a checkpoint .*set resume=True to continue it"),
    cmd('chargpt', '--trainer.resume=True', expect=r"resume=True but there is no checkpoint in out"),
    cmd('chargpt', '--system.work_dir={fx}/run_corrupt', *CHARGPT_TINY,
        expect=r"cannot read .*model\.safetensors .*delete the checkpoint directory"),
    cmd('chargpt', '--system.work_dir={fx}/run_pickle', *CHARGPT_TINY,
        expect=r"refused to load .*trainer\.pt: it holds a Python object"),

    # --- finetune: checkpoints in every format, broken; sizes that do not fit; resuming another model
    cmd('finetune', '--model.init_from={fx}/nowhere',
        expect=r"--model\.init_from=.*nowhere: .*no such file or directory, and not a known model name"),
    cmd('finetune', '--model.init_from={fx}/hf_truncated',
        expect=r"not a readable safetensors file .*corrupt or truncated"),
    cmd('finetune', '--model.init_from={fx}/hf_pickle', expect=r"refusing to load it: it holds Python objects"),
    cmd('finetune', '--model.init_from={fx}/hf_mismatch', expect=r"the weights do not fit the GPT its config"),
    cmd('finetune', '--model.init_from={fx}/hf_bad_json', expect=r"config\.json: cannot read it as JSON"),
    cmd('finetune', '--model.init_from={fx}/hf_no_weights', expect=r"has a config\.json but no weights"),
    cmd('finetune', '--model.init_from={fx}/llmc_truncated.bin',
        expect=r"llmc_truncated\.bin: \d+ bytes, but an llm\.c version"),
    cmd('finetune', '--model.init_from={fx}/tf_truncated', expect=r"model\.ckpt\.data-00000-of-00001: too short"),
    cmd('finetune', '--model.init_from={fx}/tf_bad_index', expect=r"not a readable TensorFlow checkpoint index"),
    cmd('finetune', '--model.init_from={fx}/char_model',
        expect=r"the model's vocabulary has \d+ tokens, fewer than GPT-2's tokenizer produces"),
    cmd('finetune', '--model.dropout=1.5', expect=r"embd_pdrop=1\.5, but it must be a number in \[0, 1\)"),
    cmd('finetune', '--data.block_size=9999',
        expect=r"--data\.block_size=9999 is longer than the model's context of 32 tokens"),
    cmd('finetune', '--data.path={fx}/missing.txt', expect=r"missing\.txt: no such file"),
    cmd('finetune', '--sample.top_k=0', expect=r"top_k must be an int >= 1 or None \(got 0\)"),
    cmd('finetune', '--system.work_dir={fx}/run',
        expect=r"the checkpoint in .*run/ckpt was written by a model of another size"),
    cmd('finetune', '--trainer.compile=yes', expect=r"--trainer\.compile=yes: expected True or False"),
    cmd('finetune', '--lora.r=4', '--lora.targets=c_attn,attn', expect=r"--lora\.targets='c_attn,attn': give a comma"),
    cmd('finetune', '--lora.r=4', '--lora.save=all', expect=r"--lora\.save='all': use 'adapter', 'merged' or 'both'"),
    cmd('finetune', '--lora.r=-1', expect=r"--lora\.r=-1: use 0 \(every weight trains\)"),
    cmd('finetune', '--lora.r=4', '--lora.alpha=0', expect=r"LoRA alpha=0 cannot work"),

    # --- chat/base.py
    cmd('chat/base', '--data.n_merges=-1', expect=r"--data\.n_merges must be in \[0, 50000\], got -1"),
    cmd('chat/base', '--data.n_merges=99999999', expect=r"--data\.n_merges must be in \[0, 50000\]"),
    cmd('chat/base', '--data.path={fx}/missing.txt', expect=r"missing\.txt: no such file"),
    cmd('chat/base', '--data.path={fx}/binary.bin', expect=r"binary\.bin contains NUL bytes"),
    cmd('chat/base', '--data.block_size=100000', expect=r"too few for windows of block_size=100000"),
    cmd('chat/base', '--model.n_head=3', expect=r"n_embd \(16\) must be divisible by n_head \(3\)"),
    cmd('chat/base', '--system.work_dir={fx}/run',
        expect=r"the checkpoint in .*run/ckpt was written by a model of another size"),

    # --- chat/make_data.py
    cmd('chat/make_data', '--path', '{fx}/missing.txt', expect=r"missing\.txt: no such file"),
    cmd('chat/make_data', '--path', '{fx}/latin1.txt', expect=r"latin1\.txt is not valid UTF-8"),
    cmd('chat/make_data', '--path', '{fx}/text_no_speakers.txt',
        expect=r"found only 0 speeches in .*speakers' names alone on a line"),
    cmd('chat/make_data', '--val-fraction', '1.5', expect=r"--val-fraction must be in \[0, 1\) \(got 1\.5\)"),
    cmd('chat/make_data', '--max-messages', '1', expect=r"--max-messages must be >= 2 \(got 1\): a message and its"),
    cmd('chat/make_data', '--max-chars', '0', expect=r"--max-chars must be >= 1 \(got 0\)"),
    cmd('chat/make_data', '--max-chars', 'abc', usage=True, expect=r"argument --max-chars: invalid int value: 'abc'"),

    # --- chat/sft.py
    cmd('chat/sft', '--data.train={fx}/missing.jsonl',
        expect=r"no conversation file .*missing\.jsonl; make one with python projects/chat/make_data\.py"),
    cmd('chat/sft', '--data.train={fx}/conv_bad.jsonl', expect=r"conv_bad\.jsonl:2: not a conversation"),
    cmd('chat/sft', '--data.val={fx}/missing.jsonl', expect=r"no conversation file .*missing\.jsonl"),
    cmd('chat/sft', '--data.val={fx}/conv_no_assistant.jsonl',
        expect=r"has no conversation with an assistant message"),
    cmd('chat/sft', '--model.init_from={fx}/nowhere', expect=r"no such file or directory, and not a known model name"),
    cmd('chat/sft', '--model.init_from={fx}/char_model',
        expect=r"a chat model needs a BPE tokenizer \(encoder\.json \+ vocab\.bpe\), not a CharTokenizer"),
    cmd('chat/sft', '--model.init_from={fx}/truncated_tokenizer', expect=r"encoder\.json is not valid JSON"),
    cmd('chat/sft', '--data.block_size=9999', expect=r"--data\.block_size=9999 is longer than the model's context"),
    cmd('chat/sft', '--data.block_size=4',
        expect=r"no conversation fits in block_size \+ 1 = 5 tokens; use a larger --data\.block_size"),
    cmd('chat/sft', '--sample.temperature=-1', expect=r"temperature must be >= 0 \(got -1\.0\)"),
    cmd('chat/sft', '--system.work_dir={fx}/run',
        expect=r"the checkpoint in .*run/ckpt was written by a model of another size"),

    # --- python -m mingpt.evaluate
    cmd('mingpt.evaluate', '--model', '{fx}/nowhere', '--data', '{fx}/text.txt', subprocess=True,
        expect=r"nowhere': no such file or directory, and not a known model name"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/missing.txt',
        expect=r"missing\.txt: no such file"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/empty.txt', expect=r"empty\.txt is empty"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/one.txt',
        expect=r"the text is 1 token\(s\) long; scoring needs at least 2"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/euro.txt',
        expect=r"the text has 1 character\(s\) that are not in the vocabulary: '€' .*the model knows only these"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--block-size', '0',
        expect=r"block_size=0 must be between 1 and the model's block_size \(16\)"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--block-size', '9999',
        expect=r"block_size=9999 must be between 1 and the model's block_size \(16\)"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--stride', '0',
        expect=r"stride=0 must be between 1 and block_size"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--batch-size', '0',
        expect=r"batch_size=0 must be at least 1"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--tokenizer', '{fx}/nowhere',
        expect=r"no tokenizer at .*nowhere: expected \"gpt2\", a directory with encoder\.json"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--tokenizer', 'gpt2',
        expect=r"the tokenizer has 50257 tokens but the model only \d+: .*--tokenizer PATH"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--device', 'tpu9',
        expect=r"device='tpu9' is not a device torch knows"),
    cmd('mingpt.evaluate', '--model', '{fx}/truncated_tokenizer', '--data', '{fx}/text.txt',
        expect=r"encoder\.json is not valid JSON .*copy its tokenizer files"),
    cmd('mingpt.evaluate', '--model', '{fx}/hf_pickle', '--data', '{fx}/text.txt',
        expect=r"refusing to load it: it holds Python objects"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', '--data', '{fx}/text.txt', '--batch-size', 'abc',
        usage=True, expect=r"argument --batch-size: invalid int value: 'abc'"),
    cmd('mingpt.evaluate', '--model', '{fx}/char_model', usage=True,
        expect=r"the following arguments are required: --data"),

    # --- python -m mingpt.bpe_train
    cmd('mingpt.bpe_train', '--input', '{fx}/text.txt', '--vocab-size', '10', '--out', 'tok',
        expect=r"vocab_size=10 is too small: .*so at least 256"),
    cmd('mingpt.bpe_train', '--input', '{fx}/missing.txt', '--vocab-size', '300', '--out', 'tok',
        expect=r"missing\.txt: no such file"),
    cmd('mingpt.bpe_train', '--input', '{fx}/binary.bin', '--vocab-size', '300', '--out', 'tok',
        expect=r"binary\.bin contains NUL bytes"),
    cmd('mingpt.bpe_train', '--input', '{fx}/text.txt', '--vocab-size', '300', '--out', 'tok', '--special', '',
        expect=r"special tokens must be non-empty strings, got ''"),
    cmd('mingpt.bpe_train', '--input', '{fx}/text.txt', '--vocab-size', '300', '--out', '{fx}/one.txt',
        expect=r"one\.txt is a file; the tokenizer files go into a directory"),
    cmd('mingpt.bpe_train', '--input', '{fx}/text.txt', '--vocab-size', 'many', '--out', 'tok', usage=True,
        expect=r"argument --vocab-size: invalid int value: 'many'"),

    # --- python -m mingpt.chat
    cmd('mingpt.chat', '--model', '{fx}/nowhere', expect=r"nowhere': no such file or directory"),
    cmd('mingpt.chat', '--model', '{fx}/chat_model', '--max-new-tokens', '0', subprocess=True,
        expect=r"--max-new-tokens must be >= 1 \(got 0\)"),
    cmd('mingpt.chat', '--model', '{fx}/chat_model', '--temperature', '-1', expect=r"temperature must be >= 0"),
    cmd('mingpt.chat', '--model', '{fx}/chat_model', '--top-p', '1.5', expect=r"top_p must be in \(0, 1\]"),
    cmd('mingpt.chat', '--model', '{fx}/chat_model', '--top-k', '-3', expect=r"top_k must be an int >= 1 or None"),
    cmd('mingpt.chat', '--model', '{fx}/chat_model', '--device', 'tpu9',
        expect=r"device='tpu9' is not a device torch knows"),
    cmd('mingpt.chat', '--model', '{fx}/base_model',
        expect=r"the tokenizer lacks the chat tokens .*Fine-tune the model on conversations first"),
    cmd('mingpt.chat', '--model', '{fx}/truncated_tokenizer', expect=r"encoder\.json is not valid JSON"),
    cmd('mingpt.chat', '--model', '{fx}/char_model', expect=r"a chat model needs a BPE tokenizer"),

    # --- python -m mingpt.serve (a case that got as far as starting the server would fail: uvicorn.run raises)
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--port', '99999', usage=True, subprocess=True,
        expect=r"argument --port: '99999' is not a port number \(1 to 65535\)"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--port', 'http', usage=True,
        expect=r"argument --port: 'http' is not a port number"),
    cmd('mingpt.serve', '--model', '{fx}/nowhere', expect=r"nowhere': no such file or directory"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--max-new-tokens', '0',
        expect=r"--max-new-tokens must be >= 1 \(got 0\)"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--max-tokens-limit', '0',
        expect=r"--max-tokens-limit must be >= 1 \(got 0\)"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--max-concurrent', '0',
        expect=r"--max-concurrent must be >= 1 \(got 0\)"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--queue-timeout', '-1',
        expect=r"--queue-timeout must be >= 0 \(got -1\.0\)"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--max-prompt-tokens', '0',
        expect=r"--max-prompt-tokens must be >= 1 \(got 0\)"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--top-p', '1.5', expect=r"top_p must be in \(0, 1\]"),
    cmd('mingpt.serve', '--model', '{fx}/chat_model', '--device', 'tpu9', expect=r"device='tpu9' is not a device"),

    # --- the API: GPT(config)
    call(ConfigError, lambda f: GPT(model_config(n_embd=30, n_head=4)),
         r"n_embd \(30\) must be divisible by n_head \(4\)"),
    call(ConfigError, lambda f: GPT(model_config(model_type='gpt-nano')),
         r"give either model_type \('gpt-nano'\) or explicit sizes"),
    call(ConfigError, lambda f: GPT(model_config(model_type='gpt-huge', n_layer=None, n_head=None, n_embd=None)),
         r"unknown model_type 'gpt-huge'; the presets are: openai-gpt, gpt2"),
    call(ConfigError, lambda f: GPT(model_config(vocab_size=None)),
         r"the model config needs vocab_size and block_size .*set both"),
    call(ConfigError, lambda f: GPT(model_config(n_layer=-2)),
         r"the model config has n_layer=-2, but it must be an int >= 1"),
    call(ConfigError, lambda f: GPT(model_config(vocab_size='50k')),
         r"the model config has vocab_size='50k', but it must be an int >= 1"),
    call(ConfigError, lambda f: GPT(model_config(attn_pdrop=1.5)),
         r"the model config has attn_pdrop=1\.5, but it must be a number in \[0, 1\)"),
    # model(idx, targets)
    call(ConfigError, lambda f: tiny_gpt()(ids(1, 13)),
         r"idx holds token ids from 1 to 13, but this model's vocabulary has ids 0 to 12"),
    call(ConfigError, lambda f: tiny_gpt()(ids(-1, 2)), r"idx holds token ids from -1 to 2"),
    call(ConfigError, lambda f: tiny_gpt()(ids(1, 2), ids(2, 99)),
         r"targets holds token ids from 2 to 99, but this model's vocabulary has ids 0 to 12 \(and -1"),
    call(ConfigError, lambda f: tiny_gpt()(torch.zeros(1, 17, dtype=torch.long)),
         r"cannot forward a sequence of length 17: the model's block_size \(context length\) is only 16; crop"),
    call(ConfigError, lambda f: tiny_gpt()(torch.zeros(1, 4)), r"idx must hold integer token ids, not float32"),
    call(ConfigError, lambda f: tiny_gpt()(torch.tensor([1, 2, 3])),
         r"idx must be a \(B, T\) tensor of token ids, got shape \(3,\); for one sequence use idx\[None\]"),
    call(ConfigError, lambda f: tiny_gpt()(ids(1, 2, 3), ids(1, 2)),
         r"targets must have idx's shape \(1, 3\), got \(1, 2\)"),
    # model.generate(...)
    call(ConfigError, lambda f: tiny_gpt().generate(ids(1, 2), 3, temperature=-1, do_sample=True),
         r"temperature must be >= 0 \(got -1\); use 0 or do_sample=False for greedy decoding"),
    call(ConfigError, lambda f: tiny_gpt().generate(ids(1, 2), 3, top_k=0),
         r"top_k must be an int >= 1 or None \(got 0\); top_k=1 is greedy"),
    call(ConfigError, lambda f: tiny_gpt().generate(ids(1, 2), 3, top_p=1.5),
         r"top_p must be in \(0, 1\] or None \(got 1\.5\)"),
    call(ConfigError, lambda f: tiny_gpt().generate(torch.ones(1, 20, dtype=torch.long), 3),
         r"the prompt has 20 tokens but the model's context \(block_size\) is 16 tokens; keep only the end"),
    call(ConfigError, lambda f: tiny_gpt().generate(ids(1, 50), 3),
         r"token ids must be in \[0, 13\) for this model \(got ids from 1 to 50\)"),
    call(ConfigError, lambda f: tiny_gpt().generate(ids(1, -2), 3), r"token ids must be in \[0, 13\) .*from -2 to 1"),
    call(ConfigError, lambda f: tiny_gpt().generate(ids(1, 2), -1), r"max_new_tokens must be an int >= 0 \(got -1\)"),
    call(ConfigError, lambda f: tiny_gpt().generate(torch.tensor([1, 2]), 3),
         r"idx must be a \(B, T\) tensor .*for a single 1-D prompt p use p\[None\]"),
    call(ConfigError, lambda f: tiny_gpt().resize_token_embeddings(5),
         r"resize_token_embeddings only grows the vocabulary"),
    # GPT.from_pretrained(path) and the other formats
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'nowhere'),
         r"no such file or directory, and not a known model name: looked for"),
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'hf_truncated'),
         r"model\.safetensors: not a readable safetensors file"),
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'hf_pickle'), r"pytorch_model\.bin: refusing to load it"),
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'hf_mismatch'), r"wrong shape: transformer\.wte\.weight"),
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'llmc_truncated.bin'),
         r"but an llm\.c version 3 checkpoint"),
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'tf_bad_index'),
         r"model\.ckpt\.index: not a readable TensorFlow checkpoint index"),
    call(WeightsError, lambda f: GPT.from_pretrained(f.fx / 'binary.bin'), r"binary\.bin: not a checkpoint mingpt "
                                                                           r"can read"),
    call(ConfigError, lambda f: GPT.from_pretrained(f.fx / 'char_model', resid_pdrop=2.0),
         r"resid_pdrop=2\.0, but it must be a number in \[0, 1\)"),
    call(WeightsError, lambda f: save_llmc(tiny_gpt(), f.work / 'model.bin'), r"llm\.c's format ties lm_head to wte"),
    # Trainer(config, ...)
    call(ConfigError, lambda f: trainer(batch_size=0), r"trainer config batch_size=0 cannot work"),
    call(ConfigError, lambda f: trainer(learning_rate='abc'),
         r"learning_rate='abc' cannot work: set it to a number > 0"),
    call(ConfigError, lambda f: trainer(compile='yes'), r"compile='yes' cannot work: set it to True or False"),
    call(ConfigError, lambda f: trainer(device='cuda:99'), r"device='cuda:99'"),
    call(ConfigError, lambda f: trainer(resume=True), r"resume=True needs the work_dir that holds the checkpoint"),
    call(CheckpointError, lambda f: trainer(work_dir=str(f.fx / 'run')), r"already holds a checkpoint"),
    call(CheckpointError, lambda f: trainer(work_dir=str(f.fx / 'run'), resume=True),
         r"was written by a model of another size"),
    call(CheckpointError, lambda f: trainer(work_dir=str(f.work), resume=True),
         r"resume=True but there is no checkpoint in"),
    call(ConfigError, lambda f: trainer(dataset=[]), r"the training dataset is empty"),
    call(ConfigError, lambda f: trainer(lr_schedule='cosine', max_iters=None),
         r"lr_schedule='cosine' needs to know when to reach min_lr: set lr_decay_iters or max_iters"),
    # tokenizers
    call(MissingFileError, lambda f: get_encoder(f.fx / 'nowhere'), r"nowhere lacks encoder\.json and vocab\.bpe"),
    call(WeightsError, lambda f: get_encoder(f.fx / 'truncated_tokenizer'),
         r"encoder\.json is not valid JSON .*it is truncated or corrupt"),
    call(MissingFileError, lambda f: BPETokenizer(f.fx / 'nowhere'), r"lacks encoder\.json and vocab\.bpe"),
    call(ConfigError, lambda f: BPETokenizer()('hi', return_tensors='np'), r"return_tensors='np' is not supported"),
    call(ConfigError, lambda f: get_encoder().decode([50257]),
         r"cannot decode \[50257\]: token ids must be ints in \[0, 50257\)"),
    call(ConfigError, lambda f: get_encoder().encode('hi', allowed_special={'<|start|>'}),
         r"allowed_special contains \['<\|start\|>'\], which are not special tokens"),
    call(ConfigError, lambda f: CharTokenizer(['a', 'bc']), r"a character vocabulary must list single characters"),
    call(ConfigError, lambda f: CharTokenizer('abca'), r"lists each character once; \['a'\] appear"),
    call(ConfigError, lambda f: CharTokenizer('ab').encode('abc'),
         r"the text has 1 character\(s\) that are not in the vocabulary: 'c'"),
    call(ConfigError, lambda f: CharTokenizer('ab').decode([0, 2]),
         r"cannot decode \[2\]: token ids must be ints in \[0, 2\)"),
    call(ConfigError, lambda f: CharTokenizer('ab').decode([-1]), r"cannot decode \[-1\]"),
    call(MissingFileError, lambda f: CharTokenizer.load(f.fx / 'nowhere.json'), r"nowhere\.json: no such file"),
    call(ConfigError, lambda f: CharTokenizer.load(f.fx / 'chars_not_a_list.json'),
         r"must hold a JSON list of characters"),
    call(MissingFileError, lambda f: load_tokenizer(f.fx / 'nowhere'), r"no tokenizer at .*nowhere"),
    call(ConfigError, lambda f: tokenizer_for_model(f.fx / 'hf_no_weights', 100),
         r"cannot tell which tokenizer .* has no tokenizer files"),
    call(ConfigError, lambda f: train_bpe('some text', 10), r"vocab_size=10 is too small"),
    call(ConfigError, lambda f: train_bpe('some text', 300, special_tokens=['']), r"special tokens must be non-empty"),
    call(ConfigError, lambda f: train_bpe(b'some bytes', 300), r"train_bpe trains on a str, not bytes"),
    # data, evaluation, config
    call(MissingFileError, lambda f: read_text_file(f.fx / 'missing.txt'), r"missing\.txt: no such file"),
    call(DataError, lambda f: read_text_file(f.fx / 'latin1.txt'), r"not valid UTF-8"),
    call(ConfigError, lambda f: split_windows(torch.arange(100), 0), r"block_size=0 cannot work: it must be an int"),
    call(ConfigError, lambda f: split_windows(torch.arange(100), 8, val_fraction=1.0),
         r"val_fraction=1\.0 cannot work: it must be in \[0, 1\)"),
    call(ConfigError, lambda f: evaluate_text(tiny_gpt(), CharTokenizer('abcdefghijklm'), ''),
         r"there is no text to evaluate on"),
    call(ConfigError, lambda f: evaluate_text(tiny_gpt(), CharTokenizer('abcdefghijklm'), 'abcabc', block_size=0),
         r"block_size=0 must be between 1 and the model's block_size \(16\)"),
    call(ConfigError, lambda f: evaluate_text(tiny_gpt(), CharTokenizer('abcdefghijklm'), 'abcabc', stride=99),
         r"stride=99 must be between 1 and block_size"),
    call(ConfigError, lambda f: evaluate_text(tiny_gpt(), get_encoder(), 'hello'),
         r"the tokenizer has 50257 tokens but the model only 13"),
    call(ConfigError, lambda f: CfgNode(lr=3e-4).merge_from_args(['--lr=abc']), r"--lr=abc: expected a number"),
    call(ConfigError, lambda f: CfgNode(lr=3e-4).merge_from_args(['lr=1']),
         r"expected an override of the form --key=value"),
    call(ConfigError, lambda f: CfgNode(lr=3e-4).merge_from_args(['--lrate=1']), r"unknown config key 'lrate'"),
    # chat and the web server
    call(PromptTooLong, lambda f: list(stream_reply(*f.chat, [{'role': 'user', 'content': 'word ' * 500}], 8)),
         r"the message is too long: .*shorten the message"),
    call(ConfigError, lambda f: check_messages([{'role': 'robot', 'content': 'hi'}]),
         r"message 0 has role 'robot'; the roles are"),
    call(ConfigError, lambda f: ChatTokenizer(CharTokenizer('ab')), r"a chat model needs a BPE tokenizer"),
    call(ConfigError, lambda f: add_chat_tokens(CharTokenizer('ab')), r"a chat model needs a BPE tokenizer"),
    call(WeightsError, lambda f: load_chat_model(f.fx / 'base_model'), r"the tokenizer lacks the chat tokens"),
    call(ConfigError, lambda f: load_chat_model(f.fx / 'chat_model', device='tpu9'),
         r"device='tpu9' is not a device torch knows"),
    call(ConfigError, lambda f: create_app(*f.chat, max_new_tokens=0), r"max_new_tokens must be >= 1 \(got 0\)"),
    call(ConfigError, lambda f: create_app(*f.chat, queue_timeout=-1), r"queue_timeout must be >= 0 \(got -1\)"),
]

# -----------------------------------------------------------------------------
# the fixtures: inputs good and bad, built once


class Fixtures:
    """ what an API case calls with: fx, the fixtures directory; work, the case's own; chat, a chat model """

    def __init__(self, fx):
        self.fx = fx
        self.work = None

    @property
    def chat(self):
        return load_chat_model(self.fx / 'chat_model')


def build_fixtures(fx):
    """ write every input file and directory the cases use into fx """
    fx.mkdir()
    text = shakespeare(20000)
    (fx / 'text.txt').write_text(text, encoding='utf-8')
    (fx / 'short.txt').write_text('To be.', encoding='utf-8')
    (fx / 'one.txt').write_text('T', encoding='utf-8')
    (fx / 'empty.txt').write_bytes(b'')
    (fx / 'binary.bin').write_bytes(b'\x7fELF\x02\x01\x01\x00\x00\x00' * 20)
    (fx / 'latin1.txt').write_bytes('Le café est prêt.\n'.encode('latin-1') * 20)
    (fx / 'euro.txt').write_text(text[:2000] + ' €\n', encoding='utf-8')
    (fx / 'text_no_speakers.txt').write_text('no one speaks here.\n' * 50, encoding='utf-8')
    (fx / 'play.txt').write_text(text, encoding='utf-8')
    (fx / 'chars_not_a_list.json').write_text('{"a": 0}', encoding='utf-8')
    conversation = [{'role': 'user', 'content': 'Good morrow.'}, {'role': 'assistant', 'content': 'And to you.'}]
    (fx / 'conv.jsonl').write_text(''.join(json.dumps({'messages': conversation}) + '\n' for _ in range(4)))
    (fx / 'conv_bad.jsonl').write_text(json.dumps({'messages': conversation}) + '\n{"messages": [\n')
    (fx / 'conv_no_assistant.jsonl').write_text(json.dumps({'messages': conversation[:1]}) + '\n')

    # models: a character-level one, one with GPT-2's vocabulary, a base and a chat model with small BPEs
    chars = CharTokenizer.from_text(text)
    tiny_gpt(chars.n_vocab, 16, n_layer=1, n_head=2, n_embd=16).save_pretrained(fx / 'char_model')
    chars.save(fx / 'char_model')
    tiny_gpt(50257, 32, n_layer=1, n_head=2, n_embd=8, tie_weights=True).save_pretrained(fx / 'gpt2_vocab_model')
    base_vocab = small_encoder(100)
    tiny_gpt(base_vocab.n_vocab, 32, n_layer=1, n_head=2, n_embd=16).save_pretrained(fx / 'base_model')
    save_tokenizer(base_vocab, fx / 'base_model')
    make_chat_model_dir(fx / 'chat_model', block_size=32, n_merges=100)

    # broken checkpoints, in every format
    def truncated(src, dst, name):
        shutil.copytree(src, dst)
        data = (dst / name).read_bytes()
        (dst / name).write_bytes(data[:len(data) // 2])
    truncated(fx / 'char_model', fx / 'hf_truncated', 'model.safetensors')
    truncated(fx / 'char_model', fx / 'hf_bad_json', 'config.json')
    truncated(fx / 'chat_model', fx / 'truncated_tokenizer', 'encoder.json')
    truncated(TF_FIXTURE, fx / 'tf_truncated', 'model.ckpt.data-00000-of-00001')
    truncated(TF_FIXTURE, fx / 'tf_bad_index', 'model.ckpt.index')
    (fx / 'hf_pickle').mkdir()
    shutil.copy(fx / 'char_model' / 'config.json', fx / 'hf_pickle')
    torch.save({'transformer.wte.weight': torch.zeros(2, 2), 'extra': argparse.Namespace(code='runs on load')},
               fx / 'hf_pickle' / 'pytorch_model.bin')
    (fx / 'hf_no_weights').mkdir()
    shutil.copy(fx / 'char_model' / 'config.json', fx / 'hf_no_weights')
    shutil.copytree(fx / 'char_model', fx / 'hf_mismatch')
    edit_json(fx / 'hf_mismatch' / 'config.json', n_embd=32)
    save_llmc(tiny_gpt(13, 16, n_layer=1, n_head=2, n_embd=16, tie_weights=True), fx / 'llmc.bin')
    data = (fx / 'llmc.bin').read_bytes()
    (fx / 'llmc_truncated.bin').write_bytes(data[:len(data) - 100])
    (fx / 'llmc.bin').unlink()

    # an existing chargpt run (one iteration), and two copies with a broken checkpoint
    with isolated(fx) as log, contextlib.redirect_stdout(io.StringIO()):
        run_script(load_script('chargpt').main, [a.replace('{fx}', str(fx)) for a in SCRIPT_ARGS['chargpt']]
                   + CHARGPT_TINY + [f'--system.work_dir={fx / "run"}'])
    assert (fx / 'run' / 'ckpt' / 'trainer.pt').is_file(), log.getvalue()
    truncated(fx / 'run', fx / 'run_corrupt', 'ckpt/model.safetensors')
    shutil.copytree(fx / 'run', fx / 'run_pickle')
    torch.save(argparse.Namespace(code='runs on load'), fx / 'run_pickle' / 'ckpt' / 'trainer.pt')

    for p in [fx, *fx.rglob('*')]:
        os.utime(p, (PAST, PAST))

# -----------------------------------------------------------------------------
# running a case


_scripts = {}


def load_script(name):
    """ a project script, imported as a module (once) """
    if name not in _scripts:
        spec = importlib.util.spec_from_file_location(f'bad_input_{name.replace("/", "_")}', REPO / SCRIPTS[name])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _scripts[name] = module
    return _scripts[name]


@contextlib.contextmanager
def isolated(cwd):
    """
    Run in cwd as if in a process of its own: the library's log lines go to a buffer of their own (the
    one yielded; stderr is for the error), warnings are kept, no download is possible, argparse's usage
    is one line, and torch's threads and the RNGs are as they were afterwards.
    """
    old_cwd, root = os.getcwd(), logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    log = io.StringIO()
    state = torch.get_num_threads(), random.getstate(), np.random.get_state(), torch.get_rng_state()
    os.chdir(cwd)
    root.handlers = [logging.StreamHandler(log)]  # so log_to_stderr's basicConfig() leaves logging alone
    root.setLevel(logging.INFO)
    try:
        with patched_env(MINGPT_TINYSHAKESPEARE_URL=free_port_url(), COLUMNS='1000', MINGPT_DEBUG=None), \
                warnings.catch_warnings(record=True):
            yield log
    finally:
        os.chdir(old_cwd)
        root.handlers, root.level = old_handlers, old_level
        torch.set_num_threads(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
        torch.set_rng_state(state[3])


def run_in_process(target, argv):
    """ (exit status, stderr) of a command run as its __main__ block runs it; an exception is a traceback """
    stdout, stderr = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            mock.patch.object(sys, 'argv', [target, *argv]), mock.patch.object(sys, 'stdin', io.StringIO('')), \
            mock.patch('mingpt.serve.__main__.run_server', side_effect=AssertionError('the web server would have started')):
        try:
            if target in SCRIPTS:
                run_script(load_script(target).main, argv)
            else:
                main = importlib.import_module(target + ('.__main__' if target in PACKAGES else '')).main
                run_script(main, argv) if MODULES[target] else main(argv)
        except SystemExit as e:
            status = e.code
        except BaseException:
            stderr.write(traceback.format_exc())
            status = 'an exception'
    return status, stderr.getvalue()


def start_subprocess(target, argv, cwd):
    """ the command through its real entry point (python projects/..., python -m ...), started """
    entry = [str(REPO / SCRIPTS[target])] if target in SCRIPTS else ['-m', target]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
               MINGPT_TINYSHAKESPEARE_URL=free_port_url(), COLUMNS='1000')
    env.pop('MINGPT_DEBUG', None)
    return subprocess.Popen([sys.executable, *entry, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(root):
    """ every path under root with its size (files) and mtime """
    return {str(p.relative_to(root)): (p.is_dir(), 0 if p.is_dir() else p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob('*')}


def case_name(i, case):
    """ test_NNN_<target>_<a few words of the bad input, or of the expected message for a call> """
    words = case.expect if case.target == API else ' '.join(a.rsplit('/', 1)[-1] for a in case.bad)
    slug = re.sub(r'[^a-z0-9]+', '_', f'{case.target} {words}'.lower()).strip('_')[:60]
    return f'test_{i:03d}_{slug}'


class TestBadInput(unittest.TestCase):
    """ one test per row of CASES (added below the class) """

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix='mingpt-bad-input-')
        cls.root = Path(cls._tmp.name)
        build_fixtures(cls.root / 'fx')
        cls.fixtures = Fixtures(cls.root / 'fx')

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def argv(self, case):
        return [a.replace('{fx}', str(self.root / 'fx')) for a in SCRIPT_ARGS.get(case.target, []) + case.bad]

    def assertUnchanged(self, before):
        after = snapshot(self.root)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        self.assertEqual(changed, [], 'the failing command created, changed or removed these files')

    def check(self, i, case):
        work = self.root / f'case{i:03d}'
        work.mkdir()
        os.utime(work, (PAST, PAST))
        before = snapshot(self.root)
        if case.target == API:
            self.check_call(case, work)
        else:
            with isolated(work) as log:
                status, stderr = run_in_process(case.target, self.argv(case))
            self.check_command(case, status, stderr)
            self.assertNotIn('Traceback', log.getvalue(), 'a traceback in the log')
        self.assertUnchanged(before)

    @slow
    def test_real_entry_points_too(self):
        """ the rows marked subprocess, run through the real entry points, all at once """
        cases = [(i, case) for i, case in enumerate(CASES) if case.subprocess]
        for i, _ in cases:
            (self.root / f'subprocess{i:03d}').mkdir()
            os.utime(self.root / f'subprocess{i:03d}', (PAST, PAST))
        before = snapshot(self.root)
        procs = [(case, start_subprocess(case.target, self.argv(case), self.root / f'subprocess{i:03d}'))
                 for i, case in cases]
        for case, proc in procs:
            _, stderr = proc.communicate(timeout=300)
            with self.subTest(target=case.target, args=case.bad):
                self.check_command(case, proc.returncode, stderr, how='as a subprocess')
        self.assertUnchanged(before)

    def check_command(self, case, status, stderr, how='in-process'):
        lines = stderr.splitlines()
        self.assertNotIn('Traceback', stderr, f'{how}: a traceback')
        self.assertEqual(status, 2, f'{how}: exit status {status}, stderr:\n{stderr}')
        if case.usage:  # argparse's usage error: the usage, then "prog: error: ..."
            self.assertEqual(len(lines), 2, f'{how}: not a usage line and an error line:\n{stderr}')
            self.assertTrue(lines[0].startswith('usage: '), stderr)
            message = re.sub(r'^.*?: error: ', '', lines[1])
            self.assertNotEqual(message, lines[1], stderr)
        else:
            self.assertEqual(len(lines), 1, f'{how}: not one line:\n{stderr}')
            self.assertTrue(lines[0].startswith('error: '), stderr)
            message = lines[0][len('error: '):]
        self.assertTrue(message.strip(), stderr)
        self.assertRegex(message, case.expect)

    def check_call(self, case, work):
        self.fixtures.work = work
        with isolated(work):
            try:
                case.bad(self.fixtures)
            except BaseException as e:  # anything but the expected error fails the test, with its traceback
                error = e
                trace = traceback.format_exc()
            else:
                self.fail('no exception')
        self.assertIsInstance(error, case.error, trace)
        self.assertIsInstance(error, MinGPTError, trace)
        self.assertIsInstance(error, (ValueError, OSError), trace)
        message = str(error)
        self.assertNotIn('\n', message, 'the message is more than one line')
        self.assertRegex(message, case.expect)


def _add_tests():
    for i, case in enumerate(CASES):
        def test(self, i=i, case=case):
            self.check(i, case)
        name = case_name(i, case)
        test.__name__ = name
        setattr(TestBadInput, name, test)


_add_tests()


class TestTheSweep(unittest.TestCase):
    """ the table itself: big enough, and covering every entry point """

    def test_covers_every_entry_point(self):
        self.assertGreaterEqual(len(CASES), 80)
        self.assertEqual({c.target for c in CASES}, set(SCRIPTS) | set(MODULES) | {API})
        self.assertTrue(3 <= sum(c.subprocess for c in CASES) <= 5)


if __name__ == '__main__':
    unittest.main()
