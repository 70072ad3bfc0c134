"""
DDP through torchrun: 2 gloo processes with 8 rows each take the same steps as 1 process with 16
rows (same global batches, same gradients), only rank 0 writes, and every rank's RNG is saved.
"""

import json
import os
import tempfile
import unittest

import torch
from safetensors.torch import load_file

from mingpt.checkpoint import read_checkpoint
from tests.common import run_train_script, slow


class TestDDP(unittest.TestCase):

    @slow
    def test_two_ranks_of_8_equal_one_process_of_16(self):
        # dropout off, and a small lr: Adam's 1/sqrt(v) magnifies the rounding difference between
        # averaging two half-batch gradients and one full-batch gradient where a gradient is ~0
        common = ['max_iters=5', 'data_seed=7', 'learning_rate=1e-3']
        with tempfile.TemporaryDirectory() as d:
            # checkpoint_minutes=1e-9 passes at every iteration on rank 0's clock and never on rank 1's:
            # rank 0's decision must reach rank 1, which else would leave the collective save alone
            ddp = run_train_script(os.path.join(d, 'ddp'), '--dropout', 0, '--still_clock_off_rank0', nproc=2,
                                   trainer=[*common, 'batch_size=8', f'work_dir={os.path.join(d, "w")}',
                                            'checkpoint_interval=100', 'checkpoint_minutes=1e-9'])
            self.assertEqual(ddp.returncode, 0, ddp.stderr[-3000:])
            one = run_train_script(os.path.join(d, 'one'), '--dropout', 0, trainer=[*common, 'batch_size=16'])
            self.assertEqual(one.returncode, 0, one.stderr[-3000:])

            with open(os.path.join(d, 'ddp', 'losses.json')) as f:
                ddp_losses = json.load(f)
            with open(os.path.join(d, 'one', 'losses.json')) as f:
                one_losses = json.load(f)
            self.assertEqual(sorted(ddp_losses, key=int), ['0', '1', '2', '3', '4'])
            for k in one_losses:
                self.assertAlmostEqual(ddp_losses[k], one_losses[k], delta=1e-5)
            a = load_file(os.path.join(d, 'ddp', 'final.safetensors'))
            b = load_file(os.path.join(d, 'one', 'final.safetensors'))
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)

            with open(os.path.join(d, 'ddp', 'checkpoints.json')) as f:
                self.assertEqual(json.load(f), [1, 2, 3, 4, 5])  # by the clock, every rank together
            # rank 0 wrote the checkpoint, with both ranks' RNG states and the global batch size
            _, state = read_checkpoint(os.path.join(d, 'w', 'ckpt'))
            self.assertEqual(state['iter_num'], 5)
            self.assertEqual(len(state['rng']), 2)
            self.assertEqual(state['global_batch'], 16)
            self.assertEqual(state['data_seed'], 7)
            with open(os.path.join(d, 'w', 'metrics.jsonl')) as f:
                self.assertEqual([json.loads(line)['iter'] for line in f], [1, 2, 3, 4, 5])  # one writer


if __name__ == '__main__':
    unittest.main()
