"""
The tokenizer that goes with a model: the character tokenizer, and reading and writing the tokenizer
files kept in a model's directory.

    tok = CharTokenizer.from_text(text)             # or a bpe.Encoder, e.g. get_encoder() or a trained one
    save_tokenizer(tok, 'out/model')                # next to the weights (GPT.save_pretrained)
    tok = load_tokenizer('out/model')               # 'gpt2', a directory, or a file; raises if there is none
    tok = tokenizer_for_model('out/model', vocab_size)   # the directory's files, else GPT-2's for its size

A model directory (an HF-format directory from save_pretrained, or a trainer checkpoint) may carry its
tokenizer, looked for in this order:
- encoder.json + vocab.bpe: a byte-level BPE vocabulary in GPT-2's format (mingpt.bpe.get_encoder(dir),
  written by save_tokenizer or mingpt.bpe_train); Hugging Face's names for the same files, vocab.json +
  merges.txt, work too.
- chars.json: a character vocabulary, a JSON list of strings of one character each, the index of a
  character being its id, e.g. ["\\n", " ", "!", ..., "z"].
A trainer checkpoint (work_dir/ckpt, a directory with trainer.pt) is replaced whole at every save, so its
tokenizer files may instead sit in the run directory above it (work_dir). A model without tokenizer files is
assumed to use GPT-2's BPE when its vocab_size is 50257 (or 50304, GPT-2's vocabulary padded to a multiple
of 64 as nanoGPT and llm.c do); that is tokenizer_for_model's one guess, and load_tokenizer never makes it.

Every tokenizer here has encode(text) -> ids, decode(ids) -> text and n_vocab (the vocab_size a model
needs for it).
"""

import json
import logging
from pathlib import Path

from mingpt.bpe import Encoder, get_encoder
from mingpt.errors import ConfigError, MissingFileError, WeightsError
from mingpt.utils import atomic_write

logger = logging.getLogger(__name__)

BPE_FILES = ('encoder.json', 'vocab.bpe')  # GPT-2's names
HF_BPE_FILES = ('vocab.json', 'merges.txt')  # Hugging Face's names for the same two files
CHARS_FILE = 'chars.json'
GPT2_VOCAB_SIZES = (50257, 50304)  # GPT-2's vocabulary, and the same padded to a multiple of 64

# -----------------------------------------------------------------------------
# characters


class CharTokenizer:
    """Characters <-> ids: id i is chars[i]. Saved as chars.json, a JSON list of the characters."""

    def __init__(self, chars):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ConfigError(f'a character vocabulary must list single characters; got {bad[:5]!r}')
        if len(set(chars)) != len(chars):
            dups = sorted({c for c in chars if chars.count(c) > 1})
            raise ConfigError(f'a character vocabulary lists each character once; {dups!r} appear more than once')
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.n_vocab = len(chars)

    @classmethod
    def from_text(cls, text):
        """The distinct characters of text, sorted (minGPT's chargpt order)."""
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, path):
        """From a chars.json file, or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / CHARS_FILE
        if not path.is_file():
            raise MissingFileError(f'{path}: no such file (a character vocabulary, {CHARS_FILE})')
        try:
            chars = json.loads(path.read_text(encoding='utf-8'))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f'cannot read the character vocabulary {path}: {e}') from None
        if not isinstance(chars, list):
            raise ConfigError(f'{path} must hold a JSON list of characters (index = id), not a {type(chars).__name__}')
        return cls(chars)

    def save(self, directory):
        """Write directory/chars.json (save_tokenizer); returns its path."""
        return save_tokenizer(self, directory) / CHARS_FILE

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - self.stoi.keys())
            raise ConfigError(f'the text has {len(missing)} character(s) that are not in the vocabulary: '
                              f'{"".join(missing[:20])!r} ({", ".join(map(repr, missing[:20]))}); the model knows '
                              f'only these {self.n_vocab}: {"".join(self.chars)!r}') from None

    def decode(self, ids):
        if hasattr(ids, 'tolist'):
            ids = ids.tolist()
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.n_vocab]
        if bad:  # a negative id would otherwise index from the end
            raise ConfigError(f'cannot decode {bad[:5]}: token ids must be ints in [0, {self.n_vocab})')
        return ''.join(self.chars[i] for i in ids)

# -----------------------------------------------------------------------------
# the files of a model directory


def save_tokenizer(tokenizer, directory):
    """
    Write tokenizer's files into directory (created if needed), each atomically: a bpe.Encoder as
    encoder.json (ids in order) + vocab.bpe (the merges in order, under GPT-2's header line), which
    get_encoder(directory) reads; a CharTokenizer as chars.json. Returns directory as a Path.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError(f'{d} is a file; the tokenizer files go into a directory: give the path of one')
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, CharTokenizer):
        atomic_write(d / CHARS_FILE, json.dumps(tokenizer.chars, ensure_ascii=False))
    elif isinstance(tokenizer, Encoder):
        vocab = dict(sorted(tokenizer.encoder.items(), key=lambda kv: kv[1]))
        merges = ''.join(f'{a} {b}\n' for a, b in tokenizer.merges())
        atomic_write(d / 'encoder.json', json.dumps(vocab, ensure_ascii=False))
        atomic_write(d / 'vocab.bpe', '#version: 0.2\n' + merges)
    else:
        raise TypeError(f'save_tokenizer writes a mingpt.bpe.Encoder or a CharTokenizer, not a '
                        f'{type(tokenizer).__name__}')
    return d


def find_tokenizer(directory):
    """
    The tokenizer whose files are in directory (see the module docstring), or None if there are none.
    Files that are there but cannot be read are an error (WeightsError) naming the file: a model
    directory with a broken tokenizer must not quietly fall back to another one.
    """
    d = Path(directory)
    found = next((names for names in (BPE_FILES, HF_BPE_FILES, (CHARS_FILE,))
                  if all((d / name).is_file() for name in names)), None)
    if found is None:
        return None
    try:
        if found == (CHARS_FILE,):
            return CharTokenizer.load(d / CHARS_FILE)
        return Encoder.from_files(*(d / name for name in found))
    except (OSError, ValueError) as e:
        raise WeightsError(f'{e}. The model in {d} needs its own tokenizer: copy its tokenizer files '
                           f'({" + ".join(found)}) again from where the model came from') from None


def load_tokenizer(path):
    """'gpt2' (GPT-2's BPE), a directory with tokenizer files, or a file: a JSON list of characters (chars.json,
    or any name), or one of the BPE files (the vocabulary is then read from its directory). There is no
    fallback: no tokenizer at path is a MissingFileError (a FileNotFoundError)."""
    if str(path) == 'gpt2':
        return get_encoder()
    p = Path(path)
    if p.is_file() and p.suffix == '.json':
        try:
            content = json.loads(p.read_text(encoding='utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f'cannot read the tokenizer file {p}: {e}') from None
        if isinstance(content, list):
            return CharTokenizer(content)
    tokenizer = find_tokenizer(p if p.is_dir() else p.parent)
    if tokenizer is None:
        raise MissingFileError(f'no tokenizer at {path}: expected "gpt2", a directory with encoder.json + vocab.bpe '
                               f'(or vocab.json + merges.txt, or {CHARS_FILE}), or a {CHARS_FILE} file')
    return tokenizer


def tokenizer_for_model(source, vocab_size):
    """The tokenizer of the model loaded from source (a name or path): the tokenizer files of its directory
    (for a trainer checkpoint, a directory with trainer.pt, also of the run directory above it), else GPT-2's
    BPE for a GPT-2-sized vocabulary; a ConfigError (a ValueError) saying what to do otherwise."""
    p = Path(source).expanduser()
    if p.exists():
        d = p if p.is_dir() else p.parent
        places = [d, d.parent] if (d / 'trainer.pt').is_file() else [d]
        for place in places:
            tokenizer = find_tokenizer(place)
            if tokenizer is not None:
                logger.info('tokenizer: from %s', place)
                return tokenizer
    if vocab_size in GPT2_VOCAB_SIZES:
        logger.info('tokenizer: GPT-2 BPE (no tokenizer files with the model, and vocab_size=%d)', vocab_size)
        return get_encoder()
    raise ConfigError(f'cannot tell which tokenizer {source} uses: it has no tokenizer files (encoder.json + '
                      f'vocab.bpe, or {CHARS_FILE}) and its vocab_size ({vocab_size}) is not GPT-2\'s. Put the '
                      f'tokenizer files in the model directory, or pass --tokenizer PATH')
