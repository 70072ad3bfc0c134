import os

from setuptools import setup, find_packages
from setuptools.command.build_py import build_py

PTH = 'mingpt-lm-eval.pth'  # imports mingpt_lm_eval at startup: `lm_eval --model mingpt` (see that module)


class build_py_with_pth(build_py):
    """ build_py that also puts PTH at the top of site-packages, where Python reads .pth files: in a
    wheel's root; in an editable install (which copies no package files), in the editable wheel's root """

    def run(self):
        super().run()
        root = self.get_finalized_command('install').install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(root, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(
    name='mingpt',
    version='0.1.0',
    author='mingpt contributors',
    description='A small, clean, fast GPT library with the minGPT API: train, load GPT-2, generate',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mingpt', 'mingpt.*']),
    py_modules=['mingpt_lm_eval'],
    cmdclass={'build_py': build_py_with_pth},
    package_data={'mingpt': ['static/*.html', 'assets/gpt2/*', 'kernels.c']},
    python_requires='>=3.9',
    install_requires=[
        # 2.4: CPU fused AdamW and torch.is_autocast_enabled(device); tested on 2.4.1 and 2.13.0
        'torch>=2.4',
        'numpy',
        'regex',
        'requests',
        'tqdm',
        'safetensors',
    ],
    extras_require={
        'serve': ['starlette', 'uvicorn'],
        'plot': ['matplotlib'],
        # mingpt.harness (lm-eval's command line with mingpt's models); pyyaml reads CORE bundles (mingpt.tasks)
        'eval': ['lm-eval', 'pyyaml'],
        # the engines bench/generate.py compares with (llama-cpp-python builds llama.cpp from source
        # where PyPI has no wheel for the platform; gguf writes its model files)
        'bench': ['transformers', 'ctranslate2', 'llama-cpp-python', 'gguf'],
        # transformers 5 needs torch >= 2.6; with torch 2.4 or 2.5 use transformers<4.50
        'test': [
            'starlette',
            'uvicorn',
            'httpx',
            'playwright',
            'pytest',
            'transformers',
            'tiktoken',
            'nbclient',
            'nbformat',
            'ipykernel',
            'matplotlib',
            'peft',
            'lm-eval',
            'pyyaml',
        ],
    },
    license='MIT',
)
