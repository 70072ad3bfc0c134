"""mingpt: a small, clean, fast GPT library with minGPT's API."""

from mingpt.model import GPT
from mingpt.trainer import Trainer
from mingpt.utils import CfgNode, set_seed

__all__ = ['GPT', 'Trainer', 'CfgNode', 'set_seed']
__version__ = '0.1.0'
