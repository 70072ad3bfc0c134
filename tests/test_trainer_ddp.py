"""
DDP through torchrun: 2 gloo processes with 8 rows each take the same steps as 1 process with 16
rows (same global batches, same gradients), only rank 0 writes, and every rank's RNG is saved.
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch
from safetensors.torch import load_file

from mingpt.checkpoint import read_checkpoint
from tests.common import slow

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_script.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestDDP(unittest.TestCase):

    @slow
    def test_two_ranks_of_8_equal_one_process_of_16(self):
        # dropout off, and a small lr: Adam's 1/sqrt(v) magnifies the rounding difference between
        # averaging two half-batch gradients and one full-batch gradient where a gradient is ~0
        common = ['--dropout', '0', '--trainer', 'max_iters=5', 'data_seed=7', 'learning_rate=1e-3']
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, OMP_NUM_THREADS='1')
            ddp = subprocess.run(
                # --standalone: torchrun binds a free local port itself (no window in which
                # another process can take a port picked here)
                [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                 SCRIPT, '--out', os.path.join(d, 'ddp'), *common, 'batch_size=8',
                 f'work_dir={os.path.join(d, "w")}'],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            self.assertEqual(ddp.returncode, 0, ddp.stderr[-3000:])
            one = subprocess.run([sys.executable, SCRIPT, '--out', os.path.join(d, 'one'), *common,
                                  'batch_size=16'], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=300)
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
