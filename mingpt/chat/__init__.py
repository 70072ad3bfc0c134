"""
Chat: the conversation format a model is fine-tuned on, and replies streamed from such a model.
The terminal chat is in __main__.py:

    python -m mingpt.chat --model out/chat/sft/model      # a REPL; /help lists the commands
    echo "Good morrow" | python -m mingpt.chat --model out/chat/sft/model   # one reply per input line

The format. A conversation is a list of messages, [{'role': 'system'|'user'|'assistant',
'content': str}, ...]. It becomes one token sequence, each message wrapped in special tokens:

    <|endoftext|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> <|user|> ...

The special tokens are new entries of the BPE vocabulary (add_chat_tokens) and new rows of the
model's embedding and output layer (GPT.resize_token_embeddings). Message text is always encoded as
ordinary text, so a user who types "<|end|>" gets the characters, never the control token.

Fine-tuning (projects/chat/sft.py) trains only on what the assistant says: render_conversation
returns a mask that is 1 on the assistant's tokens and on the <|end|> that closes each of its
messages (so the model learns to stop), and 0 on everything else. To reply, the conversation is
rendered up to an open <|assistant|> (render_for_completion) and the one generation engine
(mingpt.generate.stream) runs until the model emits <|end|> (or any other special token).

A model directory for chatting is a Hugging Face directory (GPT.save_pretrained) that also holds
the tokenizer, encoder.json + vocab.bpe (mingpt.tokenizers.save_tokenizer); without them GPT-2's
tokenizer is used.
"""

import logging
from pathlib import Path

import dataclasses

from mingpt import generate as generation
from mingpt.bpe import ENDOFTEXT, Encoder, get_encoder
from mingpt.errors import ConfigError, PromptTooLong, WeightsError
from mingpt.hardware import resolve_device
from mingpt.model import GPT
from mingpt.tokenizers import find_tokenizer

logger = logging.getLogger(__name__)

SYSTEM, USER, ASSISTANT, END = '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = {'system': SYSTEM, 'user': USER, 'assistant': ASSISTANT}

# -----------------------------------------------------------------------------
# the tokenizer: the chat tokens in

def add_chat_tokens(encoder):
    """
    A bpe.Encoder with <|endoftext|> and the chat tokens added at the end of the vocabulary (new
    ids n_vocab, n_vocab + 1, ...), or encoder itself when it already has them all. Every existing
    token keeps its id, so a model trained on the old vocabulary reads the same ids as before
    (grow the model to match with model.resize_token_embeddings(encoder.n_vocab)).
    """
    check_bpe(encoder)
    missing = [t for t in (ENDOFTEXT, *CHAT_TOKENS) if t not in encoder.encoder]
    if not missing:
        return encoder
    vocab = dict(encoder.encoder)
    for i, token in enumerate(missing):
        vocab[token] = encoder.n_vocab + i
    return Encoder(vocab, encoder.merges())


def check_bpe(encoder):
    """ a ConfigError unless encoder is a BPE Encoder, the one kind of tokenizer the chat tokens go into """
    if not isinstance(encoder, Encoder):
        raise ConfigError(f"a chat model needs a BPE tokenizer (encoder.json + vocab.bpe), not a "
                          f"{type(encoder).__name__}")


def tokenizer_or_gpt2(path):
    """
    The BPE tokenizer saved with the model at path (encoder.json + vocab.bpe, see mingpt.tokenizers),
    or GPT-2's when there is none there: path is a hub name, or a directory without tokenizer files.
    """
    saved = find_tokenizer(path) if Path(path).is_dir() else None
    logger.info("tokenizer: %s", "GPT-2's" if saved is None else f"from {path}")
    return get_encoder() if saved is None else saved

# -----------------------------------------------------------------------------
# conversations -> token ids

def check_messages(messages):
    """ raise a ConfigError (a ValueError) saying what is wrong with a conversation, if anything """
    if not isinstance(messages, (list, tuple)):
        raise ConfigError(f"a conversation is a list of messages (got {type(messages).__name__}); "
                          "e.g. [{'role': 'user', 'content': 'Hello'}]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
            raise ConfigError(f"message {i} must be a dict with 'role' and 'content' (got {m!r:.80})")
        if not isinstance(m['role'], str) or m['role'] not in ROLES:
            raise ConfigError(f"message {i} has role {m['role']!r:.40}; the roles are "
                              f"{', '.join(map(repr, ROLES))}")
        if not isinstance(m['content'], str):
            raise ConfigError(f"message {i} ({m['role']}) has content of type "
                              f"{type(m['content']).__name__}; it must be a str")
        if m['role'] == 'system' and i != 0:
            raise ConfigError(f"message {i} is a system message; only the first message may be one")


class ChatTokenizer:
    """
    A BPE Encoder that has the chat tokens, plus the conversation format:

        tok = ChatTokenizer(add_chat_tokens(get_encoder()))
        ids, mask = tok.render_conversation(messages)   # for training
        ids = tok.render_for_completion(messages)       # for replying: ends with <|assistant|>
    """

    def __init__(self, encoder):
        check_bpe(encoder)
        missing = [t for t in (ENDOFTEXT, *CHAT_TOKENS) if t not in encoder.special_tokens]
        if missing:
            raise ConfigError(f"the tokenizer lacks the chat tokens {', '.join(missing)}: it is a "
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
        (the system message is kept) until the prompt fits (see fit); PromptTooLong if it never does.
        """
        return self.render_conversation(self.fit(messages, max_tokens))[0] + [self.assistant_id]

    def fit(self, messages, max_tokens=None):
        """
        The newest part of messages (ending with a user message) whose prompt fits in max_tokens:
        the system message, if any, and the latest turns, from the first or from a user message on;
        all of messages without max_tokens. Each message is encoded once, whatever the number of turns dropped.
        PromptTooLong if even the last user message alone does not fit.
        """
        check_messages(messages)
        if not messages or messages[-1]['role'] != 'user':
            raise ConfigError("to reply, the conversation must end with a user message (got "
                              f"{'nothing' if not messages else messages[-1]['role']!r} last)")
        if max_tokens is None:
            return list(messages)
        system = list(messages[:1]) if messages[0]['role'] == 'system' else []
        # a message is <|role|> content <|end|>; the prompt adds <|endoftext|> and <|assistant|>
        n_tokens = 2 + sum(len(self.encode(m['content'])) + 2 for m in system)
        start = None  # where the kept turns start: the first turn, or a user message
        for i in range(len(messages) - 1, len(system) - 1, -1):
            n_tokens += len(self.encode(messages[i]['content'])) + 2
            if messages[i]['role'] != 'user' and i > len(system):
                continue
            if n_tokens > max_tokens:  # starting earlier only adds tokens
                break
            start = i
        if start is None:
            raise PromptTooLong(
                f"the message is too long: the prompt is {n_tokens} tokens but at most "
                f"{max_tokens} fit (with room left for the reply); shorten the message"
                + (" or the system prompt" if system else "") + ", or ask for fewer new tokens")
        return system + list(messages[start:])

# -----------------------------------------------------------------------------
# replying: the generation engine's stream, cut at the end of the turn, as text

def prompt_budget(block_size, max_new_tokens, max_prompt_tokens=None):
    """
    How many prompt tokens to allow: enough room for max_new_tokens of reply in the context, but
    never less than half of it (a longer reply then slides the window, see mingpt.decoder); at most
    max_prompt_tokens, if given.
    """
    budget = max(block_size - max_new_tokens, block_size // 2)
    return budget if max_prompt_tokens is None else min(budget, max_prompt_tokens)


def stream_reply(model, tokenizer, messages, max_new_tokens=256, options=None, *, max_prompt_tokens=None,
                 info=None, should_stop=None, engine=None, **sampling):
    """
    Yield the assistant's reply to messages as text pieces, as the tokens are generated; a piece
    never ends inside a UTF-8 character. Stops at the end of the turn or after max_new_tokens.
    options: a mingpt.sampling.SamplingOptions, or its fields as keywords (default: sampling at
    temperature 0.8; temperature 0 is greedy); the turn's end is added to its stop ids. Old turns are
    dropped to fit max_prompt_tokens (default prompt_budget). If info (a dict) is given it receives
    prompt_tokens, tokens (generated) and finish_reason ('stop': the model ended its turn, 'length':
    max_new_tokens ran out, 'cancelled': should_stop). should_stop, a callable, is asked before
    every token: checking per token rather than per text piece matters because a piece can wait on
    several tokens. engine, a mingpt.batching.BatchEngine, generates the reply in its batch, with
    the other requests it is running (it joins at the first token asked for); by default, alone.
    Errors in the arguments are raised at the call, before any token.
    """
    if options is None:
        sampling = {'do_sample': True, 'temperature': 0.8, **sampling}
    options = generation.checked_options(max_new_tokens, options, **sampling)
    options = dataclasses.replace(options, eos_token_id=options.stop_ids | tokenizer.stop_ids)
    info = {} if info is None else info
    budget = prompt_budget(model.block_size, max_new_tokens, max_prompt_tokens)
    ids = tokenizer.render_for_completion(messages, max_tokens=budget)
    if engine is None:
        request, steps = None, generation.stream(model, [ids], max_new_tokens, options)
    else:  # should_stop is the engine's to ask too: it frees the request's row at its next step
        request = engine.request(ids, max_new_tokens, options, should_stop=should_stop)
        steps = _joined(engine, request)
    info.update(prompt_tokens=len(ids), tokens=0, finish_reason=None)

    def token_ids():
        for tok in steps:  # (1,) per step: one prompt
            if should_stop is not None and should_stop():
                info['finish_reason'] = 'cancelled'
                steps.close()
                return
            info['tokens'] += 1
            t = int(tok)
            if t in options.stop_ids:
                info['finish_reason'] = 'stop'
                return
            yield t
        info['finish_reason'] = 'cancelled' if request and request.finish_reason == 'cancelled' else 'length'

    return generation.decode_text(token_ids(), tokenizer.decode)


def _joined(engine, request):
    """
    request's tokens, submitted to engine when the first one is asked for. Closed early, it
    returns once the engine has freed the request's row (at its next step), so that whoever
    counts rows in use (the web server's slots) never counts one twice.
    """
    try:
        yield from engine.submit(request)
    finally:
        request.cancel()
        request.done.wait(timeout=60)  # a step takes milliseconds; the bound only guards a stopped engine

# -----------------------------------------------------------------------------
# a chat model from its directory, and the flags of the programs that chat with one

def load_chat_model(path, device='cpu'):
    """
    (model in eval mode, ChatTokenizer) from a chat model directory: weights via
    GPT.from_pretrained, the tokenizer from the same directory (else GPT-2's).
    """
    device = resolve_device(device)
    model = GPT.from_pretrained(path).to(device).eval()
    encoder = tokenizer_or_gpt2(path)
    try:
        tokenizer = ChatTokenizer(encoder)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
    if tokenizer.n_vocab > model.config.vocab_size:
        raise WeightsError(f"{path}: the tokenizer has {tokenizer.n_vocab} tokens but the model only "
                           f"{model.config.vocab_size}; the model was not resized for the chat tokens "
                           "(GPT.resize_token_embeddings) or the tokenizer files belong to another model")
    return model, tokenizer


def sampling_flags(args):
    """
    The SamplingOptions of add_sampling_args' flags, checked before a model is loaded (a ConfigError
    for any out of range)
    """
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    return generation.checked_options(args.max_new_tokens, do_sample=True, temperature=args.temperature,
                                      top_k=args.top_k or None, top_p=args.top_p)


def add_sampling_args(parser):
    """ the flags the terminal chat (__main__.py) and the web server (mingpt.serve) share """
    parser.add_argument('--model', required=True,
                        help='a chat model directory (config.json, model.safetensors, encoder.json, '
                             'vocab.bpe), e.g. out/chat/sft/model from projects/chat/sft.py')
    parser.add_argument('--temperature', type=float, default=0.8, help='0 is greedy (default 0.8)')
    parser.add_argument('--top-k', type=int, default=50, help='sample from the k likeliest tokens '
                                                              '(default 50; 0 for all)')
    parser.add_argument('--top-p', type=float, default=None, help='nucleus sampling, e.g. 0.9')
    parser.add_argument('--max-new-tokens', type=int, default=256, help='longest reply (default 256)')
    parser.add_argument('--device', default='cpu')
