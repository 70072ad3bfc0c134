"""
End to end: gpt-nano learns to sort through the Trainer (minGPT's demo task, held-out inputs).
"""

import hashlib
import unittest

import torch
from torch.utils.data import Dataset

from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import set_seed
from tests.common import slow


class SortDataset(Dataset):
    """
    Sequences of `length` digits in [0, num_digits) followed by the same digits sorted; the model
    sees input + output shifted by one, and is scored only on the sorted half (targets -1 elsewhere).
    Inputs are assigned to train or test by a hash, so the test inputs are never trained on.
    """

    def __init__(self, split, length=6, num_digits=3):
        assert split in {'train', 'test'}
        self.split = split
        self.length = length
        self.num_digits = num_digits

    def __len__(self):
        return 10000  # ...

    def get_vocab_size(self):
        return self.num_digits

    def get_block_size(self):
        # the length of the sequence that will feed into transformer,
        # containing concatenated input and the output, but -1 because
        # the transformer starts making predictions at the last input element
        return self.length * 2 - 1

    @staticmethod
    def is_test(inp):
        # a quarter of all inputs are held out; deterministic across processes (no hash() salt)
        return hashlib.md5(bytes(inp.tolist())).digest()[0] % 4 == 0

    def __getitem__(self, idx):
        # rejection-sample an input of this split
        while True:
            inp = torch.randint(self.num_digits, size=(self.length,), dtype=torch.long)
            if self.is_test(inp) == (self.split == 'test'):
                break
        sol = torch.sort(inp)[0]
        cat = torch.cat((inp, sol), dim=0)
        x = cat[:-1].clone()
        y = cat[1:].clone()
        y[:self.length-1] = -1  # only predict the output locations
        return x, y


class TestLearnsToSort(unittest.TestCase):

    @slow
    def test_gpt_nano_sorts_held_out_inputs(self):
        set_seed(3407)
        train_dataset = SortDataset('train')
        model_config = GPT.get_default_config()
        model_config.model_type = 'gpt-nano'
        model_config.vocab_size = train_dataset.get_vocab_size()
        model_config.block_size = train_dataset.get_block_size()
        model = GPT(model_config)

        train_config = Trainer.get_default_config()
        train_config.learning_rate = 2e-3
        train_config.max_iters = 250
        train_config.num_workers = 0
        train_config.device = 'cpu'
        trainer = Trainer(train_config, model, train_dataset)
        trainer.run()

        # every held-out input of length 6 over {0,1,2}, sorted greedily by the model
        all_inputs = torch.cartesian_prod(*[torch.arange(3)] * 6)
        test_inputs = torch.stack([x for x in all_inputs if SortDataset.is_test(x)])
        self.assertGreater(len(test_inputs), 100)
        model.eval()
        out = model.generate(test_inputs, 6)[:, 6:]
        correct = (out == torch.sort(test_inputs, dim=1)[0]).all(dim=1).float().mean().item()
        self.assertGreaterEqual(correct, 0.9, f"only {correct:.1%} of held-out inputs sorted")


if __name__ == '__main__':
    unittest.main()
