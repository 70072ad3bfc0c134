"""
The notebooks run top to bottom, offline, on tiny models: each is executed with nbclient in a
fresh python3 kernel, with environment variables pointing it at local files.
"""

import os
import tempfile
import unittest
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.common import REPO, patched_env, use_shared_gpt2_vocab


def run_notebook(path, timeout=300):
    """ execute the notebook at path in the repository root; returns it, outputs filled in """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3',
                            resources={'metadata': {'path': str(REPO)}})
    client.execute()
    return nb


def stdout_of(nb):
    return ''.join(out.get('text', '') for cell in nb.cells if cell.cell_type == 'code'
                   for out in cell.get('outputs', []) if out.get('name') == 'stdout')


class TestGenerateNotebook(unittest.TestCase):

    def test_committed_without_outputs(self):
        nb = nbformat.read(REPO / 'generate.ipynb', as_version=4)
        for cell in nb.cells:
            if cell.cell_type == 'code':
                self.assertEqual(cell.outputs, [])
                self.assertIsNone(cell.execution_count)

    def test_samples_from_a_tiny_checkpoint(self):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        # GPT-2's vocabulary (the tokenizer's), everything else tiny
        hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257))
        with tempfile.TemporaryDirectory() as tmp, use_shared_gpt2_vocab():
            hf.save_pretrained(tmp)
            pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
            with patched_env(MINGPT_MODEL=tmp, MINGPT_DEVICE='cpu', PYTHONPATH=pythonpath,
                             MINGPT_HF_BASE_URL='http://127.0.0.1:9'):  # no hub download, ever
                nb = run_notebook(REPO / 'generate.ipynb')
        out = stdout_of(nb)
        separators = [line for line in out.splitlines() if line == '-' * 80]
        self.assertEqual(len(separators), 10 + 3)  # 10 prompted samples, then 3 unconditional ones
        samples = out.split('-' * 80 + '\n')[1:]
        self.assertTrue(all(s.startswith('Andrej Karpathy, the') for s in samples[:10]), samples[:2])
        self.assertTrue(all(s.startswith('<|endoftext|>') for s in samples[10:]), samples[10:])
        self.assertTrue(all(len(s.strip()) > len('Andrej Karpathy, the') for s in samples[:10]))


if __name__ == '__main__':
    unittest.main()
