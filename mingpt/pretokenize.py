"""
GPT-2's pre-tokenizer: the regex that cuts text into the pieces BPE works on (words with their leading
space, numbers, punctuation runs, whitespace runs; BPE never merges across pieces), and the small text
rules that encoding (mingpt/bpe.py) and vocabulary training (mingpt/bpe_train.py) share, so that both cut
text identically.

Pre-tokenizing is a large part of encoding's time, so stretches of pure ASCII text are split with an
equivalent ASCII-only pattern and the stdlib `re` (faster than `regex` with Unicode classes), and only the
neighbourhood of the odd non-ASCII character goes through the full Unicode pattern (see pretokenize for
why this is exact).
"""

import re
import sys

import regex

# GPT-2's pre-tokenizer, as published by OpenAI:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# We put the letters alternative first because it is by far the most common match; that changes nothing,
# since it can only match where the contractions cannot (they start with an apostrophe, which is neither a
# letter nor a space). \s+(?!\S) keeps the last space of a run for the next word: "a   b" -> "a", "  ", " b".
PATTERN = r""" ?\p{L}+|'(?:[sdmt]|ll|ve|re)| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PAT = regex.compile(PATTERN)

# The same pattern spelled for ASCII-only text, where \p{L} is [A-Za-z], \p{N} is [0-9] and \s (Unicode
# White_Space) is [\t\n\v\f\r ]. Note \x1c-\x1f are not White_Space, though str.isspace() says they are.
# From Python 3.11 on, `re` has possessive repeats (++): no piece ever gives back a character of a letter,
# digit or punctuation run, so the engine need not keep the states to backtrack into.
# The whitespace run before (?!\S) must stay backtracking: it gives back its last space to the next word.
_WS = r'\t\n\x0b\x0c\r '
_RUN = '++' if sys.version_info >= (3, 11) else '+'
ASCII_PATTERN = (rf"""[ ]?[A-Za-z]{_RUN}|'(?:[sdmt]|ll|ve|re)|[ ]?[0-9]{_RUN}|[ ]?[^{_WS}A-Za-z0-9]{_RUN}"""
                 rf"""|[{_WS}]+(?![^{_WS}])|[{_WS}]{_RUN}""")
_ASCII_PAT = re.compile(ASCII_PATTERN)
_NON_ASCII = re.compile(r'[^\x00-\x7f]')
# A "safe cut": an ASCII non-space character followed by an ASCII space character. No piece spans it,
# and no piece before it looks past it, so text on either side can be pre-tokenized independently.
_SAFE_CUT_AFTER = re.compile(rf'(?<=[^{_WS}\x80-\U0010ffff])(?=[{_WS}])')
_LAST_SAFE_CUT = regex.compile(rf'(?r)(?<=[^{_WS}\x80-\U0010ffff])(?=[{_WS}])')  # (?r): search backwards
# the same in UTF-8 bytes, where a byte below 0x80 is always a whole ASCII character
_LAST_SAFE_CUT_BYTES = regex.compile(rf'(?r)(?<=[^{_WS}\x80-\xff])(?=[{_WS}])'.encode())


def pretokenize(text: str) -> list:
    """The pieces GPT-2's pre-tokenizer cuts text into: PAT.findall(text), faster, since ASCII
    stretches go through the ASCII-only pattern with `re`.

    Exactness: we only cut the text at "safe cuts" (an ASCII non-space followed by an ASCII space).
    No piece contains both sides of such a cut (a piece is either all whitespace or has none except an
    optional leading space), and the only lookahead, (?!\\S), sits at the end of whitespace runs, which
    never end just before a whitespace character. So findall on the parts between cuts, each treated
    as its own string (pos/endpos), gives the pieces of the whole.
    """
    if text.isascii():
        return _ASCII_PAT.findall(text)
    n = len(text)
    if (len(text.encode('utf-8', 'surrogatepass')) - n) * 300 > n:
        # more than ~1 non-ASCII character in 300: the cut searches would cost more than they save
        # concurrent: `regex` releases the GIL while it matches, so a megabyte of text being split in a
        # worker thread does not stall the others (a server's event loop) for the whole C call
        return PAT.findall(text, concurrent=True)
    pieces, pos = [], 0
    while pos < n:
        m = _NON_ASCII.search(text, pos)
        if m is None:
            pieces += _ASCII_PAT.findall(text, pos)
            break
        # [pos, start) is pure ASCII; [start, end) holds the non-ASCII character, between safe cuts
        cut = _LAST_SAFE_CUT.search(text, pos, m.start())
        start = cut.start() if cut else pos
        cut = _SAFE_CUT_AFTER.search(text, m.end())
        end = cut.start() if cut else n
        if start > pos:
            pieces += _ASCII_PAT.findall(text, pos, start)
        pieces += PAT.findall(text, start, end, concurrent=True)
        pos = end
    return pieces


def special_tokens_regex(tokens):
    """A compiled regex that matches any of the strings tokens, longest first: a special token that is a
    prefix of another must not win over the longer one."""
    return re.compile('|'.join(map(re.escape, sorted(tokens, key=len, reverse=True))))


def without_lone_surrogates(text: str) -> str:
    """text with its lone surrogates (not valid UTF-8; say from a file read with errors='surrogateescape')
    paired up where they pair up and the rest replaced with U+FFFD, as tiktoken does."""
    return text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')


def safe_chunks(text: str, n_chars: int):
    """Yield text in consecutive chunks of at least n_chars characters (the last may be shorter), each
    ending at a "safe cut" (see pretokenize): pre-tokenizing the chunks one at a time gives exactly
    the pieces of the whole text, with the memory of one chunk."""
    pos = 0
    while pos < len(text):
        end = pos + n_chars
        cut = _SAFE_CUT_AFTER.search(text, end) if end < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[pos:end]
        pos = end


def last_safe_cut(data: bytes, pos: int = 0):
    """The position of the last "safe cut" (see pretokenize) in data, the UTF-8 bytes of a text, at pos or
    after; None if there is none. Decoding and pre-tokenizing the bytes on either side of it separately
    gives the pieces of the whole, so a file can be tokenized a stretch at a time (mingpt/prepare.py)."""
    m = _LAST_SAFE_CUT_BYTES.search(data, max(0, pos - 1))  # pos - 1: the byte before a cut at pos
    return m.start() if m else None
