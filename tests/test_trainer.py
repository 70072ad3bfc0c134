"""
The Trainer's minGPT contract: config fields and defaults, callbacks, the attributes callbacks
read, and a run that actually lowers the loss.
"""

import os
import unittest
import warnings

import torch
from torch.utils.data import Dataset

from mingpt.model import GPT
from mingpt.trainer import Trainer, default_num_workers
from mingpt.utils import set_seed


class RepeatDataset(Dataset):
    """ sequences that repeat a random token: trivially learnable, so the loss must fall """

    def __init__(self, n=256, length=8, vocab=5):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (n, 1), generator=g).repeat(1, length + 1)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def tiny_model(vocab=5, block=8):
    config = GPT.get_default_config()
    config.model_type = 'gpt-nano'
    config.vocab_size = vocab
    config.block_size = block
    return GPT(config)


class TestTrainerConfig(unittest.TestCase):

    def test_defaults_are_mingpts(self):
        C = Trainer.get_default_config()
        self.assertEqual(C.device, 'auto')
        self.assertIsNone(C.max_iters)
        self.assertEqual(C.batch_size, 64)
        self.assertEqual(C.learning_rate, 3e-4)
        self.assertEqual(C.betas, (0.9, 0.95))
        self.assertEqual(C.weight_decay, 0.1)
        self.assertEqual(C.grad_norm_clip, 1.0)
        self.assertTrue(hasattr(C, 'num_workers'))

    def test_worker_count_fits_the_machine(self):
        n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        n = default_num_workers()
        self.assertGreaterEqual(n, 0)
        self.assertLessEqual(n, max(0, n_cpu - 2))


class TestTrainerRun(unittest.TestCase):

    def setUp(self):
        set_seed(0)
        self.model = tiny_model()
        C = Trainer.get_default_config()
        C.device = 'cpu'
        C.max_iters = 30
        C.batch_size = 16
        C.learning_rate = 3e-3
        self.trainer = Trainer(C, self.model, RepeatDataset())

    def test_callbacks_see_progress_and_loss_falls(self):
        seen = []

        def record(trainer):
            self.assertIs(trainer.model, self.model)
            self.assertIsInstance(trainer.optimizer, torch.optim.AdamW)
            self.assertEqual(trainer.device, 'cpu')
            self.assertGreaterEqual(trainer.iter_dt, 0.0)
            seen.append((trainer.iter_num, trainer.loss.item()))

        self.trainer.add_callback('on_batch_end', record)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # e.g. a DataLoader complaining about too many workers
            self.trainer.run()
        self.assertEqual([i for i, _ in seen], list(range(30)))
        self.assertEqual(self.trainer.iter_num, 30)
        first, last = seen[0][1], sum(l for _, l in seen[-5:]) / 5
        self.assertLess(last, 0.5 * first)

    def test_set_callback_replaces_add_callback_appends(self):
        calls = []
        self.trainer.add_callback('on_batch_end', lambda t: calls.append('a'))
        self.trainer.add_callback('on_batch_end', lambda t: calls.append('b'))
        self.trainer.trigger_callbacks('on_batch_end')
        self.assertEqual(calls, ['a', 'b'])
        self.trainer.set_callback('on_batch_end', lambda t: calls.append('c'))
        self.trainer.trigger_callbacks('on_batch_end')
        self.assertEqual(calls, ['a', 'b', 'c'])


if __name__ == '__main__':
    unittest.main()
