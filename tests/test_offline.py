"""
A new user's first hour, offline: with an empty MINGPT_CACHE and every network request sent to a dead
proxy, GPT-2's tokenizer works (its files ship with the package), a project runs to the end, and
nothing is downloaded into the cache (which holds mingpt.kernels' build, made here from the shipped source).
"""

import os
import subprocess
import sys
import unittest

from tests.common import REPO, TempDirTestCase, free_port_url, slow


class TestOffline(TempDirTestCase):

    def env(self):
        dead = free_port_url()  # nothing listens there: any download attempt fails at once
        cache = self.tmp / 'cache'
        return cache, dict(os.environ, MINGPT_CACHE=str(cache), HTTP_PROXY=dead, HTTPS_PROXY=dead,
                           http_proxy=dead, https_proxy=dead, NO_PROXY='', no_proxy='',
                           MINGPT_GPT2_BASE_URL=dead, MINGPT_HF_BASE_URL=dead, PYTHONPATH=str(REPO))

    def run_python(self, *args, env):
        return subprocess.run([sys.executable, *args], cwd=self.tmp, env=env, capture_output=True, text=True,
                              timeout=300)

    @slow  # a process; tests/test_bpe.py checks the same in-process
    def test_gpt2_tokenizer_needs_no_network_and_no_cache(self):
        cache, env = self.env()
        code = ("from mingpt.bpe import BPETokenizer; t = BPETokenizer(); "
                "print(t('Hello world').tolist(), t.decode(t('naïve café')[0]))")
        proc = self.run_python('-c', code, env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.strip(), '[[15496, 995]] naïve café')
        self.assertFalse(cache.exists())

    @slow
    def test_a_project_runs_to_the_end(self):
        cache, env = self.env()
        work_dir = self.tmp / 'adder'
        proc = self.run_python(str(REPO / 'projects' / 'adder' / 'adder.py'), f'--system.work_dir={work_dir}',
                               '--trainer.max_iters=30', '--trainer.eval_interval=15', env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertTrue((work_dir / 'results.json').is_file(), sorted(p.name for p in work_dir.iterdir()))
        self.assertNotIn('Traceback', proc.stderr)
        self.assertLessEqual({p.name for p in cache.iterdir()} if cache.exists() else set(), {'kernels'})


if __name__ == '__main__':
    unittest.main()
