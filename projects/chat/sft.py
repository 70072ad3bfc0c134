"""
Supervised fine-tuning (SFT) of a GPT on conversations: the step that turns a base model, which
continues text, into a chat model, which answers in turns and knows when it has finished.

    python projects/chat/base.py          # a base model (or use any checkpoint, see below)
    python projects/chat/make_data.py     # conversations from tiny shakespeare
    python projects/chat/sft.py           # -> out/chat/sft/model
    python -m mingpt.chat --model out/chat/sft/model

--model.init_from is anything GPT.from_pretrained reads (default: base.py's output). Its tokenizer
is encoder.json + vocab.bpe in that directory, else GPT-2's. The chat tokens (<|user|>, ...) are
added to the tokenizer, and rows for them to the model's embedding and output layer.

--data.train / --data.val are JSONL files, one conversation a line: {"messages": [{"role":
"system"|"user"|"assistant", "content": "..."}, ...]} (a bare list of messages works too). That is
the format of most chat datasets, so a real one drops in as it is.

The loss counts only what the assistant says (its messages and the <|end|> closing each): every
other target is -1, which the model's loss ignores. To waste no compute on padding, conversations
are packed whole, each starting with <|endoftext|>, into rows of block_size + 1 tokens; one longer
than that is skipped (cropped, it would never show how it ends).

work_dir gets checkpoints (ckpt, which running the same command again resumes; ckpt_best, the best
weights), metrics.jsonl, loss.png, results.json (val loss, how often replies end on their own, sample
dialogues before and after) and model/, the best weights with the tokenizer: the directory mingpt.chat
and mingpt.serve take as --model.
"""

import json
import logging
import os
import random
import sys

import torch
from torch.utils.data import Dataset

from mingpt.chat import ChatTokenizer, add_chat_tokens, check_messages, stream_reply, tokenizer_or_gpt2
from mingpt.checkpoint import find_checkpoint, read_checkpoint
from mingpt.errors import ConfigError
from mingpt.generate import checked_options
from mingpt.metrics import track
from mingpt.model import GPT
from mingpt.tokenizers import save_tokenizer
from mingpt.trainer import Trainer
from mingpt.distributed import barrier, process_group
from mingpt.utils import run_script, start_run, CfgNode as CN

logger = logging.getLogger('chat.sft')

# -----------------------------------------------------------------------------

def get_config():
    C = CN()

    C.system = CN()
    C.system.seed = 3407
    C.system.work_dir = './out/chat/sft'

    C.model = CN()
    C.model.init_from = './out/chat/base/model'  # anything GPT.from_pretrained reads, e.g. gpt2
    C.model.dropout = None  # None: the checkpoint's own

    C.data = CN()
    C.data.train = './out/chat/data/train.jsonl'
    C.data.val = './out/chat/data/val.jsonl'
    C.data.block_size = None  # None: the model's context

    # fine-tuning: fewer, smaller steps than pretraining
    C.trainer = Trainer.get_default_config()
    C.trainer.learning_rate = 1e-3
    C.trainer.min_lr = 1e-4
    C.trainer.warmup_iters = 10
    C.trainer.lr_schedule = 'cosine'
    C.trainer.max_iters = 120
    C.trainer.batch_size = 8
    C.trainer.eval_interval = 40
    C.trainer.eval_iters = 10
    C.trainer.checkpoint_interval = 40
    C.trainer.resume = 'auto'

    # replies to the first user message of n_prompts validation conversations, before and after
    C.sample = CN()
    C.sample.n_prompts = 20
    C.sample.n_shown = 5  # of which this many are written out as dialogues
    C.sample.max_new_tokens = 64
    C.sample.temperature = 0.8
    C.sample.top_k = 50
    C.sample.seed = 0
    return C

# -----------------------------------------------------------------------------

def read_conversations(path):
    """ a JSONL file of conversations -> list of message lists; errors name the line """
    if not os.path.isfile(path):
        raise ConfigError(f"no conversation file {path}; make one with "
                          "python projects/chat/make_data.py, or pass --data.train=/--data.val= "
                          "JSONL files of {\"messages\": [...]}")
    conversations = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row['messages'] if isinstance(row, dict) else row
                check_messages(messages)
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{lineno}: not a conversation ({type(e).__name__}: "
                                  f"{e}); each line must be {{\"messages\": [{{\"role\": ..., "
                                  "\"content\": ...}, ...]}") from None
            if any(m['role'] == 'assistant' for m in messages):  # else nothing to learn
                conversations.append(messages)
    if not conversations:
        raise ConfigError(f"{path} has no conversation with an assistant message to learn from")
    return conversations


class PackedConversations(Dataset):
    """
    Conversations rendered and packed whole into rows of block_size + 1 tokens. Item i is
    (x, y), both (block_size,): x the tokens, y the next tokens where the loss mask is on, -1
    elsewhere (the user's and system's tokens, the role tokens, the padding at the end of a row).
    """

    def __init__(self, conversations, tokenizer, block_size, seed=0):
        rendered = [tokenizer.render_conversation(m) for m in conversations]
        fits = [r for r in rendered if len(r[0]) <= block_size + 1]
        self.skipped = len(rendered) - len(fits)
        if not fits:
            raise ConfigError(f"no conversation fits in block_size + 1 = {block_size + 1} tokens; use a "
                              "larger --data.block_size, or shorter conversations")
        random.Random(seed).shuffle(fits)  # rows mix conversations from all over the file
        L = block_size + 1
        rows, ids, mask = [], [], []
        for r_ids, r_mask in fits:
            if len(ids) + len(r_ids) > L:
                rows.append((ids, mask))
                ids, mask = [], []
            ids, mask = ids + r_ids, mask + r_mask
        rows.append((ids, mask))
        self.x = torch.full((len(rows), block_size), tokenizer.bos_id, dtype=torch.long)
        self.y = torch.full((len(rows), block_size), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            n = len(ids) - 1
            self.x[i, :n] = ids[:-1]
            self.y[i, :n] = ids[1:].masked_fill(~mask[1:], -1)  # y[t] is learned iff ids[t+1] is
        self.n_conversations = len(fits)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

# -----------------------------------------------------------------------------

def sample_replies(model, tokenizer, conversations, S):
    """ reply to each conversation's first user message; -> (dialogues, fraction that ended on their own) """
    model_was_training = model.training
    model.eval()
    dialogues, stopped = [], 0
    # a reply takes about a second on a CPU: a bar (or a line every few seconds) keeps the wait visible
    for k, messages in enumerate(track(conversations, len(conversations), 'sampling: reply', desc='replies',
                                       unit='reply')):
        first_user = next(i for i, m in enumerate(messages) if m['role'] == 'user')
        prompt = messages[:first_user + 1]
        info = {}
        reply = ''.join(stream_reply(model, tokenizer, prompt, S.max_new_tokens, temperature=S.temperature,
                                     top_k=S.top_k, seed=S.seed + k, info=info))
        stopped += info['finish_reason'] == 'stop'
        dialogues.append({'prompt': prompt, 'reply': reply, 'finish_reason': info['finish_reason'],
                          'reference': messages[first_user + 1]['content']})
    model.train(model_was_training)
    return dialogues, stopped / max(1, len(conversations))


def format_dialogue(d):
    lines = [f"[{m['role']}] {m['content']}" for m in d['prompt']]
    lines.append(f"[assistant] {d['reply']}" + ('' if d['finish_reason'] == 'stop' else ' [...]'))
    return '\n'.join(lines)


def main(args):
    config = get_config()
    config.merge_from_args(args)
    config.trainer.work_dir = config.system.work_dir
    run = start_run(config, logger, script='projects/chat/sft.py')
    S = config.sample
    checked_options(S.max_new_tokens, temperature=S.temperature, top_k=S.top_k)  # now, not after training

    # the base model and its tokenizer, both grown for the chat tokens
    init = config.model.init_from
    dropout = {} if config.model.dropout is None else dict(
        embd_pdrop=config.model.dropout, resid_pdrop=config.model.dropout, attn_pdrop=config.model.dropout)
    model = GPT.from_pretrained(init, **dropout)
    encoder = add_chat_tokens(tokenizer_or_gpt2(init))
    model.resize_token_embeddings(max(model.config.vocab_size, encoder.n_vocab))
    tokenizer = ChatTokenizer(encoder)

    block_size = config.data.block_size or model.block_size
    if block_size > model.block_size:
        raise ConfigError(f"--data.block_size={block_size} is longer than the model's context "
                          f"of {model.block_size} tokens; use at most that")
    train_conv = read_conversations(config.data.train)
    val_conv = read_conversations(config.data.val)
    train_dataset = PackedConversations(train_conv, tokenizer, block_size, seed=config.system.seed)
    val_dataset = PackedConversations(val_conv, tokenizer, block_size, seed=config.system.seed)
    for name, ds in (('train', train_dataset), ('val', val_dataset)):
        logger.info("%s: %d conversations packed in %d rows of %d tokens (%d skipped: longer than "
                    "that), %d tokens learned", name, ds.n_conversations, len(ds), block_size,
                    ds.skipped, int((ds.y != -1).sum()))

    trainer = Trainer(config.trainer, model, train_dataset, val_dataset=val_dataset)
    prompts = val_conv[:config.sample.n_prompts]
    # under torchrun every rank evaluates its share of the batches; rank 0 samples, writes and prints
    loss_before = trainer.evaluate()
    dialogues_before, stop_before = [], 0.0
    if run.rank0:
        dialogues_before, stop_before = sample_replies(model, tokenizer, prompts, config.sample)
    logger.info("before SFT: val loss %.4f, %.0f%% of replies ended on their own", loss_before, 100 * stop_before)

    run.train(trainer)
    trainer.plot(os.path.join(config.system.work_dir, 'loss.png'))

    barrier()  # rank 0 has written ckpt_best
    best = find_checkpoint(os.path.join(config.system.work_dir, 'ckpt_best'))
    if best is not None:
        model.load_state_dict(read_checkpoint(best)[0])
    loss_after = trainer.evaluate()
    results = {'val_loss_before': loss_before, 'val_loss_after': loss_after, 'iters': trainer.iter_num}
    if not run.rank0:
        return results  # rank 0 writes and reports
    out = os.path.join(config.system.work_dir, 'model')
    model.save_pretrained(out)
    save_tokenizer(encoder, out)
    dialogues_after, stop_after = sample_replies(model, tokenizer, prompts, config.sample)

    results.update(stop_rate_before=stop_before, stop_rate_after=stop_after, model=out,
                   dialogues_before=dialogues_before, dialogues_after=dialogues_after)
    run.finish(results)
    n = config.sample.n_shown
    print(f"--- before SFT: val loss {loss_before:.4f}, {100 * stop_before:.0f}% of replies ended ---")
    print('\n\n'.join(map(format_dialogue, dialogues_before[:n])))
    print(f"\n--- after SFT: val loss {loss_after:.4f}, {100 * stop_after:.0f}% of replies ended ---")
    print('\n\n'.join(map(format_dialogue, dialogues_after[:n])))
    print(f"\nchat model in {out}: python -m mingpt.chat --model {out}")
    return results


if __name__ == '__main__':
    with process_group():  # under torchrun: evaluations before and after run() reach every rank
        run_script(main, sys.argv[1:])
