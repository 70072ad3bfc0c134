"""
Helpers shared by the tests.

- SHARED_DATA: <repo>/../shared/data, real files (GPT-2 vocabulary, corpora) available with no network.
  Only tests know about it; the library never does.
- data_file(name): a data file from SHARED_DATA, or else fetched through the library's own download code
  (so the tests also work for someone with network but without ../shared). english_text(): 1 MB of prose.
- local_http_server(directory): serve a directory on 127.0.0.1 (with Range support) for download tests.
- tiktoken_gpt2(): tiktoken's "gpt2" encoding (the reference for exactness), offline when SHARED_DATA exists.
- tiny_gpt(...): a small random GPT in eval mode; TempDirTestCase: a test case with a fresh self.tmp;
  ProcessRunsTestCase: a test case over runs its setUpClass started (cls.runs), each checked to succeed.
- tiny_hf(seed, **config): a small random transformers GPT2LMHeadModel (TINY_HF sizes), the reference the
  checkpoint-format tests compare against; edit_json(path, **changes): rewrite some keys of a JSON file.
- python_without(*packages): the command of a Python in which those packages are not installed (to check
  that an optional dependency is optional); append a script and its arguments, or '-m' and a module.
- run_train_script(out, *args, trainer=[...], nproc=1): tests/train_script.py in a fresh process, or in nproc
  processes under torchrun (gloo, one thread each); the CompletedProcess.
- @slow: marks a test that trains for more than a few seconds; MINGPT_FAST=1 skips those, so that
  `MINGPT_FAST=1 python -m pytest tests -q` is the quick suite (CI runs everything).
"""

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
FIXTURES = REPO / 'tests' / 'fixtures'

logger = logging.getLogger(__name__)

slow = unittest.skipIf(os.environ.get('MINGPT_FAST') == '1',
                       'slow (trains for more than a few seconds): MINGPT_FAST=1 skips it')


def run_train_script(out, *args, trainer=(), nproc=1, timeout=300):
    """
    tests/train_script.py --out out *args --trainer *trainer (key=value overrides), in one process or, with
    nproc > 1, in nproc under torchrun; returns the CompletedProcess (check its returncode, stderr says why)
    """
    # --standalone: torchrun binds a free local port itself (no window in which another process can take a
    # port picked here)
    launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(REPO / 'tests' / 'train_script.py'), '--out', str(out), *map(str, args),
           '--trainer', *map(str, trainer)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def tiny_gpt(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=False, seed=0,
             sharpen=1.0):
    """
    A small random GPT (explicit sizes, no preset) in eval mode, seeded. sharpen > 1 scales the matrices
    up: sharper distributions, so that greedy decoding is not one token repeated and a wrong context or
    position actually changes the argmax.
    """
    import torch
    from mingpt.model import GPT
    torch.manual_seed(seed)
    c = GPT.get_default_config()
    c.model_type = None
    c.n_layer, c.n_head, c.n_embd = n_layer, n_head, n_embd
    c.vocab_size, c.block_size, c.tie_weights = vocab_size, block_size, tie_weights
    model = GPT(c).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(sharpen)
    return model


class TempDirTestCase(unittest.TestCase):
    """ a test case whose every test gets a fresh temporary directory, self.tmp (a Path), removed after it """

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)


class ProcessRunsTestCase(unittest.TestCase):
    """
    A test case whose setUpClass starts runs in processes into the directory cls.tmp and keeps them in
    cls.runs ({name: CompletedProcess}); every test first checks that each of them succeeded.
    """

    @classmethod
    def path(cls, name):
        return os.path.join(cls.tmp, name)

    def setUp(self):
        super().setUp()
        for name, p in self.runs.items():
            self.assertEqual(p.returncode, 0, f"{name}: {p.stderr[-3000:]}")


# the sizes of tiny_hf: no <|endoftext|> in a 100-token vocabulary
TINY_HF = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)


def tiny_hf(seed=0, **overrides):
    """ a small random transformers GPT2LMHeadModel in eval mode; overrides are GPT2Config fields """
    import torch
    import transformers
    transformers.logging.set_verbosity_error()  # no notes about generation configs in the test output
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**TINY_HF, 'bos_token_id': 0, 'eos_token_id': None, **overrides})
    hf = transformers.GPT2LMHeadModel(config).eval()
    # random LayerNorm gains and biases too, so that a swapped weight/bias cannot go unnoticed
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if n.endswith('ln_1.weight') or n.endswith('ln_2.weight') else 0.0, 0.1)
    return hf


def edit_json(path, **changes):
    """ rewrite the JSON file at path with these keys changed (a config.json, an hparams.json) """
    path = Path(path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def data_file(name: str) -> Path:
    """
    Path of a data file: GPT-2's encoder.json / vocab.bpe (shipped with mingpt), else SHARED_DATA/name.
    Tests that need a file only SHARED_DATA has are marked @needs_shared_data(name).
    """
    if name in ('encoder.json', 'vocab.bpe'):
        from mingpt.download import GPT2_VOCAB_DIR
        return GPT2_VOCAB_DIR / name
    path = SHARED_DATA / name
    if not path.is_file():
        raise FileNotFoundError(f'test data file {name!r} is not in {SHARED_DATA}; mark the test '
                                f'@needs_shared_data({name!r})')
    return path


def needs_shared_data(*names):
    """
    Skip a test, with the reason, when a file it needs is not in SHARED_DATA (a clone without the
    project's shared folder). Under CI, which always has SHARED_DATA, it is never skipped: it runs,
    and fails if the file is missing.
    """
    missing = [n for n in names if not (SHARED_DATA / n).is_file()]
    return unittest.skipIf(bool(missing) and os.environ.get('CI') != 'true',
                           f'needs {", ".join(missing)} from {SHARED_DATA}, which this checkout does not have')


def shakespeare(n_chars=None, start=0) -> str:
    """
    Tiny shakespeare's text[start:start + n_chars]: the whole 1.1 MB from SHARED_DATA when it is there,
    else tests/fixtures/shakespeare.txt, 200 KB of it (from character 578,771 on: a stretch that holds all
    65 of its characters). Ask for no more than that without @needs_shared_data.
    """
    path = SHARED_DATA / 'tinyshakespeare.txt'
    if not path.is_file():
        path = FIXTURES / 'shakespeare.txt'
    text = path.read_text(encoding='utf-8')
    return text[start:] if n_chars is None else text[start:start + n_chars]


def english_text(n_bytes: int = 1_000_000) -> str:
    """About n_bytes of English prose: War and Peace from SHARED_DATA, else tiny shakespeare's excerpt."""
    path = SHARED_DATA / 'warpeace.txt'
    if not path.is_file():
        return shakespeare()[:n_bytes]
    return path.read_bytes()[:n_bytes].decode('utf-8', errors='ignore')


@contextlib.contextmanager
def patched_env(**env):
    """Set (or, with None, unset) environment variables for the duration of the block."""
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tiktoken_gpt2():
    """
    tiktoken's "gpt2" encoding, the reference for exactness, with no network: tiktoken's own cache from
    SHARED_DATA when it is there, else the encoding tiktoken defines for "gpt2" built from the copy of
    OpenAI's files that ships with mingpt, checked against the sha256 tiktoken pins for them.
    """
    import tiktoken
    cache = SHARED_DATA / 'tiktoken_cache'
    if cache.is_dir() and 'TIKTOKEN_CACHE_DIR' not in os.environ:
        os.environ['TIKTOKEN_CACHE_DIR'] = str(cache)
        return tiktoken.get_encoding('gpt2')
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public
    from mingpt.download import GPT2_VOCAB_DIR, GPT2_VOCAB_FILES
    # what openai_public.gpt2() builds, with the files read from disk instead of OpenAI's URLs
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(GPT2_VOCAB_DIR / 'vocab.bpe'), encoder_json_file=str(GPT2_VOCAB_DIR / 'encoder.json'),
        vocab_bpe_hash=GPT2_VOCAB_FILES['vocab.bpe'], encoder_json_hash=GPT2_VOCAB_FILES['encoder.json'])
    return tiktoken.Encoding(name='gpt2', explicit_n_vocab=50257, pat_str=openai_public.r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={openai_public.ENDOFTEXT: 50256})


# what python_without runs: None in sys.modules makes `import name` (and `import name.sub`) raise
# ModuleNotFoundError, as if the package were not installed; then the rest of the command line runs
# as `python script args` or `python -m module args` would run it
_WITHOUT = '''
import os, runpy, sys
blocked, argv = sys.argv[1].split(','), sys.argv[2:]
for name in blocked:
    sys.modules[name] = None
if argv[0] == '-m':
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
else:
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    runpy.run_path(argv[0], run_name='__main__')
'''


def python_without(*packages):
    """ [python, ...]: a command for a Python without these packages; append a script or '-m module', and args """
    import sys
    return [sys.executable, '-c', _WITHOUT, ','.join(packages)]


# -----------------------------------------------------------------------------
# a local HTTP server

class RangeRequestHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single-range "Range: bytes=N-[M]" requests (206 / 416), which the
    stdlib handler ignores. Set range_requests = False on a subclass to get a server without them.
    Every request's (method, path, headers) is appended to the class's server's `requests_log`."""
    range_requests = True

    def log_message(self, format, *args):  # keep test output clean
        logger.debug('%s - %s', self.address_string(), format % args)

    def send_head(self):
        self.server.requests_log.append((self.command, self.path, dict(self.headers)))
        path = Path(self.translate_path(self.path))
        m = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range', '').strip())
        if not self.range_requests or m is None or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{size}')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return None
        f = open(path, 'rb')
        f.seek(start)
        self.send_response(206)
        self.send_header('Content-Type', self.guess_type(str(path)))
        self.send_header('Content-Range', f'bytes {start}-{end}/{size}')
        self.send_header('Content-Length', str(end - start + 1))
        self.send_header('Accept-Ranges', 'bytes')
        self.end_headers()
        return _Limited(f, end - start + 1)


class _Limited:
    """A file object that reads at most n bytes (copyfile() in the handler reads until EOF)."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def read(self, size=-1):
        size = self.n if size < 0 else min(size, self.n)
        data = self.f.read(size)
        self.n -= len(data)
        return data

    def close(self):
        self.f.close()


@contextlib.contextmanager
def local_http_server(directory, handler_class=RangeRequestHandler, requests_log=None):
    """Serve `directory` on 127.0.0.1 at a free port from a background thread; yields the base URL
    ('http://127.0.0.1:PORT'). Requests are appended to requests_log (a list) if one is given.
    handler_class: RangeRequestHandler or a subclass of it (e.g. one that misbehaves on purpose)."""
    server = ThreadingHTTPServer(('127.0.0.1', 0), partial(handler_class, directory=str(directory)))
    server.daemon_threads = True
    server.requests_log = requests_log if requests_log is not None else []
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def free_port_url() -> str:
    """An http://127.0.0.1:PORT URL on which nothing listens (for "server down" tests)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}'
