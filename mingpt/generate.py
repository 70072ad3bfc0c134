"""
Generation: prompts in, tokens out. `stream` yields each step's new tokens, `complete` returns the
whole sequences (what GPT.generate returns), `stream_text` yields text. All of them run the one
decode step of mingpt.decoder, each prompt in a row of its own KV cache; the chat and the web
server (mingpt.batching) run that same step.

    from mingpt.generate import stream, stream_text, complete
    for tok in stream(model, idx, 50, do_sample=True, top_p=0.9, seed=0):   # tok: (B,) ids
        ...
    out = complete(model, idx, 50)                     # (B, T + 50): what GPT.generate returns

Batches of prompts of different lengths come back LEFT padded (a list of prompts is padded here; a
padded (B, T) tensor comes with its attention_mask), so that every row's new tokens start at the
same column. Each row is decoded as its prompt alone: its own cache row, its own positions from 0.
Past the context (block_size), tokens follow minGPT's cropping by default: see mingpt.decoder.

Shapes in comments: B batch, T prompt length (padded), V vocab_size.
"""

import logging

import torch

from mingpt.decoder import Decoder, Sequence, check_window_keep
from mingpt.sampling import SamplingOptions, is_int
from mingpt.speculative import make_drafter
from mingpt.errors import ConfigError, PromptTooLong

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# turning the user's prompts into one left-padded (B, T) batch

def prepare_prompts(model, idx, attention_mask=None, pad_token_id=None):
    """
    Accept a (B, T) LongTensor (optionally with a (B, T) attention_mask, 1/True for real tokens,
    0/False for LEFT padding) or a list of 1-D prompts (tensors or lists of ints), which are
    left-padded here with pad_token_id (default 0; its value never matters, it is masked).
    Returns idx (B, T) on the model's device and each row's prompt without its padding, a list of
    B lists of ints.
    """
    device = next(model.parameters()).device
    if isinstance(idx, (list, tuple)):
        if attention_mask is not None:
            raise ConfigError("attention_mask is only for a (B, T) tensor of prompts; a list of "
                              "prompts is padded (and masked) here, pass it without a mask")
        if len(idx) == 0:
            raise ConfigError("the list of prompts is empty; give at least one prompt")
        prompts = [torch.as_tensor(p, dtype=torch.long, device=device) for p in idx]
        for i, p in enumerate(prompts):
            if p.dim() != 1:
                raise ConfigError(f"prompt {i} has shape {tuple(p.shape)}; each prompt in a list "
                                  "must be 1-D (a sequence of token ids)")
        T = max(p.numel() for p in prompts)
        pad = 0 if pad_token_id is None else pad_token_id
        idx = torch.full((len(prompts), T), pad, dtype=torch.long, device=device)
        attention_mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            if p.numel():
                idx[i, T - p.numel():] = p
                attention_mask[i, T - p.numel():] = True

    if not torch.is_tensor(idx) or idx.dim() != 2:
        shape = tuple(idx.shape) if torch.is_tensor(idx) else type(idx).__name__
        raise ConfigError(f"idx must be a (B, T) tensor of token ids or a list of 1-D prompts (got "
                          f"{shape}); for a single 1-D prompt p use p[None] or [p]")
    if idx.dtype not in (torch.long, torch.int32, torch.int64):
        raise ConfigError(f"idx must hold integer token ids (got dtype {idx.dtype})")
    B, T = idx.shape
    if B == 0 or T == 0:
        raise ConfigError(f"the prompt is empty (idx has shape {tuple(idx.shape)}): generation needs "
                          "at least one token to condition on, e.g. a start/end-of-text token")
    vocab_size = model.config.vocab_size
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise ConfigError(f"token ids must be in [0, {vocab_size}) for this model (got ids from "
                          f"{int(idx.min())} to {int(idx.max())}); was the prompt encoded with "
                          "another vocabulary?")
    idx = idx.to(device=device, dtype=torch.long)

    real = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ConfigError(f"attention_mask must have idx's shape {(B, T)} (got "
                              f"{tuple(attention_mask.shape)})")
        real = attention_mask.to(device=device, dtype=torch.bool)
        if not real.any(dim=1).all():
            raise ConfigError(f"prompt {int((~real.any(dim=1)).nonzero()[0])} is empty: generation "
                              "needs at least one token to condition on in every row, e.g. a "
                              "start/end-of-text token")
        if not real[:, -1].all() or (real[:, 1:] < real[:, :-1]).any():
            raise ConfigError("attention_mask must be LEFT padded (zeros first, then ones) for "
                              "generation, so that every row's next token is at the same column; "
                              "re-pad on the left (e.g. a tokenizer with padding_side='left') or "
                              "pass the prompts as a list of 1-D tensors")

    lengths = [T] * B if real is None else real.sum(dim=1).tolist()
    if max(lengths) > model.block_size:
        raise PromptTooLong(f"the prompt has {max(lengths)} tokens but the model's context (block_size) is "
                            f"{model.block_size} tokens; keep only the end of it, e.g. "
                            f"idx[:, -{model.block_size}:], or a shorter prompt")
    rows = idx.tolist()
    return idx, [row[T - n:] for row, n in zip(rows, lengths)]

# -----------------------------------------------------------------------------
# the prompts' rows through the decoder

def stream(model, idx, max_new_tokens, options=None, *, generator=None, pad_token_id=None,
           attention_mask=None, use_cache=True, window_keep=None, assistant_model=None,
           prompt_lookup_num_tokens=None, num_assistant_tokens=5, **sampling):
    """
    Generate up to max_new_tokens tokens after the prompt(s), yielding each step's new token ids
    as a (B,) LongTensor, one per row (in the prompt's row order). Arguments are checked when
    stream() is called, before the first token.

    idx: (B, T) LongTensor, optionally with attention_mask (B, T) for LEFT padding; or a list of
      1-D prompts of any lengths (padded here).
    options: a SamplingOptions, or its fields as keyword arguments (**sampling): temperature,
      do_sample, top_k, top_p, seed, eos_token_id; greedy by default.
    generator: the torch.Generator sampling draws from (not with seed, which makes a fresh one);
      neither: torch's global RNG (minGPT's behaviour).
    eos_token_id: a row that emits it (or any of them) is finished and then yields pad_token_id
      (default eos_token_id); the stream ends as soon as every row is finished.
    use_cache: False recomputes the whole window every step (minGPT's way; for comparison).
    window_keep: how many of the most recent tokens to re-prefill when the sequence fills the
      context (default block_size: identical to minGPT's cropping; see mingpt.decoder).
    assistant_model (a smaller GPT with the same vocabulary, drafting num_assistant_tokens a step) or
      prompt_lookup_num_tokens (drafts copied from earlier in the text): speculative decoding, the
      same tokens (greedy) or the same distribution (sampled) faster; see mingpt.speculative.
    """
    _, steps = _start(model, idx, max_new_tokens, options, generator=generator, pad_token_id=pad_token_id,
                      attention_mask=attention_mask, use_cache=use_cache, window_keep=window_keep,
                      assistant_model=assistant_model, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                      num_assistant_tokens=num_assistant_tokens, **sampling)
    return steps


def complete(model, idx, max_new_tokens, options=None, **kwargs):
    """
    Run `stream` (same arguments) to the end and return the prompt(s) followed by the new tokens:
    (B, T + n), T the (padded) prompt length and n = max_new_tokens, or fewer when eos_token_id is
    given and every row finished earlier (finished rows are filled with pad_token_id, default
    eos_token_id). A list of prompts comes back left-padded with pad_token_id (default
    eos_token_id, else 0).
    """
    idx, steps = _start(model, idx, max_new_tokens, options, **kwargs)
    new = list(steps)
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def checked_options(max_new_tokens, options=None, **fields):
    """
    The options of one generation checked (a ConfigError naming any out of range): options itself,
    or a SamplingOptions made of its fields (not both); and max_new_tokens, an int >= 0.
    """
    if not (is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ConfigError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if options is None:
        try:
            options = SamplingOptions(**fields)
        except TypeError as e:  # an unknown keyword: name the ones there are
            names = ', '.join(f.name for f in SamplingOptions.__dataclass_fields__.values())
            raise TypeError(f"{e}; the sampling options are {names}") from None
    elif fields:
        raise ConfigError(f"give the sampling options either as options= or as keywords "
                          f"({', '.join(fields)}), not both")
    return options.check()


def _start(model, idx, max_new_tokens, options=None, *, pad_token_id=None, attention_mask=None,
           use_cache=True, **kwargs):
    """ check every argument now (not at the first next()); return the padded idx and the steps """
    how = sequence_options(model, max_new_tokens, options, **kwargs)
    eos = how['options'].eos_token_id
    if pad_token_id is None:
        pad_token_id = eos if isinstance(eos, int) else None
    idx, prompts = prepare_prompts(model, idx, attention_mask, pad_token_id)
    seqs = [Sequence(p, max_new_tokens, use_cache=use_cache, **how) for p in prompts]  # one generator for all rows
    return idx, _steps(model, seqs, 0 if pad_token_id is None else pad_token_id)


def sequence_options(model, max_new_tokens, options=None, *, generator=None, window_keep=None,
                     assistant_model=None, prompt_lookup_num_tokens=None, num_assistant_tokens=5, **sampling):
    """
    Every option of one generation checked (a ConfigError naming any out of range) -> the keyword
    arguments of its Sequence(s): options, generator (seed made one), window_keep, drafter. stream()'s
    and a BatchEngine request's arguments go through here alike.
    """
    options = checked_options(max_new_tokens, options, **sampling)
    if generator is not None and options.seed is not None:
        raise ConfigError("give either generator or seed, not both (seed makes a new generator)")
    keep = check_window_keep(model, window_keep)
    warn_if_training(model)
    return dict(options=options, generator=generator or options.make_generator(next(model.parameters()).device),
                window_keep=keep,
                drafter=make_drafter(model, assistant_model, prompt_lookup_num_tokens, num_assistant_tokens))


def warn_if_training(model):
    if model.training:
        logger.warning("generating with the model in training mode: dropout is active, so tokens "
                       "are noisier and differ between runs; call model.eval() first")


def _steps(model, seqs, pad_token_id):
    """ the sequences in rows of their own Decoder; yields (B,) new ids per step """
    n_steps = seqs[0].max_new_tokens
    if n_steps == 0:
        return
    # the cache never needs more than the whole sequence, nor more than the context
    longest = max(len(s.tokens) for s in seqs)
    decoder = Decoder(model, len(seqs), max_len=min(model.block_size, longest + n_steps))
    decoder.add(seqs)
    starts = [len(s.tokens) - s.n_new for s in seqs]  # where each row's new tokens begin
    for step in range(1, n_steps + 1):
        # a step of the decoder gives each running row one token, or several (speculative decoding)
        while decoder.rows and any(s.n_new < step and s.finish_reason is None for s in seqs):
            decoder.step()
        for s in seqs:
            if s.error is not None:
                raise s.error
        if all(s.n_new < step for s in seqs):  # every row ended early (a stop token)
            return
        yield torch.tensor([s.tokens[start + step - 1] if s.n_new >= step else pad_token_id
                            for s, start in zip(seqs, starts)], device=decoder.device)

# -----------------------------------------------------------------------------
# text

def stream_text(model, idx, max_new_tokens, decode, options=None, **kwargs):
    """
    For one prompt (B = 1): yield the generated text piece by piece; decode(list of ids) -> str
    is the tokenizer's decoder (e.g. bpe.Encoder.decode); options and kwargs are stream's. The eos
    token, if eos_token_id is given, ends the stream and is not part of the text.
    """
    steps = stream(model, idx, max_new_tokens, options, **kwargs)
    stop_ids = (options or SamplingOptions(eos_token_id=kwargs.get('eos_token_id'))).stop_ids

    def token_ids():
        for tok in steps:
            if tok.numel() != 1:
                raise ConfigError(f"stream_text is for a single prompt (got a batch of "
                                  f"{tok.numel()}); use stream() for batches")
            if int(tok) in stop_ids:
                return
            yield int(tok)

    yield from decode_text(token_ids(), decode)


def decode_text(ids, decode):
    """
    Turn an iterable of token ids into text pieces, each yielded as soon as it is final.
    Byte-level BPE can split one UTF-8 character over several tokens, and a token can also end
    inside the next character. An incomplete character at the end of the bytes decodes to exactly
    one U+FFFD, and everything before it is final, so only that last character is held back until
    its remaining bytes arrive (or flushed at the end as it is). decode(list of ids) -> str must
    replace undecodable bytes (errors='replace'), as bpe.Encoder.decode does.
    """
    pending, sent = [], 0  # ids since the text last decoded whole; characters of theirs yielded
    for t in ids:
        pending.append(t)
        text = decode(pending)
        complete = not text.endswith('\ufffd')
        final = text if complete else text[:-1]
        if len(final) > sent:
            yield final[sent:]
        pending, sent = ([], 0) if complete else (pending, len(final))
    if pending:
        rest = decode(pending)[sent:]
        if rest:
            yield rest
