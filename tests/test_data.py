"""
mingpt.data: reading the training text (a file, ./input.txt, or tiny shakespeare through the
download code), the windows of tokens a language model trains on, and the same streamed from token
shards: their format's checks, DDP ranks reading disjoint slices, memory that does not grow with the
corpus, and a resume after SIGKILL that is bit-exact.
"""

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import unittest

import numpy as np
import torch
from safetensors.torch import load_file

from mingpt.bpe_train import train_bpe
from mingpt.checkpoint import read_checkpoint
from mingpt.data import (META_FILE, ShardWindows, TokenWindows, read_meta, read_text_file, shard_windows,
                         split_windows, training_text, write_shard)
from mingpt.download import DownloadError
from mingpt.errors import DataError
from mingpt.prepare import prepare
from mingpt.schedule import train_loader
from mingpt.trainer import Trainer
from mingpt.utils import set_seed
from tests.common import (REPO, TempDirTestCase, data_file, free_port_url, local_http_server, needs_shared_data,
                          patched_env, shakespeare, slow, tiny_gpt)
from tests.test_trainer import quiet_config

SCRIPT = REPO / 'tests' / 'train_script.py'


class TestTrainingText(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.tmp)

    def test_a_path_then_input_txt(self):
        (self.tmp / 'mine.txt').write_text('héllo', encoding='utf-8')
        self.assertEqual(training_text(self.tmp / 'mine.txt'), 'héllo')
        (self.tmp / 'input.txt').write_text('from input.txt', encoding='utf-8')
        self.assertEqual(training_text(), 'from input.txt')
        self.assertEqual(training_text(self.tmp / 'mine.txt'), 'héllo')  # a path wins

    @needs_shared_data('tinyshakespeare.txt')
    def test_tiny_shakespeare_downloaded_once_when_there_is_nothing_else(self):
        served = self.tmp / 'served'
        served.mkdir()
        (served / 'input.txt').write_bytes(data_file('tinyshakespeare.txt').read_bytes())
        log = []
        with local_http_server(served, requests_log=log) as url, \
                patched_env(MINGPT_CACHE=str(self.tmp / 'cache'), MINGPT_TINYSHAKESPEARE_URL=f'{url}/input.txt'):
            text = training_text()
            self.assertEqual(training_text(), text)  # the second time from the cache
        self.assertEqual(len(text), 1115394)
        self.assertTrue(text.startswith('First Citizen:'))
        self.assertEqual(len(log), 1)

    def test_offline_says_to_give_a_file(self):
        with patched_env(MINGPT_CACHE=str(self.tmp / 'cache'), MINGPT_TINYSHAKESPEARE_URL=free_port_url()):
            with self.assertRaises(DownloadError) as cm:
                training_text()
        message = str(cm.exception)
        self.assertIn('no input.txt here', message)
        self.assertIn('could not download', message)
        self.assertIn('--data.path', message)

    def test_bad_files_are_clear_errors(self):
        for name, content, message in [('empty.txt', b'', 'is empty'),
                                       ('binary.bin', b'ab\x00cd', 'NUL bytes'),
                                       ('latin1.txt', 'café'.encode('latin-1'), 'not valid UTF-8')]:
            (self.tmp / name).write_bytes(content)
            with self.subTest(name), self.assertRaisesRegex(ValueError, message):
                training_text(self.tmp / name)
        with self.assertRaisesRegex(FileNotFoundError, 'no such file'):
            read_text_file(self.tmp / 'missing.txt')


class TestWindows(unittest.TestCase):

    def test_every_window_shifted_by_one(self):
        ids = torch.arange(100, 110)
        ds = TokenWindows(ids, block_size=4, vocab_size=200)
        self.assertEqual(len(ds), 6)  # windows of 5 tokens start at 0..5
        self.assertEqual((ds.get_block_size(), ds.get_vocab_size()), (4, 200))
        x, y = ds[0]
        self.assertEqual(x.tolist(), [100, 101, 102, 103])
        self.assertEqual(y.tolist(), [101, 102, 103, 104])
        x, y = ds[len(ds) - 1]
        self.assertEqual(y.tolist(), [106, 107, 108, 109])  # the last token is a target once
        with self.assertRaisesRegex(ValueError, 'too few'):
            TokenWindows(ids, block_size=10)

    def test_split_is_the_end_of_the_text(self):
        ids = torch.arange(1000)
        train, val = split_windows(ids, block_size=8, val_fraction=0.1)
        self.assertEqual(train.ids.tolist(), list(range(900)))
        self.assertEqual(val.ids.tolist(), list(range(900, 1000)))
        # no training window reaches into the validation tokens
        self.assertEqual(int(train[len(train) - 1][1][-1]), 899)
        train, val = split_windows(ids, block_size=8, val_fraction=0.0)
        self.assertIsNone(val)
        self.assertEqual(len(train.ids), 1000)


def write_shards(directory, sizes, vocab_size=100, values=None):
    """ shards of these sizes in directory (ids: values, else 0, 1, 2, ... mod vocab_size across them) and a
    meta.json that lists them all as training shards; returns their paths """
    directory.mkdir(parents=True, exist_ok=True)
    values = np.arange(sum(sizes)) % vocab_size if values is None else values
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths.append(write_shard(directory / f'train_{i:06d}.bin', values[start:start + n].astype('<u2'), vocab_size))
        start += n
    shards = [{'file': p.name, 'split': 'train', 'tokens': n} for p, n in zip(paths, sizes)]
    (directory / META_FILE).write_text(json.dumps({'complete': True, 'shards': shards}))
    return paths


class TestShardWindows(TempDirTestCase):

    def test_every_window_inside_each_shard(self):
        paths = write_shards(self.tmp, [10, 3, 12])
        ds = ShardWindows(paths, block_size=4)
        self.assertEqual(len(ds), 6 + 0 + 8)  # a 3-token shard holds no window of 5
        self.assertEqual((ds.get_block_size(), ds.get_vocab_size(), ds.tokens), (4, 100, 25))
        x, y = ds[0]
        self.assertEqual((x.tolist(), y.tolist(), x.dtype), ([0, 1, 2, 3], [1, 2, 3, 4], torch.long))
        self.assertEqual(ds[5][1].tolist(), [6, 7, 8, 9])  # the last window of the first shard
        self.assertEqual(ds[6][0].tolist(), [13, 14, 15, 16])  # the first of the third
        self.assertEqual(ds[13][1].tolist(), [21, 22, 23, 24])
        for bad in (14, -1):
            with self.assertRaises(IndexError):
                ds[bad]
        # pickled for a DataLoader worker: no copy of an opened shard goes along
        self.assertEqual(pickle.loads(pickle.dumps(ds))._maps, {})
        self.assertEqual(pickle.loads(pickle.dumps(ds))[7][0].tolist(), ds[7][0].tolist())
        self.assertEqual(ShardWindows(paths, 4, vocab_size=128).get_vocab_size(), 128)

    def test_what_is_not_a_whole_shard_is_a_clear_error(self):
        path, = write_shards(self.tmp / 'ok', [50])
        data = path.read_bytes()
        cases = [('text.bin', b'just some text', 'not a token shard'),
                 ('short.bin', data[:-2], 'cut short: its 50 tokens take 132 bytes, the file has 130'),
                 ('long.bin', data + b'xx', 'longer than its header says'),
                 ('v2.bin', data[:8] + struct.pack('<I', 2) + data[12:], 'version 2; this mingpt reads version 1')]
        for name, content, message in cases:
            (self.tmp / name).write_bytes(content)
            with self.subTest(name), self.assertRaisesRegex(DataError, message):
                ShardWindows([self.tmp / name], block_size=4)
        other, = write_shards(self.tmp / 'other', [50], vocab_size=200)
        with self.assertRaisesRegex(DataError, r'different sizes \(\[100, 200\]\)'):
            ShardWindows([path, other], block_size=4)
        with self.assertRaisesRegex(DataError, 'too few tokens for windows of block_size=64'):
            ShardWindows([path], block_size=64)

    def test_a_directory_prepare_has_not_finished_is_an_error(self):
        with self.assertRaisesRegex(DataError, 'has no meta.json.*python -m mingpt.prepare'):
            shard_windows(self.tmp, block_size=4)
        write_shards(self.tmp, [50])
        (self.tmp / META_FILE).write_text(json.dumps({'complete': False, 'shards': []}))
        with self.assertRaisesRegex(DataError, 'not fully prepared.*carries on where it stopped'):
            read_meta(self.tmp)

    def test_ranks_read_disjoint_slices_of_the_global_batch(self):
        values = np.random.default_rng(0).integers(0, 50_000, 20_000)
        ds = ShardWindows(write_shards(self.tmp, [5000] * 4, vocab_size=50_257, values=values), block_size=16)
        one = iter(train_loader(ds, batch_size=8, data_seed=7))
        ranks = [iter(train_loader(ds, batch_size=4, data_seed=7, rank=r, world_size=2)) for r in (0, 1)]
        for _ in range(5):
            x0, x1 = next(ranks[0])[0], next(ranks[1])[0]
            self.assertTrue(torch.equal(torch.cat([x0, x1]), next(one)[0]))  # the global batch, split
            self.assertFalse(torch.equal(x0, x1))  # not one stream read twice

    def test_the_trainer_trains_on_shards_unchanged(self):
        paths = write_shards(self.tmp, [400, 300], vocab_size=11)  # counting mod 11: learnable
        train, val = ShardWindows(paths[:1], block_size=8), ShardWindows(paths[1:], block_size=8)
        set_seed(0)
        trainer = Trainer(quiet_config(max_iters=40, batch_size=16, learning_rate=3e-3, eval_interval=20,
                                       eval_iters=2), tiny_gpt(vocab_size=11, block_size=8).train(), train, val)
        trainer.run()
        self.assertEqual(len(trainer.history['val_loss']), 2)
        self.assertLess(trainer.history['val_loss'][-1], 0.5 * trainer.history['val_loss'][0])

    def test_its_state_names_the_shards_so_a_resume_on_others_is_an_error(self):
        values = np.arange(30_000) % 1000
        paths = write_shards(self.tmp / 'a', [10_000, 20_000], vocab_size=1000, values=values)
        state = ShardWindows(paths, block_size=16).state_dict()
        self.assertEqual((state['files'], state['tokens'], state['windows']), (2, 30_000, 30_000 - 2 * 16))
        # the same shards, also copied elsewhere (or written again from the same ids): the same state
        ShardWindows(paths, block_size=16).load_state_dict(state)
        copies = write_shards(self.tmp / 'copy', [10_000, 20_000], vocab_size=1000, values=values)
        ShardWindows(copies, block_size=16).load_state_dict(state)
        # a shard of the same size with other ids in it, at either end; other sizes; a missing shard;
        # other windows of the same shards
        changed = values.copy()
        changed[29_990] += 1  # in the last 4 KB of the second shard
        other_ends = write_shards(self.tmp / 'end', [10_000, 20_000], vocab_size=1000, values=changed)
        changed = values.copy()
        changed[3] += 1
        other_starts = write_shards(self.tmp / 'start', [10_000, 20_000], vocab_size=1000, values=changed)
        other_cut = write_shards(self.tmp / 'cut', [15_000, 15_000], vocab_size=1000, values=values)
        cases = [(other_ends, 16, 'shards'), (other_starts, 16, 'shards'), (other_cut, 16, 'shards'),
                 (paths[:1], 16, "files 2 then, 1 now"), (paths, 32, 'block_size 16 then, 32 now')]
        for shards, block_size, message in cases:
            with self.subTest(message), self.assertRaisesRegex(DataError, f'trained on other token shards .*{message}'
                                                               f'.*Resume on the shards it was trained on'):
                ShardWindows(shards, block_size).load_state_dict(state)

    def test_prepare_run_twice_on_the_same_inputs_gives_the_same_state(self):
        (self.tmp / 'corpus.txt').write_text(shakespeare(20_000), encoding='utf-8')
        states = []
        for out, shard_tokens in (('one', 2000), ('two', 2000), ('three', 3000)):
            prepare([self.tmp / 'corpus.txt'], self.tmp / out, shard_tokens=shard_tokens, val_tokens=500,
                    workers=1, progress=False)
            states.append(shard_windows(self.tmp / out, block_size=32)[0].state_dict())
        self.assertEqual(states[0], states[1])
        self.assertNotEqual(states[0]['shards'], states[2]['shards'])  # re-prepared with other settings

    @slow
    def test_peak_memory_does_not_grow_with_the_number_of_shards(self):
        # 8 shards of 4 MB: a run that reads from 2 of them and one that reads from all 8 peak at the same
        # memory, where loading the shards would add 24 MB. Memory here is RssAnon, what the process owns:
        # the file pages a read maps (the kernel maps whole folios around a touched page) are page cache the
        # OS reclaims at will, and ru_maxrss is the peak of importing torch, long before any shard is read
        paths = write_shards(self.tmp, [2_000_000] * 8, vocab_size=50_257,
                             values=np.random.default_rng(0).integers(0, 50_000, 16_000_000))
        script = ('import re, sys\n'
                  'from mingpt.data import ShardWindows\n'
                  'from mingpt.schedule import train_loader\n'
                  'def anon_kb():\n'
                  '    return int(re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))\n'
                  'base = peak = anon_kb()\n'
                  'ds = ShardWindows(sys.argv[1:], block_size=64)\n'
                  'batches = iter(train_loader(ds, batch_size=16, data_seed=0))\n'
                  'for _ in range(50):\n'
                  '    next(batches)\n'
                  '    peak = max(peak, anon_kb())\n'
                  'print(len(ds._maps), peak - base)\n')
        growth = {}
        for n in (2, 8):
            p = subprocess.run([sys.executable, '-c', script, *map(str, paths[:n])], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
            self.assertEqual(p.returncode, 0, p.stderr)
            opened, growth[n] = map(int, p.stdout.split())
            self.assertEqual(opened, n)  # every shard was read from
        self.assertLess(growth[8] - growth[2], 8 * 1024, growth)  # KB


class TestShardsResumeAfterKill(TempDirTestCase):
    """
    tests/test_trainer_resume.py's SIGKILL test on shards that prepare wrote with a trained tokenizer: a
    run killed 2 steps after its last checkpoint, then resumed, ends with exactly the weights and losses of
    a run never interrupted. The dataset keeps no position: the checkpoint's (data_seed, iter_num) is it.
    """

    def setUp(self):
        super().setUp()
        train_bpe(shakespeare(20_000), 300, special_tokens=['<|endoftext|>']).save(self.tmp / 'tok')
        for i in range(3):  # three documents
            (self.tmp / 'corpus').mkdir(exist_ok=True)
            (self.tmp / 'corpus' / f'{i}.txt').write_text(shakespeare(10_000, start=20_000 * (i + 1)))
        prepare([self.tmp / 'corpus'], self.tmp / 'shards', tokenizer=self.tmp / 'tok', shard_tokens=2000,
                val_tokens=500, workers=1, progress=False)

    def train(self, out, *trainer_args, kill_at=None, torchrun=False, dropout=0.1):
        launcher = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun else []
        cmd = [sys.executable, *launcher, str(SCRIPT), '--out', str(self.tmp / out), '--shards',
               str(self.tmp / 'shards'), '--dropout', str(dropout), *(['--kill_at', str(kill_at)] if kill_at else [])]
        return subprocess.run([*cmd, '--trainer', *trainer_args], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))

    def weights_and_losses(self, out):
        with open(self.tmp / out / 'losses.json') as f:
            return load_file(self.tmp / out / 'final.safetensors'), json.load(f)

    @slow
    def test_sigkill_then_resume_on_shards_is_bit_exact(self):
        common = ['max_iters=12', 'checkpoint_interval=4', 'batch_size=8', 'grad_accum_steps=2']
        p = self.train('straight', *common, f'work_dir={self.tmp / "w1"}')
        self.assertEqual(p.returncode, 0, p.stderr)
        p = self.train('killed', *common, f'work_dir={self.tmp / "w2"}', kill_at=10)
        self.assertEqual(p.returncode, -signal.SIGKILL, p.stderr)
        self.assertEqual(read_checkpoint(self.tmp / 'w2' / 'ckpt')[1]['iter_num'], 8)
        p = self.train('resumed', *common, f'work_dir={self.tmp / "w2"}', 'resume=True')
        self.assertEqual(p.returncode, 0, p.stderr)
        (a, straight), (b, resumed) = self.weights_and_losses('straight'), self.weights_and_losses('resumed')
        self.assertEqual(set(a), set(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        self.assertEqual(sorted(resumed, key=int), ['8', '9', '10', '11'])
        self.assertEqual({k: straight[k] for k in resumed}, resumed)

    @slow
    def test_two_ranks_on_shards_take_the_steps_of_one_process(self):
        # each rank reads its own half of every global batch: were both to read the same windows, the
        # averaged gradient, and so the losses, would differ from one process reading all 16
        common = ['max_iters=4', 'data_seed=7', 'learning_rate=1e-3']
        p = self.train('ddp', *common, 'batch_size=8', torchrun=True, dropout=0)
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        p = self.train('one', *common, 'batch_size=16', dropout=0)
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        (a, ddp), (b, one) = self.weights_and_losses('ddp'), self.weights_and_losses('one')
        self.assertEqual(sorted(ddp, key=int), ['0', '1', '2', '3'])
        for k in one:
            self.assertAlmostEqual(ddp[k], one[k], delta=1e-5)
        # the weights to rounding: one batch of 16 and two of 8 (all-reduced) round differently, and AdamW
        # normalises each update, so after 4 steps near-zero gradients leave differences of ~1e-5
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=3e-5, msg=k)


if __name__ == '__main__':
    unittest.main()
