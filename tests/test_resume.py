"""
mingpt.resume on its own: every RNG a training step touches is captured and restored through a
checkpoint file. (Resuming a Trainer, in process and after SIGKILL: test_trainer_resume.py.)
"""

import random

import numpy as np
import torch

from mingpt.resume import rng_state, set_rng_state
from tests.common import TempDirTestCase


class TestRNGState(TempDirTestCase):

    def test_capture_and_restore_replays_every_stream(self):
        def draws():
            return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()
        np.random.randn()  # leaves a cached gaussian behind: part of numpy's state
        saved = rng_state()
        first = draws()
        # through a checkpoint file, as a resumed run gets it
        torch.save(saved, self.tmp / 'rng.pt')
        set_rng_state(torch.load(self.tmp / 'rng.pt', weights_only=True))
        self.assertEqual(draws(), first)
