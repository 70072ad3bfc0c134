"""
Pretrains GPT-2 from scratch on token shards, the way nanoGPT and llm.c reproduce GPT-2 124M.

    python -m mingpt.prepare my_corpus/ --out data/shards            # once: text -> token shards
    python projects/gpt2/gpt2.py --preset=cpu --data.dir=data/shards  # a small model, minutes on a CPU
    torchrun --standalone --nproc_per_node=8 projects/gpt2/gpt2.py --data.dir=data/shards   # GPT-2 124M

--preset=gpt2 (the default) is GPT-2 124M as the reproductions train it: context 1024, ~0.5M tokens per
optimizer step (2^19, reached by gradient accumulation), AdamW with betas (0.9, 0.95) and weight decay
0.1, lr 6e-4 warmed up over 715 steps then decayed along a cosine to a tenth, gradients clipped at 1.0,
bf16 autocast and torch.compile (for a GPU), 19,073 steps: 10B tokens. --preset=cpu is the same recipe
scaled down to train in 6.5-8 minutes on a 2-core CPU (see README.md); --preset=cpu-fast spends
the same tokens on the modern recipe (rotary, RMSNorm, QK-norm, ReLU^2, Muon: 0.15 bits/byte lower). Any
field can then be overridden: --trainer.max_iters=100, --model.n_layer=24, ...

The data is a directory `python -m mingpt.prepare` wrote: train shards, validation shards, the tokenizer
and meta.json. Tokens per optimizer step are data.total_batch_tokens, whatever the hardware: each step
accumulates the gradients of grad_accum_steps = total_batch_tokens / (batch_size * block_size * world
size) micro-batches (batch_size rows per process); a total that does not divide is an error saying what
would. None leaves --trainer.grad_accum_steps as given.

Every eval_interval steps: the validation loss and its bits per byte (the nats of the evaluated windows
over the UTF-8 bytes of their text, mingpt.evaluate's formula: it compares across tokenizers), in the log
and in work_dir/metrics.jsonl ({'iter', 'val_bpb'} records beside the Trainer's), and loss.png. A sample
from the tokenizer of the shards at the end (and every sample.interval steps), in samples.txt. Running
the same command again continues from work_dir/ckpt, on the same shards only (the checkpoint records them).
Under torchrun only rank 0 logs and writes.
"""

import logging
import os
import sys
import time

import numpy as np
import torch

from mingpt.data import open_shard, read_meta, shard_windows
from mingpt.errors import ConfigError, DataError
from mingpt.evaluate import bits_per_byte, token_byte_lengths
from mingpt.generate import checked_options, complete
from mingpt.model import GPT
from mingpt.schedule import eval_batches
from mingpt.tasks import eval_callback
from mingpt.tokenizers import find_tokenizer, load_tokenizer, save_tokenizer
from mingpt.trainer import Trainer
from mingpt.distributed import dist_env, process_group
from mingpt.utils import resolve_args, run_script, start_run, CfgNode as CN

logger = logging.getLogger('gpt2')

# -----------------------------------------------------------------------------

def get_config():
    """ the gpt2 preset: GPT-2 124M on ~10B tokens, as nanoGPT / llm.c train it """

    C = CN()
    C.preset = 'gpt2'  # 'gpt2', 'cpu' or 'cpu-fast' (PRESETS): applied first, then every other override

    # system
    C.system = CN()
    C.system.seed = 1337
    C.system.work_dir = './out/gpt2'
    C.system.num_threads = None  # torch threads; None: torch's default (one per core)

    # data: the shards of python -m mingpt.prepare, and how many tokens make one optimizer step
    C.data = CN()
    C.data.dir = 'data/shards'
    C.data.block_size = 1024
    C.data.total_batch_tokens = 2 ** 19  # 524,288: GPT-3's 0.5M for its 125M model, as nanoGPT / llm.c

    # model: GPT-2 124M (12 layers, 12 heads, 768 wide), lm_head tied to the token embedding as GPT-2's,
    # no dropout (a single pass over a large corpus does not overfit). vocab_size None: the shards'
    C.model = GPT.get_default_config()
    C.model.model_type = None
    C.model.n_layer = 12
    C.model.n_head = 12
    C.model.n_embd = 768
    C.model.vocab_size = None
    C.model.tie_weights = True
    C.model.embd_pdrop = 0.0
    C.model.resid_pdrop = 0.0
    C.model.attn_pdrop = 0.0

    # trainer: 19,073 steps of 2^19 tokens = 10B tokens (one epoch of FineWeb-Edu's 10B sample)
    C.trainer = Trainer.get_default_config()
    C.trainer.batch_size = 16  # rows per micro-step per GPU: 16 x 1024 fits 24 GB; 64 on 80 GB (README)
    C.trainer.learning_rate = 6e-4
    C.trainer.min_lr = 6e-5
    C.trainer.lr_schedule = 'cosine'
    C.trainer.warmup_iters = 715
    C.trainer.max_iters = 19073
    C.trainer.betas = (0.9, 0.95)
    C.trainer.weight_decay = 0.1
    C.trainer.grad_norm_clip = 1.0
    C.trainer.dtype = 'auto'  # bf16 autocast on Ampere or newer (and CPUs with AVX512-BF16/AMX)
    C.trainer.compile = True  # torch.compile: for a GPU; the cpu preset turns it off
    C.trainer.eval_interval = 250
    C.trainer.eval_iters = 20  # batches of batch_size x world size windows, the same ones every time
    C.trainer.checkpoint_interval = 1000
    C.trainer.log_interval = 10
    C.trainer.resume = 'auto'  # continue from work_dir/ckpt when there is one

    # sampling: at the end, and every `interval` steps (at an evaluation; 0: at the end only)
    C.sample = CN()
    C.sample.prompt = ''  # after <|endoftext|>, which starts every document in the shards
    C.sample.max_new_tokens = 200
    C.sample.temperature = 1.0
    C.sample.top_k = 50
    C.sample.seed = 0
    C.sample.interval = 0

    # downstream evaluation at every `every`-th evaluation (mingpt.tasks), off when path is None: 'hellaswag'
    # (downloaded once), a HellaSwag-format .jsonl, an llm.c eval .bin or a CORE bundle directory, on its first
    # `limit` examples (None: all); its score goes into metrics.jsonl and loss.png
    C.tasks = CN()
    C.tasks.path = None
    C.tasks.every = 1
    C.tasks.limit = None

    return C


# the overrides each preset makes to get_config(), before the command line's
PRESETS = {
    'gpt2': {},
    # the recipe on a 2-core CPU in 6.5-8 minutes: the same optimizer and schedule shape, scaled down.
    # GPT-2's 50,257-token vocabulary dominates a model this narrow (the lm_head is most of its FLOPs);
    # a higher learning rate suits a small model; 2,048 tokens a step (no accumulation), so that a budget
    # of about a million tokens still makes 500 optimizer steps
    'cpu': {
        'system': {'work_dir': './out/gpt2-cpu'},
        'data': {'block_size': 256, 'total_batch_tokens': 2048},
        'model': {'n_layer': 4, 'n_head': 4, 'n_embd': 128},
        'trainer': {'batch_size': 8, 'learning_rate': 2e-3, 'min_lr': 2e-4, 'warmup_iters': 30,
                    'max_iters': 500, 'compile': False, 'eval_interval': 100, 'eval_iters': 5,
                    'checkpoint_interval': 100},
        'sample': {'max_new_tokens': 100},
    },
    # the cpu preset's data, tokens, steps and size (4 layers, 128 wide), spent on the modern recipe: rotary
    # positions, RMSNorm and QK-norm, ReLU^2, no biases, an untied zero-initialised head, Muon for the blocks'
    # matrices (AdamW for the embedding, head and gains; the embedding at a rate of its own, ~8x the head's:
    # a row learns only from the tokens that look it up, and most rows are rare). No logit soft-capping
    # (its tanh over 50,257 logits a token costs more time than it buys here) and no torch.compile (which
    # gains this model ~3% a step, less than its warm-up over 500 steps); the README has the comparison
    'cpu-fast': {
        'system': {'work_dir': './out/gpt2-cpu-fast'},
        'data': {'block_size': 256, 'total_batch_tokens': 2048},
        'model': {'n_layer': 4, 'n_head': 4, 'n_embd': 128, 'tie_weights': False, 'pos_emb': 'rope',
                  'norm': 'rmsnorm', 'qk_norm': True, 'mlp_act': 'relu2', 'bias': False, 'zero_init_out': True},
        'trainer': {'batch_size': 8, 'optimizer': 'muon', 'muon_lr': 0.03, 'learning_rate': 6e-3, 'min_lr': 6e-5,
                    'embedding_lr': 0.05,
                    'warmup_iters': 30, 'max_iters': 500, 'compile': False, 'eval_interval': 50,
                    'eval_iters': 5, 'checkpoint_interval': 100},
        'sample': {'max_new_tokens': 100},
    },
}


def resolved_config(args):
    """ get_config(), the preset named in args (--preset=...), then args """
    return resolve_args(get_config(), args, PRESETS)


def grad_accum_steps(total_batch_tokens, batch_size, block_size, world_size):
    """ micro-steps per optimizer step so that it takes total_batch_tokens; a ConfigError if they do not divide """
    per_micro_step = batch_size * block_size * world_size
    if total_batch_tokens % per_micro_step:
        fits = max(1, total_batch_tokens // per_micro_step) * per_micro_step
        raise ConfigError(f"--data.total_batch_tokens={total_batch_tokens} is not a multiple of the tokens of one "
                          f"micro-step, batch_size x block_size x processes = {batch_size} x {block_size} x "
                          f"{world_size} = {per_micro_step}: set --data.total_batch_tokens={fits}, or a "
                          f"--trainer.batch_size that divides it")
    return total_batch_tokens // per_micro_step

# -----------------------------------------------------------------------------

def shards_tokenizer(directory):
    """ the tokenizer the shards in directory were made with: its files there, else meta.json's name """
    found = find_tokenizer(directory)
    return found if found is not None else load_tokenizer(read_meta(directory)['tokenizer'])


def unigram_entropy(val):
    """ nats per token of the validation split's own token frequencies: the loss of the best model that
    ignores context, so a loss below it shows the model uses context """
    counts = sum(np.bincount(open_shard(p), minlength=val.get_vocab_size()) for p in val.paths)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

# -----------------------------------------------------------------------------

def main(args):
    config = resolved_config(args)
    config.trainer.work_dir = config.system.work_dir  # checkpoints, metrics.jsonl, the plot
    rank, _, world_size = dist_env()
    D, S = config.data, config.sample
    if D.total_batch_tokens is not None:
        config.trainer.grad_accum_steps = grad_accum_steps(D.total_batch_tokens, config.trainer.batch_size,
                                                           D.block_size, world_size)
    run = start_run(config, logger)  # samples run on every rank under FSDP: the model may be sharded
    checked_options(S.max_new_tokens, temperature=S.temperature, top_k=S.top_k)

    # the shards and their tokenizer (a resumed run's Trainer checks they are the ones it trained on)
    train_dataset, val_dataset = shard_windows(D.dir, D.block_size)
    if val_dataset is None:
        raise DataError(f"{D.dir} has no validation shards (prepared with --val-tokens 0); this recipe "
                        f"evaluates on them: prepare the corpus again with some")
    tokenizer = shards_tokenizer(D.dir)
    eot = tokenizer.special_tokens.get('<|endoftext|>') if hasattr(tokenizer, 'special_tokens') else None
    prompt_ids = ([] if eot is None else [eot]) + tokenizer.encode(str(S.prompt))
    if not prompt_ids:
        raise ConfigError("--sample.prompt is empty and the tokenizer has no <|endoftext|> to start from; give one")
    prompt = torch.tensor([prompt_ids], dtype=torch.long)

    # the model
    if config.model.vocab_size is None:
        config.model.vocab_size = train_dataset.get_vocab_size()
    elif config.model.vocab_size < train_dataset.get_vocab_size():
        raise ConfigError(f"--model.vocab_size={config.model.vocab_size} is smaller than the shards' vocabulary "
                          f"({train_dataset.get_vocab_size()}); leave it None to take theirs")
    config.model.block_size = D.block_size
    model = GPT(config.model)
    n_params = sum(p.numel() for p in model.parameters())
    step_tokens = config.trainer.batch_size * config.trainer.grad_accum_steps * D.block_size * world_size
    logger.info("%s parameters; %s tokens a step (%d x %d rows x %d tokens x %d processes); %s training "
                "tokens, %s validation", f"{n_params:,}", f"{step_tokens:,}", config.trainer.grad_accum_steps,
                config.trainer.batch_size, D.block_size, world_size, f"{train_dataset.tokens:,}",
                f"{val_dataset.tokens:,}")

    # bits per byte of an evaluation: the Trainer scores the same windows every time, so the bytes of their
    # targets are counted once here; the unigram entropy is the baseline a model that learned must beat
    lengths = token_byte_lengths(tokenizer)
    windows = np.concatenate(eval_batches(len(val_dataset), config.trainer.batch_size * world_size,
                                          config.trainer.eval_iters))
    eval_targets = len(windows) * D.block_size
    eval_bytes = int(sum(lengths[val_dataset[int(i)][1].numpy()].sum() for i in windows))
    unigram = unigram_entropy(val_dataset)
    logger.info("validation: %s tokens in %d windows (%.3f bytes a token); unigram entropy %.4f nats a token",
                f"{eval_targets:,}", len(windows), eval_bytes / eval_targets, unigram)

    trainer = Trainer(config.trainer, model, train_dataset, val_dataset=val_dataset)
    work_dir = config.system.work_dir
    if run.rank0:
        save_tokenizer(tokenizer, work_dir)  # mingpt.evaluate and the chat find it next to ckpt/

    def sample():
        model.eval()
        out = complete(model, prompt.to(trainer.device), S.max_new_tokens, do_sample=True,
                       temperature=S.temperature, top_k=S.top_k, seed=S.seed,
                       window_keep=max(1, model.block_size // 2))
        model.train()
        return tokenizer.decode(out[0, 0 if eot is None else 1:].tolist())  # the prompt and what follows

    def keep_sample(text):
        with open(os.path.join(work_dir, 'samples.txt'), 'a', encoding='utf-8') as f:
            f.write(f"--- iter {trainer.iter_num} (val loss {trainer.val_loss:.4f}) ---\n{text}\n\n")

    # a model sharded by FSDP runs only when every rank runs it: then each rank samples (in step, the same
    # shapes at every forward) and rank 0 keeps the text; otherwise rank 0 samples alone
    sharded = config.trainer.parallel == 'fsdp' and world_size > 1

    def on_eval_end(trainer):
        trainer.val_bpb = bits_per_byte(trainer.val_loss * eval_targets, eval_bytes)
        due = S.interval and trainer.iter_num % S.interval == 0 and trainer.iter_num != config.trainer.max_iters
        text = sample() if due and (sharded or run.rank0) else None
        if not run.rank0:
            return
        logger.info("iter %d: val bits per byte %.4f", trainer.iter_num, trainer.val_bpb)
        trainer.metrics.log({'iter': trainer.iter_num, 'val_bpb': trainer.val_bpb})
        trainer.plot(os.path.join(work_dir, 'loss.png'))
        if text is not None:
            logger.info("iter %d: sample\n%s", trainer.iter_num, text)
            keep_sample(text)

    trainer.val_bpb = None
    if config.tasks.path is not None:  # before on_eval_end, whose plot then shows the score
        trainer.add_callback('on_eval_end', eval_callback(config.tasks.path, tokenizer, config.tasks.every,
                                                          config.tasks.limit))
    trainer.add_callback('on_eval_end', on_eval_end)
    t0 = time.time()
    run.train(trainer)
    seconds = time.time() - t0

    if trainer.val_loss is None:  # a run resumed after it had finished trains no further
        trainer.val_loss = trainer.evaluate()
        trainer.val_bpb = bits_per_byte(trainer.val_loss * eval_targets, eval_bytes)
    results = {'iters': trainer.iter_num, 'tokens': trainer.iter_num * step_tokens, 'val_loss': trainer.val_loss,
               'val_bpb': trainer.val_bpb, 'best_val_loss': trainer.best_val_loss, 'unigram_entropy': unigram,
               'parameters': n_params, 'seconds': round(seconds, 1)}
    text = sample() if sharded or run.rank0 else None
    if not run.rank0:
        return results  # rank 0 reports the run
    plotted = trainer.plot(os.path.join(work_dir, 'loss.png'))  # None without matplotlib
    results['sample'] = text
    keep_sample(results['sample'])
    run.finish(results)
    print(results['sample'])
    print(f"\nval loss {trainer.val_loss:.4f} nats/token (unigram entropy {unigram:.4f}), {trainer.val_bpb:.4f} "
          f"bits/byte after {trainer.iter_num} steps ({results['tokens']:,} tokens); checkpoints, metrics.jsonl, "
          f"samples.txt{' and loss.png' if plotted else ''} in {work_dir}")
    return results


if __name__ == '__main__':
    with process_group():  # under torchrun: an evaluation after run() (of a finished run) reaches every rank
        run_script(main, sys.argv[1:])
