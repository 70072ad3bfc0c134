"""
Tests for mingpt/serve through HTTP: the page and settings, a reply streamed as server-sent events
(the same text the chat engine gives in-process), every limit a clear JSON error with the right
status, and on a real uvicorn server on 127.0.0.1: events arriving while the model still generates,
the event loop answering during generation, generation stopping when the client disconnects, and 8
parallel requests that all complete or get 429, as configured.
"""

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import httpx
from starlette.testclient import TestClient

from mingpt.chat import stream_reply
from mingpt.serve import MAX_MESSAGES, create_app
from tests.common import REPO, python_without, slow
from tests.test_chat import tiny_chat_model


def local_client(app):
    """ Starlette's TestClient addressing the app as a browser on this machine does (its default host,
    'testserver', is not one the server answers) """
    return TestClient(app, base_url='http://127.0.0.1:8000')


def sse_events(lines):
    """ the JSON payloads of an SSE stream's 'data: ' lines """
    return [json.loads(line[6:]) for line in lines if line.startswith('data: ')]


@contextlib.contextmanager
def running_server(app):
    """ serve app with uvicorn on 127.0.0.1 at a free port, in a thread; yields the base URL """
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning',
                                           lifespan='off'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class ServeTestCase(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        # never_stop: greedy replies always run to max_tokens, so a test controls their length
        cls.model, cls.tok = tiny_chat_model(block_size=64, never_stop=True)

    def app(self, **kwargs):
        kwargs.setdefault('max_new_tokens', 2000)
        kwargs.setdefault('temperature', 0.0)
        return create_app(self.model, self.tok, model_name='tiny', **kwargs)

    def assertError(self, response, status, pattern):
        self.assertEqual(response.status_code, status, response.text)
        self.assertRegex(response.json()['error'], pattern)

    def expected(self, messages, n):
        return ''.join(stream_reply(self.model, self.tok, messages, n, temperature=0))


HELLO = [{'role': 'user', 'content': 'Good morrow, sweet lady.'}]


class TestServeHTTP(ServeTestCase):
    """ in-process, through Starlette's TestClient """

    def test_page_is_self_contained(self):
        with local_client(self.app()) as client:
            r = client.get('/')
        self.assertEqual(r.status_code, 200)
        self.assertIn('text/html', r.headers['content-type'])
        for element in ('id="messages"', 'id="input"', 'id="send"', 'id="stop"', 'id="temperature"',
                        'id="max-tokens"', 'AbortController'):
            self.assertIn(element, r.text)
        # no CDN, no external asset of any kind: the page works offline
        self.assertIsNone(re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', r.text))
        self.assertNotIn('@import', r.text)

    def test_config_and_health(self):
        with local_client(self.app(max_new_tokens=300, max_concurrent=3)) as client:
            cfg = client.get('/config').json()
            health = client.get('/health').json()
        self.assertEqual((cfg['model'], cfg['block_size'], cfg['max_new_tokens'], cfg['max_concurrent']),
                         ('tiny', 64, 300, 3))
        self.assertEqual(cfg['defaults']['max_tokens'], 256)
        self.assertEqual((health['status'], health['active'], health['completed']), ('ok', 0, 0))
        self.assertEqual((health['rows'], health['rows_in_use'], health['queued'], health['tokens_per_second']),
                         (3, 0, 0, 0.0))
        # by default, the batch has the machine's number of rows: 16 on a CPU
        with local_client(self.app()) as client:
            self.assertEqual(client.get('/config').json()['max_concurrent'], 16)
            self.assertEqual(client.get('/health').json()['rows'], 16)

    def test_reply_streams_as_events(self):
        messages = [{'role': 'system', 'content': 'You are Juliet.'}] + HELLO
        with local_client(self.app()) as client:
            with client.stream('POST', '/chat', json={'messages': messages, 'max_tokens': 20}) as r:
                self.assertEqual(r.status_code, 200)
                self.assertTrue(r.headers['content-type'].startswith('text/event-stream'))
                events = sse_events(r.iter_lines())
            health = client.get('/health').json()
        tokens = [e['token'] for e in events if 'token' in e]
        self.assertGreater(len(tokens), 1)
        self.assertEqual(''.join(tokens), self.expected(messages, 20))
        done = events[-1]
        self.assertEqual((done['done'], done['finish_reason'], done['tokens']), (True, 'length', 20))
        self.assertEqual(done['prompt_tokens'], len(self.tok.render_for_completion(messages)))
        self.assertEqual((health['completed'], health['tokens'], health['active']), (1, 20, 0))

    def test_sampling_parameters_are_used(self):
        body = {'messages': HELLO, 'max_tokens': 12, 'temperature': 1.3, 'top_k': 40, 'top_p': 0.95,
                'seed': 7}
        with local_client(self.app()) as client:
            a = sse_events(client.post('/chat', json=body).text.splitlines())
            b = sse_events(client.post('/chat', json={**body, 'seed': 8}).text.splitlines())
        text = ''.join(e.get('token', '') for e in a)
        self.assertEqual(text, ''.join(stream_reply(self.model, self.tok, HELLO, 12, temperature=1.3,
                                                    top_k=40, top_p=0.95, seed=7)))
        self.assertNotEqual(text, ''.join(e.get('token', '') for e in b))

    def test_bad_requests_are_clear_errors(self):
        with local_client(self.app(max_new_tokens=100)) as client:
            post = lambda body: client.post('/chat', json=body)
            self.assertError(client.post('/chat', content=b'{not json', headers={'content-type': 'application/json'}),
                             400, 'not valid JSON')
            self.assertError(post([1, 2]), 400, 'JSON object')
            self.assertError(post({'messages': 'hi'}), 400, 'bad messages: .*list of messages')
            self.assertError(post({'messages': [{'role': 'wizard', 'content': 'hi'}]}), 400, "role 'wizard'")
            self.assertError(post({'messages': HELLO + [{'role': 'assistant', 'content': 'x'}]}), 400,
                             'must end with a user message')
            self.assertError(post({'messages': [{'role': 'user', 'content': '  '}]}), 400, 'empty')
            self.assertError(post({'messages': HELLO, 'temperature': -1}), 400, 'temperature must be >= 0')
            self.assertError(post({'messages': HELLO, 'temperature': 'hot'}), 400, 'temperature must be a number')
            self.assertError(post({'messages': HELLO, 'top_p': 1.5}), 400, 'top_p')
            self.assertError(post({'messages': HELLO, 'max_tokens': 101}), 400,
                             r'max_tokens must be between 1 and 100')
            self.assertError(post({'messages': HELLO, 'max_tokens': 0}), 400, 'between 1 and 100')
            self.assertError(post({'messages': HELLO, 'max_tokens': 2.5}), 400, 'integer')
            self.assertEqual(client.get('/chat').status_code, 405)
            self.assertEqual(client.get('/health').json()['active'], 0)

    def test_prompt_limits(self):
        long_message = [{'role': 'user', 'content': 'word ' * 40}]
        with local_client(self.app(max_prompt_tokens=20)) as client:
            r = client.post('/chat', json={'messages': long_message, 'max_tokens': 5})
            self.assertError(r, 413, 'too long: the prompt is \\d+ tokens but at most 20 fit')
            # a long history is fine: its oldest turns are dropped to fit
            history = [{'role': 'user', 'content': 'word ' * 10}, {'role': 'assistant', 'content': 'yes'},
                       {'role': 'user', 'content': 'Hi'}]
            r = client.post('/chat', json={'messages': history, 'max_tokens': 5})
            self.assertEqual(r.status_code, 200, r.text)
            self.assertEqual(sse_events(r.text.splitlines())[-1]['prompt_tokens'],
                             len(self.tok.render_for_completion(history[2:])))
            r = client.post('/chat', content=b' ' * (2 << 20), headers={'content-type': 'application/json'})
            self.assertError(r, 413, 'over 1048576 bytes')
        # the model's context is a limit too: a reply needs room in it
        with local_client(self.app()) as client:
            r = client.post('/chat', json={'messages': [{'role': 'user', 'content': 'word ' * 70}],
                                           'max_tokens': 5})
            self.assertError(r, 413, 'too long')

    def test_busy_is_429(self):
        app = self.app(max_concurrent=1, queue_timeout=0)
        with local_client(app) as client:
            self.assertTrue(app.state.slots.try_acquire())  # someone else is generating
            r = client.post('/chat', json={'messages': HELLO, 'max_tokens': 5})
            self.assertError(r, 429, 'busy.*try again')
            self.assertEqual(r.headers['retry-after'], '1')
            self.assertEqual(client.get('/health').json()['rejected'], 1)
            app.state.slots.release()
            r = client.post('/chat', json={'messages': HELLO, 'max_tokens': 5})
            self.assertEqual(r.status_code, 200)
            self.assertTrue(sse_events(r.text.splitlines())[-1]['done'])


    def test_full_queue_is_429_at_once(self):
        app = self.app(max_concurrent=1, queue_timeout=60)
        with local_client(app) as client:
            self.assertTrue(app.state.slots.try_acquire())  # someone else is generating...
            app.state.slots.waiting = 4  # ...and 4 x max_concurrent more wait for the row
            self.assertEqual(client.get('/health').json()['queued'], 4)
            t0 = time.monotonic()
            r = client.post('/chat', json={'messages': HELLO, 'max_tokens': 5})
            self.assertError(r, 429, 'busy.*4 requests wait')
            self.assertLess(time.monotonic() - t0, 10)  # not after queue_timeout
            app.state.slots.waiting = 0
            app.state.slots.release()
            r = client.post('/chat', json={'messages': HELLO, 'max_tokens': 5})
            self.assertEqual(sse_events(r.text.splitlines())[-1]['tokens'], 5)
        self.assertFalse(app.state.engine.stepper.is_alive())  # the app's shutdown stopped the engine


class TestServeRefuses(ServeTestCase):
    """ what a web page elsewhere, or a careless or hostile client, must not get served """

    def test_only_local_hosts_are_answered(self):
        # DNS rebinding: evil.example resolving to 127.0.0.1 reaches the server with its own name as Host
        app = self.app()
        for base in ('http://evil.example', 'http://127.0.0.1.evil.example:8000', 'http://10.0.0.5:8000'):
            with self.subTest(base=base), TestClient(app, base_url=base) as client:
                for path in ('/', '/config', '/health'):
                    self.assertError(client.get(path), 403, 'does not answer requests for host')
                self.assertError(client.post('/chat', json={'messages': HELLO}), 403, 'host')
        for base in ('http://127.0.0.1:8000', 'http://localhost:1234', 'http://[::1]:8000', 'http://LOCALHOST'):
            with self.subTest(base=base), TestClient(app, base_url=base) as client:
                self.assertEqual(client.get('/health').status_code, 200)
        with TestClient(self.app(allowed_hosts=['myhost']), base_url='http://myhost:8000') as client:
            self.assertEqual(client.get('/health').status_code, 200)
        with TestClient(self.app(allowed_hosts=None), base_url='http://anything.example') as client:
            self.assertEqual(client.get('/health').status_code, 200)

    def test_cross_origin_and_non_json_posts_are_refused(self):
        body = json.dumps({'messages': HELLO, 'max_tokens': 3})
        with local_client(self.app()) as client:
            # what a form or fetch on another site sends: no preflight for text/plain
            r = client.post('/chat', content=body, headers={'content-type': 'text/plain',
                                                             'origin': 'http://evil.example'})
            self.assertError(r, 403, "cross-origin request from 'http://evil.example' refused")
            r = client.post('/chat', content=body, headers={'content-type': 'text/plain'})
            self.assertError(r, 415, 'application/json')
            self.assertError(client.post('/chat', content=body), 415, 'application/json')
            # the page itself: same origin, JSON
            r = client.post('/chat', content=body, headers={'content-type': 'application/json; charset=utf-8',
                                                             'origin': 'http://127.0.0.1:8000'})
            self.assertEqual(r.status_code, 200, r.text)
            self.assertTrue(sse_events(r.text.splitlines())[-1]['done'])
            self.assertEqual(client.get('/health').json()['completed'], 1)

    def test_too_many_messages_is_413(self):
        turns = [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}] * (MAX_MESSAGES // 2)
        with local_client(self.app()) as client:
            r = client.post('/chat', json={'messages': turns + HELLO, 'max_tokens': 3})
            self.assertError(r, 413, f'{MAX_MESSAGES + 1} messages; at most {MAX_MESSAGES}')
            r = client.post('/chat', json={'messages': turns[2:] + HELLO, 'max_tokens': 3})
            self.assertEqual(r.status_code, 200, r.text)

    def test_chunked_body_over_the_limit_is_413_without_reading_it_all(self):
        app, received = self.app(), []

        async def counting(scope, receive, send):  # the app, counting the body bytes it reads
            async def counted_receive():
                message = await receive()
                received.append(len(message.get('body', b'')))
                return message
            await app(scope, counted_receive, send)

        def body():  # a chunked upload (no Content-Length) of 50 MB
            for _ in range(50 * 16):
                yield b' ' * (1 << 16)
        with running_server(counting) as url, httpx.Client(base_url=url, timeout=60) as client:
            try:
                r = client.post('/chat', content=body(), headers={'content-type': 'application/json'})
                self.assertError(r, 413, 'over 1048576 bytes')
            except httpx.HTTPError:
                pass  # the server may close the connection before the client has sent everything
            self.assertEqual(client.get('/health').json()['status'], 'ok')
        self.assertLess(sum(received), 2 << 20)  # it stopped reading soon after 1 MB, not at 50 MB

    def test_every_malformed_body_is_a_4xx_naming_the_field(self):
        deep = b'{"messages": ' + b'[' * 100_000 + b']' * 100_000 + b'}'
        cjk = ''.join(chr(0x4e00 + (i * 7919) % 20000) for i in range(300_000))  # 300k characters, no spaces
        cases = [  # (body, status, what the message must say)
            (deep, 400, 'nested too deeply'),
            ({'messages': [{'role': ['user'], 'content': 'hi'}]}, 400, r"message 0 has role \['user'\]"),
            ({'messages': [{'role': {'a': 1}, 'content': 'hi'}]}, 400, 'message 0 has role'),
            ({'messages': [{'role': 'user', 'content': {'text': 'hi'}}]}, 400, 'content of type dict'),
            ({'messages': ['hi']}, 400, "message 0 must be a dict with 'role' and 'content'"),
            ({'messages': HELLO, 'max_tokens': 10 ** 400}, 400, 'max_tokens is out of range'),
            ({'messages': HELLO, 'max_tokens': 1e400}, 400, 'max_tokens must be an integer'),
            ({'messages': HELLO, 'seed': 2 ** 64}, 400, 'seed is out of range'),
            ({'messages': HELLO, 'seed': 2 ** 63 + 1}, None, None),  # in range: fine
            ({'messages': HELLO, 'seed': -1.5}, 400, 'seed must be an integer'),
            ({'messages': HELLO, 'temperature': 1e400}, 400, 'temperature must be a number'),
            ({'messages': HELLO, 'temperature': 1e-300}, None, None),  # greedy, not a failure
            ({'messages': HELLO, 'top_k': '5'}, 400, 'top_k must be an integer'),
            ({'messages': HELLO, 'top_p': True}, 400, 'top_p must be a number'),
            ({'messages': HELLO, 'temprature': 0.5}, 400, "unknown field 'temprature'; the fields are messages"),
            ({'messages': [{'role': 'user', 'content': cjk}]}, 413, 'message 0 is 300000 characters long'),
        ]
        with local_client(self.app(max_new_tokens=100)) as client:
            for body, status, pattern in cases:
                with self.subTest(body=str(body)[:80]):
                    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
                    t0 = time.monotonic()
                    r = client.post('/chat', content=content, headers={'content-type': 'application/json'})
                    if status is None:
                        self.assertEqual(r.status_code, 200, r.text)
                        self.assertTrue(sse_events(r.text.splitlines())[-1]['done'])
                    else:
                        self.assertError(r, status, pattern)
                        self.assertLess(time.monotonic() - t0, 5)  # refused before any costly work
            self.assertEqual(client.get('/health').json()['failed'], 0)

    def test_hostile_requests_never_hold_up_a_normal_chat(self):
        # while clients send what costs the most to refuse (a 1 MB message of one unbroken CJK
        # run, JSON nested 100k deep), a normal chat is answered and /health stays quick
        cjk = ''.join(chr(0x4e00 + (i * 7919) % 20000) for i in range(340_000))
        hostile = [json.dumps({'messages': [{'role': 'user', 'content': cjk}]}, ensure_ascii=False).encode(),
                   b'{"messages": ' + b'[' * 400_000 + b']' * 400_000 + b'}']
        self.assertTrue(all(len(body) <= 1 << 20 for body in hostile))
        with running_server(self.app()) as url, httpx.Client(base_url=url, timeout=60) as client:
            statuses, stop = [], threading.Event()

            def attack(body):
                while not stop.is_set():
                    statuses.append(client.post('/chat', content=body,
                                                headers={'content-type': 'application/json'}).status_code)
            attackers = [threading.Thread(target=attack, args=(body,)) for body in hostile]
            for t in attackers:
                t.start()
            try:
                latencies = []
                for _ in range(10):
                    t = time.monotonic()
                    self.assertEqual(client.get('/health').status_code, 200)
                    latencies.append(time.monotonic() - t)
                t0 = time.monotonic()
                r = client.post('/chat', json={'messages': HELLO, 'max_tokens': 20})
                chat_seconds = time.monotonic() - t0
            finally:
                stop.set()
                for t in attackers:
                    t.join(60)
        self.assertEqual(sse_events(r.text.splitlines())[-1]['tokens'], 20)
        self.assertLess(chat_seconds, 10)
        self.assertLess(max(latencies), 1.0, sorted(latencies))
        self.assertTrue(statuses and set(statuses) <= {400, 413}, set(statuses))

    def test_cli_shows_no_path_checks_port_and_allowed_hosts(self):
        from mingpt.serve import __main__ as serve  # the command
        apps = []
        with mock.patch.object(serve, 'load_chat_model', lambda path, device: (self.model, self.tok)), \
                mock.patch.object(serve, 'run_server', lambda app, host, port: apps.append((app, host, port)) or True):
            with self.assertNoLogs('mingpt.serve', level='WARNING'):
                serve.main(['--model', '/home/someone/secret/mymodel', '--port', '8123'])
            with self.assertLogs('mingpt.serve', level='WARNING') as logs:
                serve.main(['--model', 'm', '--host', '0.0.0.0', '--allowed-hosts', 'box.lan, other'])
            self.assertIn('--host 0.0.0.0: any machine that can reach this one on port 8000 can now use the chat',
                          logs.output[0])
            serve.main(['--model', 'm', '--max-queue', '0'])
        (app, host, port), (lan_app, _, _), (no_queue_app, _, _) = apps
        self.assertEqual(no_queue_app.state.slots.max_waiting, 0)
        self.assertEqual((host, port), ('127.0.0.1', 8123))
        for a in (app, lan_app):  # run_server would step their engines: here, a thread does
            threading.Thread(target=a.state.engine.run, daemon=True).start()
        with local_client(app) as client:
            r = client.get('/config')
        self.assertEqual(r.json()['model'], 'mymodel')
        self.assertNotIn('secret', r.text)
        with TestClient(lan_app, base_url='http://box.lan:8000') as client:
            self.assertEqual(client.get('/health').status_code, 200)
        with TestClient(lan_app, base_url='http://0.0.0.0:8000') as client:
            self.assertEqual(client.get('/health').status_code, 403)
        for port in ('99999', '0', 'http'):
            with self.subTest(port=port), mock.patch('sys.stderr', new_callable=io.StringIO) as err:
                with self.assertRaises(SystemExit) as cm:
                    serve.main(['--model', 'm', '--port', port])
                self.assertEqual(cm.exception.code, 2)
                self.assertIn(f"{port!r} is not a port number (1 to 65535)", err.getvalue())
                self.assertNotIn('Traceback', err.getvalue())


class TestServeCommand(unittest.TestCase):
    """ python -m mingpt.serve for real: the steps in its main thread, HTTP in another (run_server) """

    @slow
    def test_serves_then_shuts_down_on_sigterm_and_reports_bind_errors(self):
        import signal
        import socket
        import tempfile
        from tests.test_chat import make_chat_model_dir
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as busy:
            model_dir = make_chat_model_dir(os.path.join(tmp, 'model'), block_size=64)
            busy.bind(('127.0.0.1', 0))
            busy.listen()
            port = busy.getsockname()[1]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
            command = [sys.executable, '-m', 'mingpt.serve', '--model', str(model_dir), '--temperature', '0']
            # a port in use: one error line, status 2, once the server has given up
            proc = subprocess.run(command + ['--port', str(port)], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=120)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f"error: cannot serve on 127.0.0.1:{port}: Address already in use; another program "
                          "is using the port", proc.stderr)
            self.assertNotIn('Traceback', proc.stderr)
            # an address this machine does not have (TEST-NET-1: binding it sends nothing anywhere)
            proc = subprocess.run(command + ['--host', '192.0.2.1', '--port', str(port)], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=120)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn("error: cannot serve on 192.0.2.1", proc.stderr)
            self.assertIn("this machine has no such address", proc.stderr)
            self.assertIn("can now use the chat", proc.stderr)  # the warning of a non-loopback --host
            busy.close()
            proc = subprocess.Popen(command + ['--port', str(port)], cwd=REPO, env=env, stderr=subprocess.PIPE,
                                    text=True)
            try:
                url = f'http://127.0.0.1:{port}'
                deadline = time.monotonic() + 120
                while True:
                    self.assertIsNone(proc.poll(), "the server exited before answering")
                    try:
                        if httpx.get(url + '/health', timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        self.assertLess(time.monotonic(), deadline, "the server did not answer within 120 s")
                        time.sleep(0.2)
                # two replies at once, from the engine stepped in the main thread
                with ThreadPoolExecutor(2) as pool:
                    replies = list(pool.map(lambda text: httpx.post(
                        url + '/chat', json={'messages': [{'role': 'user', 'content': text}], 'max_tokens': 5},
                        timeout=60), ['hello', 'to be or not']))
                for r in replies:
                    self.assertEqual(r.status_code, 200, r.text)
                    self.assertEqual(sse_events(r.text.splitlines())[-1]['done'], True)
                # SIGTERM in the middle of a long reply: a graceful shutdown within seconds
                long_reply = threading.Thread(target=lambda: httpx.post(
                    url + '/chat', json={'messages': HELLO, 'max_tokens': 2000}, timeout=60))
                long_reply.start()
                wait_until(lambda: httpx.get(url + '/health', timeout=5).json()['rows_in_use'] == 1)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(60), 0)  # the steps end with the server
                self.assertLess(time.monotonic() - t0, 10)
                long_reply.join(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            proc.stderr.close()


class TestServeWithoutItsPackages(ServeTestCase):
    """ starlette and uvicorn are optional: without them, one line says what to install """

    @slow
    def test_cli_says_what_to_install_in_one_line(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
        proc = subprocess.run([*python_without('starlette', 'uvicorn'), '-m', 'mingpt.serve', '--model', 'gpt2'],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertEqual(proc.stderr.count('\n'), 1, proc.stderr)
        self.assertTrue(proc.stderr.startswith('error: '), proc.stderr)
        self.assertIn("pip install -e '.[serve]'", proc.stderr)

    def test_create_app_says_what_to_install(self):
        import mingpt.serve
        with mock.patch.object(mingpt.serve, 'Starlette', None), self.assertRaises(ImportError) as cm:
            self.app()  # as when the import of starlette failed
        self.assertIn('pip install starlette uvicorn', str(cm.exception))


class TestServeUvicorn(ServeTestCase):
    """ a real server on 127.0.0.1, real connections """

    def test_events_arrive_while_generating_and_disconnect_stops_it(self):
        app = self.app()
        with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            body = {'messages': HELLO, 'max_tokens': 2000}  # ~seconds of generation
            with client.stream('POST', '/chat', json=body) as r:
                self.assertEqual(r.status_code, 200)
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith('data: '))
                self.assertIn('token', json.loads(first[6:]))
                # the first event came while the generation is still running: it was streamed
                t0 = time.monotonic()
                health = client.get('/health').json()
                self.assertLess(time.monotonic() - t0, 2.0, "the event loop is blocked by generation")
                self.assertEqual((health['active'], health['rows_in_use']), (1, 1))
                self.assertGreater(health['tokens_per_second'], 0)
                second = next(line for line in lines if line.startswith('data: '))
                self.assertIn('token', json.loads(second[6:]))
            # closing the response disconnects: the server stops generating long before 2000 tokens
            health = wait_until(lambda: (h := client.get('/health').json())['active'] == 0 and h)
            self.assertTrue(health, "generation went on after the client disconnected")
            self.assertEqual((health['cancelled'], health['completed'], health['rows_in_use']), (1, 0, 0))
            self.assertLess(health['tokens'], 2000)
            # and the freed slot serves the next request
            r = client.post('/chat', json={'messages': HELLO, 'max_tokens': 8})
            self.assertEqual(sse_events(r.text.splitlines())[-1]['tokens'], 8)

    def parallel(self, url, n=8, max_tokens=100):
        def one(i):
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post('/chat', json={'messages': [{'role': 'user', 'content': f'Request {i}'}],
                                          'max_tokens': max_tokens})
                return r.status_code, (sse_events(r.text.splitlines()) if r.status_code == 200
                                       else r.json())
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    def assertCompleted(self, result, i, max_tokens):
        status, events = result
        self.assertEqual(status, 200)
        self.assertEqual(events[-1].get('tokens'), max_tokens, events[-1])
        text = ''.join(e.get('token', '') for e in events)
        self.assertEqual(text, self.expected([{'role': 'user', 'content': f'Request {i}'}], max_tokens))

    @slow
    def test_parallel_requests_all_complete(self):
        app = self.app(max_concurrent=8)
        with running_server(app) as url:
            results = self.parallel(url)
            health = httpx.get(url + '/health').json()
        for i, result in enumerate(results):
            self.assertCompleted(result, i, 100)
        self.assertEqual((health['completed'], health['rejected'], health['active']), (8, 0, 0))
        self.assertLessEqual(health['peak_active'], 8)

    def test_parallel_requests_wait_for_a_slot(self):
        app = self.app(max_concurrent=2, queue_timeout=120)
        with running_server(app) as url:
            results = self.parallel(url, max_tokens=40)
            health = httpx.get(url + '/health').json()
        for i, result in enumerate(results):
            self.assertCompleted(result, i, 40)
        self.assertEqual((health['completed'], health['rejected']), (8, 0))
        self.assertEqual(health['peak_active'], 2)  # never more at once

    @slow
    def test_parallel_requests_over_the_limit_get_429(self):
        app = self.app(max_concurrent=2, queue_timeout=0)
        with running_server(app) as url:
            results = self.parallel(url, max_tokens=400)
            health = httpx.get(url + '/health').json()
        done = [i for i, (status, _) in enumerate(results) if status == 200]
        busy = [i for i, (status, _) in enumerate(results) if status == 429]
        self.assertEqual(len(done) + len(busy), 8, results)
        self.assertGreaterEqual(len(done), 1)
        self.assertGreaterEqual(len(busy), 1)
        for i in done:
            self.assertCompleted(results[i], i, 400)
        for i in busy:
            self.assertIn('busy', results[i][1]['error'])
        self.assertEqual((health['completed'], health['rejected']), (len(done), len(busy)))
        self.assertLessEqual(health['peak_active'], 2)


if __name__ == '__main__':
    unittest.main()
