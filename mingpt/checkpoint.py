"""
Trainer checkpoints: a directory holding model.safetensors (the weights) and trainer.pt (optimizer,
loss scaler, RNG states, progress: plain tensors and containers, so it loads with
torch.load(weights_only=True)), plus config.json (the trainer's and the model's config, for people).
A checkpoint to use rather than to resume (the Trainer's ckpt_best) keeps the weights and the
progress only: no optimizer state, which for AdamW is twice the size of the weights.

The files of one save are one unit: each carries the same save id (random, plus the iteration) in
its own place (model.safetensors' metadata, trainer.pt, config.json, the sharded state), so that a
file copied in from another save or another run is an error when the checkpoint is read, not a
resume that silently mixes two runs. A checkpoint written before save ids existed has none: it is
read with a warning that its files cannot be checked.

A sharded checkpoint (FSDP's, parallel='fsdp') also holds sharded/: the model's and the optimizer's
state written by torch.distributed.checkpoint, each process its own slices, which any number of
processes reads back (each takes the slices it needs). trainer.pt then holds no optimizer; the
weights are gathered into model.safetensors too, so that every checkpoint is also a model that
GPT.from_pretrained loads, whichever way it was trained.

- trainer_state: what trainer.pt holds.
- write_checkpoint / find_checkpoint / read_checkpoint: one checkpoint directory, replaced atomically.
- rng_state / set_rng_state / gather_rng_states: every RNG a training step may touch.
- new_save_id / check_one_save: the save id, and the check that a directory's files share it.
- read_resume_state / apply_resume_state: the checks that a checkpoint may continue this run, and
  putting it back on every rank. diverged: the error that points a diverged run to its last checkpoint.
- unwrap / clean_state_dict / full_state_dict: the plain model inside torch.compile's and DDP's
  wrappers; the whole of an FSDP model's weights.

Nothing here is specific to GPT: the model is any nn.Module, the optimizer any torch optimizer.
"""

import contextlib
import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

from mingpt.distributed import barrier, is_sharded
from mingpt.errors import CheckpointError
from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
SHARDED = 'sharded'  # the subdirectory of a checkpoint that torch.distributed.checkpoint writes

# -----------------------------------------------------------------------------
# the plain model inside the wrappers

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


def full_state_dict(model):
    """
    The model's whole state dict, without wrapper prefixes. An FSDP model's is gathered from every
    process's shards, one tensor at a time into CPU memory: collective (every process calls it),
    and only rank 0 gets the tensors (the others an empty dict).
    """
    if not is_sharded(unwrap(model)):
        return clean_state_dict(unwrap(model).state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    model = unwrap(model)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # the gather copies each name on its own: tied parameters (lm_head = wte) share one tensor again
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name and name in sd:
            sd[name] = sd[first[id(p)]]
    return sd

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
# one checkpoint directory

def trainer_state(iter_num, optimizer, scaler, rng, data_seed, global_batch, best_val_loss, datasets=()):
    """
    what trainer.pt holds (apply_resume_state reads it back): plain tensors and containers.
    optimizer (and scaler, rng) None: a checkpoint of the weights only, which cannot be resumed.
    datasets: the train and val datasets; those with a state_dict() (token shards: which shards, cut
    how) have it recorded, so that a resumed run's data order indexes the same windows
    """
    return {
        'version': CHECKPOINT_VERSION,
        'iter_num': iter_num,
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'rng': rng,  # gather_rng_states(): one per rank
        'data_seed': data_seed,
        'global_batch': global_batch,  # rows per iteration, over every micro-step and rank
        'best_val_loss': best_val_loss,
        'datasets': [d.state_dict() if hasattr(d, 'state_dict') else None for d in datasets],
    }


def new_save_id(iter_num, every_rank=False):
    """
    The id every file of one save carries: random (two runs never share one) plus the iteration (for
    people reading an error). every_rank: every process of the run is saving (a sharded checkpoint,
    whose state each of them writes): rank 0 draws the id and every process gets it.
    """
    box = [f"{secrets.token_hex(8)}-{iter_num}"]
    if every_rank and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def write_checkpoint(directory, model, state, trainer_config=None, optimizer=None, rank=0):
    """
    Write model weights + trainer state to `directory`, with config.json (the trainer's config and
    the model's, where the model has a CfgNode .config) for people to read. Atomically:
    everything goes to directory.tmp first, and only a complete checkpoint is renamed into place.
    The previous one is moved to directory.old for the instant between the two renames, and
    find_checkpoint falls back to it, so a kill at any moment leaves one complete checkpoint on disk.

    optimizer given: a sharded checkpoint, the model's and the optimizer's state written by every
    process into directory/sharded (state then holds no optimizer). Every process of the run calls
    it then, and for an FSDP model (whose weights are gathered) in any case; rank 0 writes the rest.
    """
    directory = os.fspath(directory)
    tmp, old = directory + '.tmp', directory + '.old'
    every_rank = optimizer is not None or is_sharded(unwrap(model))
    state = {**state, 'save_id': new_save_id(state['iter_num'], every_rank)}
    sd = full_state_dict(model)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from an earlier crash
        os.makedirs(tmp)
    if optimizer is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        barrier()  # tmp exists before any process writes into it
        model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)  # this process's slices, keyed by name
        with _alone_is_fine():
            dcp.save({'model': model_sd, 'optimizer': optim_sd, 'save_id': state['save_id']},
                     checkpoint_id=os.path.join(tmp, SHARDED))
    if rank == 0:
        _write_files(tmp, sd, model, state, trainer_config)
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
    if optimizer is not None:
        barrier()  # when it returns, the checkpoint is complete for every process


def _write_files(tmp, sd, model, state, trainer_config):
    """ model.safetensors, trainer.pt and config.json into the directory tmp """
    from safetensors.torch import save_file
    # safetensors refuses tensors that share memory (tied wte / lm_head): store one, alias the rest
    tensors, aliases, seen = {}, {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if v.numel() > 0 and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().to('cpu').contiguous()
    metadata = {'iter_num': str(state['iter_num']), 'save_id': state['save_id'], 'aliases': json.dumps(aliases)}
    model_config = getattr(unwrap(model), 'config', None)
    info = {'save_id': state['save_id'],
            'trainer': trainer_config.to_dict() if trainer_config is not None else None,
            'model': model_config.to_dict() if hasattr(model_config, 'to_dict') else None}
    atomic_write(os.path.join(tmp, 'model.safetensors'), lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(os.path.join(tmp, 'trainer.pt'), lambda p: torch.save(state, p))
    atomic_write(os.path.join(tmp, 'config.json'), json.dumps(info, indent=2, default=str))


def find_checkpoint(directory):
    """ the complete checkpoint at directory (or its .old twin after an ill-timed kill), or None """
    directory = os.fspath(directory)
    for d in (directory, directory + '.old'):
        if os.path.isdir(d):
            return d
    return None


def read_checkpoint(directory):
    """ (model state_dict, trainer state) from a write_checkpoint directory; CheckpointError if bad """
    from safetensors import safe_open
    model_path = _needed(directory, 'model.safetensors')
    state = _read_state(directory)
    try:
        with safe_open(model_path, framework='pt') as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {model_path} ({type(e).__name__}: {e}); the file is "
                              "corrupt or not a safetensors file: delete the checkpoint directory "
                              "to start afresh") from e
    check_one_save(directory, state, metadata)
    for alias, target in json.loads(metadata.get('aliases', '{}')).items():
        sd[alias] = sd[target]
    return sd, state


def check_one_save(directory, state=None, metadata=None, sharded_id=None):
    """
    CheckpointError, naming both files, unless every file of the checkpoint in directory comes from
    the same save: trainer.pt's save id against model.safetensors', config.json's and the sharded
    state's. state, metadata (model.safetensors') and sharded_id: what the caller has read already
    (None: read here; trainer.pt memory-mapped, so its optimizer state is not read in). A checkpoint
    without save ids (written before they existed) passes with a warning, its iterations compared.
    """
    directory = os.fspath(directory)
    if state is None:
        state = _read_state(directory, mmap=True)
    if metadata is None:
        metadata = _safetensors_metadata(_needed(directory, 'model.safetensors'))
    ids = {'model.safetensors': metadata.get('save_id'), 'trainer.pt': state.get('save_id')}
    config_path = os.path.join(directory, 'config.json')
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding='utf-8') as f:
                ids['config.json'] = json.load(f).get('save_id')
        except (OSError, ValueError, AttributeError):
            pass  # config.json is for people; a broken one does not stop a resume
    if sharded_id is not None or os.path.isdir(os.path.join(directory, SHARDED)):
        ids[SHARDED + '/'] = sharded_id if sharded_id is not None else _sharded_save_id(
            os.path.join(directory, SHARDED))
    if not any(ids.values()):  # written before save ids: the iterations are all there is to compare
        logger.warning("%s has no save ids (it was written by an older mingpt): its files cannot be "
                       "checked to come from one save", directory)
        if metadata.get('iter_num') != str(state['iter_num']):
            raise CheckpointError(f"checkpoint {directory} mixes files of two saves: model.safetensors "
                                  f"is of iteration {metadata.get('iter_num')}, trainer.pt of iteration "
                                  f"{state['iter_num']}; delete it to start afresh")
        return
    def which(save_id):
        return f"save {save_id}" if save_id else "no save (it has no save id)"
    for name, save_id in ids.items():
        if name != 'trainer.pt' and save_id != ids['trainer.pt'] and not (name == 'config.json' and save_id is None):
            raise CheckpointError(
                f"checkpoint {directory} mixes files of two saves: {name} is from {which(save_id)} and "
                f"trainer.pt from {which(ids['trainer.pt'])} (a save id is <random>-<iteration>): a "
                "file was copied in from another checkpoint or run. Put back the files of one save, or "
                "delete the directory to start afresh")


def _safetensors_metadata(path):
    """ the metadata of a safetensors file, without reading its tensors """
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt') as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the file is corrupt "
                              "or not a safetensors file: delete the checkpoint directory to start afresh") from e


def _needed(directory, name):
    """ directory/name, a CheckpointError if it is not there """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing; delete the "
                              "directory (or set resume=False and use another work_dir) to start afresh")
    return path


def _read_state(directory, mmap=False):
    """ the trainer state of directory/trainer.pt, refusing anything but plain tensors and containers;
    mmap: its tensors mapped from the file, read only when used """
    state_path = _needed(directory, 'trainer.pt')
    try:
        state = torch.load(state_path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's own message suggests loading with weights_only=False, which would run that code
        refused = re.search(r'GLOBAL (\S+)', str(e))
        if refused:
            raise CheckpointError(f"refused to load {state_path}: it holds a Python object "
                                  f"({refused.group(1)}), i.e. code that could run on load, where a "
                                  "mingpt checkpoint holds only tensors and plain values; delete the "
                                  "checkpoint directory to start afresh") from None
        raise CheckpointError(f"cannot read {state_path}: it is corrupt or not a trainer state "
                              "file; delete the checkpoint directory to start afresh") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {state_path} ({type(e).__name__}: {e}); the file is "
                              "corrupt: delete the checkpoint directory to start afresh") from e
    if not isinstance(state, dict) or state.get('version') != CHECKPOINT_VERSION:
        raise CheckpointError(f"{state_path} is not a mingpt trainer checkpoint of version "
                              f"{CHECKPOINT_VERSION}")
    return state


def _sharded_shapes(path):
    """ the model's tensors in the sharded checkpoint at path, empty ones on the meta device: their shapes """
    from torch.distributed.checkpoint import FileSystemReader
    try:
        tensors = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"cannot read the sharded checkpoint in {path} ({type(e).__name__}: "
                              f"{e}): delete the checkpoint directory to start afresh") from e
    return {k.split('.', 1)[1]: torch.empty(m.size, dtype=m.properties.dtype, device='meta')
            for k, m in tensors.items() if k.startswith('model.') and hasattr(m, 'size')}


def _sharded_save_id(path):
    """ the save id stored in the sharded checkpoint at path (None if it has none) """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    try:
        if 'save_id' not in FileSystemReader(path).read_metadata().state_dict_metadata:
            return None
        box = {'save_id': ''}
        with _alone_is_fine():
            dcp.load(box, checkpoint_id=path, no_dist=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the sharded checkpoint in {path} ({type(e).__name__}: "
                              f"{e}): delete the checkpoint directory to start afresh") from e
    return box['save_id']


@contextlib.contextmanager
def _alone_is_fine():
    """ torch.distributed.checkpoint warns when one process without a process group saves or loads: meant here """
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')
        yield


def _load_sharded(path, model, optimizer):
    """
    Load the sharded checkpoint at path into model and optimizer, whatever number of processes
    wrote it: each process reads the slices its own (sharded or whole) tensors need.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model = unwrap(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # what to fill: this process's tensors, by name
    both = {'model': model_sd, 'optimizer': optim_sd}
    try:
        with _alone_is_fine():
            dcp.load(both, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=both['model'], optim_state_dict=both['optimizer'])
    except (ValueError, KeyError, RuntimeError, CheckpointException) as e:
        raise CheckpointError(f"the sharded checkpoint in {path} does not fit this model and "
                              f"optimizer: {e}") from e


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
        model_sd, state = _sharded_shapes(shards), _read_state(found)
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
        _load_sharded(state['shards'], model, optimizer)
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
