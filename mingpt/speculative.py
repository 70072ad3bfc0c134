"""
Speculative decoding: guess the next few tokens cheaply (a draft), then let the model check all of
them in ONE forward of k + 1 positions, keeping the part it agrees with plus one token of its own.
A decode step costs what reading the weights costs, about the same for a few positions as for one,
so every draft token kept is a token almost for free. Two sources of drafts, with transformers' names:

    model.generate(idx, 100, prompt_lookup_num_tokens=10)   # what followed the last n-gram earlier in the text
    model.generate(idx, 100, assistant_model=small)        # a smaller GPT with the same vocabulary

What comes out is what the model alone gives. Greedy: the model's argmax at every position, so the
same tokens (up to float rounding between one forward of k + 1 positions and k + 1 forwards of one).
Sampled: the model's own distribution, exactly, by speculative sampling (Leviathan et al. 2023, Chen
et al. 2023): a draft token d drawn from the draft's distribution q is kept with probability
min(1, p(d) / q(d)), p the model's (after temperature, top_k, top_p); the first one refused is
replaced by a draw from max(p - q, 0), normalised; if all k are kept, one more is drawn from p. A
prompt-lookup draft is certain (q is one-hot on d): d is kept with probability p(d), else replaced
by a draw from p without d.

mingpt.decoder asks each row's drafter for a draft before its batched forward (propose) and checks it
after (verify). A row drafts only while its draft fits in the context; past that it decodes one token
a step, as without speculation.
"""

import torch

from mingpt.errors import ConfigError
from mingpt.hardware import pack_weights
from mingpt.sampling import probabilities


def make_drafter(model, assistant_model=None, prompt_lookup_num_tokens=None, num_assistant_tokens=5):
    """ the drafter stream()'s speculative arguments ask for (checked), or None """
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        raise ConfigError("give assistant_model or prompt_lookup_num_tokens, not both: each is a source of drafts")
    for name, k in (('prompt_lookup_num_tokens', prompt_lookup_num_tokens),
                    ('num_assistant_tokens', num_assistant_tokens)):
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError(f"{name} must be an int >= 1 (got {k!r}): how many tokens a draft guesses")
    if prompt_lookup_num_tokens is not None:
        return PromptLookup(prompt_lookup_num_tokens)
    if assistant_model is None:
        return None
    if assistant_model.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the assistant_model has a vocabulary of {assistant_model.config.vocab_size} tokens "
                          f"and the model {model.config.vocab_size}: drafts must use the model's token ids")
    if next(assistant_model.parameters()).device != next(model.parameters()).device:
        raise ConfigError("the assistant_model must be on the model's device")
    return AssistantDraft(assistant_model, num_assistant_tokens)


class PromptLookup:
    """
    Drafts copied from the sequence itself: the tokens that followed the most recent earlier
    occurrence of its last n tokens (n = max_ngram, then shorter). Free to make, and good wherever
    the output repeats its input: summaries, edits, code, quotations.
    """

    def __init__(self, num_tokens, max_ngram=3):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def propose(self, seq, k):
        """ -> (up to k draft ids, None: the draft is certain) """
        tokens = seq.tokens
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the most recent occurrence first
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k], None
        return [], None

    def rewind(self, seq, n_valid):
        pass


class AssistantDraft:
    """
    Drafts from a smaller model with the same vocabulary, drawn with the sequence's own options. Each
    sequence keeps the assistant's KV cache of its tokens (seq.draft_state), rewound to the tokens
    the model kept, so each draft costs the assistant k decode steps.
    """

    def __init__(self, assistant_model, num_tokens):
        self.model, self.num_tokens = assistant_model, num_tokens
        pack_weights(assistant_model, 'one')  # it decodes one row at a time

    def propose(self, seq, k):
        """ -> (k draft ids, their distributions (k, V)) or ([], None) when they would not fit its context """
        model, options = self.model, seq.options
        if len(seq.tokens) + k > model.block_size:
            return [], None
        if seq.draft_state is None:
            seq.draft_state = {'cache': model.make_kv_cache(1), 'length': 0}
        state = seq.draft_state
        device = state['cache'][0].k.device
        x = torch.tensor([seq.tokens[state['length']:]], device=device)  # what its cache lacks
        drafts, qs = [], []
        for i in range(k):
            logits = model(x, kv_cache=state['cache'], cache_pos=state['length'], last_only=True)[0][:, -1]
            state['length'] += x.size(1)
            if options.greedy:
                d = int(logits.argmax())
            else:
                q = probabilities(logits, options)  # (1, V)
                d = int(torch.multinomial(q, 1, generator=seq.generator))
                qs.append(q[0])
            drafts.append(d)
            x = torch.tensor([[d]], device=device)
        return drafts, (torch.stack(qs) if qs else None)

    def rewind(self, seq, n_valid):
        """ the assistant's cache holds the sequence's first n_valid tokens at most """
        if seq.draft_state is not None:
            seq.draft_state['length'] = min(seq.draft_state['length'], n_valid)


def verify(logits, draft, q, options, generator):
    """
    logits (k + 1, V): the model's at the last token and at each of the k draft tokens; q (k, V) the
    draft's distributions (None: certain drafts). -> the tokens to append: the kept draft tokens,
    then the model's own (see the module docstring)
    """
    if options.greedy:
        best = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]]
    p = probabilities(logits, options)  # (k + 1, V)
    u = torch.rand(len(draft), generator=generator, device=p.device)
    for i, d in enumerate(draft):
        qd = 1.0 if q is None else float(q[i, d])
        if float(u[i]) * qd < float(p[i, d]):  # kept with probability min(1, p(d) / q(d))
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0
        else:
            residual = (residual - q[i]).clamp(min=0)
        if not residual.sum() > 0:  # p == q to rounding: refusing had probability ~0
            residual = p[i]
        return draft[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return draft + [int(torch.multinomial(p[len(draft)], 1, generator=generator))]
