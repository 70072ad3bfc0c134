"""
The test suite. Importing it (pytest does first; `python -m unittest discover tests`, with the first
test module's `from tests.common import ...`) points mingpt's cache, which is read only when used, at a
fresh temporary directory, for this process and every subprocess a test starts:
no test reads or writes the user's ~/.cache/mingpt. It also runs torch on one thread (unless
OMP_NUM_THREADS says otherwise): the tests' tiny models are all per-op overhead, which several threads
only multiply (they spin waiting for each other, far longer on a busy machine).
"""

import atexit
import os
import shutil
import sys
import tempfile

USER_CACHE = os.environ.get('MINGPT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'mingpt')
TEST_CACHE = tempfile.mkdtemp(prefix='mingpt-test-cache-')
os.environ['MINGPT_CACHE'] = TEST_CACHE
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)

os.environ.setdefault('OMP_NUM_THREADS', '1')  # read when torch is imported, also by subprocesses
if 'torch' in sys.modules:  # imported before this package: set the thread count it read
    sys.modules['torch'].set_num_threads(int(os.environ['OMP_NUM_THREADS']))
