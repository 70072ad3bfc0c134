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
request), 403 (a Host or Origin this server does not answer), 413 (a body over 1 MB, more than
MAX_MESSAGES messages, or a message that does not fit the prompt limit or the model's context), 415
(a /chat body that is not application/json), 429 (every row stayed busy for --queue-timeout seconds,
or 4 x --max-concurrent requests wait already; Retry-After says when to try again).

Any web page the user visits could send requests to a server on localhost. So the server answers only
requests whose Host is a name of this machine's loopback (or one given with --allowed-hosts), which
defeats DNS rebinding; refuses a request whose Origin is not its own; takes /chat bodies only as
application/json, which a cross-origin page cannot send without the browser asking first; and /config
names the model without its path.

Replies are generated together, in one mingpt.batching.BatchEngine of --max-concurrent rows: each of
its steps decodes a token of every running reply in one forward (python -m mingpt.serve steps in its
main thread and answers HTTP in another: run_server). Rendering a conversation runs in a
worker thread and each reply's tokens become text in a thread of its own, so the event loop keeps
serving (and noticing disconnects) while the model computes. A client that goes away (the page's Stop
button) leaves the batch at the next step, freeing its row. The server binds to 127.0.0.1 by default:
it has no authentication, so expose it (--host 0.0.0.0) only on purpose.
"""

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time
import weakref
from pathlib import Path

from mingpt.batching import BatchEngine, default_rows
from mingpt.chat import check_messages, stream_reply
from mingpt.errors import ConfigError, PromptTooLong
from mingpt.generate import check_sampling_args

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent.parent / 'static' / 'chat.html'
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused, counted as it arrives
MAX_MESSAGES = 1000  # more messages than a context of a few thousand tokens can hold (each is >= 3 tokens)
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')
# the two packages this needs are optional (not in install_requires): said once, where they are missing
NEEDS = ("the web server needs starlette and uvicorn, which are optional: pip install starlette uvicorn "
         "(or pip install -e '.[serve]')")


class RequestError(Exception):
    """ a request we refuse: the HTTP status and a message saying what to change """

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def host_name(value):
    """ the host of a Host header or of an Origin's netloc, without its port: 'a:8000' -> 'a', '[::1]:80' -> '::1' """
    value = value.strip().lower()
    if value.startswith('['):
        return value[1:value.find(']')] if ']' in value else value
    return value.rsplit(':', 1)[0] if value.count(':') == 1 else value


def check_origin(headers, allowed_hosts):
    """
    Refuse (RequestError 403) a request whose Host is not one of allowed_hosts (None: any), or whose
    Origin, when the browser sends one, is not this server's own origin (scheme and the same Host).
    """
    host = headers.get('host', '')
    if allowed_hosts is not None and host_name(host) not in allowed_hosts:
        raise RequestError(403, f"this server does not answer requests for host {host!r}; open it at "
                                "http://127.0.0.1:<port>, or start it with --allowed-hosts NAME to allow "
                                "another name")
    origin = headers.get('origin')
    if origin is not None and origin.lower() not in (f'http://{host}'.lower(), f'https://{host}'.lower()):
        raise RequestError(403, f"cross-origin request from {origin!r} refused: only this server's own "
                                "page may use it")


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
          ('max_queue', 'max_queue', 0))


def check_limits(flags=False, **values):
    """ a ConfigError for a limit of create_app out of range, named by its flag if flags (None: no limit) """
    for name, flag, low in LIMITS:
        value = values.get(name)
        if value is not None and value < low:
            raise ConfigError(f"{flag if flags else name} must be >= {low} (got {value})")


def create_app(model, tokenizer, *, model_name='model', max_new_tokens=512, max_prompt_tokens=None,
               max_concurrent=None, queue_timeout=10.0, max_queue=None, temperature=0.8, top_k=50,
               top_p=None, default_max_tokens=256, allowed_hosts=LOCAL_HOSTS, engine_thread=True):
    """
    The Starlette app serving model (in eval mode) with its ChatTokenizer. Limits: max_new_tokens
    (the most a request may ask for), max_prompt_tokens (default: the model's context less room
    for the reply; older turns are dropped to fit, a single message that does not is a 413),
    max_concurrent generations at once, the rows of the batch (default
    mingpt.batching.default_rows: 16 on a CPU), how long a request waits for a row (queue_timeout
    seconds, then 429) and how many may wait (max_queue, default 4 x max_concurrent; more: a 429 at once).
    temperature, top_k, top_p, default_max_tokens: defaults for requests that do not say.
    allowed_hosts: the host names (without port) requests may be addressed to; None allows any.
    model_name is shown on the page: a name, never a path. engine_thread=False: the batch engine
    (app.state.engine) starts no thread of its own; the caller runs it (run_server does).
    """
    try:
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise ImportError(NEEDS) from None

    if not PAGE.is_file():
        raise FileNotFoundError(f"the chat page {PAGE} is missing from the installed package; "
                                "reinstall mingpt (pip install -e .)")
    page = PAGE.read_text(encoding='utf-8')
    check_limits(max_new_tokens=max_new_tokens, max_concurrent=max_concurrent, queue_timeout=queue_timeout,
                 max_prompt_tokens=max_prompt_tokens, max_queue=max_queue)
    default_max_tokens = min(default_max_tokens, max_new_tokens)
    allowed_hosts = None if allowed_hosts is None else frozenset(h.lower().strip('[]') for h in allowed_hosts)
    max_concurrent = default_rows(model) if max_concurrent is None else max_concurrent
    # the engine's rows and the slots agree: a request holds a slot exactly while its reply runs
    engine = BatchEngine(model, max_concurrent, threaded=engine_thread)
    slots = Slots(max_concurrent, max_waiting=4 * max_concurrent if max_queue is None else max_queue)
    stats_lock = threading.Lock()
    stats = {'completed': 0, 'cancelled': 0, 'failed': 0, 'rejected': 0, 'tokens': 0}

    def count(**kv):
        with stats_lock:
            for k, v in kv.items():
                stats[k] += v

    def parse(body):
        """ the request body -> (messages, sampling kwargs); RequestError (400) if anything is off """
        if not isinstance(body, dict):
            raise RequestError(400, 'the request body must be a JSON object: {"messages": [...]}')
        messages = body.get('messages')
        if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
            raise RequestError(413, f"the conversation has {len(messages)} messages; at most {MAX_MESSAGES} "
                                    "are accepted (older turns are dropped to fit the context anyway): "
                                    "send only the recent ones")
        try:
            check_messages(messages)
        except ValueError as e:
            raise RequestError(400, f"bad messages: {e}") from None
        if not messages or messages[-1]['role'] != 'user':
            raise RequestError(400, "the conversation must end with a user message to reply to")
        if not messages[-1]['content'].strip():
            raise RequestError(400, "the message is empty; type something to send")

        def number(name, default, kind):
            v = body.get(name, default)
            if v is None:
                return None
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (kind is int and v != int(v)):
                raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'} "
                                        f"(got {v!r})")
            return kind(v)

        n = number('max_tokens', default_max_tokens, int)
        if n is None or not 1 <= n <= max_new_tokens:
            raise RequestError(400, f"max_tokens must be between 1 and {max_new_tokens} (this server's "
                                    f"limit; got {n})")
        kw = dict(max_new_tokens=n, temperature=number('temperature', temperature, float),
                  top_k=number('top_k', top_k, int), top_p=number('top_p', top_p, float),
                  seed=number('seed', None, int))
        if kw['temperature'] is None:
            kw['temperature'] = temperature
        if kw['top_k'] == 0:
            kw['top_k'] = None
        try:
            check_sampling_args(kw['temperature'], kw['top_k'], kw['top_p'])
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return messages, kw

    def guarded(handler):
        """ handler, answering only requests that pass check_origin """
        async def guarded_handler(request):
            try:
                check_origin(request.headers, allowed_hosts)
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

    async def homepage(request):
        return HTMLResponse(page)  # the page is static: everything it shows comes from /config and /chat

    async def config(request):
        return JSONResponse({
            'model': model_name, 'block_size': model.block_size, 'max_new_tokens': max_new_tokens,
            'max_prompt_tokens': max_prompt_tokens, 'max_concurrent': max_concurrent,
            'defaults': {'temperature': temperature, 'top_k': top_k, 'top_p': top_p,
                         'max_tokens': default_max_tokens},
        })

    async def health(request):
        with stats_lock:
            s = dict(stats)
        batch = engine.stats()  # rows, rows_in_use, queued (for a row), tokens_per_second
        return JSONResponse({'status': 'ok', 'active': slots.active, 'peak_active': slots.peak, **s, **batch,
                             'queued': slots.waiting + batch['queued']})

    async def chat(request):
        try:
            content_type = request.headers.get('content-type', '').split(';')[0].strip().lower()
            if content_type != 'application/json':
                raise RequestError(415, f"send the conversation as JSON (Content-Type: application/json), "
                                        f"not {content_type or 'a body without a type'}")
            try:
                body = json.loads(await read_body(request))
            except (ValueError, UnicodeDecodeError):
                raise RequestError(400, 'the request body is not valid JSON; send {"messages": '
                                        '[{"role": "user", "content": "..."}]}') from None
            messages, kw = parse(body)
            info = {}
            stop = threading.Event()  # set when nobody listens any more: the worker then stops
            try:
                # renders (and checks the length of) the prompt now, off the event loop (a long
                # conversation takes a while to tokenize); tokens come when iterated
                pieces = await asyncio.to_thread(stream_reply, model, tokenizer, messages,
                                                 max_prompt_tokens=max_prompt_tokens, info=info,
                                                 should_stop=stop.is_set, engine=engine, **kw)
            except PromptTooLong as e:
                raise RequestError(413, str(e)) from None
            except ValueError as e:
                raise RequestError(400, str(e)) from None
            if not await slots.acquire(queue_timeout):
                count(rejected=1)
                retry = max(1, math.ceil(queue_timeout))
                raise RequestError(429, f"the server is busy: all {max_concurrent} generation slots "
                                        f"are in use and {slots.waiting} requests wait; try again in a few "
                                        "seconds", {'Retry-After': str(retry)})
        except RequestError as e:
            return JSONResponse({'error': e.message}, status_code=e.status, headers=e.headers)
        queue = start_generation(pieces, info, stop)
        events = stream_events(queue, stop)
        # if the response never starts (the client left at once), the events' finally never
        # runs: stop the worker when the generator object goes away instead
        weakref.finalize(events, stop.set)
        return StreamingResponse(events, media_type='text/event-stream',
                                 headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

    def start_generation(pieces, info, stop):
        """
        Turn pieces into events in a worker thread (the slot is already taken; the worker gives it
        back when the reply has left the batch, at the engine's next step once stop is set). -> a
        queue of ('token', str) ... then ('done', info) or ('error', message)
        """
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        info['t0'] = time.monotonic()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
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
            except Exception as e:  # a bug or an out-of-memory: tell the client, keep serving
                logger.exception("generation failed")
                outcome = 'failed'
                put(('error', f"generation failed: {type(e).__name__}: {e}"))
            finally:
                pieces.close()  # a reply still in the batch leaves it at the next step
                count(**{outcome: 1, 'tokens': info.get('tokens', 0)})
                slots.release()

        threading.Thread(target=work, name='mingpt-generate', daemon=True).start()
        return queue

    async def stream_events(queue, stop):
        """ the worker's output as server-sent events """
        try:
            while True:
                kind, value = await queue.get()
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
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)  # after its current step: a step may take a while

    app = Starlette(routes=[
        Route('/', guarded(homepage)),
        Route('/config', guarded(config)),
        Route('/health', guarded(health)),
        Route('/chat', guarded(chat), methods=['POST']),
    ], lifespan=lifespan)
    app.state.slots, app.state.stats, app.state.engine = slots, stats, engine
    return app


def sse(obj):
    """ one server-sent event carrying obj as JSON (JSON escapes newlines, so one data: line) """
    return f"data: {json.dumps(obj)}\n\n"

# -----------------------------------------------------------------------------
# running the app

def run_server(app, host, port):
    """
    Serve app (from create_app(..., engine_thread=False)) with uvicorn: HTTP in a thread of its
    own, the batch engine's steps in this one, the thread that loaded the model (the reason is in
    BatchEngine.run). Ctrl-C or SIGTERM shuts down as uvicorn does, and the app's shutdown
    closes the engine, which ends the steps. -> False if the server could not start (the error
    is logged), else True once it has shut down.
    """
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning'))

    def serve_http():
        try:
            server.run()
        finally:  # a server that could not bind its port ends here too: the steps must end with it
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.started
