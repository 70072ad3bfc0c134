"""
The one download helper of the library: tokenizer files, GPT-2 weights and datasets all come through here
(GPT-2's tokenizer files also ship inside the package: gpt2_vocab_files looks there first).

- Files are cached under cache_dir(): $MINGPT_CACHE if set, else ~/.cache/mingpt.
- A download streams into `<dest>.part` and is renamed onto `<dest>` only once it is complete and its
  sha256 (when we know it) matches, so a crash or a Ctrl-C never leaves a half-written file where the
  library will look for it.
- An interrupted download resumes from the `.part` file with an HTTP Range request when the server
  supports it (206 Partial Content), and starts over when it does not.
- Without network you get a DownloadError that names the URL and the path to put the file at by hand.

Every remote location is a module-level constant, and each can also be overridden with an environment
variable (MINGPT_GPT2_BASE_URL, MINGPT_<DATASET>_URL), which is how the tests point the library at a local
HTTP server and how a user can point it at a mirror.
"""

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

import requests
from tqdm import tqdm

from mingpt.errors import DownloadError

try:
    import fcntl  # POSIX only; used to make concurrent processes (e.g. DDP ranks) download a file once
except ImportError:  # Windows: no lock, the atomic rename still keeps every cached file whole
    fcntl = None

logger = logging.getLogger(__name__)

TIMEOUT = (10, 60)  # seconds to connect, seconds to wait for the next bytes of the body
CHUNK_SIZE = 1 << 16  # also the most we lose when a connection drops: a partly received chunk is discarded
MAX_ATTEMPTS = 5  # an attempt that received bytes before failing is resumed, up to this many times in all

# OpenAI's public GPT-2 bucket: the tokenizer files and the original TF checkpoints live under models/<size>/
GPT2_BASE_URL = 'https://openaipublic.blob.core.windows.net/gpt-2'

TINY_SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
TINY_SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'

# public text corpora at pinned commits (so their sha256 never moves): Tolstoy's War and Peace (Project
# Gutenberg's text, as char-rnn's data sets carry it), and WikiText-2's validation and test splits (v1, as
# pytorch/examples' word language model carries them)
GITHUB_RAW = 'https://raw.githubusercontent.com'
WARPEACE_URL = (f'{GITHUB_RAW}/MrHereward/machine_learning_sandbox/2d0fdf30f4afbcf01c1b8c7b408e738a0161d613/'
                'warpeace_input.txt')
WIKITEXT2_URL = (f'{GITHUB_RAW}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/'
                 'word_language_model/data/wikitext-2/{split}.txt')
# HellaSwag's validation split (10,042 examples), the file build-nanogpt and llm.c evaluate on; no sha256
# is published for it, so only its size is checked (against the server's Content-Length)
HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'

# name -> (url, sha256, file name in the cache). get_dataset(name) downloads one of them once.
DATASETS = {
    'tinyshakespeare': (TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_SHA256, 'tinyshakespeare.txt'),
    'warpeace': (WARPEACE_URL, 'b0fc81c399971eaf738c8be89809e6a0d95c151749112b04f06b6af648d8a39f', 'warpeace.txt'),
    'wikitext2_valid': (WIKITEXT2_URL.format(split='valid'),
                        'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8', 'wikitext2_valid.txt'),
    'wikitext2_test': (WIKITEXT2_URL.format(split='test'),
                       'd790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0', 'wikitext2_test.txt'),
    'hellaswag': (HELLASWAG_URL, None, 'hellaswag_val.jsonl'),
}
# the DATASETS that are plain text, a corpus to tokenize (mingpt.prepare --fetch takes these)
CORPORA = ('tinyshakespeare', 'warpeace', 'wikitext2_valid', 'wikitext2_test')


def cache_dir() -> Path:
    """$MINGPT_CACHE if set, else ~/.cache/mingpt; created on demand."""
    path = cache_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f'cannot create the mingpt cache directory {path} ({e}); '
                           f'set the MINGPT_CACHE environment variable to a writable directory') from e
    return path


def cache_path() -> Path:
    """Where the cache is ($MINGPT_CACHE, else ~/.cache/mingpt), without creating it."""
    return Path(os.environ.get('MINGPT_CACHE') or Path.home() / '.cache' / 'mingpt').expanduser()


def sha256sum(path) -> str:
    """Hex sha256 of a file, read in chunks so that multi-GB weights do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(CHUNK_SIZE), b''):
            h.update(chunk)
    return h.hexdigest()


def gpt2_url(path: str) -> str:
    """URL of a file in OpenAI's GPT-2 bucket, e.g. gpt2_url('models/124M/encoder.json').
    The base can be overridden with $MINGPT_GPT2_BASE_URL (a mirror, or a local server in the tests)."""
    base = os.environ.get('MINGPT_GPT2_BASE_URL') or GPT2_BASE_URL
    return base.rstrip('/') + '/' + path.lstrip('/')


# -----------------------------------------------------------------------------
# downloading

def download(url: str, dest, sha256: str = None, desc: str = None, expected_size: int = None) -> Path:
    """Download url to dest (always fetching, replacing dest if it exists) and return dest as a Path.

    Streams to dest + '.part' with a progress bar, resumes an existing .part with a Range request,
    checks the size (expected_size, else what the server announced) and sha256 if given, then renames the
    .part onto dest atomically. Raises DownloadError on failure; dest is never left half-written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        _download(url, dest, sha256, desc, expected_size)
    return dest


def cached_download(url: str, filename: str, sha256: str = None, subdir: str = None,
                    desc: str = None, expected_size: int = None) -> Path:
    """Return cache_dir()/subdir/filename, downloading it from url first if it is not there yet.

    With a sha256, a cached file is checked before it is returned, and a corrupt one is downloaded again.
    A cached file is used without touching the network, so this works offline once files are in place.
    """
    dest = cache_dir() / subdir / filename if subdir else cache_dir() / filename
    if _is_valid(dest, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if _is_valid(dest, sha256):  # another process finished it while we waited for the lock
            return dest
        if dest.exists():
            logger.warning('cached file %s does not match its sha256, downloading it again', dest)
        _download(url, dest, sha256, desc, expected_size)
    return dest


def _is_valid(path: Path, sha256) -> bool:
    return path.is_file() and (sha256 is None or sha256sum(path) == sha256)


@contextlib.contextmanager
def _locked(dest: Path):
    """Exclusive lock on dest for the duration of a download, so that processes started together
    (torchrun ranks, parallel test workers) do not write the same .part file at once. The lock file
    is removed afterwards; a process that opened it just before the removal finds, once it holds the
    lock, that the path now names another file (or none), and locks afresh."""
    if fcntl is None:
        yield
        return
    lock = dest.with_name(dest.name + '.lock')
    while True:
        f = open(lock, 'w')
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it, so no one can lock the removed file unseen
        f.close()  # closing releases the lock


def _download(url, dest: Path, sha256, desc, expected_size):
    part = dest.with_name(dest.name + '.part')
    logger.info('downloading %s to %s', url, dest)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        offset = part.stat().st_size if part.exists() else 0
        try:
            total = _fetch(url, part, offset, desc or dest.name)
        except requests.HTTPError as e:
            reason = f'HTTP {e.response.status_code} {e.response.reason}'
            raise DownloadError(_failure_message(url, dest, reason)) from e
        except requests.RequestException as e:  # refused, DNS, timeout, connection dropped mid-body
            received = part.stat().st_size if part.exists() else 0
            if received > offset and attempt < MAX_ATTEMPTS:  # we made progress: resume from where it broke
                logger.warning('download of %s interrupted at byte %d (%s), resuming', url, received, e)
                continue
            raise DownloadError(_failure_message(url, dest, e)) from e
        if total is _STALE:  # 416 on a .part that is not a prefix of the file we want: start over
            part.unlink()
            continue
        break
    else:
        raise DownloadError(_failure_message(url, dest, f'gave up after {MAX_ATTEMPTS} attempts'))

    size = part.stat().st_size
    want = expected_size if expected_size is not None else total
    if want is not None and size != want:
        part.unlink()
        raise DownloadError(f'downloaded {size} bytes from {url} but expected {want}; the partial file was '
                            f'deleted, run again to retry (or put the file at {dest} by hand)')
    if sha256 is not None:
        got = sha256sum(part)
        if got != sha256:
            part.unlink()
            raise DownloadError(f'sha256 mismatch for {url}: expected {sha256}, got {got}. The downloaded file '
                                f'was deleted; run again to retry, or put a correct copy at {dest} by hand')
    os.replace(part, dest)  # atomic: dest is either absent or complete
    return dest


_STALE = object()


def _fetch(url, part: Path, offset: int, desc: str):
    """One HTTP request appending to (or, without Range support, rewriting) the .part file.
    Returns the full size of the file if the server told us (else None), or _STALE for a useless .part."""
    headers = {'Accept-Encoding': 'identity'}  # we want the stored bytes: sizes and Range offsets refer to them
    if offset:
        headers['Range'] = f'bytes={offset}-'
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if offset and r.status_code == 416:  # nothing after offset: .part is already complete, or stale
            total = _content_range_total(r)
            return total if total == offset else _STALE
        r.raise_for_status()
        total = _content_range_total(r) if r.status_code == 206 else None
        if r.status_code == 206 and _content_range_start(r) != offset:
            raise requests.ConnectionError(f'server answered a Range request for byte {offset} with '
                                           f'{r.headers.get("Content-Range")!r}')
        if r.status_code != 206:  # server ignored the Range header and sends the whole file
            offset = 0
            length = r.headers.get('Content-Length')
            total = int(length) if length and length.isdigit() else None
        with open(part, 'ab' if offset else 'wb') as f, \
                tqdm(total=total, initial=offset, unit='B', unit_scale=True, unit_divisor=1024,
                     desc=desc, disable=None) as bar:  # disable=None: no bar when stderr is not a terminal
            for chunk in r.iter_content(CHUNK_SIZE):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _content_range_start(r):
    m = re.match(r'bytes (\d+)-', r.headers.get('Content-Range', ''))
    return int(m.group(1)) if m else None


def _content_range_total(r):
    m = re.search(r'/(\d+)\s*$', r.headers.get('Content-Range', ''))
    return int(m.group(1)) if m else None


def _failure_message(url, dest, reason) -> str:
    # requests nests the root cause (refused, DNS, ...) deep in its message: show just that part
    reason = str(reason).split('Caused by ')[-1].rstrip(')')
    return (f'could not download {url} ({reason}).\n'
            f'If this machine has no internet access, download that file elsewhere and put it at {dest} '
            f'(files are cached under {cache_path()}; set the MINGPT_CACHE environment variable to use another '
            f'directory).')


# -----------------------------------------------------------------------------
# GPT-2's tokenizer files

# OpenAI's files for the GPT-2 tokenizer (the same for every model size) and their sha256; a copy ships
# in GPT2_VOCAB_DIR
GPT2_VOCAB_DIR = Path(__file__).resolve().parent / 'assets' / 'gpt2'
GPT2_VOCAB_FILES = {
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
}

def gpt2_vocab_files():
    """
    Paths of GPT-2's encoder.json and vocab.bpe: the copy shipped inside the package (mingpt/assets/gpt2);
    else minGPT's cache (encoder.json and vocab.bpe directly in ~/.cache/mingpt), else cache_dir()/gpt2,
    downloaded (and checked against their sha256) if missing. Cached files are used only when their
    sha256 is right.
    """
    if all((GPT2_VOCAB_DIR / name).is_file() for name in GPT2_VOCAB_FILES):
        return tuple(GPT2_VOCAB_DIR / name for name in GPT2_VOCAB_FILES)
    mingpt_cache = cache_path()  # not cache_dir(): only look, create nothing
    if all((mingpt_cache / name).is_file() and sha256sum(mingpt_cache / name) == sha
           for name, sha in GPT2_VOCAB_FILES.items()):
        return tuple(mingpt_cache / name for name in GPT2_VOCAB_FILES)
    paths = []
    for name, sha256 in GPT2_VOCAB_FILES.items():
        try:
            paths.append(cached_download(gpt2_url(f'models/124M/{name}'), name, sha256=sha256, subdir='gpt2'))
        except DownloadError as e:
            raise DownloadError(
                f'{e}\nThe GPT-2 tokenizer needs two files, encoder.json and vocab.bpe (from '
                f'{gpt2_url("models/124M/")}), in the directory {cache_path() / "gpt2"}. Copy both there, or pass '
                f'get_encoder(path=...) / BPETokenizer(path=...) a directory that contains them.') from e
    return tuple(paths)


# -----------------------------------------------------------------------------
# datasets

def get_dataset(name: str) -> Path:
    """Path to a dataset file from DATASETS, downloaded to cache_dir()/datasets/ the first time.
    The URL can be overridden with $MINGPT_<NAME>_URL, e.g. MINGPT_TINYSHAKESPEARE_URL."""
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; known datasets: {", ".join(sorted(DATASETS))}')
    url, sha256, filename = DATASETS[name]
    url = os.environ.get(f'MINGPT_{name.upper()}_URL') or url
    return cached_download(url, filename, sha256=sha256, subdir='datasets', desc=filename)


def get_tiny_shakespeare() -> Path:
    """Path to tiny shakespeare (1,115,394 characters of Shakespeare, karpathy/char-rnn's input.txt)."""
    return get_dataset('tinyshakespeare')
