"""
Resuming a run: work_dir/ckpt (mingpt.checkpoint's directory) continues a run only if it fits the
model and config of this one, and then every RNG, the weights, the optimizer and the progress come
back as they were, so that the resumed run goes on bit for bit.

- rng_state / set_rng_state / gather_rng_states: every RNG a training step may touch.
- read_resume_state / check_fits: the checks that a checkpoint may continue this run.
- apply_resume_state: putting it back on every rank.
- diverged: the error that points a diverged run to its last good checkpoint.
"""

import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from mingpt.checkpoint import (SHARDED, check_one_save, clean_state_dict, find_checkpoint, load_sharded,
                               read_checkpoint, read_state, sharded_shapes, unwrap)
from mingpt.distributed import is_sharded
from mingpt.errors import CheckpointError

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# RNG state: what a resumed run needs to replay dropout and anything else drawn at random

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
    """ put back what rng_state() captured """
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states(world_size=1):
    """ [rng_state() of rank 0, of rank 1, ...]: dropout streams differ per rank, so each is kept """
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states

# -----------------------------------------------------------------------------
# resuming: work_dir/ckpt continues a run only if it fits the model and config of this one.
# Rank 0 reads and checks it as the Trainer is made, before anything is written to work_dir; run()
# hands it to the other ranks (so only rank 0's node needs work_dir) and puts it back. A sharded
# checkpoint is read by every rank itself: all of them need work_dir then (a shared filesystem).

def read_resume_state(config, model, datasets=()):
    """
    (model state_dict, trainer state) of config.work_dir/ckpt to resume from, checked against model,
    config and datasets (those with a load_state_dict check the state they had), or None for a fresh
    start. config.resume says which of the two is expected (False: a checkpoint there is an error;
    True: a missing one is; 'auto': either). For a sharded checkpoint the state dict is None and
    state['shards'] names the directory every rank loads.
    """
    work_dir = config.work_dir
    if work_dir is None:
        return None
    found = find_checkpoint(os.path.join(work_dir, 'ckpt'))
    if found is not None and config.resume is False:
        raise CheckpointError(f"{work_dir} already holds a checkpoint ({found}); set "
                              "resume=True to continue it, or use another work_dir (or "
                              "delete it) to start a new run: it is never overwritten")
    if found is None and config.resume is True:
        raise CheckpointError(f"resume=True but there is no checkpoint in {work_dir} "
                              "(expected a 'ckpt' directory); check work_dir, or use "
                              "resume='auto' to start afresh when there is none")
    if found is None:
        return None
    shards = os.path.join(found, SHARDED)
    sharded = os.path.isdir(shards)
    if sharded:  # only the shapes now: every rank reads its own slices in run()
        model_sd, state = sharded_shapes(shards), read_state(found)
        check_one_save(found, state)
    else:
        model_sd, state = read_checkpoint(found)
    if state['optimizer'] is None and not sharded:
        raise CheckpointError(f"{found} holds the weights only (like ckpt_best: a checkpoint to use the "
                              "model, e.g. with GPT.from_pretrained), not the optimizer state a run "
                              "continues from; resume from a full checkpoint, or use another work_dir")
    check_fits(model_sd, model, found)
    if (state['scaler'] is None) != (config.dtype != 'float16'):
        raise CheckpointError(f"the checkpoint in {found} was written with "
                              f"{'' if state['scaler'] is not None else 'no '}float16 loss scaling, "
                              f"this run has dtype={config.dtype!r}; resume with the same dtype")
    if config.data_seed is not None and state['data_seed'] != config.data_seed:
        raise CheckpointError(f"the checkpoint in {found} used data_seed={state['data_seed']}, "
                              f"this run asks for {config.data_seed}; set data_seed=None (or the "
                              "checkpoint's value) to continue the same data order")
    for saved, dataset in zip(state.get('datasets', ()), datasets):
        if saved is not None and hasattr(dataset, 'load_state_dict'):
            dataset.load_state_dict(saved)  # a DataError if it is not the data the run trained on
    logger.info("resuming from %s at iteration %d", found, state['iter_num'])
    if sharded:
        return None, {**state, 'shards': shards}
    return model_sd, state


def check_fits(model_sd, model, where):
    """ CheckpointError naming (a few of) the tensors of model_sd that model has not, or not in that shape """
    own = clean_state_dict(unwrap(model).state_dict())
    problems = [f"{k}: {tuple(model_sd[k].shape)} in the checkpoint, {tuple(v.shape)} in this model"
                for k, v in own.items() if k in model_sd and model_sd[k].shape != v.shape]
    problems += [f"{k}: not in the checkpoint" for k in own if k not in model_sd]
    problems += [f"{k}: not in this model" for k in model_sd if k not in own]
    if problems:
        more = f"; and {len(problems) - 3} more tensors" if len(problems) > 3 else ""
        raise CheckpointError(f"the checkpoint in {where} was written by a model of another size "
                              f"({'; '.join(problems[:3])}{more}): build the model with the sizes in "
                              f"{os.path.join(where, 'config.json')}, or use another work_dir")


def apply_resume_state(resume, model, optimizer, scaler, config, rank=0, world_size=1):
    """
    Load a checkpoint that read_resume_state checked (on rank 0; the other ranks pass None) into
    this run: the weights, the optimizer and scaler state and, last, this rank's RNG state. Every
    rank calls it; a sharded checkpoint is read by all of them together. config is the trainer's
    (work_dir, batch_size, grad_accum_steps). Returns the trainer state, from which the caller takes
    the progress (iter_num, best_val_loss, data_seed), or None for a fresh start.
    """
    if world_size > 1:  # rank 0's reading, on every rank
        box = [resume]
        dist.broadcast_object_list(box, src=0)
        resume = box[0]
    if resume is None:
        return None
    model_sd, state = resume
    where = os.path.join(config.work_dir, 'ckpt')
    if state.get('shards'):
        load_sharded(state['shards'], model, optimizer)
    elif is_sharded(unwrap(model)):
        raise CheckpointError(f"the checkpoint in {where} holds whole weights (it was written without "
                              "parallel='fsdp'), which this FSDP run cannot split: continue it with "
                              "parallel='ddp', or in one process, whose checkpoints under "
                              "parallel='fsdp' are sharded")
    else:
        try:
            unwrap(model).load_state_dict(model_sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint in {where} does not fit this model: {e}") from e
        try:
            optimizer.load_state_dict(state['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the optimizer state in {where} does not fit this model's "
                                  f"optimizer: {e}") from e
    if scaler is not None:
        scaler.load_state_dict(state['scaler'])
    global_batch = config.batch_size * config.grad_accum_steps * world_size
    if state['global_batch'] != global_batch and rank == 0:
        logger.warning("the checkpoint trained on global batches of %d rows, this run uses %d: the "
                       "data order will not continue the original sequence", state['global_batch'],
                       global_batch)
    rng = state['rng']
    if len(rng) != world_size and rank == 0:
        logger.warning("the checkpoint holds RNG states of %d processes, this run has %d: dropout "
                       "will not replay the original run", len(rng), world_size)
    # last, so that nothing in the setup above can consume the restored streams
    set_rng_state(rng[rank % len(rng)])
    return state


def diverged(loss, iter_num, work_dir=None):
    """ the FloatingPointError for a loss that is not finite, naming the last good checkpoint in work_dir """
    found = find_checkpoint(os.path.join(work_dir, 'ckpt')) if work_dir else None
    where = (f"; the last good checkpoint is in {found} (resume=True continues from it)" if found
             else "; no checkpoint had been written yet" if work_dir else "")
    return FloatingPointError(f"loss is {loss} at iteration {iter_num}: training diverged and was "
                              f"stopped before the optimizer step{where}. Try a lower learning_rate, "
                              "more warmup_iters, a grad_norm_clip, or dtype='float32', and check the "
                              "data for bad values.")
