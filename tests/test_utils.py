import json
import os
import random
import sys
import tempfile
import unittest

import numpy as np
import torch

from mingpt.errors import ConfigError
from mingpt.utils import CfgNode, set_seed, setup_logging


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


if __name__ == '__main__':
    unittest.main()
