"""
Makes chat data from a play: tiny shakespeare's dialogue as conversations, in JSONL.

    python projects/chat/make_data.py                      # -> out/chat/data/{train,val}.jsonl
    python projects/chat/make_data.py --path=play.txt --out=data/ --max-chars=200

There is no conversation dataset on this machine, so we make one from what people say to each other
in the plays: one speaker's speech is the user's turn, the reply of the next speaker the assistant's.
While two characters keep answering each other (A, B, A, B, ...) the conversation goes on, up to
--max-messages messages. Half of the conversations open with a system message naming the character
the assistant plays ("You are ROMEO."), so that a chat can pick one with --system.

Each line of the output is one conversation, the format sft.py reads (and the one most chat datasets
come in, so any such file works in place of these):

    {"messages": [{"role": "system", "content": "You are ROMEO."},
                  {"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

The text must be in tiny shakespeare's layout: a speaker's name alone on a line ending with ':',
after a blank line, then the speech. Conversations starting in the last --val-fraction of the
speeches go to val.jsonl, the others to train.jsonl.
"""

import argparse
import json
import logging
import os
import random
import re
import sys

from mingpt.data import read_text_file
from mingpt.errors import ConfigError
from mingpt.utils import run_script

logger = logging.getLogger('chat.make_data')

SPEAKER = re.compile(r"^[A-Z][A-Za-z' ,.-]{0,40}:$")


def read_speeches(text):
    """ the play as a list of (speaker, speech), in order; a speech's line breaks are kept """
    speeches = []
    after_blank = True
    for line in text.splitlines():
        if not line.strip():
            after_blank = True
            continue
        if after_blank and SPEAKER.match(line.strip()):
            speeches.append((line.strip()[:-1], []))
        elif speeches:
            speeches[-1][1].append(line.strip())
        after_blank = False
    return [(who, '\n'.join(lines)) for who, lines in speeches if lines]


def conversations(speeches, max_chars=300, max_messages=6, system_fraction=0.5, seed=0):
    """
    Yield (start index, messages): from every speech i to which another character replies, the
    longest run of A, B, A, B, ... speeches (at most max_messages, an even number, each speech at
    most max_chars long), A as the user and B as the assistant.
    """
    rng = random.Random(seed)
    for i in range(len(speeches) - 1):
        a, b = speeches[i][0], speeches[i + 1][0]
        if a == b:
            continue
        run = []
        for j in range(i, min(i + max_messages, len(speeches))):
            who, speech = speeches[j]
            if who != (a, b)[(j - i) % 2] or len(speech) > max_chars:
                break
            run.append({'role': ('user', 'assistant')[(j - i) % 2], 'content': speech})
        run = run[:len(run) // 2 * 2]  # end on the assistant's reply
        if not run:
            continue
        if rng.random() < system_fraction:
            run.insert(0, {'role': 'system', 'content': f'You are {b}.'})
        yield i, run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--path', default=None, help='the play (default: tiny shakespeare)')
    parser.add_argument('--out', default='out/chat/data', help='directory for train.jsonl, val.jsonl')
    parser.add_argument('--max-chars', type=int, default=300, help='longest speech kept')
    parser.add_argument('--max-messages', type=int, default=6, help='longest conversation (messages)')
    parser.add_argument('--val-fraction', type=float, default=0.1)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.max_chars < 1:
        raise ConfigError(f"--max-chars must be >= 1 (got {args.max_chars})")
    if args.max_messages < 2:
        raise ConfigError(f"--max-messages must be >= 2 (got {args.max_messages}): a message and its reply")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1) (got {args.val_fraction})")

    path = args.path
    if path is None:
        from mingpt.download import get_tiny_shakespeare
        path = get_tiny_shakespeare()
    speeches = read_speeches(read_text_file(path))
    if len(speeches) < 10:
        raise ConfigError(f"found only {len(speeches)} speeches in {path}; the text must have "
                          "speakers' names alone on a line ending with ':' (tiny shakespeare's layout)")
    split = int(len(speeches) * (1 - args.val_fraction))
    os.makedirs(args.out, exist_ok=True)
    counts = {'train': 0, 'val': 0}
    with open(os.path.join(args.out, 'train.jsonl'), 'w', encoding='utf-8') as ftrain, \
         open(os.path.join(args.out, 'val.jsonl'), 'w', encoding='utf-8') as fval:
        for i, messages in conversations(speeches, args.max_chars, args.max_messages, seed=args.seed):
            # a conversation reaching into the other split would leak its speeches: skip it
            if i < split <= i + len(messages):
                continue
            name = 'train' if i < split else 'val'
            (ftrain if name == 'train' else fval).write(json.dumps({'messages': messages}) + '\n')
            counts[name] += 1
    logger.info("%d speeches -> %d train and %d val conversations in %s", len(speeches),
                counts['train'], counts['val'], args.out)
    return counts


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
