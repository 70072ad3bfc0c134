"""
The training loop, and everything that wraps one optimizer step: learning-rate schedule, gradient
accumulation, mixed precision, torch.compile, evaluation, checkpoint/resume, DDP and logging.

Nothing here is specific to GPT: the model only has to provide configure_optimizers(config) and
forward(x, y) -> (logits, loss), with -1 marking targets that do not count.

A plain Trainer(config, model, train_dataset).run() is minGPT's loop, unchanged: batches drawn with
replacement by a RandomSampler, a constant learning rate, fp32, one process, no files written.
Every other feature is a config field whose default leaves that loop alone.
"""

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.dataloader import DataLoader, default_collate

from mingpt.utils import CfgNode as CN

logger = logging.getLogger(__name__)

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
CHECKPOINT_VERSION = 1


def fast_dtype(device_type):
    """
    What dtype='auto' trains in: 'bfloat16' where the hardware has bf16 arithmetic, else 'float32'.
    That is a CUDA GPU of compute capability 8 (Ampere) or newer, or a CPU with AVX512-BF16 or AMX
    instructions, where autocast's bf16 matmuls run about twice as fast as fp32 ones (measured on
    gpt-mini: a training step 1.9x faster). Without them the bf16 matmuls are emulated, and slower
    than fp32.
    """
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.get_device_capability()[0] >= 8 else 'float32'
    if device_type == 'cpu':
        # torch.cpu's feature checks are private; a torch without them just gets float32
        checks = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
        if any(check is not None and check() for check in checks):
            return 'bfloat16'
    return 'float32'


def default_num_workers():
    """
    DataLoader workers that pay for themselves: each is a process that copies the dataset, and
    with only a couple of cores it competes with the training step itself. Keep one core for the
    main process and never go past 4.
    """
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(4, n_cpu - 2))

# -----------------------------------------------------------------------------
# learning-rate schedule and data order: both pure functions of the iteration number, so that a
# resumed run needs nothing but iter_num (and the data seed) to carry on where it stopped

def get_lr(it, config):
    """ the learning rate of iteration it (0-based): linear warmup, then constant or cosine """
    lr = config.learning_rate
    if it < config.warmup_iters:
        return lr * (it + 1) / config.warmup_iters
    if config.lr_schedule is None:
        return lr
    decay_iters = config.lr_decay_iters if config.lr_decay_iters is not None else config.max_iters
    min_lr = lr / 10 if config.min_lr is None else config.min_lr
    if it >= decay_iters:
        return min_lr
    ratio = (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)


class GlobalBatchSampler:
    """
    A batch_sampler whose order is a pure function of (seed, iteration): iteration `it` draws one
    global batch of batch_size * grad_accum_steps * world_size indices, with replacement as in
    minGPT, and this process takes its slices of it. Micro-step m on rank r gets chunk m*W + r.

    So the global batch does not depend on how it is split: 1 process x 16 rows, 2 ranks x 8 rows
    and 4 micro-steps x 4 rows see the same 16 examples, and a run resumed at iteration k starts
    from exactly the batch the uninterrupted run would have drawn.
    """

    def __init__(self, n, batch_size, grad_accum_steps, seed, start_iter=0, rank=0, world_size=1):
        self.n, self.batch_size, self.grad_accum_steps = n, batch_size, grad_accum_steps
        self.seed, self.start_iter, self.rank, self.world_size = seed, start_iter, rank, world_size

    def global_batch(self, it):
        """ (batch_size * grad_accum_steps * world_size,) indices of iteration it """
        rng = np.random.default_rng([self.seed, it])  # SeedSequence mixes (seed, it) into a fresh stream
        return rng.integers(0, self.n, size=self.batch_size * self.grad_accum_steps * self.world_size)

    def __iter__(self):
        B, W = self.batch_size, self.world_size
        it = self.start_iter
        while True:
            idx = self.global_batch(it)
            for m in range(self.grad_accum_steps):
                chunk = m * W + self.rank
                yield idx[chunk * B:(chunk + 1) * B].tolist()
            it += 1


def count_targets(y):
    """ how many targets of y count in the loss: -1 is GPT's ignore_index """
    if torch.is_tensor(y) and not y.is_floating_point():
        return y.ne(-1).sum().float()
    return torch.ones((), device=y.device if torch.is_tensor(y) else None)

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT)

def dist_env():
    """ (rank, local_rank, world_size) of this process; (0, 0, 1) when not distributed """
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), local_rank, dist.get_world_size()
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size > 1:
        return int(os.environ['RANK']), local_rank, world_size
    return 0, 0, 1


def unwrap(model):
    """ the plain nn.Module inside torch.compile's and DDP's wrappers: its keys carry no prefixes """
    while True:
        if hasattr(model, '_orig_mod'):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_state_dict(state_dict):
    """ strip the '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes from every key """
    out = {}
    for k, v in state_dict.items():
        while k.startswith(('_orig_mod.', 'module.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out

# -----------------------------------------------------------------------------
# checkpoints: a directory holding model.safetensors (weights) and trainer.pt (optimizer, RNG,
# progress; plain tensors and containers, so it loads with torch.load(weights_only=True))

class CheckpointError(RuntimeError):
    """ a checkpoint that is missing, unreadable, or does not fit this model / config """


def rng_state():
    """ every RNG a training step may touch, as tensors and plain python values """
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _fsync_write(path, write):
    with open(path, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory, model, state, info=None):
    """
    Write model weights + trainer state to `directory`, atomically: everything goes to
    directory.tmp first, and only a complete checkpoint is renamed into place. The previous one is
    moved to directory.old for the instant between the two renames, and load_checkpoint falls
    back to it, so a kill at any moment leaves one complete checkpoint on disk.
    """
    from safetensors.torch import save_file
    sd = clean_state_dict(unwrap(model).state_dict())
    # safetensors refuses tensors that share memory (tied wte / lm_head): store one, alias the rest
    tensors, aliases, seen = {}, {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if v.numel() > 0 and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().to('cpu').contiguous()
    metadata = {'iter_num': str(state['iter_num']), 'aliases': json.dumps(aliases)}

    tmp, old = directory + '.tmp', directory + '.old'
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from an earlier crash
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata=metadata)
    with open(os.path.join(tmp, 'model.safetensors'), 'rb+') as f:
        os.fsync(f.fileno())
    _fsync_write(os.path.join(tmp, 'trainer.pt'), lambda f: torch.save(state, f))
    if info is not None:
        _fsync_write(os.path.join(tmp, 'config.json'),
                     lambda f: f.write(json.dumps(info, indent=2, default=str).encode()))
    if os.path.exists(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    fd = os.open(os.path.dirname(os.path.abspath(directory)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the renames themselves durable
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory):
    """ the complete checkpoint at directory (or its .old twin after an ill-timed kill), or None """
    for d in (directory, directory + '.old'):
        if os.path.isdir(d):
            return d
    return None


def load_checkpoint(directory):
    """ (model state_dict, trainer state) from a save_checkpoint directory; CheckpointError if bad """
    from safetensors import safe_open
    model_path, state_path = os.path.join(directory, 'model.safetensors'), os.path.join(directory, 'trainer.pt')
    for p in (model_path, state_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {directory} is incomplete: {os.path.basename(p)} is "
                                  "missing; delete the directory (or set resume=False and use another "
                                  "work_dir) to start afresh")
    try:
        with safe_open(model_path, framework='pt') as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {model_path} ({type(e).__name__}: {e}); the file is "
                              "corrupt or not a safetensors file: delete the checkpoint directory "
                              "to start afresh") from e
    try:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {state_path} ({type(e).__name__}: {e}); the file is "
                              "corrupt: delete the checkpoint directory to start afresh") from e
    if not isinstance(state, dict) or state.get('version') != CHECKPOINT_VERSION:
        raise CheckpointError(f"{state_path} is not a mingpt trainer checkpoint of version "
                              f"{CHECKPOINT_VERSION}")
    if metadata.get('iter_num') != str(state['iter_num']):
        raise CheckpointError(f"checkpoint {directory} mixes files of two saves (weights of iteration "
                              f"{metadata.get('iter_num')}, trainer state of iteration "
                              f"{state['iter_num']}); delete it to start afresh")
    for alias, target in json.loads(metadata.get('aliases', '{}')).items():
        sd[alias] = sd[target]
    return sd, state

# -----------------------------------------------------------------------------

def plot_metrics(history, path):
    """
    Save a PNG of training (and validation) loss against iteration. history is Trainer.history
    or a list of metrics.jsonl records. Needs matplotlib (an optional dependency); uses the Agg
    canvas directly, so it touches no global pyplot backend state.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib, which is optional: pip install matplotlib") from e
    if isinstance(history, list):  # metrics.jsonl records
        records = history
        history = defaultdict(list)
        for r in records:
            if 'loss' in r:
                history['iter'].append(r['iter'])
                history['loss'].append(r['loss'])
            if 'val_loss' in r:
                history['val_iter'].append(r['iter'])
                history['val_loss'].append(r['val_loss'])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(history['iter'], history['loss'], lw=0.8, label='train')
    if history.get('val_loss'):
        ax.plot(history['val_iter'], history['val_loss'], 'o-', label='val')
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)

# -----------------------------------------------------------------------------

class Trainer:

    @staticmethod
    def get_default_config():
        C = CN()
        # device to train on: 'auto' picks cuda when it is available
        C.device = 'auto'
        # dataloader parameters: None picks a sensible count for this machine (0 on <= 2 cores)
        C.num_workers = None
        # optimizer parameters
        C.max_iters = None
        C.batch_size = 64  # rows per micro-step and per process
        C.learning_rate = 3e-4
        C.betas = (0.9, 0.95)
        C.weight_decay = 0.1 # only applied on matmul weights
        C.grad_norm_clip = 1.0  # None or 0 disables clipping
        # learning-rate schedule: None keeps learning_rate constant (after warmup_iters, if any);
        # 'cosine' decays it to min_lr (None: learning_rate / 10) at lr_decay_iters (None: max_iters)
        C.lr_schedule = None
        C.warmup_iters = 0
        C.lr_decay_iters = None
        C.min_lr = None
        # micro-steps per optimizer step: the gradient of grad_accum_steps * batch_size rows
        C.grad_accum_steps = 1
        # 'float32', 'bfloat16' (autocast, CPU or CUDA), 'float16' (autocast + GradScaler, CUDA only),
        # 'auto': bfloat16 where the hardware runs it natively, else float32 (see fast_dtype)
        C.dtype = 'float32'
        # torch.compile the model for training; compile_backend is passed on ('eager' to debug)
        C.compile = False
        C.compile_backend = 'inductor'
        # evaluation on val_dataset (when one is given): every eval_interval iterations and at the
        # end, eval_iters batches (the same batches every time, so evaluations compare)
        C.eval_interval = 500
        C.eval_iters = 20
        # checkpoints: None writes nothing; else work_dir/ckpt every checkpoint_interval iterations
        # and at the end, work_dir/ckpt_best on a new best val loss, work_dir/metrics.jsonl
        C.work_dir = None
        C.checkpoint_interval = 500
        # False: a new run (an existing checkpoint in work_dir is an error, never overwritten);
        # True: continue from work_dir/ckpt (missing is an error); 'auto': continue if there is one
        C.resume = False
        # data order: None is minGPT's RandomSampler, unless checkpoints or DDP need a replayable
        # order, which is then seeded from torch's RNG; an int fixes the order (see GlobalBatchSampler)
        C.data_seed = None
        # logging: a line every log_interval iterations (None: never); the tqdm bar (None: when
        # stderr is a terminal)
        C.log_interval = 100
        C.progress_bar = None
        return C

    def __init__(self, config, model, train_dataset, val_dataset=None):
        # configs written before a field existed get its default
        for k, v in self.get_default_config().__dict__.items():
            if not hasattr(config, k):
                setattr(config, k, v)
        self.config = config
        self.model = model
        self.optimizer = None
        self.scaler = None
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.callbacks = defaultdict(list)

        # torchrun tells each process who it is; only rank 0 logs and writes files
        self.rank, self.local_rank, self.world_size = dist_env()
        self.is_master = self.rank == 0

        # determine the device we'll train on
        if config.device == 'auto':
            self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        else:
            self.device = config.device
        if self.world_size > 1 and self.device == 'cuda':
            self.device = f'cuda:{self.local_rank}'  # one GPU per process
            torch.cuda.set_device(self.device)
        self.device_type = torch.device(self.device).type
        if config.dtype == 'auto':
            config.dtype = fast_dtype(self.device_type)
        self._check_config()
        self.model = self.model.to(self.device)
        if self.is_master:
            logger.info("running on device %s%s, %s", self.device,
                        f" (rank 0 of {self.world_size})" if self.world_size > 1 else "", config.dtype)

        # variables that will be assigned to trainer class later for logging and etc
        self.iter_num = 0
        self.iter_time = 0.0
        self.iter_dt = 0.0
        self.loss = None
        self.lr = config.learning_rate
        self.tokens_per_sec = 0.0
        self.val_loss = None
        self.best_val_loss = float('inf')
        self.history = defaultdict(list)  # iter/loss/lr and val_iter/val_loss, for plot()
        self._stop_requested = False

    def _check_config(self):
        C = self.config
        if C.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {C.dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
        if C.dtype == 'float16' and self.device_type != 'cuda':
            raise ValueError(f"dtype='float16' needs a CUDA device (its GradScaler is CUDA-only), but "
                             f"the device is {self.device!r}; use dtype='bfloat16' on CPU, or 'float32'")
        if C.dtype == 'bfloat16' and self.device_type == 'cuda' and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bfloat16 support; use dtype='float16' (or 'float32')")
        if not (isinstance(C.grad_accum_steps, int) and C.grad_accum_steps >= 1):
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {C.grad_accum_steps!r}")
        if C.lr_schedule not in (None, 'cosine'):
            raise ValueError(f"unknown lr_schedule {C.lr_schedule!r}; use None (constant) or 'cosine'")
        if C.lr_schedule == 'cosine' and C.lr_decay_iters is None and C.max_iters is None:
            raise ValueError("lr_schedule='cosine' needs to know when to reach min_lr: set "
                             "lr_decay_iters or max_iters")
        if C.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {C.warmup_iters}")
        for k in ('eval_interval', 'eval_iters', 'checkpoint_interval'):
            v = getattr(C, k)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{k} must be an int >= 1, got {v!r}")
        if C.resume not in (False, True, 'auto'):
            raise ValueError(f"resume must be False, True or 'auto', got {C.resume!r}")
        if C.resume and C.work_dir is None:
            raise ValueError(f"resume={C.resume!r} needs the work_dir that holds the checkpoint")
        if C.data_seed is not None and not (isinstance(C.data_seed, int) and C.data_seed >= 0):
            raise ValueError(f"data_seed must be None or an int >= 0, got {C.data_seed!r}")

    def add_callback(self, onevent: str, callback):
        self.callbacks[onevent].append(callback)

    def set_callback(self, onevent: str, callback):
        self.callbacks[onevent] = [callback]

    def trigger_callbacks(self, onevent: str):
        for callback in self.callbacks.get(onevent, []):
            callback(self)

    def stop(self):
        """
        End run() after the current iteration, e.g. from a callback once a target is reached. That
        iteration is then the last one: it is evaluated (if it was not already) and checkpointed.
        """
        self._stop_requested = True

    # -------------------------------------------------------------------------

    def run(self):
        """ train until max_iters (forever if None); events 'on_batch_end', 'on_eval_end', 'on_checkpoint' """
        owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend='nccl' if self.device_type == 'cuda' else 'gloo')
            owns_group = True
        self._metrics_file = None
        try:
            self._run()
        finally:
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
            if owns_group:
                dist.destroy_process_group()

    def _run(self):
        model, config = self.model, self.config
        W, A = self.world_size, config.grad_accum_steps
        ddp = W > 1

        # setup the optimizer (and, for float16, the loss scaler that keeps small gradients alive)
        self.optimizer = model.configure_optimizers(config)
        self._base_lrs = [g['lr'] for g in self.optimizer.param_groups]
        if config.dtype == 'float16':
            self.scaler = torch.amp.GradScaler('cuda')

        # what the training step calls: the model, maybe inside DDP (gradient all-reduce), maybe compiled
        self._ddp_model = None
        train_model = model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            device_ids = [self.local_rank] if self.device_type == 'cuda' else None
            train_model = self._ddp_model = DDP(model, device_ids=device_ids)
        if config.compile:
            train_model = torch.compile(train_model, backend=config.compile_backend)
        self._train_model = train_model

        # fresh start or resume; a replayable data order whenever checkpoints or DDP are on
        self.iter_num = 0
        self.best_val_loss = float('inf')
        self.history = defaultdict(list)
        seeded = config.data_seed is not None or config.work_dir is not None or ddp
        data_seed = None
        state = self._load_resume_state()
        if state is not None:
            data_seed = self._apply_resume_state(*state)
        elif seeded:
            data_seed = config.data_seed
            if data_seed is None:
                # drawn from torch's RNG, like RandomSampler's own seed, so set_seed fixes it
                data_seed = int(torch.empty((), dtype=torch.int64).random_().item()) & (2**63 - 1)
                if ddp:  # every rank must slice the same global batches
                    box = [data_seed]
                    dist.broadcast_object_list(box, src=0)
                    data_seed = box[0]
        self.data_seed = data_seed
        self._open_metrics(resumed=state is not None)

        # setup the dataloader: sampling with replacement, so "epochs" never end
        num_workers = default_num_workers() if config.num_workers is None else config.num_workers
        if seeded:
            sampler = GlobalBatchSampler(len(self.train_dataset), config.batch_size, A, self.data_seed,
                                         start_iter=self.iter_num, rank=self.rank, world_size=W)
            # its own generator: creating the iterator must not consume the global RNG that a
            # resumed run restores (it only seeds the workers)
            train_loader = DataLoader(self.train_dataset, batch_sampler=sampler, num_workers=num_workers,
                                      pin_memory=self.device_type == 'cuda',
                                      generator=torch.Generator().manual_seed(self.data_seed))
        else:
            train_loader = DataLoader(
                self.train_dataset,
                sampler=torch.utils.data.RandomSampler(self.train_dataset, replacement=True, num_samples=int(1e10)),
                shuffle=False,
                pin_memory=self.device.startswith('cuda'),
                batch_size=config.batch_size,
                num_workers=num_workers,
            )

        show_bar = config.progress_bar if config.progress_bar is not None else sys.stderr.isatty()
        show_bar = bool(show_bar) and self.is_master
        with contextlib.ExitStack() as stack:
            pbar = None
            if show_bar:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
                stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar
                pbar = stack.enter_context(tqdm(total=config.max_iters, initial=self.iter_num,
                                                unit='it', dynamic_ncols=True))
            self._loop(train_loader, pbar)

    def _loop(self, train_loader, pbar):
        model, config = self.model, self.config
        A = config.grad_accum_steps
        model.train()
        self.iter_time = time.time()
        data_iter = iter(train_loader)
        self._stop_requested = False
        while not self._stop_requested and (config.max_iters is None or self.iter_num < config.max_iters):
            t0 = time.time()

            # fetch the next grad_accum_steps batches (x, y) and re-init iterator if needed
            batches = []
            for _ in range(A):
                try:
                    batch = next(data_iter)
                except StopIteration:
                    data_iter = iter(train_loader)
                    batch = next(data_iter)
                batches.append([t.to(self.device, non_blocking=True) for t in batch])

            # forward, backward, update
            self._set_lr()
            self.loss = self._step(batches)

            self.trigger_callbacks('on_batch_end')
            self.iter_num += 1
            tnow = time.time()
            self.iter_dt = tnow - self.iter_time
            self.iter_time = tnow
            self.tokens_per_sec = sum(b[0].numel() for b in batches) * self.world_size / max(tnow - t0, 1e-9)
            self._record(pbar)

            last = self._stop_requested or (config.max_iters is not None and self.iter_num >= config.max_iters)
            if self.val_dataset is not None and (self.iter_num % config.eval_interval == 0 or last):
                self._eval_and_keep_best()
            last = last or self._stop_requested  # an 'on_eval_end' callback may have stopped the run
            if config.work_dir is not None and (self.iter_num % config.checkpoint_interval == 0 or last):
                self.save_checkpoint()

    def _set_lr(self):
        """ the schedule sets every group's lr, scaled like the group's own base lr """
        config = self.config
        self.lr = get_lr(self.iter_num, config)
        if config.lr_schedule is None and config.warmup_iters == 0:
            return  # minGPT's constant learning rate: leave the optimizer alone
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group['lr'] = base * self.lr / config.learning_rate

    def _step(self, batches):
        """
        One optimizer step over the micro-batches of this process; returns the global-batch loss.

        The loss of the global batch is the mean over every counted target in it, so micro-batch
        m on rank r is weighted by its share of those targets, n_rm / N (times W, because DDP
        averages the gradients of the W ranks). With equal counts that is 1/grad_accum_steps; with
        -1 targets spread unevenly it is still exactly the gradient of one big batch.
        """
        config, W = self.config, self.world_size
        A = len(batches)
        counts = torch.stack([count_targets(y) for _, y in batches])  # (A,)
        total = counts.sum()
        if W > 1:
            dist.all_reduce(total)
        weights = counts * W / total.clamp(min=1)  # (A,)

        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for m, (x, y) in enumerate(batches):
            if self._ddp_model is not None:
                # all-reduce the gradients only once, on the last micro-step
                self._ddp_model.require_backward_grad_sync = m == A - 1
            with self._autocast_ctx():
                _, loss = self._train_model(x, y)
            loss = loss.float() * weights[m]
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()
        if W > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= W

        # a diverged loss stops the run before the update, so the weights stay the last good ones
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            where = (f"; the last good checkpoint is in {os.path.join(self.config.work_dir, 'ckpt')} "
                     "(resume=True continues from it)" if self.config.work_dir else "")
            raise FloatingPointError(f"loss is {loss_value} at iteration {self.iter_num}: training "
                                     f"diverged and was stopped before the optimizer step{where}. "
                                     "Try a lower learning_rate, more warmup_iters, a grad_norm_clip, "
                                     "or dtype='float32', and check the data for bad values.")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if config.grad_norm_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_norm_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss_sum

    # -------------------------------------------------------------------------
    # evaluation

    def _eval_indices(self, n):
        """ the eval_iters global batches of validation indices: the same ones at every evaluation """
        rows = self.config.batch_size * self.world_size
        if n <= rows * self.config.eval_iters:
            idx = np.arange(n)  # small enough: every example once
        else:
            idx = np.random.default_rng(0).integers(0, n, size=rows * self.config.eval_iters)
        return [idx[i:i + rows] for i in range(0, len(idx), rows)]

    @torch.no_grad()
    def evaluate(self, dataset=None):
        """ mean loss per counted target on dataset (default: val_dataset), over eval_iters batches """
        dataset = self.val_dataset if dataset is None else dataset
        model = self.model
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for global_idx in self._eval_indices(len(dataset)):
            mine = global_idx[self.rank::self.world_size]
            if len(mine) == 0:
                continue
            x, y = [t.to(self.device) for t in default_collate([dataset[int(i)] for i in mine])]
            with self._autocast_ctx():
                _, loss = model(x, y)
            n = count_targets(y)
            loss_sum += loss.float() * n
            count += n
        if self.world_size > 1:
            both = torch.stack([loss_sum, count])
            dist.all_reduce(both)
            loss_sum, count = both[0], both[1]
        model.train(was_training)
        return (loss_sum / count.clamp(min=1)).item()

    def _autocast_ctx(self):
        if self.config.dtype == 'float32':
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.config.dtype])

    def _eval_and_keep_best(self):
        self.val_loss = self.evaluate()
        improved = self.val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = self.val_loss
        if self.is_master:
            logger.info("iter %d: val loss %.4f (best %.4f)", self.iter_num, self.val_loss, self.best_val_loss)
            self.history['val_iter'].append(self.iter_num)
            self.history['val_loss'].append(self.val_loss)
            self._write_metrics({'iter': self.iter_num, 'val_loss': self.val_loss})
        self.trigger_callbacks('on_eval_end')
        if improved and self.config.work_dir is not None:
            self.save_checkpoint('ckpt_best')

    # -------------------------------------------------------------------------
    # observability: history (for plot), metrics.jsonl, log lines, the progress bar

    def _open_metrics(self, resumed):
        self._metrics_file = None
        if self.config.work_dir is None or not self.is_master:
            return
        path = os.path.join(self.config.work_dir, 'metrics.jsonl')
        os.makedirs(self.config.work_dir, exist_ok=True)
        if resumed and os.path.exists(path):
            # keep what led up to the checkpoint; the steps after it are about to be redone
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            records = [r for r in records if r.get('iter', 0) <= self.iter_num]
            with open(path + '.tmp', 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in records)
            os.replace(path + '.tmp', path)
            for r in records:
                if 'loss' in r:
                    for k in ('iter', 'loss', 'lr'):
                        self.history[k].append(r[k])
                if 'val_loss' in r:
                    self.history['val_iter'].append(r['iter'])
                    self.history['val_loss'].append(r['val_loss'])
        self._metrics_file = open(path, 'a' if resumed else 'w')

    def _write_metrics(self, record):
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + '\n')

    def _record(self, pbar):
        if not self.is_master:
            return
        loss = self.loss.item()
        self.history['iter'].append(self.iter_num)
        self.history['loss'].append(loss)
        self.history['lr'].append(self.lr)
        self._write_metrics({'iter': self.iter_num, 'loss': loss, 'lr': self.lr,
                             'tokens_per_sec': round(self.tokens_per_sec, 1), 'time': round(time.time(), 3)})
        if pbar is not None:
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{self.tokens_per_sec:.0f}",
                             refresh=False)
            pbar.update(1)
        interval = self.config.log_interval
        if interval and self.iter_num % interval == 0:
            logger.info("iter %d%s: loss %.4f, lr %.3e, %.0f tokens/s", self.iter_num,
                        f"/{self.config.max_iters}" if self.config.max_iters else "", loss, self.lr,
                        self.tokens_per_sec)
            if self._metrics_file is not None:
                self._metrics_file.flush()

    def plot(self, path):
        """ save a PNG of the loss curves so far (needs matplotlib) """
        plot_metrics(self.history, path)

    # -------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, name='ckpt'):
        """ write work_dir/name (rank 0 writes; every rank contributes its RNG state) """
        if self.config.work_dir is None:
            raise ValueError("save_checkpoint needs config.work_dir")
        rng = [rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_state())  # dropout streams differ per rank
        if not self.is_master:
            return
        state = {
            'version': CHECKPOINT_VERSION,
            'iter_num': self.iter_num,
            'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'rng': rng,
            'data_seed': self.data_seed,
            'global_batch': self.config.batch_size * self.config.grad_accum_steps * self.world_size,
            'best_val_loss': self.best_val_loss,
        }
        model_config = getattr(unwrap(self.model), 'config', None)
        info = {'trainer': self.config.to_dict(),
                'model': model_config.to_dict() if hasattr(model_config, 'to_dict') else None}
        directory = os.path.join(self.config.work_dir, name)
        os.makedirs(self.config.work_dir, exist_ok=True)
        save_checkpoint(directory, self.model, state, info)
        if self._metrics_file is not None:
            self._metrics_file.flush()
        logger.info("iter %d: saved checkpoint %s", self.iter_num, directory)
        self.trigger_callbacks('on_checkpoint')

    def _load_resume_state(self):
        """
        (model state_dict, trainer state) to resume from, or None for a fresh start. Rank 0 reads
        the disk and hands the result to the other ranks, so only rank 0's node needs work_dir.
        """
        config = self.config
        if config.work_dir is None:
            return None
        result = None
        if self.is_master:
            try:
                found = find_checkpoint(os.path.join(config.work_dir, 'ckpt'))
                if found is not None and config.resume is False:
                    raise CheckpointError(f"{config.work_dir} already holds a checkpoint ({found}); set "
                                          "resume=True to continue it, or use another work_dir (or "
                                          "delete it) to start a new run: it is never overwritten")
                if found is None and config.resume is True:
                    raise CheckpointError(f"resume=True but there is no checkpoint in {config.work_dir} "
                                          "(expected a 'ckpt' directory); check work_dir, or use "
                                          "resume='auto' to start afresh when there is none")
                if found is not None:
                    result = load_checkpoint(found)
                    logger.info("resuming from %s at iteration %d", found, result[1]['iter_num'])
            except CheckpointError as e:
                result = e
        if self.world_size > 1:
            box = [result if not isinstance(result, CheckpointError) else str(result)]
            dist.broadcast_object_list(box, src=0)
            result = box[0] if not isinstance(box[0], str) else CheckpointError(box[0])
        if isinstance(result, CheckpointError):
            raise result
        return result

    def _apply_resume_state(self, model_sd, state):
        """ load weights, optimizer, scaler, progress and RNG; returns the run's data seed """
        config = self.config
        where = os.path.join(config.work_dir, 'ckpt')
        try:
            unwrap(self.model).load_state_dict(model_sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint in {where} does not fit this model (was it written "
                                  f"by a model of another size?): {e}") from e
        try:
            self.optimizer.load_state_dict(state['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the optimizer state in {where} does not fit this model's "
                                  f"optimizer: {e}") from e
        if (state['scaler'] is None) != (self.scaler is None):
            raise CheckpointError(f"the checkpoint in {where} was written with "
                                  f"{'' if state['scaler'] is not None else 'no '}float16 loss scaling, "
                                  f"this run has dtype={config.dtype!r}; resume with the same dtype")
        if self.scaler is not None:
            self.scaler.load_state_dict(state['scaler'])
        if config.data_seed is not None and state['data_seed'] != config.data_seed:
            raise CheckpointError(f"the checkpoint in {where} used data_seed={state['data_seed']}, "
                                  f"this run asks for {config.data_seed}; set data_seed=None (or the "
                                  "checkpoint's value) to continue the same data order")
        global_batch = config.batch_size * config.grad_accum_steps * self.world_size
        if state['global_batch'] != global_batch and self.is_master:
            logger.warning("the checkpoint trained on global batches of %d rows, this run uses %d: the "
                           "data order will not continue the original sequence", state['global_batch'],
                           global_batch)
        self.iter_num = state['iter_num']
        self.best_val_loss = state['best_val_loss']
        rng = state['rng']
        if len(rng) != self.world_size and self.is_master:
            logger.warning("the checkpoint holds RNG states of %d processes, this run has %d: dropout "
                           "will not replay the original run", len(rng), self.world_size)
        # last, so that nothing in the setup above can consume the restored streams
        set_rng_state(rng[self.rank % len(rng)])
        return state['data_seed']
