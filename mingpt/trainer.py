"""
The training loop, and everything that wraps one optimizer step: gradient accumulation, mixed
precision, torch.compile, evaluation and callbacks. What it draws on lives next door: the
learning rate and data order in schedule.py, checkpoints in checkpoint.py and resuming from them
in resume.py, the metrics log, progress lines and plot in metrics.py, machine-dependent choices in
hardware.py, the model spread over several processes (DDP or FSDP) in distributed.py.

Nothing here is specific to GPT: the model only has to provide configure_optimizers(config) and
forward(x, y) -> (logits, loss), with -1 marking targets that do not count.

A plain Trainer(config, model, train_dataset).run() is minGPT's loop, unchanged: batches drawn with
replacement by a RandomSampler, a constant learning rate, fp32, one process, no files written.
Every other feature is a config field whose default leaves that loop alone.
"""

import contextlib
import gc
import logging
import math
import os
import sys
import time
import types
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mingpt.checkpoint import trainer_state, write_checkpoint
from mingpt.config import DTYPES, check_trainer_config
from mingpt.distributed import dist_env, process_group, set_grad_sync, wrap_model
from mingpt.errors import ConfigError
from mingpt.hardware import default_num_workers, fast_dtype, training_device
from mingpt.metrics import MetricsLog, Progress, count_targets, dataset_loss, loss_only, plot_metrics
from mingpt.resume import apply_resume_state, diverged, gather_rng_states, read_resume_state
from mingpt.schedule import draw_data_seed, eval_batches, get_lr, get_muon_momentum, train_loader
from mingpt.utils import CfgNode as CN

logger = logging.getLogger(__name__)

clock = time.monotonic  # what checkpoint_minutes are measured by (a test may put a fake clock here)

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
        # 'adamw', or 'muon': the blocks' weight matrices take Muon (mingpt.muon) at muon_lr, with
        # Nesterov momentum muon_momentum and decoupled muon_weight_decay; the rest AdamW as above.
        # The schedule scales both learning rates alike
        C.optimizer = 'adamw'
        C.muon_lr = 0.02
        C.muon_momentum = 0.95
        C.muon_momentum_warmup = 0  # iterations over which the momentum rises from 0.85 to muon_momentum
        C.muon_weight_decay = 0.0
        # the AdamW lr of the embedding tables (not a wte tied to lm_head); None: learning_rate
        C.embedding_lr = None
        # learning-rate schedule: None keeps learning_rate constant (after warmup_iters, if any);
        # 'cosine' decays it to min_lr (None: learning_rate / 10) at lr_decay_iters (None: max_iters);
        # 'wsd' keeps it constant, then decays it in a straight line over the last cooldown_frac of them
        C.lr_schedule = None
        C.cooldown_frac = 0.4
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
        # recompute each block's activations in the backward pass instead of keeping them: activation
        # memory of one block instead of all, for about one more forward pass of compute
        C.activation_checkpointing = False
        # with several processes (torchrun): 'ddp' keeps a whole replica of the model in each;
        # 'fsdp' shards parameters, gradients and AdamW's state over them (FSDP2, for models whose
        # replica does not fit), and its checkpoints, which resume on any number of processes
        C.parallel = 'ddp'
        # evaluation on val_dataset (when one is given): every eval_interval iterations and at the
        # end, eval_iters batches (the same batches every time, so evaluations compare)
        C.eval_interval = 500
        C.eval_iters = 20
        # checkpoints: None writes nothing; else work_dir/ckpt every checkpoint_interval iterations,
        # also once checkpoint_minutes have passed since the last one (so that a kill loses minutes,
        # not hours; None or 0: only by iterations), and at the end; work_dir/ckpt_best (weights
        # only) on a new best val loss; work_dir/metrics.jsonl
        C.work_dir = None
        C.checkpoint_interval = 500
        C.checkpoint_minutes = 5.0
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
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.callbacks = defaultdict(list)

        # torchrun tells each process who it is; only rank 0 logs and writes files
        self.rank, self.local_rank, self.world_size = dist_env()
        self.is_master = self.rank == 0
        self._fsdp = config.parallel == 'fsdp' and self.world_size > 1

        # the device we'll train on: one GPU per process under torchrun
        self.device = training_device(config.device, self.local_rank, self.world_size)
        self.device_type = torch.device(self.device).type
        if config.dtype == 'auto':
            config.dtype = fast_dtype(self.device_type)
        check_trainer_config(config, self.device_type, lora=getattr(model, 'lora_config', None) is not None,
                             fsdp=self._fsdp)
        if hasattr(train_dataset, '__len__') and len(train_dataset) == 0:
            raise ConfigError("the training dataset is empty: there is nothing to draw batches from; give it "
                              "at least one example (more text, or a smaller block_size)")
        # a run that cannot resume stops here, before anything is written to work_dir (by the
        # Trainer or, if it makes the Trainer first, by the script); run() loads what was read
        self._resume = read_resume_state(config, model, (train_dataset, val_dataset)) if self.is_master else None
        if not self._fsdp:  # fully_shard moves only this rank's slices to the device
            self.model = self.model.to(self.device)
        if self.is_master:
            logger.info("running on device %s%s, %s", self.device,
                        f" (rank 0 of {self.world_size})" if self.world_size > 1 else "", config.dtype)

        # what run() sets up: the optimizer (and for float16 the loss scaler that keeps small
        # gradients alive), the model the step calls (maybe inside DDP or sharded, maybe compiled)
        self.optimizer = None
        self.scaler = None
        self._base_lrs = []  # each param group's own lr, which the schedule scales
        self._wrapped_model = None
        self._train_model = None
        self.data_seed = None  # the seed of the data order, None for minGPT's RandomSampler

        # progress, read by callbacks
        self.iter_num = 0
        self.iter_time = 0.0
        self.iter_dt = 0.0
        self.loss = None
        self.lr = config.learning_rate
        self.tokens_per_sec = 0.0
        self.val_loss = None
        self.best_val_loss = float('inf')
        self.metrics = MetricsLog()  # the history for plot(), and work_dir/metrics.jsonl
        self._stop_requested = False
        self._last_checkpoint = None  # when work_dir/ckpt was last written, by clock()

    @property
    def history(self):
        """ iter/loss/lr of every step and val_iter/val_loss of every evaluation so far, for plot() """
        return self.metrics.history

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
        try:
            with process_group(self.device_type, self.world_size):
                try:
                    self._run()
                finally:
                    # DDP's reducer holds the process group: let it go while the group lives, so that
                    # destroying the group (which releases the GIL) is what joins gloo's threads, not the
                    # reducer's deallocation at exit, which holds the GIL while a gloo thread may be
                    # waiting for it to free its last work (a hang at exit)
                    self._wrapped_model = None
                    if self.world_size > 1:
                        gc.collect()
        finally:
            self.metrics.close()

    def _run(self):
        model, config = self.model, self.config
        # spread over the processes first: under FSDP the optimizer holds the sharded parameters
        train_model = self._wrapped_model = wrap_model(model, config.parallel, self.device_type,
                                                       self.local_rank, self.world_size)
        self.optimizer = model.configure_optimizers(config)
        self._loss_only = loss_only(model)
        self._base_lrs = [g['lr'] for g in self.optimizer.param_groups]
        if config.dtype == 'float16':
            self.scaler = torch.amp.GradScaler('cuda')
        if config.compile:
            train_model = torch.compile(train_model, backend=config.compile_backend)
        self._train_model = train_model

        # fresh start or resume; a replayable data order whenever checkpoints or processes are on
        self.iter_num = 0
        self.best_val_loss = float('inf')
        seeded = config.data_seed is not None or config.work_dir is not None or self.world_size > 1
        self.data_seed = None
        resume, self._resume = self._resume, None  # not kept: a second copy of the weights
        if resume is None and self.is_master:  # a fresh start, or a second run(): look again
            resume = read_resume_state(config, model, (self.train_dataset, self.val_dataset))
        state = apply_resume_state(resume, model, self.optimizer, self.scaler, config, self.rank, self.world_size)
        if state is not None:
            self.iter_num, self.best_val_loss = state['iter_num'], state['best_val_loss']
            self.data_seed = state['data_seed']
        elif seeded:
            self.data_seed = config.data_seed
            if self.data_seed is None:
                self.data_seed = draw_data_seed(self.world_size)
        self.metrics.open(config.work_dir if self.is_master else None,
                          resume_iter=self.iter_num if state is not None else None)
        if state is None and config.work_dir is not None and self.is_master:
            kept = self.metrics.kept_as  # a run that was stopped before its first checkpoint
            (logger.warning if kept else logger.info)(
                "no checkpoint in %s: starting afresh at iteration 0%s", os.path.join(config.work_dir, 'ckpt'),
                f"; the metrics an earlier run logged are kept in {kept}" if kept else "")

        num_workers = default_num_workers() if config.num_workers is None else config.num_workers
        loader = train_loader(self.train_dataset, config.batch_size, config.grad_accum_steps, self.data_seed,
                              start_iter=self.iter_num, rank=self.rank, world_size=self.world_size,
                              num_workers=num_workers, pin_memory=self.device_type == 'cuda')

        show_bar = config.progress_bar if config.progress_bar is not None else sys.stderr.isatty()
        with Progress(config.max_iters, self.iter_num, bar=bool(show_bar), log_interval=config.log_interval,
                      enabled=self.is_master) as progress, checkpointed_blocks(model, config.activation_checkpointing):
            self._loop(loader, progress)

    def _loop(self, train_loader, progress):
        model, config = self.model, self.config
        model.train()
        self.iter_time = time.time()
        self._last_checkpoint = clock()
        data_iter = iter(train_loader)
        self._stop_requested = False
        while not self._stop_requested and (config.max_iters is None or self.iter_num < config.max_iters):
            t0 = time.time()

            # the next grad_accum_steps batches (x, y): both samplers draw with replacement, forever
            batches = [[t.to(self.device, non_blocking=True) for t in next(data_iter)]
                       for _ in range(config.grad_accum_steps)]

            self._set_lr()
            self.loss = self._step(batches)

            self.trigger_callbacks('on_batch_end')
            self.iter_num += 1
            tnow = time.time()
            self.iter_dt = tnow - self.iter_time
            self.iter_time = tnow
            self.tokens_per_sec = sum(b[0].numel() for b in batches) * self.world_size / max(tnow - t0, 1e-9)
            self._record(progress)

            last = self._stop_requested or (config.max_iters is not None and self.iter_num >= config.max_iters)
            if self.val_dataset is not None and (self.iter_num % config.eval_interval == 0 or last):
                self._eval_and_keep_best()
            last = last or self._stop_requested  # an 'on_eval_end' callback may have stopped the run
            overdue = config.work_dir is not None and self._checkpoint_overdue()  # asked every iteration, on every rank
            if config.work_dir is not None and (self.iter_num % config.checkpoint_interval == 0 or last or overdue):
                self.save_checkpoint()

    def _checkpoint_overdue(self):
        """ whether checkpoint_minutes have passed since the last checkpoint, by rank 0's clock: every rank
        must take the same decision (saving is collective), and their clocks differ a little """
        minutes = self.config.checkpoint_minutes
        if not minutes:
            return False
        overdue = clock() - self._last_checkpoint >= 60 * minutes
        if self.world_size > 1:
            flag = torch.tensor([overdue], dtype=torch.int32, device=self.device)
            dist.broadcast(flag, src=0)
            overdue = bool(flag.item())
        return overdue

    def _set_lr(self):
        """ the schedule sets every group's lr, scaled like the group's own base lr, and Muon's momentum """
        config = self.config
        self.lr = get_lr(self.iter_num, config)
        scheduled = config.lr_schedule is not None or config.warmup_iters > 0  # else minGPT's constant rate, as made
        momentum = get_muon_momentum(self.iter_num, config)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            if scheduled:
                group['lr'] = base * self.lr / config.learning_rate
            if group.get('muon'):
                group['momentum'] = momentum

    def _step(self, batches):
        """
        One optimizer step over the micro-batches of this process; returns the global-batch loss.

        The loss of the global batch is the mean over every counted target in it, so micro-batch
        m on rank r is weighted by its share of those targets, n_rm / N (times W, because DDP and
        FSDP average the gradients of the W ranks). With equal counts that is 1/grad_accum_steps; with
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
            set_grad_sync(self._wrapped_model, m == A - 1)  # gradients travel once, after the last
            with self._autocast_ctx():
                _, loss = self._train_model(x, y, **self._loss_only)
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
        if not math.isfinite(loss_sum.item()):
            raise diverged(loss_sum.item(), self.iter_num, config.work_dir)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if config.grad_norm_clip:
            # FSDP's gradients are DTensor shards: the norm is the whole gradient's, summed over ranks
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_norm_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss_sum

    def _autocast_ctx(self):
        if self.config.dtype == 'float32':
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.config.dtype])

    # -------------------------------------------------------------------------
    # evaluation

    def evaluate(self, dataset=None):
        """ mean loss per counted target on dataset (default: val_dataset), over eval_iters batches """
        dataset = self.val_dataset if dataset is None else dataset
        batches = eval_batches(len(dataset), self.config.batch_size * self.world_size, self.config.eval_iters)
        return dataset_loss(self.model, dataset, batches, self.device, self._autocast_ctx, self.rank,
                            self.world_size, every_rank=self._fsdp)

    def _eval_and_keep_best(self):
        self.val_loss = self.evaluate()
        improved = self.val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = self.val_loss
        if self.is_master:
            logger.info("iter %d: val loss %.4f (best %.4f)", self.iter_num, self.val_loss, self.best_val_loss)
            self.metrics.log({'iter': self.iter_num, 'val_loss': self.val_loss, 'time': round(time.time(), 3)})
        self.trigger_callbacks('on_eval_end')
        if improved and self.config.work_dir is not None:
            self.save_checkpoint('ckpt_best', weights_only=True)  # for using the model, not for resuming

    # -------------------------------------------------------------------------
    # observability: the metrics log, log lines, the progress bar, the plot

    def _record(self, progress):
        if self.is_master:
            loss = self.loss.item()
            self.metrics.log({'iter': self.iter_num, 'loss': loss, 'lr': self.lr,
                              'tokens_per_sec': round(self.tokens_per_sec, 1), 'time': round(time.time(), 3)})
            progress.update(self.iter_num, loss, self.lr, self.tokens_per_sec)

    def plot(self, path):
        """ a PNG of the loss curves so far at path, returned; None without matplotlib (a warning says so)
        and on ranks other than 0, which write no files (and keep no history) """
        return plot_metrics(self.history, path) if self.is_master else None

    # -------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, name='ckpt', weights_only=False):
        """ write work_dir/name (on every rank: rank 0 writes, and under parallel='fsdp' each rank its shards);
        weights_only: no optimizer, scaler or RNG state, not resumable """
        if self.config.work_dir is None:
            raise ConfigError("save_checkpoint needs config.work_dir: set it to the run's directory")
        optimizer, scaler, rng = (None, None, None) if weights_only else (
            self.optimizer, self.scaler, gather_rng_states(self.world_size))  # every rank's RNG state
        sharded = optimizer is not None and self.config.parallel == 'fsdp'
        state = trainer_state(self.iter_num, None if sharded else optimizer, scaler, rng, self.data_seed,
                              self.config.batch_size * self.config.grad_accum_steps * self.world_size,
                              self.best_val_loss, (self.train_dataset, self.val_dataset))
        directory = os.path.join(self.config.work_dir, name)
        write_checkpoint(directory, self.model, state, trainer_config=self.config,
                         optimizer=optimizer if sharded else None, rank=self.rank)
        if name == 'ckpt':
            self._last_checkpoint = clock()
        if self.is_master:
            logger.info("iter %d: saved checkpoint %s", self.iter_num, directory)
            self.trigger_callbacks('on_checkpoint')

# -----------------------------------------------------------------------------
# activation checkpointing

@contextlib.contextmanager
def checkpointed_blocks(model, enabled=True):
    """
    Within: every block of model (each module of an nn.ModuleList, the layers of a transformer) keeps only
    its input for the backward pass, which recomputes the block's activations from it. Gradients are
    the same: the recomputation replays the RNG state, so dropout draws the same masks.
    """
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m] if enabled else []
    for block in blocks:  # an instance attribute, not a wrapper module: parameter names stay the same
        block.forward = types.MethodType(_checkpointed_forward, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _checkpointed_forward(block, *args, **kwargs):
    forward = type(block).forward
    if not torch.is_grad_enabled():  # evaluation, generation: nothing to keep anyway
        return forward(block, *args, **kwargs)
    # the non-reentrant variant: keyword arguments, DDP and torch.compile work with it
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
