"""
BPE's merge step: the UTF-8 bytes of a pre-tokenized piece -> its parts, by repeatedly merging the
adjacent pair whose concatenation has the lowest rank (the leftmost such pair on ties) until no adjacent
pair makes a token. That is tiktoken's rule, so the parts are tiktoken's tokens (mingpt/bpe.py turns them
into ids and caches them per piece).

Everything here works on "rank ids": byte b is b, the token made by merge r is 256 + r. A part is a small
int, comparing rank ids compares ranks, and the part a merge makes is the pair's rank id itself. A pair of
rank ids (a, b) is the int a << shift | b, and PairMerger's table says what every pair merges into.

Three ways to the same result, for three workloads:
- merge: one short piece (a word). Each step scans the list of pairs for its lowest rank: O(n) a step,
  O(n^2) a piece, but the scans are C-level list operations, the fastest way for a few bytes.
- merge_long: one long piece (CJK text without spaces, a run of one character or of emoji: a single piece
  of as many bytes as the text). A heap of the pairs over a linked list of the parts: O(n log n).
- merge_many: the thousands of new pieces of a corpus, all at once with numpy: each round merges one pair
  in every piece, in a few array operations, so the rounds are as many as the longest piece needs.
"""

from heapq import heapify, heappop, heappush

import numpy as np

LONG_PIECE = 64  # bytes; merge hands a longer piece to merge_long, and merge_many may leave it out (see alone)
ROUND_COST = 1 / 200  # in a batch of N bytes, each byte of the longest piece costs merge_many (in rounds, each a
                      # pass over all N) about what merge_long spends on N * ROUND_COST bytes


class PairMerger:
    """Merges pieces with one vocabulary's table of pairs (building it takes a moment: do it once)."""

    def __init__(self, rank_id: dict, n_rank_ids: int):
        """rank_id: token bytes -> rank id, for every token BPE can produce; n_rank_ids: 256 + the merges.

        The table holds every way to write a token as two tokens: pairs maps a << shift | b -> the rank id of
        a + b, and table holds the same as sorted numpy arrays (keys, rank ids) for merge_many. Any two
        adjacent parts whose concatenation is a token merge, so these are more than vocab.bpe's merges;
        absent pairs never merge."""
        self.shift = shift = n_rank_ids.bit_length()
        pairs, get = {}, rank_id.get
        for tb, r in rank_id.items():
            for j in range(1, len(tb)):
                a, b = get(tb[:j]), get(tb[j:])
                if a is not None and b is not None:
                    pairs[a << shift | b] = r
        keys = np.fromiter(pairs.keys(), np.int64, len(pairs))
        order = np.argsort(keys)
        self.table = keys[order], np.fromiter(pairs.values(), np.int64, len(pairs))[order]
        self.pairs = pairs

    def alone(self, lengths: list) -> list:
        """Which pieces of a batch (by index, given their lengths in bytes) to merge with merge_long instead
        of merge_many. Each round of merge_many passes over all N bytes of the batch, and there are as many
        rounds as its longest piece needs, so one long piece among short ones costs far more there than
        alone. Leaving out the k longest costs about their bytes in merge_long and makes the rounds as many as
        the longest piece kept needs: this picks the k for which that sum is least."""
        if max(lengths) <= LONG_PIECE:
            return []
        order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
        per_round = ROUND_COST * sum(lengths)
        best, best_k, left_out = per_round * lengths[order[0]], 0, 0
        for k, i in enumerate(order, 1):
            if lengths[i] <= LONG_PIECE:
                break
            left_out += lengths[i]
            cost = left_out + per_round * (lengths[order[k]] if k < len(order) else 0)
            if cost < best:
                best, best_k = cost, k
        return order[:best_k]

    def merge(self, b: bytes) -> list:
        """BPE of one piece: start from single bytes, repeatedly merge the adjacent pair whose concatenation
        has the lowest rank (leftmost on ties), until no adjacent pair makes a token. Returns the parts as
        rank ids: small ints, so a merge step is a few list operations and dict lookups, and no new bytes.
        Each step scans all the parts, which is fast for a short piece; a long one goes to merge_long."""
        if len(b) > LONG_PIECE:
            return self.merge_long(b)
        rank, shift, NONE = self.pairs.get, self.shift, 1 << 62
        parts = list(b)  # the rank id of a single byte is the byte
        # ranks[i] = rank id of parts[i] + parts[i+1] (NONE: they never merge), updated after each merge
        ranks = [rank(x << shift | y, NONE) for x, y in zip(parts, parts[1:])]
        while ranks:
            r = min(ranks)
            if r == NONE:
                break
            i = ranks.index(r)
            parts[i:i + 2] = (r,)
            del ranks[i]
            # only the pairs touching the new part changed
            if i > 0:
                ranks[i - 1] = rank(parts[i - 1] << shift | r, NONE)
            if i < len(ranks):
                ranks[i] = rank(r << shift | parts[i + 1], NONE)
        return parts

    def merge_long(self, b: bytes) -> list:
        """merge, in O(n log n) for a piece of n bytes rather than O(n^2). The parts form a linked list (each
        known by the position of its first byte, which it keeps as it grows), and a heap holds every pair that
        merges as the int rank id << bits | position, so the smallest entry is the lowest-ranked pair, the
        leftmost on ties: the pair merge picks. A merge changes only the pairs on either side of the new part;
        their new entries are pushed, and the old ones are skipped when popped, as ranks[i] no longer holds
        their rank id (the pair at a position only ever grows, each time into a longer token, so a rank id
        that left a position never comes back to it)."""
        rank, shift = self.pairs.get, self.shift
        pop, push = heappop, heappush  # module globals looked up per call, so that a test can count them
        n = len(b)
        bits = n.bit_length()
        at = (1 << bits) - 1  # entry & at: the position
        parts = list(b)
        # ranks[i]: rank id of the pair (part at i, next part); None if they never merge or i is merged away
        ranks = [rank(x << shift | y) for x, y in zip(parts, parts[1:])]
        heap = [r << bits | i for i, r in enumerate(ranks) if r is not None]
        heapify(heap)
        ranks.append(None)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # the neighbours' positions (n, -1: none)
        while heap:
            entry = pop(heap)
            r = entry >> bits
            i = entry & at
            if ranks[i] != r:
                continue
            j = nxt[i]  # the right part, absorbed into i
            k = nxt[i] = nxt[j]
            parts[i] = r
            ranks[j] = None
            if k < n:
                prv[k] = i
                right = ranks[i] = rank(r << shift | parts[k])
                if right is not None:
                    push(heap, right << bits | i)
            else:
                ranks[i] = None
            h = prv[i]
            if h >= 0:
                left = ranks[h] = rank(parts[h] << shift | r)
                if left is not None:
                    push(heap, left << bits | h)
        merged, i = [], 0
        while i < n:
            merged.append(parts[i])
            i = nxt[i]
        return merged

    def merge_many(self, pieces: list) -> tuple:
        """merge for many pieces (bytes) at once, with numpy: every round merges, in each piece still
        merging, its lowest-ranked pair (leftmost on ties), as merge does; a round is a few array operations
        over all the pieces, so the rounds are as many as the longest piece needs, not a Python loop per merge.
        Returns the parts of all pieces one after the other as rank ids (an array), and each piece's count."""
        keys, values = self.table
        parts = np.frombuffer(b''.join(pieces), dtype=np.uint8).astype(np.int64)
        lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
        if not len(keys):  # a vocabulary of single bytes: nothing ever merges
            return parts, lengths.tolist()
        shift, NONE = self.shift, 1 << self.shift  # NONE: above every rank id

        def rank(a, b):  # rank id of the token a + b, for arrays of rank ids; NONE where they never merge
            key = a << shift | b
            i = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            return np.where(keys[i] == key, values[i], NONE)

        # all pieces side by side: parts (N,) rank ids, and each part linked to its neighbours in its
        # piece (-1 at a piece's ends); a merge overwrites the left part and unlinks the right one
        N = len(parts)
        starts = np.cumsum(lengths) - lengths
        nxt, prv = np.arange(1, N + 1), np.arange(-1, N - 1)
        nxt[starts + lengths - 1], prv[starts] = -1, -1
        ranks = np.full(N, NONE)  # ranks[i]: rank id of the pair (i, nxt[i])
        linked = nxt >= 0
        ranks[linked] = rank(parts[linked], parts[nxt[linked]])
        alive = np.ones(N, dtype=bool)
        position = np.arange(N)
        while True:
            # per piece, the lowest (rank, position): rank * N + position orders by rank, then leftmost
            best = np.minimum.reduceat(ranks * N + position, starts)
            best = best[best < NONE * N]  # the pieces that still have a pair to merge
            if not len(best):
                break
            i, r = best % N, best // N
            j = nxt[i]  # the right part of each pair, absorbed into i
            parts[i], alive[j], ranks[j] = r, False, NONE
            after = nxt[j]
            nxt[i] = after
            has_after = after >= 0
            prv[after[has_after]] = i[has_after]
            # only the pairs touching the new parts changed
            ranks[i] = NONE
            ranks[i[has_after]] = rank(r[has_after], parts[after[has_after]])
            before = prv[i]
            has_before = before >= 0
            ranks[before[has_before]] = rank(parts[before[has_before]], r[has_before])
        return parts[alive], np.add.reduceat(alive, starts).tolist()
