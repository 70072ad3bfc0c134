"""Tests for mingpt/download.py against a local HTTP server on 127.0.0.1 (no internet needed)."""

import hashlib
import os
import tempfile
import threading
import unittest
from pathlib import Path

from mingpt import download as dl
from mingpt.errors import MinGPTError
from mingpt.download import DownloadError, cache_dir, cached_download, download, sha256sum
from tests.common import (RangeRequestHandler, TempDirTestCase, data_file, free_port_url, local_http_server,
                          needs_shared_data, patched_env)

PAYLOAD = os.urandom(300_000)  # a few chunks of the server's copy buffer, and not a multiple of them
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class NoRangeHandler(RangeRequestHandler):
    range_requests = False


class DropFirstHandler(RangeRequestHandler):
    """Announces the whole file but hangs up halfway through the first response, like a flaky network."""
    dropped = False

    def copyfile(self, source, outputfile):
        if not DropFirstHandler.dropped:
            DropFirstHandler.dropped = True
            outputfile.write(source.read(len(PAYLOAD) // 2))
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


class DownloadTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.served = self.tmp / 'served'
        self.served.mkdir()
        (self.served / 'blob.bin').write_bytes(PAYLOAD)
        self.dest = self.tmp / 'out' / 'blob.bin'
        self.part = self.dest.with_name('blob.bin.part')
        self.log = []

    def serve(self, handler=RangeRequestHandler):
        return local_http_server(self.served, handler_class=handler, requests_log=self.log)

    def test_download_writes_file_and_no_part(self):
        with self.serve() as url:
            path = download(f'{url}/blob.bin', self.dest, sha256=PAYLOAD_SHA, expected_size=len(PAYLOAD))
        self.assertEqual(path, self.dest)
        self.assertEqual(self.dest.read_bytes(), PAYLOAD)
        self.assertFalse(self.part.exists())
        self.assertNotIn('Range', self.log[0][2])  # nothing to resume: a plain GET

    def test_sha256_mismatch_raises_and_leaves_nothing(self):
        with self.serve() as url, self.assertRaises(DownloadError) as cm:
            download(f'{url}/blob.bin', self.dest, sha256='0' * 64)
        self.assertIn('sha256 mismatch', str(cm.exception))
        self.assertIn(PAYLOAD_SHA, str(cm.exception))  # says what it got
        self.assertFalse(self.dest.exists())
        self.assertFalse(self.part.exists())

    def test_expected_size_mismatch_raises_and_leaves_nothing(self):
        with self.serve() as url, self.assertRaises(DownloadError) as cm:
            download(f'{url}/blob.bin', self.dest, expected_size=len(PAYLOAD) + 1)
        self.assertIn(str(len(PAYLOAD) + 1), str(cm.exception))
        self.assertFalse(self.dest.exists())
        self.assertFalse(self.part.exists())

    def test_resumes_part_file_with_range_request(self):
        self.dest.parent.mkdir()
        self.part.write_bytes(PAYLOAD[:100_000])
        with self.serve() as url:
            download(f'{url}/blob.bin', self.dest, sha256=PAYLOAD_SHA)
        self.assertEqual(self.dest.read_bytes(), PAYLOAD)
        self.assertEqual(len(self.log), 1)
        self.assertEqual(self.log[0][2].get('Range'), 'bytes=100000-')
        self.assertFalse(self.part.exists())

    def test_server_without_range_support_starts_over(self):
        self.dest.parent.mkdir()
        self.part.write_bytes(b'x' * 1000)  # would corrupt the file if it were appended to
        with self.serve(NoRangeHandler) as url:
            download(f'{url}/blob.bin', self.dest, sha256=PAYLOAD_SHA)
        self.assertEqual(self.dest.read_bytes(), PAYLOAD)

    def test_part_longer_than_file_starts_over(self):
        self.dest.parent.mkdir()
        self.part.write_bytes(b'x' * (len(PAYLOAD) + 10))  # server answers 416
        with self.serve() as url:
            download(f'{url}/blob.bin', self.dest, sha256=PAYLOAD_SHA)
        self.assertEqual(self.dest.read_bytes(), PAYLOAD)
        self.assertEqual([h.get('Range') for _, _, h in self.log], [f'bytes={len(PAYLOAD) + 10}-', None])

    def test_complete_part_file_is_used(self):
        # stopped after the last byte but before the rename: the server has nothing more to send (416)
        self.dest.parent.mkdir()
        self.part.write_bytes(PAYLOAD)
        with self.serve() as url:
            download(f'{url}/blob.bin', self.dest, sha256=PAYLOAD_SHA)
        self.assertEqual(self.dest.read_bytes(), PAYLOAD)
        self.assertEqual(len(self.log), 1)

    def test_dropped_connection_is_resumed(self):
        DropFirstHandler.dropped = False
        with self.serve(DropFirstHandler) as url:
            download(f'{url}/blob.bin', self.dest, sha256=PAYLOAD_SHA)
        self.assertTrue(DropFirstHandler.dropped)
        self.assertEqual(self.dest.read_bytes(), PAYLOAD)
        self.assertEqual(len(self.log), 2)
        # resumed from the last whole chunk received before the drop, not from zero
        resumed_at = int(self.log[1][2]['Range'].removeprefix('bytes=').removesuffix('-'))
        self.assertTrue(0 < resumed_at <= len(PAYLOAD) // 2, resumed_at)

    def test_server_down_raises_clear_error(self):
        url = f'{free_port_url()}/blob.bin'
        with self.assertRaises(DownloadError) as cm:
            download(url, self.dest)
        msg = str(cm.exception)
        self.assertIn(url, msg)
        self.assertIn(str(self.dest), msg)  # where to put the file by hand
        self.assertIn('MINGPT_CACHE', msg)
        self.assertFalse(self.dest.exists())
        self.assertIsInstance(cm.exception, OSError)  # what a caller catches for files and the network
        self.assertIsInstance(cm.exception, MinGPTError)
        self.assertEqual(list(self.dest.parent.glob('*.lock')), [])  # no lock file left behind

    def test_http_error_raises(self):
        with self.serve() as url, self.assertRaises(DownloadError) as cm:
            download(f'{url}/missing.bin', self.dest)
        self.assertIn('404', str(cm.exception))
        self.assertFalse(self.dest.exists())

    def test_sha256sum(self):
        path = self.served / 'blob.bin'
        self.assertEqual(sha256sum(path), PAYLOAD_SHA)


class CacheTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.served = self.tmp / 'served'
        self.served.mkdir()
        (self.served / 'blob.bin').write_bytes(PAYLOAD)
        self.cache = self.tmp / 'cache'
        env = patched_env(MINGPT_CACHE=self.cache)
        env.__enter__()
        self.addCleanup(env.__exit__, None, None, None)

    def test_cache_dir_from_env_and_default(self):
        self.assertEqual(cache_dir(), self.cache)
        self.assertTrue(self.cache.is_dir())  # created on demand
        with patched_env(MINGPT_CACHE=None, HOME=self.tmp / 'home'):
            self.assertEqual(cache_dir(), self.tmp / 'home' / '.cache' / 'mingpt')
            self.assertTrue(cache_dir().is_dir())

    def test_cached_file_is_reused_without_network(self):
        with local_http_server(self.served) as url:
            path = cached_download(f'{url}/blob.bin', 'blob.bin', sha256=PAYLOAD_SHA, subdir='sub')
        self.assertEqual(path, self.cache / 'sub' / 'blob.bin')
        self.assertEqual(path.read_bytes(), PAYLOAD)
        dead = f'{free_port_url()}/blob.bin'  # nothing listens there any more
        self.assertEqual(cached_download(dead, 'blob.bin', sha256=PAYLOAD_SHA, subdir='sub'), path)
        self.assertEqual(cached_download(dead, 'blob.bin', subdir='sub'), path)

    def test_corrupt_cached_file_is_downloaded_again(self):
        path = self.cache / 'blob.bin'
        path.parent.mkdir(parents=True)
        path.write_bytes(b'corrupt')
        log = []
        with local_http_server(self.served, requests_log=log) as url:
            self.assertEqual(cached_download(f'{url}/blob.bin', 'blob.bin', sha256=PAYLOAD_SHA), path)
        self.assertEqual(len(log), 1)
        self.assertEqual(path.read_bytes(), PAYLOAD)

    def test_concurrent_downloads_fetch_once_and_leave_no_lock(self):
        # eight threads ask for the same file at once: the lock makes one of them download it, the
        # others find it complete; the lock file is removed afterwards
        log, results = [], []
        with local_http_server(self.served, requests_log=log) as url:
            threads = [threading.Thread(target=lambda: results.append(
                cached_download(f'{url}/blob.bin', 'blob.bin', sha256=PAYLOAD_SHA))) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.assertEqual(results, [self.cache / 'blob.bin'] * 8)
        self.assertEqual(len(log), 1)
        self.assertEqual((self.cache / 'blob.bin').read_bytes(), PAYLOAD)
        self.assertEqual(sorted(p.name for p in self.cache.iterdir()), ['blob.bin'])

    def test_gpt2_url_override(self):
        with patched_env(MINGPT_GPT2_BASE_URL=None):
            self.assertEqual(dl.gpt2_url('models/124M/encoder.json'),
                             'https://openaipublic.blob.core.windows.net/gpt-2/models/124M/encoder.json')
        with patched_env(MINGPT_GPT2_BASE_URL='http://127.0.0.1:1/mirror/'):
            self.assertEqual(dl.gpt2_url('models/124M/vocab.bpe'), 'http://127.0.0.1:1/mirror/models/124M/vocab.bpe')

    @needs_shared_data('tinyshakespeare.txt')
    def test_tiny_shakespeare(self):
        source = data_file('tinyshakespeare.txt')
        (self.served / 'input.txt').write_bytes(source.read_bytes())
        with local_http_server(self.served) as url, patched_env(MINGPT_TINYSHAKESPEARE_URL=f'{url}/input.txt'):
            path = dl.get_tiny_shakespeare()
        self.assertEqual(path, self.cache / 'datasets' / 'tinyshakespeare.txt')
        self.assertEqual(sha256sum(path), dl.TINY_SHAKESPEARE_SHA256)
        self.assertEqual(len(path.read_text(encoding='utf-8')), 1115394)
        with self.assertRaises(ValueError) as cm:
            dl.get_dataset('nope')
        self.assertIn('tinyshakespeare', str(cm.exception))


class SuiteIsolationTest(unittest.TestCase):

    def test_the_suite_never_uses_the_users_cache(self):
        import tests  # its import gave this process (and its subprocesses) a temporary cache
        self.assertEqual(os.environ['MINGPT_CACHE'], tests.TEST_CACHE)
        self.assertEqual(cache_dir(), Path(tests.TEST_CACHE))
        self.assertNotEqual(Path(tests.TEST_CACHE).resolve(), Path(tests.USER_CACHE).resolve())
        self.assertTrue(Path(tests.TEST_CACHE).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()))


if __name__ == '__main__':
    unittest.main()
