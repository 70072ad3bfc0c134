"""
mingpt.prepare: a corpus of text files, JSONL and directories -> token shards. The ids are tiktoken's with
<|endoftext|> before every document, however the files are cut into tasks; the shards are the same for any
number of workers; a run stopped mid-shard carries on and ends with the same files, keeping the finished
ones; what cannot work is a one-line error.
"""

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np

import mingpt.prepare as prepare_module
from mingpt.bpe import Encoder, bytes_to_unicode
from mingpt.data import META_FILE, open_shard, read_meta, read_shard_header, shard_windows
from mingpt.errors import ConfigError, DataError
from mingpt.prepare import prepare
from mingpt.tokenizers import CharTokenizer, save_tokenizer
from mingpt import download
from mingpt.errors import DownloadError
from tests.common import (REPO, SHARED_DATA, TempDirTestCase, local_http_server, needs_shared_data, patched_env,
                          shakespeare, slow, tiktoken_gpt2)

EOT = 50256
SHARD, VAL = 300, 200  # tokens a shard, validation tokens: several shards from the little corpus below


def make_corpus(root):
    """ a directory of two text files, an empty one, a hidden one and a JSONL file; returns (root, the
    texts of its documents in the order prepare reads them) """
    root.mkdir()
    a = shakespeare(3000)
    b = 'Ünïcödé 日本語, emoji 🙂 and  odd\tspacing\r\n' + shakespeare(2000, start=10_000)
    (root / 'a.txt').write_text(a, encoding='utf-8')
    (root / 'b.txt').write_text(b, encoding='utf-8')
    (root / 'empty.txt').write_text('')
    (root / '.hidden.txt').write_text('never read')
    (root / 'sub').mkdir()
    docs = [shakespeare(300, start=20_000 + 300 * i) for i in range(5)] + ['a literal <|endoftext|> is text']
    lines = [json.dumps({'text': t, 'id': i}) for i, t in enumerate(docs)]
    lines[2:2] = ['', json.dumps({'text': ''})]  # a blank line and an empty document: both skipped
    (root / 'sub' / 'c.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return root, [a, b] + docs


def all_ids(out):
    """ every id of out's shards in stream order (validation first), and meta """
    meta = read_meta(out)
    return np.concatenate([open_shard(Path(out) / s['file']) for s in meta['shards']]), meta


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


class TestPrepare(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.corpus, self.docs = make_corpus(self.tmp / 'corpus')
        # small tasks, so that the text files are cut into stretches and there are tasks to share out
        patcher = mock.patch.object(prepare_module, 'TASK_BYTES', 1000)
        patcher.start()
        self.addCleanup(patcher.stop)

    def run_prepare(self, out, **kw):
        return prepare([self.corpus], self.tmp / out, **{'shard_tokens': SHARD, 'val_tokens': VAL, 'workers': 1,
                                                          'progress': False, **kw})

    def test_tiktoken_ids_with_endoftext_before_each_document(self):
        meta = self.run_prepare('out')
        ids, meta = all_ids(self.tmp / 'out')
        enc = tiktoken_gpt2()
        expected = [i for doc in self.docs for i in [EOT] + enc.encode_ordinary(doc)]
        self.assertEqual(ids.tolist(), expected)
        self.assertEqual(meta['documents'], len(self.docs))
        self.assertEqual(meta['bytes'], sum(f.stat().st_size for f in self.corpus.rglob('*')
                                             if f.is_file() and 'hidden' not in f.name))
        # the first VAL ids validate, the rest train, SHARD a shard
        splits = [(s['split'], s['tokens']) for s in meta['shards']]
        n_train = len(expected) - VAL
        self.assertEqual(splits[0], ('val', VAL))
        self.assertEqual(splits[1:], [('train', SHARD)] * (n_train // SHARD) + [('train', n_train % SHARD)])
        self.assertGreaterEqual(len(splits), 5)
        self.assertEqual(meta['tokens'], {'train': n_train, 'val': VAL, 'total': len(expected)})
        self.assertEqual([Path(f['path']).name for f in meta['inputs']], ['a.txt', 'b.txt', 'empty.txt', 'c.jsonl'])
        self.assertEqual((meta['tokenizer'], meta['vocab_size'], meta['eot']), ('gpt2', 50257, EOT))
        self.assertEqual(read_shard_header(self.tmp / 'out' / 'train_000000.bin'), (SHARD, np.dtype('<u2'), 50257))
        # the tokenizer travels with the shards, and the training side reads them
        self.assertEqual(sorted(p.name for p in (self.tmp / 'out').iterdir() if not p.name.endswith('.bin')),
                         ['encoder.json', META_FILE, 'vocab.bpe'])
        train, val = shard_windows(self.tmp / 'out', block_size=32)
        self.assertEqual((train.tokens, val.tokens, train.get_vocab_size()), (n_train, VAL, 50257))

    @slow
    def test_the_same_shards_whatever_the_number_of_workers(self):
        self.run_prepare('w1', workers=1)
        for workers in (2, 3):
            with self.subTest(workers=workers):
                self.run_prepare(f'w{workers}', workers=workers)
                self.assertEqual(shard_bytes(self.tmp / f'w{workers}'), shard_bytes(self.tmp / 'w1'))

    @slow
    def test_spawned_workers_load_the_tokenizer_from_the_output(self):
        # forked workers inherit the tokenizer; where processes are spawned (macOS, Windows) they load it
        self.run_prepare('forked', workers=2)
        spawn = multiprocessing.get_context('spawn')
        with mock.patch.object(prepare_module.multiprocessing, 'get_context', lambda: spawn):
            self.run_prepare('spawned', workers=2)
        self.assertEqual(shard_bytes(self.tmp / 'spawned'), shard_bytes(self.tmp / 'forked'))

    @slow
    def test_a_stopped_run_carries_on_and_keeps_its_finished_shards(self):
        self.run_prepare('straight')
        out = self.tmp / 'stopped'
        real_write_shard = prepare_module.write_shard
        calls = []

        def write_shard_then_crash(path, ids, vocab_size):
            calls.append(path.name)
            if len(calls) == 4:  # half of the fourth shard reaches its temporary file, then the process dies
                Path(str(path) + '.tmp').write_bytes(b'MGPTSHRD half a shard')
                raise KeyboardInterrupt
            return real_write_shard(path, ids, vocab_size)
        with mock.patch.object(prepare_module, 'write_shard', write_shard_then_crash), \
                self.assertRaises(KeyboardInterrupt):
            self.run_prepare('stopped')
        self.assertEqual(calls, ['val_000000.bin', 'train_000000.bin', 'train_000001.bin', 'train_000002.bin'])
        self.assertFalse((out / 'train_000002.bin').exists())  # never renamed into place
        with self.assertRaisesRegex(DataError, 'not fully prepared.*again'):
            shard_windows(out, block_size=8)
        finished = {name: os.stat(out / name) for name in calls[:3]}

        tokenized = []
        real_tokenize = prepare_module.tokenize_task
        with mock.patch.object(prepare_module, 'tokenize_task', lambda task, tok: tokenized.append(1) or real_tokenize(task, tok)):
            self.run_prepare('stopped')
        self.assertEqual(shard_bytes(out), shard_bytes(self.tmp / 'straight'))  # no .tmp left either
        for name, before in finished.items():
            after = os.stat(out / name)
            self.assertEqual((after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns), name)
        n_tasks = read_meta(out)['next']['task']
        self.assertLess(len(tokenized), n_tasks)  # only from the task the stream stopped in

        tokenized.clear()  # a finished directory: nothing to do
        with mock.patch.object(prepare_module, 'tokenize_task', lambda task, tok: tokenized.append(1)):
            self.assertTrue(self.run_prepare('stopped')['complete'])
        self.assertEqual(tokenized, [])

    def test_a_directory_of_an_older_format_is_not_continued(self):
        self.run_prepare('out')
        meta = json.loads((self.tmp / 'out' / META_FILE).read_text())
        (self.tmp / 'out' / META_FILE).write_text(json.dumps({**meta, 'version': 1}))
        with self.assertRaisesRegex(DataError, r'\(format version differ\)'):
            self.run_prepare('out')

    def test_other_inputs_or_settings_never_mix_into_a_directory(self):
        self.run_prepare('out')
        with self.assertRaisesRegex(DataError, r'another corpus or other settings \(shard_tokens differ\)'):
            self.run_prepare('out', shard_tokens=SHARD + 1)
        with open(self.corpus / 'a.txt', 'a') as f:
            f.write('more')
        with self.assertRaisesRegex(DataError, r'\(inputs differ\).*another --out'):
            self.run_prepare('out')

    def test_a_vocabulary_past_uint16_gets_uint32_shards(self):
        b2u = bytes_to_unicode()
        encoder = {b2u[b]: b for b in range(256)}
        encoder['<|endoftext|>'] = 70_000  # ids up to 70,000 do not fit in uint16
        save_tokenizer(Encoder(encoder, []), self.tmp / 'tok')
        prepare([self.corpus / 'a.txt'], self.tmp / 'out', tokenizer=self.tmp / 'tok', val_tokens=0, workers=1,
                progress=False)
        ids, meta = all_ids(self.tmp / 'out')
        self.assertEqual((ids.dtype, meta['dtype']), (np.dtype('<u4'), 'uint32'))
        self.assertEqual(ids.tolist(), [70_000] + list(self.docs[0].encode('utf-8')))

    def test_what_cannot_work_is_a_clear_error(self):
        (self.tmp / 'bad.jsonl').write_text('{"text": "fine"}\n{"body": "no text"}\n')
        (self.tmp / 'latin1.txt').write_bytes('café'.encode('latin-1'))
        (self.tmp / 'nothing').mkdir()
        CharTokenizer('abc').save(self.tmp / 'chars')
        cases = [([self.tmp / 'bad.jsonl'], {}, DataError, r'bad\.jsonl:2 has no "text"'),
                 ([self.tmp / 'latin1.txt'], {}, DataError, 'not valid UTF-8 .*offset 3'),
                 ([self.tmp / 'missing.txt'], {}, FileNotFoundError, 'no such file'),
                 ([self.tmp / 'nothing'], {}, DataError, 'no files'),
                 ([self.corpus], {'tokenizer': self.tmp / 'chars'}, ConfigError, 'no <\\|endoftext\\|> token'),
                 ([self.corpus], {'shard_tokens': 0}, ConfigError, 'shard_tokens=0'),
                 ([self.corpus], {'val_tokens': 10 ** 9}, DataError, 'all taken by the validation split')]
        for i, (inputs, kw, error, message) in enumerate(cases):
            with self.subTest(message), self.assertRaisesRegex(error, message):
                prepare(inputs, self.tmp / f'out{i}', **{'workers': 1, 'progress': False, **kw})

    def test_progress_lines_when_stderr_is_not_a_terminal(self):
        with mock.patch.object(prepare_module, 'PLAIN_PROGRESS_EVERY', 0), \
                self.assertLogs('mingpt.prepare', logging.INFO) as logs:
            self.run_prepare('out')
        lines = [r.getMessage() for r in logs.records]
        self.assertTrue(any('MB/s' in line and 'docs/s' in line and 'tokens/s' in line for line in lines), lines)

    @slow
    def test_command_line(self):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, '-m', 'mingpt.prepare', str(self.corpus), '--out', str(self.tmp / 'out'),
               '--shard-tokens', '1000', '--val-tokens', '300', '--workers', '2']
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r'^8 documents -> [\d,]+ training tokens in \d+ shards, 300 validation tokens in 1;')
        self.assertEqual(read_meta(self.tmp / 'out')['val_tokens'], 300)
        (self.tmp / 'bad.jsonl').write_text('not json\n')
        p = subprocess.run([sys.executable, '-m', 'mingpt.prepare', str(self.tmp / 'bad.jsonl'), '--out',
                            str(self.tmp / 'bad')], capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(p.returncode, 2)
        self.assertRegex(p.stderr, r'^error: .*bad\.jsonl:1 is not valid JSON .*\n$')


class TestFetch(TempDirTestCase):
    """ --fetch NAME: a public corpus through the library's download code (cache, checksum), from a local server """

    def setUp(self):
        super().setUp()
        self.served = self.tmp / 'served'
        self.served.mkdir()
        self.texts = {'play.txt': shakespeare(6000), 'more.txt': shakespeare(3000, start=20_000)}
        for name, text in self.texts.items():
            (self.served / name).write_text(text, encoding='utf-8')

    def fetch(self, *names, out='out'):
        prepare_module.main(['--fetch', *names, '--out', str(self.tmp / out), '--workers', '1',
                             '--shard-tokens', '1000', '--val-tokens', '100'])
        return all_ids(self.tmp / out)

    def test_fetched_corpora_are_downloaded_once_checked_and_tokenized(self):
        log = []
        with local_http_server(self.served, requests_log=log) as url, \
                patched_env(MINGPT_CACHE=self.tmp / 'cache'), \
                mock.patch.object(prepare_module, 'CORPORA', ('play', 'more', 'bad')), mock.patch.dict(download.DATASETS, {
                    'play': (f'{url}/play.txt', download.sha256sum(self.served / 'play.txt'), 'play.txt'),
                    'more': (f'{url}/more.txt', download.sha256sum(self.served / 'more.txt'), 'more.txt')}):
            ids, meta = self.fetch('play', 'more')
            self.assertEqual(len(log), 2)
            enc = tiktoken_gpt2()
            expected = [i for name in ('play.txt', 'more.txt') for i in [EOT] + enc.encode_ordinary(self.texts[name])]
            self.assertEqual(ids.tolist(), expected)
            self.assertEqual([Path(f['path']) for f in meta['inputs']],
                             [self.tmp / 'cache' / 'datasets' / name for name in ('play.txt', 'more.txt')])
            self.fetch('play', out='again')  # from the cache: no request
            self.assertEqual(len(log), 2)
            download.DATASETS['bad'] = (f'{url}/more.txt', '0' * 64, 'bad.txt')
            with self.assertRaisesRegex(DownloadError, 'sha256'):
                self.fetch('bad', out='bad')
        self.assertFalse((self.tmp / 'cache' / 'datasets' / 'bad.txt').exists())
        for name in ('nonesuch', 'hellaswag'):  # unknown, or a dataset that is no text corpus: a usage error
            with self.subTest(name=name), self.assertRaises(SystemExit):
                prepare_module.main(['--fetch', name, '--out', str(self.tmp / 'x')])

    @needs_shared_data('warpeace.txt', 'wikitext-2/valid.txt', 'wikitext-2/test.txt', 'tinyshakespeare.txt')
    def test_the_pinned_checksums_are_those_of_the_public_files(self):
        # the copies in the shared data folder were taken from the same public commits the URLs name
        files = {'tinyshakespeare': 'tinyshakespeare.txt', 'warpeace': 'warpeace.txt',
                 'wikitext2_valid': 'wikitext-2/valid.txt', 'wikitext2_test': 'wikitext-2/test.txt'}
        self.assertEqual(sorted(download.CORPORA), sorted(files))
        for name, path in files.items():
            self.assertEqual(download.DATASETS[name][1], download.sha256sum(SHARED_DATA / path), name)
        # and the real entry, its URL pointed at a local copy, goes through the checksum
        with local_http_server(SHARED_DATA / 'wikitext-2') as url, \
                patched_env(MINGPT_CACHE=self.tmp / 'cache', MINGPT_WIKITEXT2_TEST_URL=f'{url}/test.txt'):
            self.assertEqual(download.get_dataset('wikitext2_test').read_bytes(),
                             (SHARED_DATA / 'wikitext-2' / 'test.txt').read_bytes())


class TestValidationSplit(TempDirTestCase):
    """
    The validation split comes from evenly spaced places across the whole corpus, each input giving its
    share by size, not from the start of the stream; the same on every run, and after a restart.
    """

    VAL = 2000  # validation tokens: 10 regions of 200

    def setUp(self):
        super().setUp()
        root = self.tmp / 'corpus'
        root.mkdir()
        self.texts = {'a.txt': shakespeare(40_000), 'b.txt': shakespeare(20_000, start=50_000)}
        for name, text in self.texts.items():
            (root / name).write_text(text, encoding='utf-8')
        docs = [shakespeare(500, start=100_000 + 500 * i) for i in range(40)]
        (root / 'c.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in docs), encoding='utf-8')
        self.docs = {'a.txt': [self.texts['a.txt']], 'b.txt': [self.texts['b.txt']], 'c.jsonl': docs}
        self.bytes = {name: (root / name).stat().st_size for name in self.docs}
        self.corpus = root
        for name, value in (('MIN_VAL_REGION_TOKENS', 200), ('MIN_TASK_BYTES', 500)):
            patcher = mock.patch.object(prepare_module, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    def run_prepare(self, out):
        return prepare([self.corpus], self.tmp / out, shard_tokens=1000, val_tokens=self.VAL, workers=1,
                       progress=False)

    def test_regions_spread_over_every_input_in_proportion(self):
        meta = self.run_prepare('out')
        self.assertEqual(meta['val_regions'], 10)
        self.assertEqual(meta['tokens']['val'], self.VAL)
        ids, _ = all_ids(self.tmp / 'out')
        enc = tiktoken_gpt2()
        expected = [i for name in ('a.txt', 'b.txt', 'c.jsonl') for doc in self.docs[name]
                    for i in [EOT] + enc.encode_ordinary(doc)]
        # every id once, in the corpus's order: a shard holds a stretch of the stream and the shards are
        # listed in stream order, validation ones among the training ones
        self.assertEqual(ids.tolist(), expected)
        # where in the stream each validation shard is, and which input that is
        ends = np.cumsum([len(enc.encode_ordinary(d)) + 1 for name in ('a.txt', 'b.txt', 'c.jsonl')
                          for d in self.docs[name]])
        owner = ['a.txt', 'b.txt'] + ['c.jsonl'] * 40
        pos, starts, per_input = 0, [], {name: 0 for name in self.docs}
        for shard in meta['shards']:
            if shard['split'] == 'val':
                starts.append(pos)
                for i in range(pos, pos + shard['tokens']):
                    per_input[owner[int(np.searchsorted(ends, i, side='right'))]] += 1
            pos += shard['tokens']
        self.assertGreaterEqual(len(starts), 8)  # regions in neighbouring tasks may merge, most do not
        gaps = np.diff(starts) / len(ids)
        self.assertLess(max(gaps), 0.2, starts)  # evenly spaced: a tenth of the stream apart
        self.assertGreater(starts[-1] / len(ids), 0.85, starts)  # to the end of the corpus, not its start
        total = sum(self.bytes.values())
        for name, n in per_input.items():
            share = self.bytes[name] / total
            self.assertAlmostEqual(n / self.VAL, share, delta=0.15, msg=(name, per_input))

    def test_the_same_split_on_every_run_and_after_a_restart(self):
        self.run_prepare('straight')
        real_write_shard = prepare_module.write_shard
        calls = []

        def write_shard_then_crash(path, ids, vocab_size):
            calls.append(path.name)
            if len(calls) == 10:
                raise KeyboardInterrupt
            return real_write_shard(path, ids, vocab_size)
        with mock.patch.object(prepare_module, 'write_shard', write_shard_then_crash), \
                self.assertRaises(KeyboardInterrupt):
            self.run_prepare('stopped')
        self.assertGreaterEqual(sum(c.startswith('val') for c in calls[:-1]), 2)  # stopped past a few regions
        self.run_prepare('stopped')
        self.assertEqual(shard_bytes(self.tmp / 'stopped'), shard_bytes(self.tmp / 'straight'))
        self.run_prepare('again')
        self.assertEqual(shard_bytes(self.tmp / 'again'), shard_bytes(self.tmp / 'straight'))

