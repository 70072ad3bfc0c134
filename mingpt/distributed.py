"""
Spreading one training run over several processes: torchrun starts the same script once per GPU
(or per CPU socket) and tells each process who it is through its environment.

- dist_env / is_rank0: this process's rank, local rank and the number of processes.
- process_group: the default process group for a block of code (nccl on CUDA, gloo otherwise).
- wrap_model: how the processes share the model. 'ddp' keeps a whole replica in each and averages
  the gradients; 'fsdp' (PyTorch's FSDP2, fully_shard) splits every parameter, its gradient and
  its optimizer state over the processes, so each holds 1/W of them: for models whose replica,
  with AdamW's two moments, does not fit on one GPU.
- set_grad_sync: skip the gradient communication on all micro-steps but the last.
- is_sharded / require_fsdp / require_whole_model / barrier: the small questions the trainer, the
  checkpoints and the projects ask.

Nothing here is specific to GPT: the units FSDP gathers one at a time are the items of the model's
nn.ModuleLists (GPT's transformer blocks).
"""

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from mingpt.errors import ConfigError

PARALLEL = ('ddp', 'fsdp')

# -----------------------------------------------------------------------------
# who this process is: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT)

def dist_env():
    """ (rank, local_rank, world_size) of this process; (0, 0, 1) when not distributed """
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), local_rank, dist.get_world_size()
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size > 1:
        return int(os.environ['RANK']), local_rank, world_size
    return 0, 0, 1


def is_rank0():
    """ whether this process speaks for the run: the only process, or torchrun's rank 0 """
    return dist_env()[0] == 0


@contextlib.contextmanager
def process_group(device_type=None, world_size=None):
    """
    The default process group inside the with block, when there are several processes (world_size,
    default from torchrun's environment): nccl between GPUs, gloo between CPUs (device_type None:
    both, torch picks per tensor). A group that exists already is used and left alone; the one made
    here is destroyed at the end. A project wraps its whole script in one, so that evaluations before
    and after Trainer.run() (which uses the existing group) reduce over every rank.
    """
    world_size = dist_env()[2] if world_size is None else world_size
    owned = world_size > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group(backend=None if device_type is None else
                                'nccl' if device_type == 'cuda' else 'gloo')
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def barrier():
    """ wait for every process (nothing to wait for in a single one) """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

# -----------------------------------------------------------------------------
# the model over the processes

def require_fsdp():
    """ FSDP2's fully_shard; a ConfigError saying which torch has it on one that does not """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        # torch 2.4 and 2.5 have FSDP2 only as the private torch.distributed._composable.fsdp
        raise ConfigError(f"parallel='fsdp' needs torch >= 2.6, where FSDP2's fully_shard is in "
                          f"torch.distributed.fsdp; this is torch {torch.__version__}: upgrade torch "
                          "(pip install -U torch), or use parallel='ddp'") from None
    return fully_shard


def require_whole_model(parallel, script):
    """
    A ConfigError for parallel='fsdp' over several processes in a script that runs the model on rank 0
    alone (to sample, to test): a sharded model runs only when every rank runs it, so rank 0 would
    wait for the others forever.
    """
    if parallel == 'fsdp' and dist_env()[2] > 1:
        raise ConfigError(f"{script} runs the model on rank 0 alone (samples, tests), which a model sharded "
                          "over processes by --trainer.parallel=fsdp cannot do: use --trainer.parallel=ddp "
                          "(a replica of this model fits one device), or projects/gpt2/gpt2.py, which "
                          "samples on every rank under FSDP")


def is_sharded(model):
    """ whether model's parameters are FSDP2 shards (DTensors), i.e. wrap_model gave it to fully_shard """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 shards nothing
        return False
    return isinstance(model, FSDPModule)


def wrap_model(model, parallel, device_type, local_rank=0, world_size=1):
    """
    The module a training step calls. One process: model itself. 'ddp': DDP(model), a replica per
    process. 'fsdp': model itself, sharded in place by fully_shard (its parameters become DTensors
    holding this process's 1/W slice; build the optimizer after this, on those).

    FSDP shards every block (the items of each nn.ModuleList) on its own, then the root (what is
    left: embeddings, final LayerNorm, lm_head): the forward gathers one block's full weights just
    before it runs and frees them after, so the full weights of only about one block exist at a time.

    Precision stays with the trainer's autocast rather than FSDP's MixedPrecisionPolicy: the
    weights FSDP gathers are fp32 and autocast runs the matmuls in bf16/fp16 while LayerNorm,
    softmax, the residual stream and the loss stay fp32, the same arithmetic as one process and
    DDP (so switching parallel= changes no result) and one float16 GradScaler path (it handles
    DTensor gradients). The price: the gathers move fp32, twice the bytes of a bf16 param_dtype.
    """
    if world_size == 1:
        return model  # nothing to spread over
    if parallel == 'ddp':
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    if not is_sharded(model):  # a second run() of the same trainer finds it sharded already
        fully_shard = require_fsdp()
        for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:
                fully_shard(block)
        fully_shard(model)
    return model


def set_grad_sync(model, on):
    """
    Whether the next backward communicates gradients (DDP's all-reduce, FSDP's reduce-scatter).
    Off on all micro-steps but the last, the gradients accumulate locally and travel once: FSDP
    keeps them unsharded until then, the price of the saved traffic.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = on
    elif is_sharded(model):
        model.set_requires_gradient_sync(on)
