"""
The one decode step. Everything in this library that generates tokens (GPT.generate and
mingpt.generate.stream, the terminal chat, the web server's mingpt.batching.BatchEngine) runs its
sequences through a Decoder: a KV cache of n rows, one running sequence per row, and step(), which
gives every row its next token. A feature of decoding (a stop rule, a sampling option, speculative
drafts) is written here once.

    options = SamplingOptions(do_sample=True, temperature=0.8, top_k=50, seed=0).check()  # mingpt.sampling
    decoder = Decoder(model, n_rows=4)
    decoder.add([Sequence(prompt_ids, 20, options)])  # prefilled into a free row, first token sampled
    while decoder.rows:
        decoder.step()                                # a token for every running row; ended rows leave

A step:
1. ONE forward decodes the newest token of every row (and its draft, if it has one: see
   mingpt.speculative), each row at its own position: cache_pos is an int when all rows stand at the
   same position, which needs no mask, else a (n,) tensor (see GPT.forward). A row whose sequence
   fills the context re-prefills its last window_keep tokens instead (next_input).
2. Each row samples with its own options and generator; rows that share both (the rows of one
   stream() call) sample together, in the order they were added, in one call.
3. A sequence that emitted a stop token or its last token, or was cancelled, leaves; so does one
   whose own forward, sampling or callback failed, with its error, which is its alone (a batched
   forward that fails is re-run row by row to find whose it was). The last row moves into a freed
   row, so the running sequences fill rows 0..n-1.
add() prefills new sequences into free rows: neighbours with prompts of one length in one forward.

A row's tokens do not depend on its neighbours: it attends only to its own cache positions (the mask
hides other rows and whatever an earlier owner left past its position), its position ids are its
own, and the rest of a transformer works row by row. So each sequence gets the tokens it would get
alone, its logits within float rounding (batched matmuls sum in another order).

Context window. A GPT sees at most block_size tokens. Like minGPT's generate, which crops the sequence
to its last block_size tokens at every step, a full row re-prefills its last window_keep (default
block_size) tokens each step, a full forward each. A smaller window_keep (e.g. block_size // 2) is
much faster past the limit (one re-prefill every block_size - window_keep tokens) but a token then
sees between window_keep and block_size tokens of context, unlike minGPT.

The model interface relied on, which mingpt.model.GPT provides:

    model.block_size, model.config.vocab_size    the context length; ids must be below vocab_size
    model.make_kv_cache(n_rows, max_len)         one cache per layer; cache[i].rows(a, b) is rows a..b-1
    model(idx, kv_cache=, cache_pos=, last_only=) -> (logits (B, T or 1, V), _)
        idx (B, T) new tokens written at cache positions [cache_pos, cache_pos + T), causal; or, with
        cache_pos a (B,) LongTensor, row b's at [cache_pos[b], cache_pos[b] + T) (also their position
        ids), each attending to its own row's positions up to its own only
"""

import itertools
import logging

import torch

from mingpt.errors import ConfigError
from mingpt.hardware import pack_weights
from mingpt.sampling import is_int, sample
from mingpt.speculative import verify

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# the sequences and the rows they run in

def check_window_keep(model, window_keep):
    """ how many recent tokens a full context keeps: window_keep checked, default block_size """
    keep = model.block_size if window_keep is None else window_keep
    if not is_int(keep) or not 1 <= keep <= model.block_size:
        raise ConfigError(f"window_keep must be an int in [1, block_size={model.block_size}] (got "
                          f"{window_keep!r}); it is how many recent tokens are kept when the "
                          "sequence fills the context")
    return keep


def next_input(L, cache_len, block_size, keep):
    """
    The next forward of a sequence of L tokens, cache_len of them in its cache, as (start,
    cache_pos): it feeds tokens [start, L) written at cache position cache_pos. While the cache has
    room, the newest token alone (a decode step). Otherwise a prefill at position 0: the prompt
    (nothing cached yet, or no cache kept: then the last block_size tokens every step), or, once
    the sequence fills the context, its last `keep` tokens (see the module docstring).
    """
    if 0 < cache_len < block_size:
        return L - 1, cache_len
    return L - min(L, keep if cache_len == block_size else block_size), 0


class Sequence:
    """
    One sequence to decode: tokens (the prompt, then each new id: a list of ints), its options and
    generator, and where it stands. finish_reason: None while it runs, then 'stop' (a stop token),
    'length' (max_new_tokens), 'cancelled' (should_stop() said so) or 'error' (error holds why).
    on_logits(logits), if given, sees the (V,) logits each token is drawn from (an inference tensor:
    copy it to keep it). use_cache=False re-runs the whole window at every step (minGPT's way, for
    comparison). drafter: a mingpt.speculative drafter, whose drafts each step checks. Subclasses
    receive tokens as they come by overriding emit() and finish().
    """

    _order = itertools.count()  # the order sequences were made in: rows that sample together draw in it

    def __init__(self, prompt, max_new_tokens, options, *, generator=None, window_keep=None,
                 use_cache=True, should_stop=None, on_logits=None, drafter=None):
        self.tokens = list(prompt)
        self.max_new_tokens, self.options, self.generator = max_new_tokens, options, generator
        self.keep, self.use_cache = window_keep, use_cache  # window_keep: checked by the caller
        self.should_stop, self.on_logits = should_stop, on_logits
        self.drafter, self.draft_state = drafter, None  # speculative decoding (mingpt.speculative)
        self.stop_ids = options.stop_ids
        self.order = next(Sequence._order)
        self.n_new = 0  # tokens generated so far
        self.cache_len = 0  # positions of its row that hold its tokens
        self.ending = None  # (reason, error) once it has ended, until its row is free
        self.finish_reason = self.error = None

    def stopped(self):
        """ True when the sequence should end now, unasked ('cancelled') """
        return self.should_stop is not None and self.should_stop()

    def emit(self, tok):
        """ called with every new token id (an int) as it is generated """

    def finish(self, reason, error=None):
        """ called once, when the sequence ends (error: the exception, for reason 'error') """
        self.finish_reason, self.error = reason, error


class Decoder:
    """
    A KV cache of n_rows rows for up to max_len positions (default block_size) and the sequences
    running in them, sequence i in row i; see the module docstring. Not thread-safe: one thread
    calls add() and step() (mingpt.batching hands requests over to it).
    """

    def __init__(self, model, n_rows, max_len=None):
        self.model, self.n_rows = model, n_rows
        # each step's products have a row per running sequence: lay the weights out for that
        pack_weights(model, 'one' if n_rows == 1 else 'many')
        self.cache = model.make_kv_cache(n_rows, max_len)
        self.device = next(model.parameters()).device
        self.rows = []  # the running sequences

    def add(self, seqs):
        """ prefill seqs into free rows and give each its first token -> how many tokens that made """
        if len(self.rows) + len(seqs) > self.n_rows:
            raise ValueError(f"{len(seqs)} sequences do not fit the {self.n_rows - len(self.rows)} free rows")
        first = len(self.rows)
        self.rows += seqs
        with torch.inference_mode():
            self._sample_and_emit(self._prefill([(i, 0) for i in range(first, len(self.rows))]))
        self._leave_finished()
        return len(seqs)

    def step(self):
        """ one token for every running row (cancelled rows leave first) -> how many tokens that made """
        for seq in self.rows:
            if seq.stopped():
                seq.ending = ('cancelled', None)
        self._leave_finished()
        if not self.rows:
            return 0
        block_size = self.model.block_size
        starts = [next_input(len(s.tokens), s.cache_len if s.use_cache else 0, block_size, s.keep)
                  for s in self.rows]
        decoding = [i for i, (_, cache_pos) in enumerate(starts) if cache_pos > 0]
        n_before = sum(s.n_new for s in self.rows)
        with torch.inference_mode():
            logits = {}
            if decoding:
                drafts = self._drafts(decoding)
                decoded = self._decode(decoding, drafts)  # (n, T, V)
                for i in decoding:
                    if i in drafts:
                        self._verify(i, decoded[i], *drafts[i])
                    else:
                        logits[i] = decoded[i, 0]
            logits.update(self._prefill([(i, start) for i, (start, cache_pos) in enumerate(starts)
                                         if cache_pos == 0]))
            self._sample_and_emit(logits)
        n_tokens = sum(s.n_new for s in self.rows) - n_before
        self._leave_finished()
        return n_tokens

    # -------------------------------------------------------------------------
    # forwards

    def _drafts(self, decoding):
        """ {row: (draft ids, their distributions or None)} for the rows whose drafter has one that fits """
        limit = min(self.cache[0].k.size(2), self.model.block_size)
        # the forward feeds every row as many tokens as the longest draft: they must fit the fullest row
        room = limit - 1 - max(self.rows[i].cache_len for i in decoding)
        drafts = {}
        for i in decoding:
            seq = self.rows[i]
            k = min(room, seq.max_new_tokens - seq.n_new - 1)  # no guessing past the last token wanted
            if seq.drafter is None or k < 1:
                continue
            try:
                draft, q = seq.drafter.propose(seq, min(k, seq.drafter.num_tokens))
            except Exception as e:
                self._fail(i, 'its draft', e)
                continue
            if draft:
                drafts[i] = (draft, q)
        return drafts

    def _decode(self, decoding, drafts):
        """
        The newest token of every row in decoding, and its draft if it has one, in ONE forward:
        -> logits (n, T, V), T = 1 + the longest draft; rows not decoding get zeros
        """
        n = len(self.rows)
        decoding = set(decoding)
        T = 1 + max((len(d) for d, _ in drafts.values()), default=0)
        rows = [([s.tokens[-1]] + (drafts[i][0] if i in drafts else []) if i in decoding else [])
                for i, s in enumerate(self.rows)]
        # (n, T): past a row's own tokens, padding that lands past its cache's end, where nobody reads
        x = torch.tensor([row + [0] * (T - len(row)) for row in rows], device=self.device)
        positions = [s.cache_len if i in decoding else 0 for i, s in enumerate(self.rows)]
        try:
            if len(decoding) == n and len(set(positions)) == 1:
                # every row at the same position: an int cache_pos, no mask (the fast path of a batch)
                cache, cache_pos = self._rows_view(0, n), positions[0]
            else:
                cache, cache_pos = self.cache, torch.tensor(positions, device=self.device)
            logits = self.model(x, kv_cache=cache, cache_pos=cache_pos, last_only=T == 1)[0]
        except Exception:
            # one row's input broke the batch (or the machine did): each row alone finds which
            logits = torch.zeros(n, T, self.model.config.vocab_size, device=self.device)
            for i in decoding:
                try:
                    logits[i] = self.model(x[i:i + 1], kv_cache=self._rows_view(i, i + 1),
                                           cache_pos=positions[i], last_only=T == 1)[0][0]
                except Exception as e:
                    self._fail(i, 'its forward', e)
        for i in decoding:
            self.rows[i].cache_len += 1
        return logits

    def _verify(self, i, logits, draft, q):
        """ row i's draft checked against the model's logits (T, V) (mingpt.speculative.verify) """
        seq = self.rows[i]
        if seq.ending is not None:
            return
        n_before = len(seq.tokens)
        try:
            tokens = verify(logits[:len(draft) + 1], draft, q, seq.options, seq.generator)
        except Exception as e:
            self._fail(i, 'checking its draft', e)
            return
        seq.cache_len += len(tokens) - 1  # the kept draft tokens are in the cache now; the rest is past its end
        seq.drafter.rewind(seq, n_before + len(tokens) - 1)
        for j, tok in enumerate(tokens):
            if seq.on_logits is not None:
                seq.on_logits(logits[j])
            if self._append(seq, tok):
                break

    def _prefill(self, todo):
        """
        todo: (row, start) pairs, each row's tokens from start on to be written at its position 0
        -> {row: logits (V,)} of each row's last token. Neighbouring rows of the same length share a forward.
        """
        logits = {}
        group = []
        for i, start in sorted(todo) + [(None, None)]:
            length = None if i is None else len(self.rows[i].tokens) - start
            if group and (i != group[-1][0] + 1 or length != group[-1][2]):
                logits.update(self._prefill_group(group))
                group = []
            group.append((i, start, length))
        return logits

    def _prefill_group(self, group):
        a, b = group[0][0], group[-1][0] + 1
        x = torch.tensor([self.rows[i].tokens[start:] for i, start, _ in group], device=self.device)  # (g, T)
        try:
            out = self.model(x, kv_cache=self._rows_view(a, b), cache_pos=0, last_only=True)[0][:, -1]
        except Exception as e:
            if len(group) == 1:
                self._fail(a, 'its prefill', e)
                return {}
            out = {}
            for one in group:
                out.update(self._prefill_group([one]))
            return out
        for i, _, length in group:
            self.rows[i].cache_len = length
        return dict(zip(range(a, b), out.unbind(0)))

    def _rows_view(self, a, b):
        if a == 0 and b == self.n_rows:
            return self.cache  # every row: the cache itself (a view per layer costs ~30 us a step each)
        return [layer.rows(a, b) for layer in self.cache]

    # -------------------------------------------------------------------------
    # sampling, stopping, leaving

    def _sample_and_emit(self, logits):
        """ logits: {row: its (V,) logits}; each row's next token drawn, emitted, its stop rules applied """
        groups = {}  # rows that share options and generator draw together, in the order they were made
        for i, lg in logits.items():
            seq = self.rows[i]
            if seq.ending is None:
                groups.setdefault((id(seq.options), id(seq.generator)), []).append((seq.order, i, lg))
        for group in groups.values():
            group.sort()
            try:
                # (one row: a view; stacking would copy its logits, ~0.1 ms for GPT-2's 50k)
                rows = group[0][2][None] if len(group) == 1 else torch.stack([lg for _, _, lg in group])
                self._draw([i for _, i, _ in group], rows)
            except Exception as e:
                if len(group) == 1:
                    self._fail(group[0][1], 'sampling', e)
                    continue
                for _, i, lg in group:  # find whose options or logits fail, alone
                    try:
                        self._draw([i], lg[None])
                    except Exception as e:
                        self._fail(i, 'sampling', e)

    def _draw(self, rows, logits):
        """ the next token of every row in rows, from logits (n, V), all sharing options and generator """
        for i, lg in zip(rows, logits):
            if self.rows[i].on_logits is not None:
                self.rows[i].on_logits(lg)
        seq = self.rows[rows[0]]
        toks = sample(logits, seq.options, seq.generator).tolist()
        for i, tok in zip(rows, toks):
            self._append(self.rows[i], tok)

    def _append(self, seq, tok):
        """ tok is seq's next token: emitted, its stop rules applied -> True if it ended the sequence """
        seq.tokens.append(tok)
        seq.n_new += 1
        seq.emit(tok)
        if tok in seq.stop_ids:
            seq.ending = ('stop', None)
        elif seq.n_new == seq.max_new_tokens:
            seq.ending = ('length', None)
        return seq.ending is not None

    def _fail(self, i, where, e):
        """ row i's sequence ends with error e, its own: the others run on """
        seq = self.rows[i]
        logger.warning("a sequence failed in %s and ends alone: %s: %s", where, type(e).__name__, e)
        seq.ending = ('error', e)

    def _leave_finished(self):
        """
        Free the rows of ended sequences, then tell each it has finished (so that whoever waits on
        it finds its row free): the last row's sequence moves into each freed row (its cache
        copied), so rows 0..n-1 stay the running ones.
        """
        ended = []
        for i in reversed(range(len(self.rows))):
            if self.rows[i].ending is None:
                continue
            ended.append(self.rows[i])
            last = self.rows.pop()
            if i < len(self.rows):
                self.rows[i] = last
                n = last.cache_len
                with torch.inference_mode():
                    for layer in self.cache:
                        layer.move_row(len(self.rows), i, n)
        for seq in reversed(ended):
            seq.finish(*seq.ending)
