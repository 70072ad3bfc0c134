"""
The one generation engine: prefill the prompt into the KV cache, then decode one token per step,
yielding each step's new tokens. `GPT.generate`, the chat CLI and the web server all consume
`stream`; there is no other decoding loop in the library.

    from mingpt.generate import stream, stream_text, complete
    for tok in stream(model, idx, 50, do_sample=True, top_p=0.9, seed=0):   # tok: (B,) ids
        ...
    out = complete(model, idx, 50)                     # (B, T + 50): what GPT.generate returns

The model interface this engine relies on, which mingpt.model.GPT provides (any module that does
can be decoded here):

    model.block_size, model.config.vocab_size       the context length; ids must be below vocab_size
    model.training                                  dropout on: warned about
    model.parameters()                              the first one's device is where decoding runs
    model.make_kv_cache(batch_size, max_len)        a list, one cache per layer, for max_len positions
    model(idx, kv_cache=, cache_pos=, pos=, attn_mask=, last_only=True) -> (logits, _)
        idx (B, T) the new tokens, written into kv_cache at positions [cache_pos, cache_pos + T);
        pos (B, T) position ids (None: cache_pos, cache_pos + 1, ...); attn_mask (B, 1, T, cache_pos + T)
        bool, True where a query may attend (None: causal); logits (B, 1, V) of the last position
    model(idx, kv_cache=, cache_pos=, last_only=True) with cache_pos a (B,) LongTensor (mingpt.batching)
        idx (B, 1) one new token per row, row b of the cache's first B written at position cache_pos[b]
        (also its position id), attending to that row's positions [0, cache_pos[b]] only; and
        kv_cache[i].row(b), row b alone as a cache of batch size 1 (a prefill into one row)

Context window. A GPT sees at most block_size tokens. minGPT's generate crops the sequence to
its last block_size tokens at every step, and that is what we do by default too: once the
sequence fills the context, each further step re-prefills the last `window_keep` (default
block_size) tokens, positions restarting at 0, and these steps cost a full forward each, exactly
like the uncached path. A smaller window_keep (e.g. block_size // 2) is much faster past the limit
(one re-prefill every block_size - window_keep tokens, cached steps in between) but each new token
then sees between window_keep and block_size tokens of context, so it no longer equals minGPT.

Batches of prompts of different lengths are LEFT padded, so that every row's next token is
predicted from the same column: the attention mask hides the pads and position ids start at 0 at
each row's first real token, which makes every row's tokens those of its prompt generated alone.

Shapes in comments: B batch, T prompt length (padded), L tokens so far, V vocab_size.
"""

import logging
import numbers

import torch

from mingpt.errors import ConfigError, PromptTooLong

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# choosing the next token

def check_sampling_args(temperature=1.0, top_k=None, top_p=None, max_new_tokens=None):
    """ raise a ConfigError (a ValueError) saying what to change for any option out of its range """
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 0):
        raise ConfigError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if not temperature >= 0:  # also rejects NaN
        raise ConfigError(f"temperature must be >= 0 (got {temperature}); use 0 or do_sample=False "
                          "for greedy decoding, 1.0 to sample from the model's distribution as is")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be an int >= 1 or None (got {top_k!r}); top_k=1 is greedy, "
                          "None keeps the whole vocabulary")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None (got {top_p!r}); it is the probability "
                          "mass of the most likely tokens kept, e.g. 0.9; 1.0 or None keeps them all")


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def filter_logits(logits, top_k=None, top_p=None):
    """
    logits (B, V) -> logits (B, V) with -inf for every token outside the k most likely (top_k)
    and outside the smallest set of most likely tokens whose probabilities add up to at least
    top_p (nucleus sampling), in that order; transformers' TopK/TopPLogitsWarper, in short.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass; the first
        # has nothing above it, so at least one token always survives
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float('-inf'))
    return logits


def sample(logits, temperature=1.0, do_sample=False, top_k=None, top_p=None, generator=None):
    """
    logits (B, V) -> next token ids (B,): greedy (argmax) unless do_sample is True and
    temperature > 0, else a draw from softmax(logits / temperature) restricted by top_k, top_p.
    """
    if not do_sample or temperature == 0:
        # temperature and the filters keep the most likely token the most likely one
        return logits.argmax(dim=-1)
    logits, idx = logits.float() / temperature, None
    if top_k is not None and top_k < logits.size(-1):
        # draw among the k most likely tokens only: the distribution top_k filtering leaves, but
        # multinomial's cost is one exponential per entry, k of them rather than vocab_size
        logits, idx = torch.topk(logits, top_k, dim=-1)  # (B, k)
    probs = filter_logits(logits, top_p=top_p).softmax(dim=-1)
    tok = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    return (tok if idx is None else idx.gather(-1, tok)).squeeze(-1)

# -----------------------------------------------------------------------------
# turning the user's prompts into one left-padded (B, T) batch

def prepare_prompts(model, idx, attention_mask=None, pad_token_id=None):
    """
    Accept a (B, T) LongTensor (optionally with a (B, T) attention_mask, 1/True for real tokens,
    0/False for LEFT padding) or a list of 1-D prompts (tensors or lists of ints), which are
    left-padded here with pad_token_id (default 0; its value never matters, it is masked).
    Returns idx (B, T) on the model's device and real (B, T) bool, or None when nothing is padded.
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
        if real.all():
            real = None  # nothing padded: take the unmasked fast path

    lengths = T if real is None else real.sum(dim=1)
    longest = int(lengths) if real is None else int(lengths.max())
    if longest > model.block_size:
        raise PromptTooLong(f"the prompt has {longest} tokens but the model's context (block_size) is "
                          f"{model.block_size} tokens; keep only the end of it, e.g. "
                          f"idx[:, -{model.block_size}:], or a shorter prompt")
    return idx, real


def _window_inputs(real):
    """
    For a window of a padded batch, real (B, n) bool -> position ids (B, n) counting from 0 at
    each row's first real token, and the (B, 1, n, n) attention mask: causal, pads hidden.
    A pad query may see itself: a query that sees nothing gives NaNs, which would then reach the
    cache (and 0 * NaN is NaN even under a mask); what pads compute is never looked at.
    """
    n = real.size(1)
    pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    causal = torch.ones(n, n, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=real.device)
    mask = causal & (real[:, None, None, :] | eye)  # (B, 1, n, n)
    return pos, mask

# -----------------------------------------------------------------------------
# the engine

def stream(model, idx, max_new_tokens, *, temperature=1.0, do_sample=False, top_k=None,
           top_p=None, generator=None, seed=None, eos_token_id=None, pad_token_id=None,
           attention_mask=None, use_cache=True, window_keep=None):
    """
    Generate up to max_new_tokens tokens after the prompt(s), yielding each step's new token ids
    as a (B,) LongTensor, one per row (in the prompt's row order). Arguments are checked when
    stream() is called, before the first token.

    idx: (B, T) LongTensor, optionally with attention_mask (B, T) for LEFT padding; or a list of
      1-D prompts of any lengths (padded here).
    temperature, do_sample, top_k, top_p: see `sample`; greedy by default.
    generator / seed: the torch.Generator sampling draws from, or a seed to make a fresh one;
      a fixed seed reproduces the same samples. Neither: torch's global RNG (minGPT's behaviour).
    eos_token_id: a row that emits it is finished and keeps emitting pad_token_id (default
      eos_token_id); the stream ends as soon as every row is finished.
    use_cache: False recomputes the whole window every step (minGPT's way; for comparison).
    window_keep: how many of the most recent tokens to re-prefill when the sequence fills the
      context (default block_size: identical to minGPT's cropping; see the module docstring).
    """
    _, steps = _start(model, idx, max_new_tokens, temperature=temperature, do_sample=do_sample,
                      top_k=top_k, top_p=top_p, generator=generator, seed=seed,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      attention_mask=attention_mask, use_cache=use_cache, window_keep=window_keep)
    return steps


def complete(model, idx, max_new_tokens, **kwargs):
    """
    Run `stream` (same keyword arguments) to the end and return the prompt(s) followed by the new
    tokens: (B, T + n), T the (padded) prompt length and n = max_new_tokens, or fewer when
    eos_token_id is given and every row finished earlier (finished rows are filled with
    pad_token_id, default eos_token_id). A list of prompts comes back left-padded with
    pad_token_id (default eos_token_id, else 0).
    """
    idx, steps = _start(model, idx, max_new_tokens, **kwargs)
    new = list(steps)
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def _start(model, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, top_p=None,
           generator=None, seed=None, eos_token_id=None, pad_token_id=None, attention_mask=None,
           use_cache=True, window_keep=None):
    """ check every argument now (not at the first next()); return the padded idx and the steps """
    keep, how = decoding_options(model, max_new_tokens, temperature=temperature, do_sample=do_sample,
                                 top_k=top_k, top_p=top_p, generator=generator, seed=seed,
                                 window_keep=window_keep)
    if pad_token_id is None:
        pad_token_id = eos_token_id
    idx, real = prepare_prompts(model, idx, attention_mask, pad_token_id)
    return idx, _decode(model, idx, real, max_new_tokens, keep, use_cache, eos_token_id,
                        pad_token_id, how)


def decoding_options(model, max_new_tokens, *, temperature=1.0, do_sample=False, top_k=None,
                     top_p=None, generator=None, seed=None, window_keep=None):
    """
    Check the options of one decoding (stream's, or one request of mingpt.batching), raising a
    ConfigError for any out of range; -> (keep, how): how many recent tokens a full context keeps
    (window_keep, default block_size) and the keyword arguments of `sample`, a seed made a generator.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if generator is not None and seed is not None:
        raise ConfigError("give either generator or seed, not both (seed makes a new generator)")
    block_size = model.block_size
    keep = block_size if window_keep is None else window_keep
    if not _is_int(keep) or not 1 <= keep <= block_size:
        raise ConfigError(f"window_keep must be an int in [1, block_size={block_size}] (got "
                          f"{window_keep!r}); it is how many recent tokens are kept when the "
                          "sequence fills the context")
    if model.training:
        logger.warning("generating with the model in training mode: dropout is active, so tokens "
                       "are noisier and differ between runs; call model.eval() first")
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return keep, dict(temperature=temperature, do_sample=do_sample, top_k=top_k, top_p=top_p,
                      generator=generator)


def next_input(L, cache_len, block_size, keep):
    """
    The next forward of a sequence of L tokens, cache_len of them in its cache, as (start,
    cache_pos): it feeds tokens [start, L) written at cache position cache_pos. While the cache has
    room, the newest token alone (a decode step). Otherwise a prefill at position 0: the prompt
    (nothing cached yet, or no cache at all: then the last block_size tokens every step), or, once
    the sequence fills the context, its last `keep` tokens (see the module docstring).
    """
    if 0 < cache_len < block_size:
        return L - 1, cache_len
    return L - min(L, keep if cache_len == block_size else block_size), 0


def _decode(model, idx, real, max_new_tokens, keep, use_cache, eos_token_id, pad_token_id,
            how):
    """
    The decoding loop: yields (B,) new ids per step; `how` are the arguments of `sample`.
    """
    B, T = idx.shape
    device = idx.device
    block_size = model.block_size

    # all tokens so far, written in place: (B, T + max_new_tokens), the first L columns valid
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    seq[:, :T] = idx
    if real is not None:
        real = torch.cat([real, real.new_ones(B, max_new_tokens)], dim=1)  # generated tokens are real
    finished = torch.zeros(B, dtype=torch.bool, device=device) if eos_token_id is not None else None

    # the cache never needs more than the whole sequence, nor more than the context
    cache = model.make_kv_cache(B, max_len=min(block_size, T + max_new_tokens)) if use_cache else None
    cache_len = 0  # cache positions filled: the cache_len tokens before the newest one, seq[:, L-1]
    next_pos = None  # (B, 1) position id of the next token of each row, when padded

    L = T
    for _ in range(max_new_tokens):
        # inference_mode, not just no_grad: no version counters or view tracking on the ~300 small
        # ops of a decode step, a real share of their overhead. Tensors made here are inference
        # tensors; the buffers above were made outside, so they stay ordinary tensors.
        with torch.inference_mode():
            pos = mask = None
            start, cache_pos = next_input(L, cache_len, block_size, keep)
            x = seq[:, start:L]  # (B, 1) to decode, (B, n) to prefill
            if cache_pos > 0:
                # decode: the newest token attends to itself and everything cached
                if real is not None:
                    pos, mask = next_pos, real[:, None, None, L - cache_len - 1:L]  # (B, 1, 1, S)
                    next_pos = next_pos + 1
            else:
                # prefill: the prompt, or (uncached, or past the context) a window of recent tokens
                if cache_len == block_size and keep == block_size and L == block_size + 1:
                    logger.info("the sequence is longer than block_size=%d: every further token "
                                "re-runs the last %d tokens (minGPT's cropping); window_keep=%d "
                                "would be faster", block_size, block_size, block_size // 2)
                if real is not None:
                    pos, mask = _window_inputs(real[:, start:L])
                    next_pos = pos[:, -1:] + 1
            logits, _ = model(x, kv_cache=cache, cache_pos=cache_pos, pos=pos, attn_mask=mask,
                                last_only=True)  # (B, 1, V)
            if cache is not None:
                cache_len = cache_pos + x.size(1)

            tok = sample(logits[:, -1, :], **how)  # (B,)
            if finished is not None:
                tok = tok.masked_fill(finished, pad_token_id)
                finished |= tok == eos_token_id
            seq[:, L] = tok
        L += 1
        yield tok.clone()  # an ordinary tensor, which the caller may modify or use in autograd
        if finished is not None and finished.all():
            return


def stream_text(model, idx, max_new_tokens, decode, **kwargs):
    """
    For one prompt (B = 1): yield the generated text piece by piece; decode(list of ids) -> str
    is the tokenizer's decoder (e.g. bpe.Encoder.decode); kwargs are stream's. The eos token, if
    eos_token_id is given, ends the stream and is not part of the text.
    """
    eos = kwargs.get('eos_token_id')
    steps = stream(model, idx, max_new_tokens, **kwargs)

    def token_ids():
        for tok in steps:
            if tok.numel() != 1:
                raise ConfigError(f"stream_text is for a single prompt (got a batch of "
                                  f"{tok.numel()}); use stream() for batches")
            if int(tok) == eos:
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
