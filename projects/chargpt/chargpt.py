"""
Trains a character-level language model.

    python projects/chargpt/chargpt.py                              # tiny shakespeare, CPU-sized
    python projects/chargpt/chargpt.py --data.path=my_text.txt
    python projects/chargpt/chargpt.py --model.model_type=gpt-mini  # a preset instead of the CPU sizes
    python projects/chargpt/chargpt.py --preset=fast                # the modern recipe: rotary, Muon, ...

The text comes from --data.path, else ./input.txt (minGPT's convention), else tiny shakespeare,
downloaded once into the mingpt cache. The first 90% of the text is trained on, the last 10% is
the validation split. Running the same command again continues from work_dir/ckpt.
"""

import logging
import os
import sys

import torch

from mingpt.checkpoint import find_checkpoint
from mingpt.data import split_windows, training_text
from mingpt.errors import ConfigError
from mingpt.generate import checked_options, stream
from mingpt.metrics import track
from mingpt.model import GPT
from mingpt.tokenizers import CharTokenizer
from mingpt.trainer import Trainer
from mingpt.distributed import process_group
from mingpt.utils import resolve_args, run_script, start_run, CfgNode as CN

logger = logging.getLogger('chargpt')

# -----------------------------------------------------------------------------

def get_config():

    C = CN()
    C.preset = 'default'  # 'default' (minGPT's architecture, AdamW) or 'fast' (PRESETS): applied first, then overrides

    # system
    C.system = CN()
    C.system.seed = 3407
    C.system.work_dir = './out/chargpt'
    C.system.num_threads = None  # torch threads; None: torch's default (one per core)

    # data
    C.data = CN()
    C.data.path = None  # None: ./input.txt if it exists, else tiny shakespeare
    C.data.block_size = 128
    C.data.val_fraction = 0.1  # the last 10% of the text; 0: train without validation

    # model: sized for a CPU (about 1.8M parameters); see the README for a GPU-sized run.
    # No dropout: on a CPU it slows each step by more than it gains within a 15-minute run
    C.model = GPT.get_default_config()
    C.model.model_type = None
    C.model.n_layer = 4
    C.model.n_head = 4
    C.model.n_embd = 192
    C.model.embd_pdrop = 0.0
    C.model.resid_pdrop = 0.0
    C.model.attn_pdrop = 0.0

    # trainer: a high learning rate, warmed up and decayed along a cosine to nearly zero (to a
    # hundredth rather than a tenth: with ~11 passes over the text the model overfits, and the
    # annealing buys the last of the val loss; the README has the comparison)
    C.trainer = Trainer.get_default_config()
    C.trainer.learning_rate = 2e-3
    C.trainer.min_lr = 2e-5
    C.trainer.warmup_iters = 100
    C.trainer.lr_schedule = 'cosine'
    C.trainer.max_iters = 2500
    # bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU has it: its matmuls run natively there
    C.trainer.dtype = 'auto'
    C.trainer.batch_size = 32
    C.trainer.eval_interval = 250
    C.trainer.eval_iters = 20
    C.trainer.checkpoint_interval = 250
    C.trainer.resume = 'auto'  # continue from work_dir/ckpt when there is one

    # sampling: after every evaluation and at the end
    C.sample = CN()
    C.sample.prompt = 'O God, O God!'
    C.sample.max_new_tokens = 500
    C.sample.temperature = 1.0
    C.sample.top_k = None

    return C


# the overrides each preset makes to get_config(), before the command line's
PRESETS = {
    'default': {},
    # the same 15 minutes, spent on the modern recipe: rotary positions, RMSNorm and QK-norm, a ReLU^2
    # MLP, no biases, zero-initialised output projections, value embeddings (~0.006 lower at the end for
    # a few % more time a step), Muon for the blocks' matrices (AdamW for the embeddings, head and gains),
    # the learning rates held, then brought down in a straight line over the last 40% of the steps (on ~6
    # passes over the text the model overfits: the low-rate end is where the validation loss is won), a
    # light dropout (0.05 on embeddings and residuals: behind early, ~0.01 lower at the end; 0.1 learns
    # too slowly for the budget), and torch.compile, which fuses the norms' and rotations' elementwise
    # work. The context stays chargpt's 128 (batch 32): a step of 256 x 16 costs ~15% more and ends ~0.01
    # higher (projects/chargpt/README.md)
    'fast': {
        'system': {'work_dir': './out/chargpt-fast'},
        'model': {'pos_emb': 'rope', 'norm': 'rmsnorm', 'qk_norm': True, 'mlp_act': 'relu2', 'bias': False,
                  'zero_init_out': True, 'value_embeds': True, 'token_shift': True, 'embd_pdrop': 0.05,
                  'resid_pdrop': 0.05},
        'trainer': {'optimizer': 'muon', 'muon_lr': 0.015, 'muon_momentum_warmup': 300, 'compile': True,
                    'learning_rate': 3e-3, 'lr_schedule': 'wsd', 'cooldown_frac': 0.4, 'min_lr': 3e-5, 'max_iters': 1450},
    },
}


def resolved_config(args):
    """ get_config(), the preset named in args (--preset=...), then args """
    return resolve_args(get_config(), args, PRESETS)

# -----------------------------------------------------------------------------

def main(args):
    config = resolved_config(args)
    config.trainer.work_dir = config.system.work_dir  # checkpoints, metrics.jsonl, the plot
    run = start_run(config, logger, script='projects/chargpt/chargpt.py')

    # the text, its vocabulary and the two splits: the first 90% to train on, the last 10% to
    # validate on, as nanoGPT does. The vocabulary is kept in the work dir as chars.json: a resumed
    # run must use the same ids, and `python -m mingpt.evaluate` finds it there
    text = training_text(config.data.path)
    vocab = CharTokenizer.from_text(text)
    vocab_path = os.path.join(config.system.work_dir, 'chars.json')
    if find_checkpoint(os.path.join(config.system.work_dir, 'ckpt')) and os.path.exists(vocab_path):
        if CharTokenizer.load(vocab_path).chars != vocab.chars:
            raise ConfigError(f"{config.system.work_dir} holds a run on a text with another "
                              f"vocabulary ({vocab_path}); use another --system.work_dir for this text")
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    train_dataset, val_dataset = split_windows(ids, config.data.block_size, config.data.val_fraction,
                                               vocab_size=vocab.n_vocab)
    logger.info("%d characters, %d distinct: %d to train on, %d to validate on", len(text),
                vocab.n_vocab, len(train_dataset.ids), 0 if val_dataset is None else len(val_dataset.ids))
    if val_dataset is None:
        logger.warning("--data.val_fraction=%s leaves no text to validate on: training without validation "
                       "(no val loss, no ckpt_best; a sample at the end only)", config.data.val_fraction)
    # check the sampling options and the prompt now, not after training
    S = config.sample
    checked_options(S.max_new_tokens, temperature=S.temperature, top_k=S.top_k)
    try:
        prompt = torch.tensor([vocab.encode(str(S.prompt))], dtype=torch.long)
    except ValueError as e:
        raise ConfigError(f"--sample.prompt={S.prompt!r}: {e}") from None

    # the model
    config.model.vocab_size = vocab.n_vocab
    config.model.block_size = config.data.block_size
    model = GPT(config.model)

    # the trainer evaluates, keeps work_dir/ckpt_best and resumes; we add samples and the plot
    trainer = Trainer(config.trainer, model, train_dataset, val_dataset=val_dataset)
    if run.rank0:
        vocab.save(config.system.work_dir)

    def sample(trainer):
        model.eval()
        # window_keep: once the text fills the context, re-read its last half every block_size // 2
        # characters, not all of it at every character (minGPT's cropping: a full forward per character)
        steps = stream(model, prompt.to(trainer.device), S.max_new_tokens, temperature=S.temperature,
                       do_sample=True, top_k=S.top_k, window_keep=max(1, model.block_size // 2))
        new = [int(t) for t in track(steps, S.max_new_tokens, 'sampling: character', desc='sampling',
                                     unit='char')]
        model.train()
        return vocab.decode(prompt[0].tolist() + new)

    def on_eval_end(trainer):
        if not run.rank0:
            return
        if trainer.iter_num != config.trainer.max_iters:  # the last iteration's sample is printed at the end
            logger.info("iter %d: sample\n%s", trainer.iter_num, sample(trainer))
        trainer.plot(os.path.join(config.system.work_dir, 'loss.png'))

    trainer.add_callback('on_eval_end', on_eval_end)
    run.train(trainer)

    # (a run resumed after it had finished trains no further, and has not evaluated yet)
    val_loss = trainer.val_loss
    if val_loss is None and val_dataset is not None:
        val_loss = trainer.evaluate()
    plotted = trainer.plot(os.path.join(config.system.work_dir, 'loss.png'))  # None without matplotlib
    results = {'iters': trainer.iter_num, 'val_loss': val_loss,
               'best_val_loss': trainer.best_val_loss if val_dataset is not None else None}
    if not run.finish(results):
        return results  # rank 0 reports the run
    print(sample(trainer))
    scores = (f"val loss {val_loss:.4f} (best {trainer.best_val_loss:.4f})" if val_loss is not None
              else f"train loss {trainer.loss.item():.4f} (no validation)" if trainer.loss is not None
              else "no validation")
    print(f"\n{scores} after {trainer.iter_num} iterations; checkpoints, metrics.jsonl"
          f"{' and loss.png' if plotted else ''} in {config.system.work_dir}")
    return results


if __name__ == '__main__':
    with process_group():  # under torchrun: evaluations before and after run() reach every rank
        run_script(main, sys.argv[1:])
