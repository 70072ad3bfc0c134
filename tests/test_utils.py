import json
import os
import random
import stat
import sys
import tempfile
import unittest

import numpy as np
import torch

from mingpt.errors import ConfigError
from safetensors.torch import save_file

from mingpt.distributed import barrier, process_group
from mingpt.utils import CfgNode, atomic_write, dist_env, is_rank0, set_seed, setup_logging, start_run

from tests.common import TempDirTestCase, patched_env, tiny_gpt


class TestCfgNode(unittest.TestCase):

    def make(self):
        return CfgNode(lr=3e-4, name='run', betas=(0.9, 0.95),
                       model=CfgNode(n_layer=2, model_type='gpt-nano'))

    def test_merge_from_args_parses_literals(self):
        C = self.make()
        C.merge_from_args(['--lr=1e-3', '--model.n_layer=4', '--betas=(0.8,0.99)',
                           '--model.model_type=None', '--name=my run'])
        self.assertEqual(C.lr, 1e-3)
        self.assertEqual(C.model.n_layer, 4)
        self.assertEqual(C.betas, (0.8, 0.99))
        self.assertIsNone(C.model.model_type)
        self.assertEqual(C.name, 'my run')  # not a literal: kept as the string

    def test_unknown_key_is_a_clear_error(self):
        C = self.make()
        with self.assertRaisesRegex(ConfigError, "valid keys there are: model_type, n_layer"):
            C.merge_from_args(['--model.n_layers=4'])
        with self.assertRaisesRegex(ConfigError, "unknown config key 'lrate'"):
            C.merge_from_args(['--lrate=4'])
        with self.assertRaisesRegex(ConfigError, '--key=value'):
            C.merge_from_args(['lr=4'])
        with self.assertRaisesRegex(ConfigError, 'group of settings'):
            C.merge_from_args(['--model=4'])

    def test_values_must_have_the_keys_type(self):
        C = CfgNode(batch_size=64, lr=3e-4, compile=False, betas=(0.9, 0.95), prompt='O God', max_iters=None)
        for arg, expected in (('--batch_size=abc', 'expected an integer, like its default 64'),
                              ('--batch_size=2.5', 'expected an integer'),
                              ('--batch_size=True', 'expected an integer'),
                              ('--lr=abc', 'expected a number, like its default 0.0003'),
                              ('--compile=1', 'expected True or False'),
                              ('--betas=0.9', 'expected a tuple')):
            with self.subTest(arg=arg), self.assertRaisesRegex(ConfigError, f'{arg}: {expected}'):
                C.merge_from_args([arg])
        C.merge_from_args(['--lr=1', '--prompt=123', '--max_iters=abc', '--betas=[0.8, 0.9]', '--batch_size=None'])
        self.assertEqual((C.lr, C.prompt, C.max_iters, C.betas, C.batch_size), (1.0, '123', 'abc', (0.8, 0.9), None))
        self.assertIsInstance(C.lr, float)
        # a string key also takes True and False (a Trainer's resume is 'auto', True or False)
        for arg, expected in (('--resume=False', False), ('--resume=True', True), ('--resume=auto', 'auto')):
            C = CfgNode(resume='auto')
            C.merge_from_args([arg])
            self.assertEqual((C.resume, type(C.resume)), (expected, type(expected)))

    def test_merge_from_dict_and_to_dict(self):
        C = self.make()
        C.merge_from_dict({'lr': 0.1, 'model': {'n_layer': 8}})
        self.assertEqual(C.to_dict(), {'lr': 0.1, 'name': 'run', 'betas': (0.9, 0.95),
                                       'model': {'n_layer': 8, 'model_type': 'gpt-nano'}})
        self.assertIsInstance(C.model, CfgNode)

    def test_str_is_readable(self):
        s = str(self.make())
        self.assertIn('lr: 0.0003\n', s)
        self.assertIn('model:\n    n_layer: 2\n', s)


class TestSeedAndLogging(unittest.TestCase):

    def test_set_seed_makes_every_rng_repeat(self):
        def draw():
            return random.random(), np.random.rand(), torch.rand(1).item()
        set_seed(123)
        a = draw()
        set_seed(123)
        self.assertEqual(a, draw())
        set_seed(124)
        self.assertNotEqual(a, draw())

    def test_setup_logging_writes_args_and_config(self):
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = os.path.join(tmp, 'out', 'run')
            C = CfgNode(system=CfgNode(work_dir=work_dir, seed=3), lr=0.5)
            setup_logging(C)
            with open(os.path.join(work_dir, 'config.json')) as f:
                self.assertEqual(json.load(f), {'system': {'work_dir': work_dir, 'seed': 3}, 'lr': 0.5})
            with open(os.path.join(work_dir, 'args.txt')) as f:
                self.assertEqual(f.read(), ' '.join(sys.argv))

    def test_under_torchrun_rank_0_writes_and_reports(self):
        self.assertTrue(is_rank0())
        with tempfile.TemporaryDirectory() as tmp, patched_env(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2'):
            self.assertEqual(dist_env(), (1, 1, 2))
            self.assertFalse(is_rank0())
            setup_logging(CfgNode(system=CfgNode(work_dir=os.path.join(tmp, 'run'))))
            self.assertEqual(os.listdir(tmp), [])  # rank 0 writes args.txt and config.json
        with patched_env(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2'):
            self.assertTrue(is_rank0())

    def test_process_group_is_a_no_op_in_one_process(self):
        # (under torchrun: tests/test_projects.py runs the projects on 2 ranks)
        with process_group():
            self.assertFalse(torch.distributed.is_initialized())
            barrier()  # nothing to wait for
        self.assertFalse(torch.distributed.is_initialized())


class TestStartRun(unittest.TestCase):

    def test_seeds_sets_threads_and_logs_the_config(self):
        import logging
        config = CfgNode(system=CfgNode(seed=7, num_threads=1))
        threads = torch.get_num_threads()
        try:
            with self.assertLogs('start-run-test', level='INFO') as logs:
                start_run(config, logging.getLogger('start-run-test'))
            self.assertEqual(torch.get_num_threads(), 1)
        finally:
            torch.set_num_threads(threads)
        self.assertIn('seed: 7', logs.output[0])
        drawn = torch.rand(3)
        set_seed(7)
        self.assertTrue(torch.equal(drawn, torch.rand(3)))  # the same stream as set_seed(7)
        start_run(CfgNode(system=CfgNode(seed=7)), logging.getLogger('start-run-test'))  # no num_threads: fine


class TestRun(TempDirTestCase):
    """ start_run's Run: the config as given, recorded when training starts; results.json on rank 0 """

    def config(self, **trainer):
        from mingpt.trainer import Trainer
        C = CfgNode(system=CfgNode(seed=0, work_dir=str(self.tmp / 'run')), trainer=Trainer.get_default_config())
        C.trainer.merge_from_dict(dict(device='cpu', num_workers=0, progress_bar=False, max_iters=2,
                                       batch_size=4, work_dir=C.system.work_dir, **trainer))
        return C

    def test_the_config_as_given_is_recorded_when_training_starts(self):
        import logging
        from mingpt.trainer import Trainer
        from tests.test_trainer import RepeatDataset, tiny_model
        config = self.config()
        run = start_run(config, logging.getLogger('run-test'))
        config.trainer.learning_rate = 1e-2  # what the script fills in later is not what was given
        trainer = Trainer(config.trainer, tiny_model(), RepeatDataset())
        self.assertFalse((self.tmp / 'run' / 'config.json').exists())  # nothing yet: the trainer checked work_dir
        self.assertIs(run.train(trainer), trainer)
        self.assertEqual(trainer.iter_num, 2)
        with open(self.tmp / 'run' / 'config.json') as f:
            self.assertEqual(json.load(f)['trainer']['learning_rate'], 3e-4)
        self.assertTrue((self.tmp / 'run' / 'args.txt').is_file())
        self.assertTrue(run.finish({'iters': 2, 'val_loss': None}))
        with open(self.tmp / 'run' / 'results.json') as f:
            results = json.load(f)
        self.assertGreaterEqual(results.pop('wall_seconds'), 0.0)  # since start_run: a tiny run rounds to 0.0
        self.assertEqual(results, {'iters': 2, 'val_loss': None})

    def test_only_rank_0_reports_and_a_rank0_script_refuses_fsdp(self):
        import logging
        with patched_env(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2'):
            run = start_run(self.config(), logging.getLogger('run-test'))
            self.assertFalse(run.rank0)
            self.assertFalse(run.finish({'iters': 2}))
            with self.assertRaisesRegex(ConfigError, "x.py runs the model on rank 0 alone"):
                start_run(self.config(parallel='fsdp'), logging.getLogger('run-test'), script='x.py')
        self.assertFalse((self.tmp / 'run').exists())
        start_run(self.config(parallel='fsdp'), logging.getLogger('run-test'), script='x.py')  # one process: fine


class TestAtomicWrite(TempDirTestCase):

    def test_whole_file_or_nothing_with_the_users_permissions(self):
        path = self.tmp / 'f.txt'
        atomic_write(path, 'old')
        with self.assertRaises(RuntimeError):
            def broken(tmp):  # a writer that dies half-way
                tmp.write_text('half')
                raise RuntimeError('killed')
            atomic_write(path, broken)
        self.assertEqual(path.read_text(), 'old')
        old_mask = os.umask(0o027)
        try:
            atomic_write(path, b'new')
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o640)
            # a writer that creates its file 0600 (as safetensors does) still gets the umask's permissions
            atomic_write(self.tmp / 'w.safetensors', lambda tmp: save_file({'x': torch.zeros(2)}, str(tmp)))
            self.assertEqual(stat.S_IMODE((self.tmp / 'w.safetensors').stat().st_mode), 0o640)
        finally:
            os.umask(old_mask)
        self.assertEqual(path.read_bytes(), b'new')

    def test_models_and_checkpoints_get_the_users_permissions(self):
        from mingpt.checkpoint import write_checkpoint
        old_mask = os.umask(0o022)
        try:
            model = tiny_gpt()
            model.save_pretrained(self.tmp / 'model')
            write_checkpoint(self.tmp / 'ckpt', model, {'iter_num': 0})
        finally:
            os.umask(old_mask)
        for f in [*(self.tmp / 'model').iterdir(), *(self.tmp / 'ckpt').iterdir()]:
            self.assertEqual(stat.S_IMODE(f.stat().st_mode), 0o644, f)


if __name__ == '__main__':
    unittest.main()
