"""
Fine-tunes a pretrained GPT (GPT-2 by default) on a text file, with GPT-2's BPE tokenizer.

    python projects/finetune/finetune.py --data.path=my_text.txt
    python projects/finetune/finetune.py --model.init_from=gpt2-medium --trainer.device=cuda

--model.init_from is anything GPT.from_pretrained reads: a hub name (gpt2, gpt2-medium, ...,
downloaded once into the mingpt cache), a Hugging Face directory (mingpt's own exports are these),
an OpenAI TensorFlow checkpoint or an llm.c .bin file. The text comes from --data.path, else
./input.txt, else tiny shakespeare. The first 90% of its tokens are trained on, the last 10% are
the validation split; the validation loss and a sample are shown before and after fine-tuning.
The model with the best validation loss is exported to work_dir/model (a Hugging Face directory).
Running the same command again continues from work_dir/ckpt.
"""

import logging
import os
import sys

import torch

from mingpt.bpe import get_encoder
from mingpt.checkpoint import find_checkpoint, read_checkpoint
from mingpt.data import split_windows, training_text
from mingpt.errors import ConfigError
from mingpt.generate import checked_options
from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.distributed import barrier, process_group
from mingpt.utils import run_script, start_run, CfgNode as CN

logger = logging.getLogger('finetune')

# -----------------------------------------------------------------------------

def get_config():

    C = CN()

    # system
    C.system = CN()
    C.system.seed = 3407
    C.system.work_dir = './out/finetune'
    C.system.num_threads = None  # torch threads; None: torch's default (one per core)

    # model: where the pretrained weights come from, and its dropout while fine-tuning
    C.model = CN()
    C.model.init_from = 'gpt2'
    C.model.dropout = None  # None: the checkpoint's own (0.1 for OpenAI's GPT-2s)

    # data
    C.data = CN()
    C.data.path = None  # None: ./input.txt if it exists, else tiny shakespeare
    C.data.block_size = 128  # tokens per training window; at most the model's context (1024 for GPT-2)
    C.data.val_fraction = 0.1  # the last 10% of the tokens

    # trainer: a pretrained model needs small steps, and few of them (sized for a CPU; on a GPU
    # raise batch_size and block_size)
    C.trainer = Trainer.get_default_config()
    C.trainer.learning_rate = 1e-4
    C.trainer.min_lr = 1e-5
    C.trainer.warmup_iters = 10
    C.trainer.lr_schedule = 'cosine'
    C.trainer.max_iters = 100
    C.trainer.dtype = 'auto'  # bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU has it
    C.trainer.batch_size = 4
    C.trainer.eval_interval = 25
    C.trainer.eval_iters = 10
    C.trainer.checkpoint_interval = 25
    C.trainer.resume = 'auto'  # continue from work_dir/ckpt when there is one

    # sampling, before and after fine-tuning (same seed, so the two compare)
    C.sample = CN()
    C.sample.prompt = '\n'
    C.sample.max_new_tokens = 100
    C.sample.temperature = 0.8
    C.sample.top_k = 40
    C.sample.seed = 0

    return C

# -----------------------------------------------------------------------------

def main(args):
    config = get_config()
    config.merge_from_args(args)
    config.trainer.work_dir = config.system.work_dir  # checkpoints, metrics.jsonl, the plot
    run = start_run(config, logger, script='projects/finetune/finetune.py')
    S = config.sample
    checked_options(S.max_new_tokens, temperature=S.temperature, top_k=S.top_k)  # now, not after training

    # the text and GPT-2's vocabulary first: a wrong path is better found before a model download
    text = training_text(config.data.path)
    enc = get_encoder()

    # the pretrained model
    dropout = {} if config.model.dropout is None else dict(
        embd_pdrop=config.model.dropout, resid_pdrop=config.model.dropout, attn_pdrop=config.model.dropout)
    try:
        model = GPT.from_pretrained(config.model.init_from, **dropout)
    except (OSError, ValueError) as e:  # no such checkpoint, a bad one, or offline (a DownloadError)
        raise ConfigError(f"--model.init_from={config.model.init_from}: {e}") from e
    if config.data.block_size > model.block_size:
        raise ConfigError(f"--data.block_size={config.data.block_size} is longer than the "
                          f"model's context of {model.block_size} tokens; use at most that")

    # the text as GPT-2 tokens, split 90/10 (tokenizing a megabyte takes a couple of seconds)
    ids = torch.tensor(enc.encode(text), dtype=torch.long)
    if int(ids.max()) >= model.config.vocab_size:
        raise ConfigError(f"the model's vocabulary has {model.config.vocab_size} tokens, fewer "
                          "than GPT-2's tokenizer produces; fine-tune a model with GPT-2's vocabulary")
    train_dataset, val_dataset = split_windows(ids, config.data.block_size, config.data.val_fraction)
    logger.info("%d characters, %d tokens: %d to train on, %d to validate on",
                len(text), len(ids), len(train_dataset.ids), len(val_dataset.ids))

    trainer = Trainer(config.trainer, model, train_dataset, val_dataset=val_dataset)
    prompt = torch.tensor([enc.encode(str(config.sample.prompt))], dtype=torch.long)

    def sample():
        model.eval()
        out = model.generate(prompt.to(trainer.device), S.max_new_tokens, do_sample=True,
                             temperature=S.temperature, top_k=S.top_k, seed=S.seed)
        model.train()
        return enc.decode(out[0].tolist())

    # before: the pretrained model as it is (also when resuming, so the numbers always compare).
    # Under torchrun every rank evaluates its share of the batches; rank 0 samples, writes and prints
    loss_before = trainer.evaluate()
    sample_before = sample() if run.rank0 else None
    logger.info("before fine-tuning: val loss %.4f", loss_before)

    run.train(trainer)
    plotted = trainer.plot(os.path.join(config.system.work_dir, 'loss.png'))  # None without matplotlib

    # after: the weights with the best validation loss, exported where from_pretrained reads them
    barrier()  # rank 0 has written ckpt_best
    best = find_checkpoint(os.path.join(config.system.work_dir, 'ckpt_best'))
    if best is not None:
        state_dict, _ = read_checkpoint(best)
        model.load_state_dict(state_dict)
    loss_after = trainer.evaluate()
    results = {'val_loss_before': loss_before, 'val_loss_after': loss_after, 'iters': trainer.iter_num}
    if not run.rank0:
        return results  # rank 0 reports the run
    model_dir = model.save_pretrained(os.path.join(config.system.work_dir, 'model'))
    results.update(model=str(model_dir), sample_before=sample_before, sample_after=sample())
    run.finish(results)
    sample_after = results['sample_after']
    print(f"--- sample before fine-tuning (val loss {loss_before:.4f}) ---\n{sample_before}\n")
    print(f"--- sample after fine-tuning (val loss {loss_after:.4f}) ---\n{sample_after}\n")
    print(f"fine-tuned model in {model_dir}; checkpoints, metrics.jsonl{' and loss.png' if plotted else ''} in "
          f"{config.system.work_dir}")
    return results


if __name__ == '__main__':
    with process_group():  # under torchrun: evaluations before and after run() reach every rank
        run_script(main, sys.argv[1:])
