"""
The learning rate and the data order as pure functions of the iteration: warmup + cosine or wsd, a global
batch that is split rather than redrawn, and the DataLoader a run trains from.
"""

import unittest

import torch
from torch.utils.data import TensorDataset

from mingpt.config import check_trainer_config
from mingpt.errors import ConfigError
from mingpt.schedule import GlobalBatchSampler, draw_data_seed, eval_batches, get_lr, train_loader
from mingpt.trainer import Trainer
from mingpt.utils import set_seed


def schedule_config(**kw):
    C = Trainer.get_default_config()
    C.merge_from_dict(kw)
    return C


class TestLearningRate(unittest.TestCase):

    def test_warmup_then_cosine_to_min_lr(self):
        C = schedule_config(learning_rate=1.0, lr_schedule='cosine', warmup_iters=10, lr_decay_iters=110,
                            min_lr=0.1, max_iters=200)
        self.assertAlmostEqual(get_lr(0, C), 0.1)
        self.assertAlmostEqual(get_lr(4, C), 0.5)
        self.assertAlmostEqual(get_lr(9, C), 1.0)
        self.assertAlmostEqual(get_lr(10, C), 1.0)
        self.assertAlmostEqual(get_lr(60, C), 0.55)  # halfway down the cosine
        self.assertAlmostEqual(get_lr(110, C), 0.1)
        self.assertAlmostEqual(get_lr(150, C), 0.1)
        lrs = [get_lr(i, C) for i in range(10, 111)]
        self.assertTrue(all(a >= b for a, b in zip(lrs, lrs[1:])))
        C.min_lr = None  # the default: a tenth of the peak
        self.assertAlmostEqual(get_lr(110, C), 0.1)

    def test_warmup_stable_then_a_straight_line_to_min_lr(self):
        C = schedule_config(learning_rate=1.0, lr_schedule='wsd', warmup_iters=10, max_iters=110, min_lr=0.1,
                            cooldown_frac=0.4)
        self.assertAlmostEqual(get_lr(4, C), 0.5)
        # 100 iterations after the warmup: the last 40 decay, from 1.0 at iteration 70 to 0.1 at 110
        self.assertEqual({get_lr(i, C) for i in range(10, 71)}, {1.0})
        self.assertAlmostEqual(get_lr(90, C), 0.55)
        self.assertAlmostEqual(get_lr(109, C), 0.1 + 0.9 / 40)
        self.assertAlmostEqual(get_lr(110, C), 0.1)
        lrs = [get_lr(i, C) for i in range(70, 111)]
        self.assertTrue(all(a > b for a, b in zip(lrs, lrs[1:])))
        with self.assertRaises(ConfigError):
            check_trainer_config(schedule_config(lr_schedule='wsd', cooldown_frac=0.0), 'cpu')

    def test_default_is_constant_and_decay_defaults_to_max_iters(self):
        self.assertEqual({get_lr(i, schedule_config()) for i in (0, 1, 10**6)}, {3e-4})
        C = schedule_config(learning_rate=1.0, lr_schedule='cosine', max_iters=100)
        self.assertAlmostEqual(get_lr(50, C), 0.55)
        self.assertAlmostEqual(get_lr(100, C), 0.1)


class TestDataOrder(unittest.TestCase):

    def test_global_batch_is_split_not_redrawn(self):
        # what one process of 16 rows draws, 2 ranks x 8 rows and 2 micro-steps x 4 rows x 2 ranks draw
        one = GlobalBatchSampler(1000, 16, 1, seed=5)
        ranks = [GlobalBatchSampler(1000, 8, 1, seed=5, rank=r, world_size=2) for r in range(2)]
        micro = [GlobalBatchSampler(1000, 4, 2, seed=5, rank=r, world_size=2) for r in range(2)]
        it_one, it_ranks, it_micro = iter(one), [iter(s) for s in ranks], [iter(s) for s in micro]
        for step in range(3):
            rows = next(it_one)
            self.assertEqual(rows, next(it_ranks[0]) + next(it_ranks[1]))
            m0 = [next(it_micro[0]), next(it_micro[0])]  # rank 0: micro-steps 0 and 1
            m1 = [next(it_micro[1]), next(it_micro[1])]
            self.assertEqual(rows, m0[0] + m1[0] + m0[1] + m1[1])
        # and resuming at iteration 2 starts from the same batch
        self.assertEqual(next(iter(GlobalBatchSampler(1000, 16, 1, seed=5, start_iter=2))), rows)
        self.assertNotEqual(next(iter(GlobalBatchSampler(1000, 16, 1, seed=6, start_iter=2))), rows)

    def test_train_loader_seeded_or_minGPTs(self):
        data = TensorDataset(torch.arange(100), torch.arange(100))
        seeded = iter(train_loader(data, 4, grad_accum_steps=2, data_seed=3, start_iter=1))
        sampler = iter(GlobalBatchSampler(100, 4, 2, seed=3, start_iter=1))
        for _ in range(4):
            self.assertEqual(next(seeded)[0].tolist(), next(sampler))
        # minGPT's: RandomSampler with replacement, fixed by set_seed
        draws = []
        for _ in range(2):
            set_seed(0)
            x, _ = next(iter(train_loader(data, 8)))
            draws.append(x.tolist())
        self.assertEqual(len(draws[0]), 8)
        self.assertEqual(draws[0], draws[1])

    def test_drawn_data_seed_follows_set_seed(self):
        set_seed(1)
        a = draw_data_seed()
        set_seed(1)
        self.assertEqual(draw_data_seed(), a)
        self.assertGreaterEqual(a, 0)
        self.assertNotEqual(draw_data_seed(), a)

    def test_eval_batches_are_fixed_and_cover_a_small_set_once(self):
        small = eval_batches(10, rows=4, eval_iters=5)
        self.assertEqual([b.tolist() for b in small], [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])
        big = eval_batches(1000, rows=4, eval_iters=3)
        self.assertEqual([len(b) for b in big], [4, 4, 4])
        self.assertEqual([b.tolist() for b in big], [b.tolist() for b in eval_batches(1000, 4, 3)])


if __name__ == '__main__':
    unittest.main()
