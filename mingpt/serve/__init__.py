"""
Web chat: a small ASGI app (Starlette, served by uvicorn) with one page, mingpt/static/chat.html.

    pip install starlette uvicorn        # or: pip install -e '.[serve]'
    python -m mingpt.serve --model out/chat/sft/model
    # then open http://127.0.0.1:8000

The server keeps no conversation: the page sends the whole conversation with every message, and the
reply streams back as server-sent events, one per piece of text (mingpt.chat.stream_reply, cut at the
end of the turn, never splitting a UTF-8 character).

    GET  /          the page
    GET  /config    limits and defaults, for the page's settings
    GET  /health    {"status": "ok", "active", "completed", "cancelled", ..., "rows", "rows_in_use",
                     "queued", "tokens_per_second"}
    POST /chat      {"messages": [...], "temperature": 0.8, "max_tokens": 256, "top_k": 50,
                     "top_p": null, "seed": null}  ->  text/event-stream of
                    data: {"token": "..."}  ...  then  data: {"done": true, "finish_reason": "stop"|
                    "length", "tokens": n, ...}  or  data: {"error": "..."}  if generation failed midway

Errors a user can cause are JSON {"error": "what is wrong and what to do"} with a status: 400 (a bad
request: the message names the field), 403 (a Host or Origin this server does not answer), 413 (a
body over 1 MB, more than MAX_MESSAGES messages, a message longer than CHARS_PER_TOKEN characters per
token of the prompt limit, or one that does not fit the prompt limit or the model's context), 415 (a
/chat body that is not application/json), 429 (every row stayed busy for --queue-timeout seconds, or
--max-queue requests wait already: then at once; Retry-After says when to try again).

Every limit is checked before the work it bounds: the body's size as it arrives, the messages'
lengths in characters before any is tokenized, so a request costs at most a few hundred milliseconds
of preparation whatever it holds. One reply's failure (its sampling, its forward, turning its tokens
into text) ends that reply with an error event; the others run on (mingpt.decoder).

Any web page the user visits could send requests to a server on localhost. So the server answers only
requests whose Host is a name of this machine's loopback (or one given with --allowed-hosts), which
defeats DNS rebinding; refuses a request whose Origin is not its own; takes /chat bodies only as
application/json, which a cross-origin page cannot send without the browser asking first; and /config
names the model without its path.

Replies are generated together, in one mingpt.batching.BatchEngine of --max-concurrent rows: each of
its steps decodes a token of every running reply in one forward (python -m mingpt.serve steps in its
main thread and answers HTTP in another: run_server). Rendering a conversation runs in a
worker thread and each reply's tokens become text in a thread of its own, so the event loop keeps
serving (and noticing disconnects) while the model computes. Parsing a request is a plain function
(parse_chat_request); ChatServer's methods are the handlers; create_app wires them to routes. A client that goes away (the page's Stop
button) leaves the batch at the next step, freeing its row. The server binds to 127.0.0.1 by default:
it has no authentication, so expose it (--host 0.0.0.0) only on purpose.
"""

import asyncio
import contextlib
import errno
import json
import logging
import math
import signal
import socket
import threading
import time
import weakref
from pathlib import Path

try:
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:  # optional: create_app says what to install
    Starlette = None

from mingpt.batching import BatchEngine, default_rows
from mingpt.chat import stream_reply
from mingpt.errors import ConfigError, PromptTooLong
from mingpt.serve.requests import (MAX_MESSAGES, ChatSettings, RequestError, check_origin,  # noqa: F401
                                   parse_chat_request)

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent.parent / 'static' / 'chat.html'
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused, counted as it arrives
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')
# the two packages this needs are optional (not in install_requires): said once, where they are missing
NEEDS = ("the web server needs starlette and uvicorn, which are optional: pip install starlette uvicorn "
         "(or pip install -e '.[serve]')")


class Slots:
    """
    At most n generations at once (one per batch row), at most max_waiting requests waiting for one.
    Thread-safe rather than an asyncio.Semaphore: worker threads give slots back when generation
    really stops, which may be well after the request that took the slot has gone. """

    def __init__(self, n, max_waiting):
        self.n, self.max_waiting = n, max_waiting
        self.lock = threading.Lock()
        self.active = self.peak = self.waiting = 0

    def try_acquire(self):
        with self.lock:
            if self.active >= self.n:
                return False
            self.active += 1
            self.peak = max(self.peak, self.active)
            return True

    def release(self):
        with self.lock:
            self.active -= 1

    async def acquire(self, timeout):
        """ wait up to timeout seconds for a slot (polling: a wait here is the exception); False if
        none came, or at once if all are taken and max_waiting requests wait already """
        with self.lock:
            if self.active >= self.n and self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
        try:
            deadline = time.monotonic() + timeout
            while not self.try_acquire():
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.02)
            return True
        finally:
            with self.lock:
                self.waiting -= 1

# -----------------------------------------------------------------------------

# create_app's limits: (argument, its command-line flag, lowest value)
LIMITS = (('max_new_tokens', '--max-tokens-limit', 1), ('max_concurrent', '--max-concurrent', 1),
          ('queue_timeout', '--queue-timeout', 0), ('max_prompt_tokens', '--max-prompt-tokens', 1),
          ('max_queue', '--max-queue', 0))


def check_limits(flags=False, **values):
    """ a ConfigError for a limit of create_app out of range, named by its flag if flags (None: no limit) """
    for name, flag, low in LIMITS:
        value = values.get(name)
        if value is not None and value < low:
            raise ConfigError(f"{flag if flags else name} must be >= {low} (got {value})")


class ChatServer:
    """
    The web chat's state and handlers: the model in a BatchEngine of max_concurrent rows (default
    mingpt.batching.default_rows: 16 on a CPU), the slots requests wait for, the statistics /health
    reports. queue_timeout: how long a request waits for a row (then 429); max_queue: how many may
    wait (default 4 x max_concurrent; more get a 429 at once). allowed_hosts: the host names
    (without port) requests may be addressed to; None allows any. model_name is shown on the page: a
    name, never a path. engine_thread=False: the engine starts no thread of its own; the caller runs
    it (run_server does). settings: a ChatSettings, or its fields as keywords.
    """

    def __init__(self, model, tokenizer, *, model_name='model', max_concurrent=None, queue_timeout=10.0,
                 max_queue=None, allowed_hosts=LOCAL_HOSTS, engine_thread=True, **settings):
        self.settings = ChatSettings(**settings)
        check_limits(max_new_tokens=self.settings.max_new_tokens, max_concurrent=max_concurrent,
                     queue_timeout=queue_timeout, max_prompt_tokens=self.settings.max_prompt_tokens,
                     max_queue=max_queue)
        self.settings.default_max_tokens = min(self.settings.default_max_tokens, self.settings.max_new_tokens)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.queue_timeout = queue_timeout
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower().strip('[]') for h in allowed_hosts)
        self.max_concurrent = default_rows(model) if max_concurrent is None else max_concurrent
        # the engine's rows and the slots agree: a request holds a slot exactly while its reply runs
        self.engine = BatchEngine(model, self.max_concurrent, threaded=engine_thread)
        self.slots = Slots(self.max_concurrent, 4 * self.max_concurrent if max_queue is None else max_queue)
        self.stats_lock = threading.Lock()
        self.stats = {'completed': 0, 'cancelled': 0, 'failed': 0, 'rejected': 0, 'tokens': 0}

    def count(self, **kv):
        with self.stats_lock:
            for k, v in kv.items():
                self.stats[k] += v

    # -------------------------------------------------------------------------
    # the handlers

    async def homepage(self, request):
        return HTMLResponse(self.page)  # static: everything it shows comes from /config and /chat

    async def config(self, request):
        s = self.settings
        return JSONResponse({
            'model': self.model_name, 'block_size': self.model.block_size, 'max_new_tokens': s.max_new_tokens,
            'max_prompt_tokens': s.max_prompt_tokens, 'max_concurrent': self.max_concurrent,
            'defaults': {'temperature': s.temperature, 'top_k': s.top_k, 'top_p': s.top_p,
                         'max_tokens': s.default_max_tokens},
        })

    async def health(self, request):
        with self.stats_lock:
            stats = dict(self.stats)
        batch = self.engine.stats()  # rows, rows_in_use, queued (for a row), tokens_per_second
        return JSONResponse({'status': 'ok', 'active': self.slots.active, 'peak_active': self.slots.peak,
                             **stats, **batch, 'queued': self.slots.waiting + batch['queued']})

    async def chat(self, request):
        try:
            content_type = request.headers.get('content-type', '').split(';')[0].strip().lower()
            if content_type != 'application/json':
                raise RequestError(415, f"send the conversation as JSON (Content-Type: application/json), "
                                        f"not {content_type or 'a body without a type'}")
            req = parse_chat_request(await read_body(request), self.settings, self.model.block_size)
            info = {}
            stop = threading.Event()  # set when nobody listens any more: the worker then stops
            try:
                # renders (and checks the length of) the prompt now, off the event loop; tokens come when iterated
                pieces = await asyncio.to_thread(
                    stream_reply, self.model, self.tokenizer, req.messages, req.max_new_tokens, req.options,
                    max_prompt_tokens=self.settings.max_prompt_tokens, info=info, should_stop=stop.is_set,
                    engine=self.engine)
            except PromptTooLong as e:
                raise RequestError(413, str(e)) from None
            except ValueError as e:
                raise RequestError(400, str(e)) from None
            if not await self.slots.acquire(self.queue_timeout):
                self.count(rejected=1)
                raise RequestError(429, f"the server is busy: all {self.max_concurrent} generation slots "
                                        f"are in use and {self.slots.waiting} requests wait; try again in a few "
                                        "seconds", {'Retry-After': str(max(1, math.ceil(self.queue_timeout)))})
        except RequestError as e:
            return JSONResponse({'error': e.message}, status_code=e.status, headers=e.headers)
        events = self.stream_events(self.start_generation(pieces, info, stop), stop)
        # if the response never starts (the client left at once), the events' finally never
        # runs: stop the worker when the generator object goes away instead
        weakref.finalize(events, stop.set)
        return StreamingResponse(events, media_type='text/event-stream',
                                 headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

    # -------------------------------------------------------------------------
    # a reply: tokens to text in a worker thread, text to events in the event loop

    def start_generation(self, pieces, info, stop):
        """
        Turn pieces into events in a worker thread (the slot is already taken; the worker gives it
        back when the reply has left the batch, at the engine's next step once stop is set). -> a
        queue of ('token', str) ... then ('done', info) or ('error', message)
        """
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        info['t0'] = time.monotonic()

        def put(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
                stop.set()

        def work():
            outcome = 'cancelled'
            try:
                for piece in pieces:
                    put(('token', piece))
                if info['finish_reason'] != 'cancelled':
                    outcome = 'completed'
                    put(('done', info))
            except Exception as e:  # this reply's own failure: tell its client; the others run on
                logger.warning("a reply failed: %s: %s", type(e).__name__, e)
                outcome = 'failed'
                put(('error', str(e) if str(e).startswith('generation failed') else
                     f"generation failed: {type(e).__name__}: {e}"))
            finally:
                pieces.close()  # a reply still in the batch leaves it at the next step
                self.count(**{outcome: 1, 'tokens': info.get('tokens', 0)})
                self.slots.release()

        threading.Thread(target=work, name='mingpt-generate', daemon=True).start()
        return events

    async def stream_events(self, events, stop):
        """ the worker's output as server-sent events """
        try:
            while True:
                kind, value = await events.get()
                if kind == 'token':
                    yield sse({'token': value})
                elif kind == 'done':
                    yield sse({'done': True, 'finish_reason': value['finish_reason'],
                               'tokens': value['tokens'], 'prompt_tokens': value['prompt_tokens'],
                               'seconds': round(time.monotonic() - value['t0'], 3)})
                    return
                else:
                    yield sse({'error': value})
                    return
        finally:
            # reached on completion, and on cancellation when the client disconnects: either way
            # the worker must not go on generating for nobody
            stop.set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        yield
        await asyncio.to_thread(self.engine.close)  # after its current step: a step may take a while

    def guarded(self, handler):
        """ handler, answering only requests that pass check_origin """

        async def guarded_handler(request):
            try:
                check_origin(request.headers, self.allowed_hosts)
            except RequestError as e:
                return JSONResponse({'error': e.message}, status_code=e.status)
            return await handler(request)
        return guarded_handler


async def read_body(request):
    """ the body, counted as it arrives: a chunked body has no Content-Length to check first """
    too_big = RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes, the most accepted: "
                                "shorten the conversation")
    declared = request.headers.get('content-length', '')
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    return bytes(body)


def create_app(model, tokenizer, **kwargs):
    """
    The Starlette app serving model (in eval mode) with its ChatTokenizer; kwargs are ChatServer's
    (limits, defaults, allowed hosts). app.state.server is the ChatServer, app.state.engine its
    BatchEngine, app.state.slots and app.state.stats its slots and statistics.
    """
    if Starlette is None:
        raise ImportError(NEEDS)
    if not PAGE.is_file():
        raise FileNotFoundError(f"the chat page {PAGE} is missing from the installed package; "
                                "reinstall mingpt (pip install -e .)")
    server = ChatServer(model, tokenizer, **kwargs)
    server.page = PAGE.read_text(encoding='utf-8')
    app = Starlette(routes=[
        Route('/', server.guarded(server.homepage)),
        Route('/config', server.guarded(server.config)),
        Route('/health', server.guarded(server.health)),
        Route('/chat', server.guarded(server.chat), methods=['POST']),
    ], lifespan=server.lifespan)
    app.state.server, app.state.engine = server, server.engine
    app.state.slots, app.state.stats = server.slots, server.stats
    return app


def sse(obj):
    """ one server-sent event carrying obj as JSON (JSON escapes newlines, so one data: line) """
    return f"data: {json.dumps(obj)}\n\n"

# -----------------------------------------------------------------------------
# running the app

def listen(host, port):
    """
    A socket bound to host:port and listening, or a ConfigError (an OSError too) saying why not:
    the port in use, an address this machine does not have, a name that does not resolve.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot serve on {host}:{port}: the host name does not resolve ({e.strerror}); "
                          "give --host an address of this machine, e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart at once after a stop
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "another program is using the port: try another --port",
                errno.EACCES: "ports below 1024 need privileges: try --port 8000",
                errno.EADDRNOTAVAIL: "this machine has no such address: try --host 127.0.0.1"}.get(e.errno, '')
        raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror}" + (f"; {hint}" if hint else '')) from None
    return sock


def run_server(app, host, port):
    """
    Serve app (from create_app(..., engine_thread=False)) with uvicorn: HTTP in a thread of its
    own, the batch engine's steps in this one, the thread that loaded the model (the reason is in
    BatchEngine.run). The socket is bound first (listen: a ConfigError if it cannot be). Ctrl-C or
    SIGTERM shuts down as uvicorn does, and the app's shutdown closes the engine, which ends the
    steps; every step and every request's preparation is bounded, so that takes seconds at most.
    """
    import uvicorn
    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level='warning'))

    def serve_http():
        try:
            server.run(sockets=[sock])
        finally:  # the steps must end with the server, however it ended
            app.state.engine.close()
    web = threading.Thread(target=serve_http, name='mingpt-http')
    # signals reach only the main thread: pass them on to uvicorn, which then shuts down gracefully
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        web.start()
        app.state.engine.run()
    finally:
        server.should_exit = True
        web.join()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
