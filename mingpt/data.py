"""
Text in, training examples out: what a script that trains a GPT on a text file needs between the file
and the Trainer.

    text = training_text(path)                              # path, else ./input.txt, else tiny shakespeare
    ids = torch.tensor(tokenizer.encode(text))              # (N,) token ids
    train_dataset, val_dataset = split_windows(ids, block_size=128, val_fraction=0.1)

A language-model example is a window of block_size + 1 consecutive tokens: x is its first block_size,
y the same shifted by one, so every position predicts the next token. The validation split is the END
of the text (nanoGPT's 90/10), not a random sample of windows, which would overlap the training ones.
"""

import logging
import numbers
import os
from pathlib import Path

from torch.utils.data import Dataset

from mingpt.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)


def read_text_file(path) -> str:
    """A UTF-8 text file, or an error that says why it cannot be trained (or evaluated) on."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f'{path} is a directory, not a file; give the path of a text file')
    if not path.is_file():
        raise MissingFileError(f'{path}: no such file')
    data = path.read_bytes()
    if not data:
        raise ConfigError(f'{path} is empty; give a file with some text in it')
    if b'\x00' in data:
        raise ConfigError(f'{path} contains NUL bytes (at byte {data.index(0)}), so it is binary, not text; '
                          f'give a UTF-8 text file')
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path} is not valid UTF-8 (bad byte at offset {e.start}); convert it to UTF-8 first, '
                          f'e.g. iconv -f latin1 -t utf-8') from None


def training_text(path=None) -> str:
    """
    The text to train on: path; else input.txt in the working directory (minGPT's chargpt
    convention); else tiny shakespeare, downloaded once into the mingpt cache (a DownloadError when
    that fails, e.g. offline, that says to give a file).
    """
    if path is None and os.path.isfile('input.txt'):
        path = 'input.txt'
    if path is None:
        from mingpt.download import DownloadError, get_tiny_shakespeare  # only this case needs them
        try:
            path = get_tiny_shakespeare()
        except DownloadError as e:
            raise DownloadError(f"no text file was given and there is no input.txt here, so tiny "
                                f"shakespeare was to be downloaded, which failed:\n{e}\nGive the path "
                                f"of a text file to train on (the projects' --data.path=...).") from e
    logger.info("training on %s", path)
    return read_text_file(path)


class TokenWindows(Dataset):
    """ every window of block_size + 1 tokens of ids (N,): item i is (ids[i:i+T], ids[i+1:i+T+1]) """

    def __init__(self, ids, block_size, vocab_size=None):
        if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigError(f"block_size={block_size!r} cannot work: it must be an int >= 1, the "
                              "length of a training window in tokens")
        if len(ids) <= block_size:
            raise ConfigError(f"{len(ids)} tokens are too few for windows of block_size={block_size}; "
                              "use more text or a smaller block_size")
        self.ids = ids  # (N,) LongTensor
        self.block_size = block_size
        self.vocab_size = vocab_size

    # minGPT's dataset interface, from which its scripts size the model
    def get_vocab_size(self):
        return self.vocab_size

    def get_block_size(self):
        return self.block_size

    def __len__(self):
        return len(self.ids) - self.block_size

    def __getitem__(self, idx):
        chunk = self.ids[idx:idx + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def split_windows(ids, block_size, val_fraction=0.1, vocab_size=None):
    """ (train, val) TokenWindows over the first 1 - val_fraction of ids (N,) and the rest (val None if 0) """
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise ConfigError(f"val_fraction={val_fraction!r} cannot work: it must be in [0, 1), the fraction of "
                          "the tokens (at the end) kept for validation, e.g. 0.1")
    n_val = int(len(ids) * val_fraction)
    train = TokenWindows(ids[:len(ids) - n_val], block_size, vocab_size)
    return train, (TokenWindows(ids[len(ids) - n_val:], block_size, vocab_size) if n_val else None)
