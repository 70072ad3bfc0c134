"""
Pretrains a small base model for the chat project: a GPT on tiny shakespeare with a BPE vocabulary,
sized to learn something in a few minutes on a CPU. sft.py then teaches it to converse.

    python projects/chat/base.py                                  # -> out/chat/base
    python projects/chat/base.py --trainer.max_iters=3000 --model.n_layer=6   # longer, better

The vocabulary is GPT-2's BPE cut to its first --data.n_merges merges (4,000 of 50,000): GPT-2's
tokens and ids up to 256 + n_merges, its exact encoding otherwise. Common words stay one token,
rarer ones split into a few, and the model's embedding and output layer are 12x smaller than with
the full vocabulary, which is most of a small model's compute on a CPU. (With a GPU, or a GPT-2
checkpoint, skip this script: sft.py fine-tunes any model GPT.from_pretrained reads.)

The result, work_dir/model, is a Hugging Face directory (config.json, model.safetensors) holding
the tokenizer too (encoder.json, vocab.bpe), which is what sft.py's --model.init_from expects.
Running the same command again continues from work_dir/ckpt.
"""

import logging
import os
import sys

import torch

from mingpt.bpe import Encoder, get_encoder
from mingpt.checkpoint import find_checkpoint, read_checkpoint
from mingpt.data import read_text_file, split_windows, training_text_path
from mingpt.errors import ConfigError
from mingpt.model import GPT
from mingpt.tokenizers import save_tokenizer
from mingpt.trainer import Trainer
from mingpt.distributed import barrier, process_group
from mingpt.utils import run_script, start_run, CfgNode as CN

logger = logging.getLogger('chat.base')

# -----------------------------------------------------------------------------

def get_config():
    C = CN()

    C.system = CN()
    C.system.seed = 3407
    C.system.work_dir = './out/chat/base'

    C.data = CN()
    C.data.path = None  # None: ./input.txt if there is one, else tiny shakespeare (downloaded once)
    C.data.n_merges = 4000  # GPT-2's first n merges: a vocabulary of 256 + n_merges tokens
    C.data.block_size = 256  # the model's context, in tokens; chat conversations must fit in it
    C.data.val_fraction = 0.1  # the last 10% of the tokens

    # about 0.8M parameters in the blocks, 0.5M in the embeddings: sized for a few CPU minutes
    C.model = GPT.get_default_config()
    C.model.model_type = None
    C.model.n_layer = 4
    C.model.n_head = 4
    C.model.n_embd = 128
    C.model.tie_weights = True  # GPT-2's tying: the embedding doubles as the output layer
    C.model.embd_pdrop = C.model.resid_pdrop = C.model.attn_pdrop = 0.0  # underfits, never overfits

    C.trainer = Trainer.get_default_config()
    C.trainer.learning_rate = 2e-3
    C.trainer.min_lr = 2e-4
    C.trainer.warmup_iters = 50
    C.trainer.lr_schedule = 'cosine'
    C.trainer.max_iters = 300  # ~10 minutes on one busy core; the loss is still falling here
    C.trainer.batch_size = 8
    C.trainer.eval_interval = 100
    C.trainer.eval_iters = 5
    C.trainer.checkpoint_interval = 100
    C.trainer.resume = 'auto'
    return C

# -----------------------------------------------------------------------------

def gpt2_prefix_vocab(n_merges):
    """ GPT-2's BPE with its first n_merges merges only; GPT-2's token ids are 256 + merge rank """
    full = get_encoder()
    if not 0 <= n_merges <= len(full.bpe_ranks):
        raise ConfigError(f"--data.n_merges must be in [0, {len(full.bpe_ranks)}], got {n_merges}")
    merges = full.merges()[:n_merges]
    n = 256 + n_merges
    return Encoder({t: i for t, i in full.encoder.items() if i < n}, merges)


# -----------------------------------------------------------------------------

def main(args):
    config = get_config()
    config.merge_from_args(args)
    config.trainer.work_dir = config.system.work_dir
    run = start_run(config, logger, script='projects/chat/base.py')

    enc = gpt2_prefix_vocab(config.data.n_merges)
    text_path = training_text_path(config.data.path)  # make_data.py makes conversations of the same text
    text = read_text_file(text_path)
    ids = torch.tensor(enc.encode(text), dtype=torch.long)
    B = config.data.block_size
    train_dataset, val_dataset = split_windows(ids, B, config.data.val_fraction)
    logger.info("vocabulary of %d tokens; %d characters -> %d tokens (%d to validate on)",
                enc.n_vocab, len(text), len(ids), len(val_dataset.ids))

    config.model.vocab_size, config.model.block_size = enc.n_vocab, B
    model = GPT(config.model)
    trainer = Trainer(config.trainer, model, train_dataset, val_dataset=val_dataset)
    run.train(trainer)
    trainer.plot(os.path.join(config.system.work_dir, 'loss.png'))

    barrier()  # under torchrun: rank 0 has written ckpt_best
    best = find_checkpoint(os.path.join(config.system.work_dir, 'ckpt_best'))
    if best is not None:
        model.load_state_dict(read_checkpoint(best)[0])
    val_loss = trainer.evaluate()  # every rank its share of the batches
    results = {'val_loss': val_loss, 'iters': trainer.iter_num}
    if not run.rank0:
        return results  # rank 0 writes and reports
    out = os.path.join(config.system.work_dir, 'model')
    model.save_pretrained(out)
    save_tokenizer(enc, out)

    model.eval()
    prompt = torch.tensor([enc.encode('ROMEO:\n')])
    sample = enc.decode(model.generate(prompt, 120, do_sample=True, temperature=0.8, top_k=50, seed=0)[0])
    results.update(vocab_size=enc.n_vocab, model=out, sample=sample)
    run.finish(results)
    print(f"--- sample (val loss {val_loss:.4f}) ---\n{sample}\n")
    # both next steps read only local files: the text trained on, this model and its tokenizer
    print(f"base model in {out}; next: python projects/chat/make_data.py --path={text_path} && "
          f"python projects/chat/sft.py --model.init_from={out}")
    return results


if __name__ == '__main__':
    with process_group():  # under torchrun: evaluations before and after run() reach every rank
        run_script(main, sys.argv[1:])
