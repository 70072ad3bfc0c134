"""
The web chat end to end in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright against mingpt.serve on 127.0.0.1. A message typed in the page gets a reply streamed into
the conversation (the text the chat engine gives in-process), Stop ends a reply and the server stops
generating, and an error from the server is shown in the page. Screenshots go to
$MINGPT_TEST_ARTIFACTS (default: <tmp>/mingpt-test-artifacts); the path is logged.

Without Chromium (or Playwright's Python package) the test skips, saying what to install; under CI
(CI=true), which installs both, it fails instead, so a broken install never hides behind a skip.
Playwright's own browser download is never used.
"""

import logging
import os
import shutil
import tempfile
import unittest
from pathlib import Path

import httpx

from mingpt.chat import stream_reply
from mingpt.serve import create_app
from tests.test_chat import tiny_chat_model
from tests.common import slow
from tests.test_serve import running_server, wait_until

logger = logging.getLogger(__name__)

CHROMIUM = os.environ.get('MINGPT_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
ARTIFACTS = Path(os.environ.get('MINGPT_TEST_ARTIFACTS', Path(tempfile.gettempdir()) / 'mingpt-test-artifacts'))


def chromium_path():
    path = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which('chromium')
    if path is None:
        missing(f"Chromium is not installed (looked for {CHROMIUM} and `chromium` on PATH): apt-get install "
                "chromium, or set MINGPT_CHROMIUM to a Chromium binary")
    return path


def missing(what):
    """ a browser requirement is absent: skip with the reason, except under CI, which must have it """
    if os.environ.get('CI') == 'true':
        raise AssertionError(what)
    raise unittest.SkipTest(what)


@slow
class TestChatPageInBrowser(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing("the browser test needs Playwright's Python package: pip install playwright (its "
                    "bundled browsers are not needed: do not run `playwright install`; Debian's chromium "
                    "is used)")
        executable = chromium_path()
        cls.model, cls.tok = tiny_chat_model(block_size=64, never_stop=True)
        # greedy by default, so the page's reply is known in advance
        cls.app = create_app(cls.model, cls.tok, model_name='tiny-test-model', max_new_tokens=3000,
                             temperature=0.0, default_max_tokens=24)
        cls._server = running_server(cls.app)
        cls.url = cls._server.__enter__()
        cls._pw = sync_playwright().start()
        cls.browser = cls._pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls._pw.stop()
        cls._server.__exit__(None, None, None)

    def setUp(self):
        self.page = self.browser.new_page(viewport={'width': 1000, 'height': 700})
        self.addCleanup(self.page.close)
        self.page.set_default_timeout(60_000)
        self.page.goto(self.url)
        # the settings came from /config
        self.page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny-test-model')")

    def screenshot(self, name):
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        logger.warning("screenshot saved to %s", path)
        print(f"screenshot: {path}")
        return path

    def send(self, text):
        self.page.fill('#input', text)
        self.page.press('#input', 'Enter')

    def health(self):
        return httpx.get(self.url + '/health').json()

    def test_message_gets_a_streamed_reply(self):
        page = self.page
        self.assertEqual(page.input_value('#temperature'), '0')
        self.assertEqual(page.input_value('#max-tokens'), '24')
        self.send('Good morrow, sweet lady.')
        page.wait_for_selector('.msg.assistant .meta')  # the done event arrived
        self.assertEqual(page.get_attribute('body', 'data-state'), 'idle')
        self.assertEqual(page.inner_text('.msg.user'), 'Good morrow, sweet lady.')
        reply = page.eval_on_selector('.msg.assistant', 'el => el.firstChild.textContent')
        expected = ''.join(stream_reply(self.model, self.tok, [{'role': 'user', 'content': 'Good morrow, sweet lady.'}],
                                        24, temperature=0))
        self.assertEqual(reply, expected)
        self.assertIn('24 tokens', page.inner_text('.msg.assistant .meta'))
        # a second message carries the conversation: the server saw both turns
        self.send('And what of it?')
        page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2")
        second = page.eval_on_selector_all('.msg.assistant', 'els => els[1].firstChild.textContent')
        history = [{'role': 'user', 'content': 'Good morrow, sweet lady.'}, {'role': 'assistant', 'content': reply},
                   {'role': 'user', 'content': 'And what of it?'}]
        self.assertEqual(second, ''.join(stream_reply(self.model, self.tok, history, 24, temperature=0)))
        path = self.screenshot('chat_reply.png')
        self.assertGreater(path.stat().st_size, 5000)

    def test_reply_streams_and_stop_ends_it(self):
        page = self.page
        before = self.health()
        page.fill('#max-tokens', '3000')  # many seconds of generation, unless stopped
        self.send('Speak on, speak on.')
        page.wait_for_selector('body[data-state=generating]')
        # the reply grows while it is being generated: streamed, not delivered at the end
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0")
        first = len(page.inner_text('.msg.assistant'))
        page.wait_for_function(f"document.querySelector('.msg.assistant').textContent.length > {first}")
        self.assertEqual(page.get_attribute('body', 'data-state'), 'generating',
                         page.inner_text('#messages')[-500:])
        self.assertTrue(page.is_enabled('#stop'))
        self.assertFalse(page.is_enabled('#send'))
        self.screenshot('chat_streaming.png')
        page.click('#stop')
        page.wait_for_selector('body[data-state=idle]')
        self.assertIn('stopped', page.get_attribute('.msg.assistant', 'class'))
        # the server noticed the closed connection and stopped generating for nobody
        health = wait_until(lambda: (h := self.health())['active'] == 0 and h)
        self.assertTrue(health, "the server kept generating after Stop")
        self.assertEqual(health['cancelled'], before['cancelled'] + 1)
        self.assertLess(health['tokens'] - before['tokens'], 3000)

    def test_server_errors_are_shown(self):
        page = self.page
        page.fill('#max-tokens', '999999')
        self.send('Too much, too much.')
        page.wait_for_selector('.msg.error')
        self.assertIn('max_tokens must be between 1 and 3000', page.inner_text('.msg.error'))
        # the message went back to the input box, and out of the conversation
        self.assertEqual(page.input_value('#input'), 'Too much, too much.')
        self.assertEqual(page.get_attribute('body', 'data-state'), 'idle')
        self.assertEqual(page.locator('.msg.assistant').count(), 0)
        self.assertEqual(page.locator('.msg.user').count(), 0)
        self.screenshot('chat_error.png')
        # New chat clears the view
        page.click('#new-chat')
        self.assertEqual(page.locator('.msg').count(), 0)


if __name__ == '__main__':
    unittest.main()
