"""
The terminal chat with a chat model (see mingpt/chat/__init__.py for the conversation format).

    python -m mingpt.chat --model out/chat/sft/model      # a REPL; /help lists the commands
    echo "Good morrow" | python -m mingpt.chat --model out/chat/sft/model   # one reply per input line

On a terminal there is a prompt and the replies are labelled; with stdin piped, each input line is a
user message and the output is exactly the replies, one per line (anything else goes to stderr).
A line whose first word is a /command is never sent to the model: /help, /reset and /quit do what
they say, and any other /command is refused with a one-line message.

The conversation is kept within the model's context: before each reply the oldest turns that no
longer fit are dropped from the history itself (the chat says so once), so a reply costs the same in
a long chat as in a short one. The model sees what it would see if the history were kept whole,
since a prompt only ever holds the newest turns that fit (ChatTokenizer.fit).
"""

import argparse
import dataclasses
import logging
import re
import sys

from mingpt.chat import PromptTooLong, add_sampling_args, load_chat_model, prompt_budget, sampling_flags, stream_reply
from mingpt.quantize import METHODS, quantize
from mingpt.utils import run_script

logger = logging.getLogger('mingpt.chat')

COMMANDS = {
    '/help': 'list the commands',
    '/reset': 'start a new conversation (the --system message stays)',
    '/quit': 'leave (Ctrl-D does too)',
}
COMMAND = re.compile(r'/[A-Za-z]\w*')  # the first word of a command line; "/etc/hosts is..." is a message
HELP = ''.join(f'{name:8} {what}\n' for name, what in COMMANDS.items())


def repl(model, tokenizer, args, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr):
    """
    Read user messages line by line and stream the replies. On a terminal there is a prompt, the
    replies are labelled and notes (/help, a refused command, ...) go to stdout; with stdin piped
    each reply is written as it is, followed by a newline, so stdout is exactly the replies, and the
    notes go to stderr. Ends at EOF or /quit. -> the number of messages refused (too long)
    """
    interactive = stdin.isatty()
    notes = stdout if interactive else stderr
    fresh = [{'role': 'system', 'content': args.system}] if args.system else []
    messages = list(fresh)
    budget = prompt_budget(model.block_size, args.max_new_tokens)  # the same as stream_reply's
    said_dropped = False  # the note on dropped turns, once per conversation
    options = sampling_flags(args)
    refused = 0
    if interactive:
        stdout.write("Chatting with %s. /help lists the commands, /quit (or Ctrl-D) leaves.\n" % args.model)
    use_input = interactive and stdin is sys.stdin and stdout is sys.stdout
    if use_input:
        try:
            import readline  # noqa: F401  (input() then gets line editing and history)
        except ImportError:
            pass
    turn = 0
    while True:
        if use_input:
            try:
                line = input('\nyou> ') + '\n'
            except EOFError:
                line = ''
        else:
            if interactive:
                stdout.write('\nyou> ')
                stdout.flush()
            line = stdin.readline()
        if not line:  # EOF
            if interactive:
                stdout.write('\n')
            return refused
        text = line.rstrip('\r\n')
        if not text.strip():
            continue
        command = text.split(maxsplit=1)[0]
        if COMMAND.fullmatch(command):
            if command == '/quit':
                return refused
            if command == '/reset':
                messages, said_dropped = list(fresh), False
                if interactive:
                    stdout.write('(conversation reset)\n')
            elif command == '/help':
                notes.write(HELP)
            else:
                notes.write(f"unknown command {command}: /help lists the commands\n")
            notes.flush()
            continue
        messages.append({'role': 'user', 'content': text})
        seed = None if args.seed is None else args.seed + turn  # turn i samples with seed + i
        turn += 1
        try:
            kept = tokenizer.fit(messages, budget)
        except PromptTooLong as e:
            messages.pop()
            refused += 1
            logger.error("%s", e)
            stdout.write('\n')
            continue
        if len(kept) < len(messages):
            messages = kept
            if not said_dropped:
                said_dropped = True
                notes.write(f"(the conversation no longer fits in the model's context of {model.block_size} "
                            "tokens: from now on its oldest turns are dropped)\n")
                notes.flush()
        if interactive:
            stdout.write('bot> ')
        reply = []
        try:
            for piece in stream_reply(model, tokenizer, messages, args.max_new_tokens,
                                      dataclasses.replace(options, seed=seed)):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            stdout.write(' [stopped]')  # Ctrl-C stops the reply, not the chat
        stdout.write('\n')
        stdout.flush()
        messages.append({'role': 'assistant', 'content': ''.join(reply)})


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.chat', description=__doc__.split('\n\n')[0].strip())
    add_sampling_args(parser)
    parser.add_argument('--system', default=None, help='a system message to start every conversation')
    parser.add_argument('--seed', type=int, default=None, help='make the replies reproducible')
    parser.add_argument('--quantize', choices=METHODS, default=None,
                        help='int8: the linears in int8 with per-channel scales, a quarter of the bytes (mingpt.quantize)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    sampling_flags(args)
    model, tokenizer = load_chat_model(args.model, args.device)
    quantize(model, args.quantize)
    # a reply may hold any character; never die on a terminal's narrower encoding
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='replace')
    try:
        refused = repl(model, tokenizer, args)
    except KeyboardInterrupt:
        sys.stdout.write('\n')
        return
    if refused and not sys.stdin.isatty():  # a script piping messages learns that some got no reply
        sys.exit(2)


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
