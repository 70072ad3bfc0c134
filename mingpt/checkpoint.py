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
- new_save_id / check_one_save: the save id, and the check that a directory's files share it.
- read_state / sharded_shapes / load_sharded: the parts of a checkpoint that resuming reads on its own.
- unwrap / clean_state_dict / full_state_dict: the plain model inside torch.compile's and DDP's
  wrappers; the whole of an FSDP model's weights.

Whether a checkpoint may continue a run, and putting it back, is mingpt.resume's part. Nothing here
is specific to GPT: the model is any nn.Module, the optimizer any torch optimizer.
"""

import contextlib
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import warnings

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
    state = read_state(directory)
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


def check_one_save(directory, state=None, metadata=None):
    """
    CheckpointError, naming both files, unless every file of the checkpoint in directory comes from
    the same save: trainer.pt's save id against model.safetensors', config.json's and the sharded
    state's. state and metadata (model.safetensors'): what the caller has read already (None: read
    here; trainer.pt memory-mapped, so its optimizer state is not read in). A checkpoint without save
    ids (written before they existed) passes with a warning, its iterations compared.
    """
    directory = os.fspath(directory)
    if state is None:
        state = read_state(directory, mmap=True, any_version=True)
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
    if os.path.isdir(os.path.join(directory, SHARDED)):
        ids[SHARDED + '/'] = _sharded_save_id(os.path.join(directory, SHARDED))

    if not any(ids.values()):  # written before save ids: the iterations are all there is to compare
        logger.warning("%s has no save ids (it was written by an older mingpt): its files cannot be "
                       "checked to come from one save", directory)
        if metadata.get('iter_num') != str(state.get('iter_num')):
            raise CheckpointError(f"checkpoint {directory} mixes files of two saves: model.safetensors "
                                  f"is of iteration {metadata.get('iter_num')}, trainer.pt of iteration "
                                  f"{state.get('iter_num')}; delete it to start afresh")
        return
    expected = ids['trainer.pt']
    for name, save_id in ids.items():
        if save_id != expected and not (name == 'config.json' and save_id is None):
            raise CheckpointError(
                f"checkpoint {directory} mixes files of two saves: {name} is from {_which_save(save_id)} "
                f"and trainer.pt from {_which_save(expected)} (a save id is <random>-<iteration>): a "
                "file was copied in from another checkpoint or run. Put back the files of one save, or "
                "delete the directory to start afresh")


def _which_save(save_id):
    return f"save {save_id}" if save_id else "no save (it has no save id)"


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


def read_state(directory, mmap=False, any_version=False):
    """ the trainer state of directory/trainer.pt, refusing anything but plain tensors and containers;
    mmap: its tensors mapped from the file, read only when used; any_version: for its save id alone,
    which every version of the state keeps in the same place """
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
    if not isinstance(state, dict) or (state.get('version') != CHECKPOINT_VERSION and not any_version):
        raise CheckpointError(f"{state_path} is not a mingpt trainer checkpoint of version "
                              f"{CHECKPOINT_VERSION}")
    return state


def sharded_shapes(path):
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


def load_sharded(path, model, optimizer):
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
