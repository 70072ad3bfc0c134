"""
The test suite. Importing it (pytest and `python -m unittest discover tests` both do, first) points
mingpt's cache at a fresh temporary directory, for this process and every subprocess a test starts:
no test reads or writes the user's ~/.cache/mingpt.
"""

import atexit
import os
import shutil
import tempfile

USER_CACHE = os.environ.get('MINGPT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'mingpt')
TEST_CACHE = tempfile.mkdtemp(prefix='mingpt-test-cache-')
os.environ['MINGPT_CACHE'] = TEST_CACHE
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
