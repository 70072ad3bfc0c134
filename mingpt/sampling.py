"""
How the next token is chosen: SamplingOptions, the one object every caller of the decoder builds
(mingpt.generate, the chat, the web server, a BatchEngine request), and the functions that apply it
to a row's logits: greedy, temperature, top_k, top_p, with a generator for reproducible draws.
"""

import dataclasses
import math
import numbers
from typing import Collection, Optional, Union

import torch

from mingpt.errors import ConfigError

# Below this temperature sampling is greedy. softmax(logits / t) is one-hot to float precision long
# before t reaches 0 (two tokens would need logits within ~t of each other to share the draw), and
# logits / t overflows to inf for a tiny enough t, which torch's sampling rejects.
MIN_TEMPERATURE = 1e-4

def is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """
    How one generation chooses its tokens and when it stops; what every caller of the engine builds.
    temperature: softmax(logits / temperature); 0 (or below MIN_TEMPERATURE) is greedy.
    do_sample: False (minGPT's default) is greedy whatever the other options say.
    top_k: draw among the k most likely tokens only (None: all). top_p: nucleus sampling, the smallest
      set of most likely tokens holding top_p of the probability (None or 1.0: all).
    seed: a fresh torch.Generator for this generation, so a seed reproduces its samples (None:
      torch's global RNG, minGPT's behaviour, or a generator the caller passes).
    eos_token_id: an id, or a collection of ids, that ends the sequence once emitted (it is emitted).
    """
    temperature: float = 1.0
    do_sample: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    eos_token_id: Union[int, Collection[int], None] = None

    def check(self):
        """ self, or a ConfigError (a ValueError) that names the option out of range and what to use """
        t = self.temperature
        if not is_number(t) or not t >= 0 or math.isinf(t):  # `not t >= 0` also rejects NaN
            raise ConfigError(f"temperature must be >= 0 (got {t!r}); use 0 or do_sample=False for greedy "
                              "decoding, 1.0 to sample from the model's distribution as is")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be True or False (got {self.do_sample!r})")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ConfigError(f"top_k must be an int >= 1 or None (got {self.top_k!r}); top_k=1 is greedy, "
                              "None keeps the whole vocabulary")
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1] or None (got {self.top_p!r}); it is the probability "
                              "mass of the most likely tokens kept, e.g. 0.9; 1.0 or None keeps them all")
        if self.seed is not None and not (is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64):
            raise ConfigError(f"seed must be an int from -2**63 to 2**64 - 1 or None (got {self.seed!r:.40})")
        if not all(is_int(i) and i >= 0 for i in self.stop_ids):
            raise ConfigError(f"eos_token_id must be a token id (an int >= 0) or a collection of them "
                              f"(got {self.eos_token_id!r:.80})")
        return self

    @property
    def greedy(self):
        return not self.do_sample or self.temperature < MIN_TEMPERATURE

    @property
    def stop_ids(self):
        """ the ids that end a sequence, a frozenset (empty: none) """
        eos = self.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, numbers.Number) else eos)

    def make_generator(self, device):
        """ a torch.Generator seeded with seed, or None when there is no seed """
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


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


def sample(logits, options, generator=None):
    """
    logits (B, V) -> next token ids (B,): the argmax when options are greedy, else a draw from
    softmax(logits / temperature) restricted by top_k and top_p, from generator (None: torch's global RNG).
    """
    if options.greedy:
        # temperature and the filters keep the most likely token the most likely one
        if logits.device.type == 'cpu' and logits.dtype == torch.float32:
            # numpy's argmax is vectorised, torch's CPU one is not (GPT-2's 50k logits: ~5 vs ~50 us,
            # 1% of a decode step); both take the first of equal maxima, and NaN as the maximum
            return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
        return logits.argmax(dim=-1)
    logits, idx = logits.float() / options.temperature, None
    if options.top_k is not None and options.top_k < logits.size(-1):
        # draw among the k most likely tokens only: the distribution top_k filtering leaves, but
        # multinomial's cost is one exponential per entry, k of them rather than vocab_size
        logits, idx = torch.topk(logits, options.top_k, dim=-1)  # (B, k)
    probs = filter_logits(logits, top_p=options.top_p).softmax(dim=-1)
    tok = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    return (tok if idx is None else idx.gather(-1, tok)).squeeze(-1)


def probabilities(logits, options):
    """ logits (n, V) -> the distributions `sample` draws from under options (temperature, top_k, top_p) """
    logits = filter_logits(logits.float() / options.temperature, options.top_k, options.top_p)
    return logits.softmax(dim=-1)
