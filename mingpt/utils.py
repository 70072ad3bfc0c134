"""
Small utilities shared by the library and the projects: seeding, work-dir setup, which process of a
torchrun job reports, a project script's start and finish (start_run, Run), writing files
atomically, running a script's main with clear errors, and CfgNode, the tiny attribute-dict that
every config in mingpt is made of.
"""

import ast
import copy
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

# which process of a torchrun job this is: their home is distributed.py, re-exported for older scripts
from mingpt.distributed import dist_env, is_rank0, require_whole_model  # noqa: F401
from mingpt.errors import ConfigError, MinGPTError

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------

def set_seed(seed):
    """Seed every RNG a training run touches (python, numpy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def setup_logging(config):
    """
    Prepare config.system.work_dir for a run: the exact command line goes to args.txt and the
    full config to config.json, so that every run can be reproduced from its work dir alone.
    Also routes the library's `logging` output to stderr (log_to_stderr). Under torchrun, rank 0
    writes the files.
    """
    if is_rank0():
        work_dir = config.system.work_dir
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, 'args.txt'), 'w') as f:
            f.write(' '.join(sys.argv))
        with open(os.path.join(work_dir, 'config.json'), 'w') as f:
            f.write(json.dumps(config.to_dict(), indent=4))
    log_to_stderr()


def log_to_stderr():
    """
    Route the library's `logging` output to stderr at INFO level, unless logging is configured
    already. For a script that logs before setup_logging may write to its work dir. Under torchrun
    only rank 0 reports: the other ranks show warnings and errors only.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if is_rank0() else logging.WARNING,
                            format='%(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S')


def start_run(config, logger, script=None):
    """
    The start every project script shares: logging to stderr (log_to_stderr), every RNG seeded with
    config.system.seed, torch's threads set to config.system.num_threads when the config has one and
    it is set, and the resolved config logged through the script's logger, before any work. script:
    the path of a script that runs the model on rank 0 alone (to sample, to test), which therefore
    refuses --trainer.parallel=fsdp over several processes. Returns the Run that carries main on.
    """
    run = Run(config)
    log_to_stderr()
    set_seed(config.system.seed)
    if getattr(config.system, 'num_threads', None):
        torch.set_num_threads(config.system.num_threads)
    logger.info("config:\n%s", config)
    if script is not None:
        require_whole_model(config.trainer.parallel, script)
    return run


def resolve_args(config, args, presets=None):
    """
    The config a project script runs with: config, then the preset args name (their last
    --preset=NAME, else config.preset) when the script has presets (a dict name -> overrides in
    merge_from_dict's shape), then args themselves. Naming a model preset (--model.model_type=...)
    clears the model's sizes first: a GPT takes one or the other. An unknown preset is a ConfigError.
    """
    if presets is not None:
        names = [a.split('=', 1)[1] for a in args if a.startswith('--preset=')]
        name = names[-1] if names else config.preset
        if name not in presets:
            raise ConfigError(f"--preset={name}: unknown preset; use one of {', '.join(presets)}")
        config.merge_from_dict(presets[name])
    if any(a.startswith('--model.model_type=') for a in args):
        config.model.n_layer = config.model.n_head = config.model.n_embd = None
    config.merge_from_args(args)
    return config


class Run:
    """
    A project script's run, from start_run to finish: the config, a copy of it as it was given
    (what config.json records: the model and the trainer fill in what the command line left open),
    the work_dir, and whether this process reports the run (rank0: under torchrun every rank runs
    the script; only rank 0 writes files and prints).
    """

    def __init__(self, config):
        self.config = config
        self.given = copy.deepcopy(config)
        self.work_dir = getattr(config.system, 'work_dir', None)
        self.rank0 = is_rank0()
        self.started = time.monotonic()

    def train(self, trainer):
        """
        trainer.run(), after recording the command and the config in work_dir (setup_logging). Not
        before: making the Trainer checked what work_dir holds, and a run that cannot resume there
        must leave the earlier run's files as they are.
        """
        setup_logging(self.given)
        trainer.run()
        return trainer

    def finish(self, results):
        """ results into work_dir/results.json (rank 0), with wall_seconds: this process's time since
        start_run, loading, compiling and evaluations included; returns whether this process reports the run """
        if self.rank0:
            results = {**results, 'wall_seconds': round(time.monotonic() - self.started, 1)}
            atomic_write(os.path.join(self.work_dir, 'results.json'), json.dumps(results, indent=2))
        return self.rank0


def atomic_write(path, content):
    """
    Write the file at path so that it holds either its old content or the whole new one, never a
    half-written file (a crash or Ctrl-C mid-write leaves only path.tmp behind). content is str,
    bytes, or a callable write(tmp_path) for writers that want a path (safetensors, torch.save).
    The data is fsynced before the rename, so the rename never outlives it in a power cut; the file
    gets the permissions of the user's umask, as open() would give it. Returns path as a Path.
    """
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    if callable(content):
        content(tmp)
    else:
        tmp.write_bytes(content.encode('utf-8') if isinstance(content, str) else content)
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create files 0600 whatever the umask
    os.replace(tmp, path)
    return path


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def run_script(main, *args):
    """
    Run a command-line entry point: an error a user can cause (a MinGPTError, or the ValueError,
    OSError or KeyError a library call raises for bad input) ends the program with one line on
    stderr, "error: ...", and exit status 2, not a traceback. MINGPT_DEBUG=1 shows the traceback.
    """
    try:
        return main(*args)
    except (MinGPTError, ValueError, OSError, KeyError) as e:
        if os.environ.get('MINGPT_DEBUG'):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None

# -----------------------------------------------------------------------------

class CfgNode:
    """
    A lightweight configuration object: attributes are the config keys, nested CfgNodes are
    sub-configs. Inspired by yacs, but with none of its machinery.

    >>> C = CfgNode(lr=3e-4, model=CfgNode(n_layer=2))
    >>> C.merge_from_args(['--model.n_layer=4'])
    >>> C.model.n_layer
    4
    """

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __str__(self):
        return self._str_helper(0)

    def __repr__(self):
        return f"CfgNode({self.to_dict()!r})"

    def _str_helper(self, indent):
        """ need to have a helper to support nested indentation for pretty printing """
        parts = []
        for k, v in self.__dict__.items():
            if isinstance(v, CfgNode):
                parts.append("%s:\n" % k)
                parts.append(v._str_helper(indent + 1))
            else:
                parts.append("%s: %s\n" % (k, v))
        parts = [' ' * (indent * 4) + p for p in parts]
        return "".join(parts)

    def to_dict(self):
        """ return a dict representation of the config (nested CfgNodes become nested dicts) """
        return {k: v.to_dict() if isinstance(v, CfgNode) else v for k, v in self.__dict__.items()}

    def merge_from_dict(self, d):
        """ update the config from a (possibly nested) dict; nested dicts merge into sub-configs """
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(getattr(self, k, None), CfgNode):
                getattr(self, k).merge_from_dict(v)
            else:
                setattr(self, k, v)

    def merge_from_args(self, args):
        """
        Update the config from a list of command-line strings of the form `--arg=value`, where
        arg may be nested (`--model.n_layer=10`, `--trainer.batch_size=32`). The value is parsed as
        a Python literal when it is one (numbers, tuples, True/None) and kept as a string otherwise.
        Only existing keys can be set: a typo is an error, not a silently ignored option. A value
        must have the type of the key's current value (an int where there is an int, a number where
        there is a float, ...), or be None; a key whose value is None takes anything. Every mistake
        is a ConfigError (a ValueError) that says what to type instead.
        """
        for arg in args:
            keyval = arg.split('=', maxsplit=1)
            if len(keyval) != 2 or not keyval[0].startswith('--'):
                raise ConfigError(f"expected an override of the form --key=value, got {arg!r}")
            key, raw = keyval
            key = key[2:]  # strip the '--'
            val = raw
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                pass  # not a literal: keep it as the string the user typed

            # walk down to the CfgNode that owns the leaf key
            keys = key.split('.')
            obj = self
            for i, k in enumerate(keys):
                if not isinstance(obj, CfgNode) or k not in obj.__dict__:
                    prefix = '.'.join(keys[:i])
                    valid = sorted(obj.__dict__) if isinstance(obj, CfgNode) else []
                    where = f"under '{prefix}'" if prefix else "at the top level"
                    raise ConfigError(f"unknown config key '{key}': no '{k}' {where}; "
                                      f"valid keys there are: {', '.join(valid)}")
                if i < len(keys) - 1:
                    obj = getattr(obj, k)
            leaf = keys[-1]
            if isinstance(getattr(obj, leaf), CfgNode):
                raise ConfigError(f"'{key}' is a group of settings, not a value; set one of its keys, "
                                  f"e.g. --{key}.{next(iter(getattr(obj, leaf).__dict__), 'x')}=...")
            val = _typed(key, val, raw, getattr(obj, leaf))
            logger.info("command line overwriting config attribute %s with %r", key, val)
            setattr(obj, leaf, val)


def _typed(key, val, raw, current):
    """ val (parsed from the text raw) checked against the type of the key's current value """
    if val is None or current is None:
        return val
    if isinstance(current, str):
        # a string key keeps what was typed, even if it reads as a number; but True and False stay
        # themselves, for the keys that take a string or a switch (resume='auto', True or False)
        return val if isinstance(val, bool) else raw
    if isinstance(current, bool):
        ok = isinstance(val, bool)
    elif isinstance(current, int):
        ok = isinstance(val, int) and not isinstance(val, bool)
    elif isinstance(current, float):
        ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        val = float(val) if ok else val
    elif isinstance(current, (tuple, list)):
        ok = isinstance(val, (tuple, list))
        val = type(current)(val) if ok else val
    else:
        ok = True
    if not ok:
        kind = {bool: 'True or False', int: 'an integer', float: 'a number', tuple: 'a tuple',
                list: 'a list'}.get(type(current), type(current).__name__)
        raise ConfigError(f"--{key}={raw}: expected {kind}, like its default {current!r}")
    return val
