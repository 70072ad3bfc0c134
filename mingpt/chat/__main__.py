"""
The terminal chat with a chat model (see mingpt/chat/__init__.py for the conversation format).

    python -m mingpt.chat --model out/chat/sft/model      # a REPL; /reset, /quit
    echo "Good morrow" | python -m mingpt.chat --model out/chat/sft/model   # one reply per input line

On a terminal there is a prompt and the replies are labelled; with stdin piped, each input line is a
user message and the output is exactly the replies, one per line.
"""

import argparse
import logging
import sys

from mingpt.chat import PromptTooLong, add_sampling_args, load_chat_model, stream_reply
from mingpt.errors import ConfigError
from mingpt.generate import check_sampling_args
from mingpt.utils import run_script

logger = logging.getLogger('mingpt.chat')


def sampling_kwargs(args):
    return dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)


def repl(model, tokenizer, args, stdin=sys.stdin, stdout=sys.stdout):
    """
    Read user messages line by line and stream the replies. On a terminal there is a prompt and
    the replies are labelled; with stdin piped each reply is written as it is, followed by a
    newline, so the output is exactly the replies. Ends at EOF or /quit.
    """
    interactive = stdin.isatty()
    messages = [{'role': 'system', 'content': args.system}] if args.system else []
    fresh = list(messages)
    kwargs = sampling_kwargs(args)
    if interactive:
        stdout.write("Chatting with %s. /reset starts over, /quit (or Ctrl-D) leaves.\n" % args.model)
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
            return
        text = line.rstrip('\r\n')
        if text.strip() == '/quit':
            return
        if text.strip() == '/reset':
            messages = list(fresh)
            if interactive:
                stdout.write('(conversation reset)\n')
            continue
        if not text.strip():
            continue
        messages.append({'role': 'user', 'content': text})
        if interactive:
            stdout.write('bot> ')
        seed = None if args.seed is None else args.seed + turn
        turn += 1
        reply = []
        try:
            for piece in stream_reply(model, tokenizer, messages, args.max_new_tokens, seed=seed, **kwargs):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            stdout.write(' [stopped]')  # Ctrl-C stops the reply, not the chat
        except PromptTooLong as e:
            messages.pop()
            logger.error("%s", e)
            stdout.write('\n')
            continue
        stdout.write('\n')
        stdout.flush()
        messages.append({'role': 'assistant', 'content': ''.join(reply)})


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mingpt.chat', description=__doc__.split('\n\n')[0].strip())
    add_sampling_args(parser)
    parser.add_argument('--system', default=None, help='a system message to start every conversation')
    parser.add_argument('--seed', type=int, default=None, help='make the replies reproducible')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    check_sampling_args(args.temperature, args.top_k or None, args.top_p)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    model, tokenizer = load_chat_model(args.model, args.device)
    # a reply may hold any character; never die on a terminal's narrower encoding
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='replace')
    try:
        repl(model, tokenizer, args)
    except KeyboardInterrupt:
        sys.stdout.write('\n')


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
