"""
FSDP (parallel='fsdp'): parameters, gradients and AdamW's state sharded over the processes with
PyTorch's FSDP2, checkpoints sharded with torch.distributed.checkpoint.

- in this process: the config checks, and the sharded checkpoint format, which a single process
  writes and reads too (a world of one has nothing to shard, but its checkpoints are the same kind).
- under torchrun, 2 gloo processes on the CPU (@slow): the same losses and weights as 1 process with
  the global batch; a sharded checkpoint of 2 processes resumes on 2 (bit for bit) and on 1; the
  exported weights load with GPT.from_pretrained.
"""

import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import torch
import torch.distributed.fsdp
from safetensors.torch import load_file

from mingpt.checkpoint import SHARDED, find_checkpoint, read_checkpoint
from mingpt.distributed import require_fsdp, require_whole_model
from mingpt.errors import CheckpointError, ConfigError
from mingpt.model import GPT
from mingpt.trainer import Trainer
from tests.common import ProcessRunsTestCase, TempDirTestCase, run_train_script, slow
from tests.test_trainer import RepeatDataset, quiet_config
from tests.test_trainer_resume import tiny_model, train


def losses(out):
    with open(os.path.join(out, 'losses.json')) as f:
        return {int(k): v for k, v in json.load(f).items()}


def val_losses(work_dir):
    with open(os.path.join(work_dir, 'metrics.jsonl')) as f:
        return {r['iter']: r['val_loss'] for r in map(json.loads, f) if 'val_loss' in r}


class TestConfig(unittest.TestCase):

    def test_parallel_is_checked(self):
        C = quiet_config(parallel='zero')
        with self.assertRaisesRegex(ConfigError, "parallel='zero' cannot work.*'ddp'.*'fsdp'"):
            Trainer(C, tiny_model(), RepeatDataset())
        self.assertEqual(Trainer.get_default_config().parallel, 'ddp')  # today's behaviour by default

    def test_scripts_that_run_the_model_on_rank_0_alone_refuse_fsdp_over_processes(self):
        require_whole_model('fsdp', 'x.py')  # one process: nothing is sharded
        with mock.patch.dict(os.environ, {'WORLD_SIZE': '2', 'RANK': '1'}):
            require_whole_model('ddp', 'x.py')
            with self.assertRaisesRegex(ConfigError, r'x.py runs the model on rank 0 alone.*parallel=ddp'):
                require_whole_model('fsdp', 'x.py')

    def test_a_torch_without_fsdp2_is_told_which_it_needs(self):
        with mock.patch.dict(torch.distributed.fsdp.__dict__):
            del torch.distributed.fsdp.__dict__['fully_shard']  # as on torch 2.4 and 2.5
            with self.assertRaisesRegex(ConfigError, r"parallel='fsdp' needs torch >= 2\.6.*parallel='ddp'"):
                Trainer(quiet_config(parallel='fsdp'), tiny_model(), RepeatDataset())
        self.assertTrue(callable(require_fsdp()))


class TestShardedCheckpointsInOneProcess(TempDirTestCase):
    """ parallel='fsdp' in one process: nothing to shard, but checkpoints written and read as under FSDP """

    def test_layout_export_and_exact_resume(self):
        straight = train(str(self.tmp / 'a'), 6, parallel='fsdp')
        train(str(self.tmp / 'b'), 4, parallel='fsdp')
        ckpt = self.tmp / 'b' / 'ckpt'
        self.assertEqual(sorted(os.listdir(ckpt)), ['config.json', 'model.safetensors', SHARDED, 'trainer.pt'])
        self.assertEqual(sorted(os.listdir(ckpt / SHARDED)), ['.metadata', '__0_0.distcp'])
        sd, state = read_checkpoint(ckpt)
        self.assertIsNone(state['optimizer'])  # it lives in sharded/
        self.assertEqual((state['iter_num'], len(state['rng'])), (4, 1))
        loaded = GPT.from_pretrained(ckpt)  # the gathered weights: a model like any other checkpoint's
        for k, v in loaded.state_dict().items():
            self.assertTrue(torch.equal(v, sd[k]), k)

        resumed = train(str(self.tmp / 'b'), 6, parallel='fsdp', resume=True)
        self.assertEqual(resumed.iter_num, 6)
        for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
            self.assertTrue(torch.equal(a, b))
        self.assertEqual(resumed.history['iter'], [1, 2, 3, 4, 5, 6])

    def test_a_plain_run_continues_a_sharded_checkpoint_and_back(self):
        straight = train(str(self.tmp / 'a'), 6)
        train(str(self.tmp / 'b'), 2, parallel='fsdp')
        train(str(self.tmp / 'b'), 4, resume=True)  # parallel='ddp' reads the shards ...
        self.assertFalse((self.tmp / 'b' / 'ckpt' / SHARDED).exists())  # ... and writes its own kind
        resumed = train(str(self.tmp / 'b'), 6, parallel='fsdp', resume=True)
        self.assertTrue((self.tmp / 'b' / 'ckpt' / SHARDED).is_dir())
        for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
            self.assertTrue(torch.equal(a, b))

    def test_weights_only_checkpoints_stay_single_files(self):
        trainer = train(str(self.tmp), 2, parallel='fsdp')
        trainer.save_checkpoint('ckpt_best', weights_only=True)
        self.assertEqual(sorted(os.listdir(self.tmp / 'ckpt_best')), ['config.json', 'model.safetensors', 'trainer.pt'])
        self.assertIsNotNone(GPT.from_pretrained(self.tmp / 'ckpt_best'))

    def test_a_half_written_sharded_checkpoint_never_counts(self):
        train(str(self.tmp), 2, parallel='fsdp')
        ckpt = str(self.tmp / 'ckpt')
        # killed between the two renames of the next save: the complete one is .old, .tmp is half
        shutil.copytree(ckpt, ckpt + '.tmp')
        os.remove(os.path.join(ckpt + '.tmp', SHARDED, '.metadata'))
        os.replace(ckpt, ckpt + '.old')
        self.assertEqual(find_checkpoint(ckpt), ckpt + '.old')
        trainer = train(str(self.tmp), 4, parallel='fsdp', resume=True)
        self.assertEqual(trainer.iter_num, 4)
        self.assertEqual(sorted(os.listdir(self.tmp)), ['ckpt', 'metrics.jsonl'])
        self.assertEqual(read_checkpoint(ckpt)[1]['iter_num'], 4)

    def test_a_sharded_checkpoint_of_another_model_is_refused_before_anything_runs(self):
        train(str(self.tmp), 2, parallel='fsdp')
        with self.assertRaisesRegex(CheckpointError, "another size.*transformer.wte.weight: \\(5, 48\\) in the "
                                                     "checkpoint, \\(5, 32\\) in this model"):
            Trainer(quiet_config(work_dir=str(self.tmp), resume=True, parallel='fsdp'), tiny_model(n_embd=32),
                    RepeatDataset())
        os.remove(self.tmp / 'ckpt' / SHARDED / '.metadata')
        with self.assertRaisesRegex(CheckpointError, "cannot read the sharded checkpoint"):
            Trainer(quiet_config(work_dir=str(self.tmp), resume=True), tiny_model(), RepeatDataset())


@slow  # on the class: setUpClass starts the processes
class TestFSDPProcesses(ProcessRunsTestCase):
    """
    2 gloo processes on the CPU with 4 rows x 2 micro-steps each against 1 process with 16 rows:
    the same global batches (GlobalBatchSampler), so the same losses and weights up to the rounding
    of summing gradients in another order (1e-5). Dropout off (each rank has its own dropout stream);
    a small lr, as in test_trainer_ddp (Adam's 1/sqrt(v) magnifies that rounding where a gradient is
    ~0); grad_norm_clip=0.1, below every step's gradient norm here, so each step is clipped and a
    norm of the local shards instead of the whole gradient would show. Each evaluation reads all 33
    validation rows, under FSDP in batches of 2 x 4: the last has one row, so one rank has none and
    must take part in the forward anyway. Tied lm_head and wte: the gathered export stores one tensor.
    """

    @classmethod
    def setUpClass(cls):
        cls.tmp = tmp = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, tmp)
        common = ['data_seed=7', 'learning_rate=1e-3', 'grad_norm_clip=0.1', 'eval_interval=3', 'eval_iters=5',
                  'checkpoint_interval=3']
        fsdp = [*common, 'parallel=fsdp', 'batch_size=4', 'grad_accum_steps=2']
        script = ['--dropout', 0, '--val', '--tie_weights']
        runs = {  # name: (processes, trainer overrides)
            'one': (1, [*common, 'max_iters=6', 'batch_size=16', f'work_dir={cls.path("w_one")}']),
            'fsdp': (2, [*fsdp, 'max_iters=6', f'work_dir={cls.path("w_fsdp")}']),
            'half': (2, [*fsdp, 'max_iters=3', f'work_dir={cls.path("w_half")}']),
        }
        cls.runs = {}
        for name, (nproc, trainer) in runs.items():
            cls.runs[name] = run_train_script(cls.path(name), *script, nproc=nproc, trainer=trainer)
        shutil.copytree(cls.path('w_half'), cls.path('w_half_on_one'))
        # the 3-iteration checkpoint of 2 processes, continued to 6 on 2 processes and on 1
        cls.runs['resumed_on_two'] = run_train_script(
            cls.path('resumed_on_two'), *script, nproc=2,
            trainer=[*fsdp, 'max_iters=6', f'work_dir={cls.path("w_half")}', 'resume=True'])
        cls.runs['resumed_on_one'] = run_train_script(
            cls.path('resumed_on_one'), *script,
            trainer=[*common, 'parallel=fsdp', 'max_iters=6', 'batch_size=16',
                     f'work_dir={cls.path("w_half_on_one")}', 'resume=True'])
        # a checkpoint of whole weights (1 process, parallel='ddp') cannot be split by 2 FSDP processes
        shutil.copytree(cls.path('w_one'), cls.path('w_whole'))
        cls.refused = run_train_script(cls.path('refused'), *script, nproc=2,
                                       trainer=[*fsdp, 'max_iters=7', f'work_dir={cls.path("w_whole")}', 'resume=True'])

    def weights(self, work_dir, name='ckpt'):
        return load_file(os.path.join(self.path(work_dir), name, 'model.safetensors'))

    def assert_close(self, a, b, atol=1e-5):
        self.assertEqual(set(a), set(b))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)

    def test_two_sharded_ranks_equal_one_process_of_the_global_batch(self):
        one, fsdp = losses(self.path('one')), losses(self.path('fsdp'))
        self.assertEqual(sorted(fsdp), [0, 1, 2, 3, 4, 5])
        for k in one:
            self.assertAlmostEqual(fsdp[k], one[k], delta=1e-5)
        self.assertGreater(abs(one[5] - one[0]), 1e-3)  # the weights did move
        self.assert_close(self.weights('w_fsdp'), self.weights('w_one'))
        self.assertNotIn('lm_head.weight', self.weights('w_fsdp'))  # tied: stored once, as wte
        one_val, fsdp_val = val_losses(self.path('w_one')), val_losses(self.path('w_fsdp'))
        self.assertEqual(sorted(fsdp_val), [3, 6])
        for k in one_val:
            self.assertAlmostEqual(fsdp_val[k], one_val[k], delta=1e-5)

        # the checkpoint: each process wrote its shards, rank 0 the rest
        ckpt = os.path.join(self.path('w_fsdp'), 'ckpt')
        self.assertEqual(sorted(os.listdir(os.path.join(ckpt, SHARDED))), ['.metadata', '__0_0.distcp', '__1_0.distcp'])
        _, state = read_checkpoint(ckpt)
        self.assertEqual((state['iter_num'], len(state['rng']), state['global_batch']), (6, 2, 16))
        with open(os.path.join(self.path('w_fsdp'), 'metrics.jsonl')) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual([r['iter'] for r in records if 'loss' in r], [1, 2, 3, 4, 5, 6])  # one writer

    def test_exports_load_with_from_pretrained(self):
        for name in ('ckpt', 'ckpt_best'):
            with self.subTest(name):
                fsdp = GPT.from_pretrained(os.path.join(self.path('w_fsdp'), name)).state_dict()
                one = GPT.from_pretrained(os.path.join(self.path('w_one'), name)).state_dict()
                self.assert_close(fsdp, one)
        # the best model is a single file, like a run without FSDP writes
        self.assertEqual(sorted(os.listdir(os.path.join(self.path('w_fsdp'), 'ckpt_best'))),
                         ['config.json', 'model.safetensors', 'trainer.pt'])

    def test_resume_on_two_processes_is_bit_exact(self):
        straight, resumed = losses(self.path('fsdp')), losses(self.path('resumed_on_two'))
        self.assertEqual(sorted(resumed), [3, 4, 5])
        for k in resumed:
            self.assertEqual(resumed[k], straight[k])
        a, b = self.weights('w_fsdp'), self.weights('w_half')
        self.assertEqual(set(a), set(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)

    def test_resume_on_one_process(self):
        # the same arithmetic as 1 process from the start, so close to the 2-process run, not equal
        straight, resumed = losses(self.path('fsdp')), losses(self.path('resumed_on_one'))
        self.assertEqual(sorted(resumed), [3, 4, 5])
        for k in resumed:
            self.assertAlmostEqual(resumed[k], straight[k], delta=1e-5)
        self.assert_close(self.weights('w_half_on_one'), self.weights('w_fsdp'))
        self.assertEqual(sorted(os.listdir(os.path.join(self.path('w_half_on_one'), 'ckpt', SHARDED))),
                         ['.metadata', '__0_0.distcp'])

    def test_whole_weights_are_not_split_into_shards(self):
        self.assertNotEqual(self.refused.returncode, 0)
        self.assertIn("holds whole weights (it was written without parallel='fsdp')", self.refused.stderr)
        self.assertIn("continue it with parallel='ddp'", self.refused.stderr)


if __name__ == '__main__':
    unittest.main()
