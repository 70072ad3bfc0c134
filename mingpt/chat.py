"""
Chat: the conversation format a model is fine-tuned on, and a command-line chat with such a model.

    python -m mingpt.chat --model out/chat/sft/model      # a REPL; /reset, /quit
    echo "Good morrow" | python -m mingpt.chat --model out/chat/sft/model   # one reply per input line

The format. A conversation is a list of messages, [{'role': 'system'|'user'|'assistant',
'content': str}, ...]. It becomes one token sequence, each message wrapped in special tokens:

    <|endoftext|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> <|user|> ...

The special tokens are new entries of the BPE vocabulary (add_chat_tokens) and new rows of the
model's embedding and output layer (resize_token_embeddings). Message text is always encoded as
ordinary text, so a user who types "<|end|>" gets the characters, never the control token.

Fine-tuning (projects/chat/sft.py) trains only on what the assistant says: render_conversation
returns a mask that is 1 on the assistant's tokens and on the <|end|> that closes each of its
messages (so the model learns to stop), and 0 on everything else. To reply, the conversation is
rendered up to an open <|assistant|> (render_for_completion) and the one generation engine
(mingpt.generate.stream) runs until the model emits <|end|> (or any other special token).

A model directory for chatting is a Hugging Face directory (GPT.save_pretrained) that also holds
the tokenizer, encoder.json + vocab.bpe (save_tokenizer); without them GPT-2's tokenizer is used.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

from mingpt import generate as generation
from mingpt.bpe import ENDOFTEXT, Encoder, get_encoder
from mingpt.download import DownloadError
from mingpt.model import GPT, Linear

logger = logging.getLogger(__name__)

SYSTEM, USER, ASSISTANT, END = '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = {'system': SYSTEM, 'user': USER, 'assistant': ASSISTANT}
TOKENIZER_FILES = ('encoder.json', 'vocab.bpe')

# -----------------------------------------------------------------------------
# the tokenizer: special tokens in, files out

def add_chat_tokens(encoder):
    """
    A bpe.Encoder with <|endoftext|> and the chat tokens added at the end of the vocabulary (new
    ids n_vocab, n_vocab + 1, ...), or encoder itself when it already has them all. Every existing
    token keeps its id, so a model trained on the old vocabulary reads the same ids as before.
    """
    missing = [t for t in (ENDOFTEXT, *CHAT_TOKENS) if t not in encoder.encoder]
    if not missing:
        return encoder
    vocab = dict(encoder.encoder)
    for i, token in enumerate(missing):
        vocab[token] = encoder.n_vocab + i
    return Encoder(vocab, _merges(encoder))


def _merges(encoder):
    """ the merges of an Encoder, in rank order: what vocab.bpe lists """
    return sorted(encoder.bpe_ranks, key=encoder.bpe_ranks.get)


def save_tokenizer(encoder, directory):
    """ write encoder.json and vocab.bpe (GPT-2's format, which bpe.get_encoder(path) reads) """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / 'encoder.json').write_text(json.dumps(encoder.encoder, ensure_ascii=False), encoding='utf-8')
    lines = ['#version: 0.2'] + [f'{a} {b}' for a, b in _merges(encoder)]
    (d / 'vocab.bpe').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return d


def load_tokenizer(directory=None):
    """ the Encoder saved in directory (encoder.json + vocab.bpe), else GPT-2's """
    if directory is not None and all((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        return get_encoder(directory)
    return get_encoder()

# -----------------------------------------------------------------------------
# the model: room for the new tokens

def resize_token_embeddings(model, vocab_size):
    """
    Grow the model's vocabulary to vocab_size tokens, in place: new rows at the end of the token
    embedding (wte) and of lm_head, the old rows untouched, so every old token's logits stay
    exactly what they were. A tied lm_head stays tied to the new wte. The new rows start at the
    mean of the old ones: the new tokens' logits then start at the average logit, which is far
    below the likely tokens', so the model does not emit them before it is trained to.
    Returns the model.
    """
    old = model.config.vocab_size
    if vocab_size == old:
        return model
    if vocab_size < old:
        raise ValueError(f"resize_token_embeddings only grows the vocabulary (the model has {old} "
                         f"tokens, asked for {vocab_size}); removing tokens would renumber nothing "
                         "but lose their rows")
    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    w = wte.weight
    new_wte = nn.Embedding(vocab_size, w.size(1), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new_wte.weight[:old] = w
        new_wte.weight[old:] = w.mean(dim=0)
    model.transformer.wte = new_wte
    if tied:
        model.lm_head.weight = new_wte.weight
    else:
        h = head.weight
        new_head = Linear(h.size(1), vocab_size, bias=False, device=h.device, dtype=h.dtype)
        with torch.no_grad():
            new_head.weight[:old] = h
            new_head.weight[old:] = h.mean(dim=0)
        model.lm_head = new_head
    model.config.vocab_size = vocab_size
    logger.info("resized the vocabulary from %d to %d tokens%s", old, vocab_size,
                " (lm_head tied to wte)" if tied else "")
    return model

# -----------------------------------------------------------------------------
# conversations -> token ids

class PromptTooLong(ValueError):
    """ the conversation does not fit in the token budget even with its old turns dropped """


def check_messages(messages):
    """ raise a ValueError saying what is wrong with a conversation, if anything """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"a conversation is a list of messages (got {type(messages).__name__}); "
                         "e.g. [{'role': 'user', 'content': 'Hello'}]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' (got {m!r:.80})")
        if m['role'] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; the roles are "
                             f"{', '.join(map(repr, ROLES))}")
        if not isinstance(m['content'], str):
            raise ValueError(f"message {i} ({m['role']}) has content of type "
                             f"{type(m['content']).__name__}; it must be a str")
        if m['role'] == 'system' and i != 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")


class ChatTokenizer:
    """
    A BPE Encoder that has the chat tokens, plus the conversation format:

        tok = ChatTokenizer(add_chat_tokens(get_encoder()))
        ids, mask = tok.render_conversation(messages)   # for training
        ids = tok.render_for_completion(messages)       # for replying: ends with <|assistant|>
    """

    def __init__(self, encoder):
        missing = [t for t in (ENDOFTEXT, *CHAT_TOKENS) if t not in encoder.special_tokens]
        if missing:
            raise ValueError(f"the tokenizer lacks the chat tokens {', '.join(missing)}: it is a "
                             "base model's tokenizer. Fine-tune the model on conversations first "
                             "(projects/chat/sft.py adds them), or call add_chat_tokens(encoder)")
        self.encoder = encoder
        self.n_vocab = encoder.n_vocab
        self.bos_id = encoder.special_tokens[ENDOFTEXT]
        self.end_id = encoder.special_tokens[END]
        self.assistant_id = encoder.special_tokens[ASSISTANT]
        self.role_ids = {role: encoder.special_tokens[tok] for role, tok in ROLES.items()}
        # the assistant's turn is over at <|end|>, and also if it starts another turn of its own
        self.stop_ids = frozenset(encoder.special_tokens.values())

    def encode(self, text):
        """ ordinary text -> ids; special-token text in it stays text """
        return self.encoder.encode_ordinary(text)

    def decode(self, ids):
        return self.encoder.decode(ids)

    def render_conversation(self, messages, max_tokens=None):
        """
        messages -> (ids, mask), two lists of ints of equal length. mask is 1 on the tokens the
        model should learn to produce: each assistant message's content and its closing <|end|>.
        max_tokens crops both (training windows are at most block_size + 1 tokens).
        """
        check_messages(messages)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            learn = int(m['role'] == 'assistant')
            content = self.encode(m['content'])
            ids += [self.role_ids[m['role']], *content, self.end_id]
            mask += [0] + [learn] * (len(content) + 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, messages, max_tokens=None):
        """
        messages (ending with a user message) -> ids ending with <|assistant|>, the prompt from
        which the model writes the next reply. With max_tokens, the oldest turns are dropped
        (the system message is kept) until the prompt fits; PromptTooLong if it never does.
        """
        check_messages(messages)
        if not messages or messages[-1]['role'] != 'user':
            raise ValueError("to reply, the conversation must end with a user message (got "
                             f"{'nothing' if not messages else messages[-1]['role']!r} last)")
        system = list(messages[:1]) if messages[0]['role'] == 'system' else []
        turns = list(messages[len(system):])
        while True:
            ids = self.render_conversation(system + turns)[0] + [self.assistant_id]
            if max_tokens is None or len(ids) <= max_tokens:
                return ids
            # drop the oldest exchange: everything before the next user message after the first
            nxt = next((i for i in range(1, len(turns)) if turns[i]['role'] == 'user'), None)
            if nxt is None:
                raise PromptTooLong(
                    f"the message is too long: the prompt is {len(ids)} tokens but at most "
                    f"{max_tokens} fit (with room left for the reply); shorten the message"
                    + (" or the system prompt" if system else "") + ", or ask for fewer new tokens")
            turns = turns[nxt:]

# -----------------------------------------------------------------------------
# replying: the generation engine's stream, cut at the end of the turn, as text

def prompt_budget(model, max_new_tokens):
    """
    How many prompt tokens to allow: enough room for max_new_tokens of reply in the context, but
    never less than half of it (a longer reply then slides the window, see mingpt.generate).
    """
    return max(model.block_size - max_new_tokens, model.block_size // 2)


def stream_reply(model, tokenizer, messages, max_new_tokens=256, temperature=0.8, top_k=None,
                 top_p=None, seed=None, max_prompt_tokens=None, info=None, should_stop=None):
    """
    Yield the assistant's reply to messages as text pieces, as the tokens are generated; a piece
    never ends inside a UTF-8 character. Stops at the end of the turn or after max_new_tokens.
    temperature 0 is greedy. Old turns are dropped to fit max_prompt_tokens (default
    prompt_budget). If info (a dict) is given it receives prompt_tokens, tokens (generated) and
    finish_reason ('stop': the model ended its turn, 'length': max_new_tokens ran out,
    'cancelled': should_stop). should_stop, a callable, is asked before every token: checking per
    token rather than per text piece matters because a piece can wait on several tokens.
    Errors in the arguments are raised at the call, before any token.
    """
    info = {} if info is None else info
    budget = prompt_budget(model, max_new_tokens)
    if max_prompt_tokens is not None:
        budget = min(budget, max_prompt_tokens)
    ids = tokenizer.render_for_completion(messages, max_tokens=budget)
    steps = generation.stream(model, [ids], max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              eos_token_id=tokenizer.end_id)
    info.update(prompt_tokens=len(ids), tokens=0, finish_reason=None)

    def token_ids():
        for tok in steps:  # (1,) per step: one prompt
            if should_stop is not None and should_stop():
                info['finish_reason'] = 'cancelled'
                steps.close()
                return
            info['tokens'] += 1
            t = int(tok)
            if t in tokenizer.stop_ids:
                info['finish_reason'] = 'stop'
                return
            yield t
        info['finish_reason'] = 'length'

    return generation.decode_text(token_ids(), tokenizer.decode)


def load_chat_model(path, device='cpu'):
    """
    (model in eval mode, ChatTokenizer) from a chat model directory: weights via
    GPT.from_pretrained, the tokenizer from the same directory (else GPT-2's).
    """
    model = GPT.from_pretrained(path).to(device).eval()
    local = Path(path).is_dir() and all((Path(path) / f).is_file() for f in TOKENIZER_FILES)
    try:
        tokenizer = ChatTokenizer(load_tokenizer(path if local else None))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.n_vocab} tokens but the model only "
                         f"{model.config.vocab_size}; the model was not resized for the chat tokens "
                         "(resize_token_embeddings) or the tokenizer files belong to another model")
    return model, tokenizer

# -----------------------------------------------------------------------------
# the command-line chat

def add_sampling_args(parser):
    """ the flags the CLI and the web server share """
    parser.add_argument('--model', required=True,
                        help='a chat model directory (config.json, model.safetensors, encoder.json, '
                             'vocab.bpe), e.g. out/chat/sft/model from projects/chat/sft.py')
    parser.add_argument('--temperature', type=float, default=0.8, help='0 is greedy (default 0.8)')
    parser.add_argument('--top-k', type=int, default=50, help='sample from the k likeliest tokens '
                                                              '(default 50; 0 for all)')
    parser.add_argument('--top-p', type=float, default=None, help='nucleus sampling, e.g. 0.9')
    parser.add_argument('--max-new-tokens', type=int, default=256, help='longest reply (default 256)')
    parser.add_argument('--device', default='cpu')


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
    parser = argparse.ArgumentParser(prog='python -m mingpt.chat', description=__doc__.split('\n\n')[0])
    add_sampling_args(parser)
    parser.add_argument('--system', default=None, help='a system message to start every conversation')
    parser.add_argument('--seed', type=int, default=None, help='make the replies reproducible')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    try:
        generation.check_sampling_args(args.temperature, args.top_k or None, args.top_p)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
        model, tokenizer = load_chat_model(args.model, args.device)
    except (ValueError, OSError, DownloadError) as e:
        parser.exit(2, f"error: {e}\n")
    # a reply may hold any character; never die on a terminal's narrower encoding
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='replace')
    try:
        repl(model, tokenizer, args)
    except KeyboardInterrupt:
        sys.stdout.write('\n')


if __name__ == '__main__':
    main()
