"""
What a web chat request may ask, checked before any work: the Host and Origin guards, and a /chat
body parsed into a ChatRequest. Plain functions (no web framework), so each rule is tested alone.
"""

import dataclasses
import json
import math

from mingpt.chat import check_messages, prompt_budget
from mingpt.sampling import SamplingOptions

MAX_MESSAGES = 1000  # more messages than a context of a few thousand tokens can hold (each is >= 3 tokens)
# A message longer than this many characters per token of the prompt budget is refused before it is
# tokenized: text of any script takes fewer characters per token (English ~4, CJK ~1-2), and only a
# run of one repeated symbol packs more, which is no message worth the tokenizer's time
CHARS_PER_TOKEN = 16


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


# -----------------------------------------------------------------------------
# a /chat request's body -> what to generate; plain functions, no web framework

@dataclasses.dataclass
class ChatSettings:
    """ a server's limits and the defaults of requests that do not say """
    max_new_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 256
    max_prompt_tokens: int = None  # None: the model's context less room for the reply
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = None


@dataclasses.dataclass
class ChatRequest:
    messages: list
    max_new_tokens: int
    options: SamplingOptions  # without the stop ids: stream_reply adds the tokenizer's


FIELDS = ('messages', 'temperature', 'max_tokens', 'top_k', 'top_p', 'seed')


def parse_chat_request(body, settings, block_size):
    """
    A /chat body (bytes) -> ChatRequest, or a RequestError (400 naming the field, 413 for a
    conversation too big to take) before anything is tokenized. block_size: the model's context.
    """
    try:
        body = json.loads(body)
    except RecursionError:
        raise RequestError(400, "the request body is JSON nested too deeply; send {\"messages\": [...]}") from None
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, 'the request body is not valid JSON; send {"messages": '
                                '[{"role": "user", "content": "..."}]}') from None
    if not isinstance(body, dict):
        raise RequestError(400, 'the request body must be a JSON object: {"messages": [...]}')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r:.60}; the fields are {', '.join(FIELDS)}")
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

    n = _field(body, 'max_tokens', settings.default_max_tokens, int)
    if n is None or not 1 <= n <= settings.max_new_tokens:
        raise RequestError(400, f"max_tokens must be between 1 and {settings.max_new_tokens} (this server's "
                                f"limit; got {n!r:.40})")
    budget = prompt_budget(block_size, n, settings.max_prompt_tokens)
    for i, m in enumerate(messages):
        if len(m['content']) > CHARS_PER_TOKEN * budget:
            raise RequestError(413, f"message {i} is {len(m['content'])} characters long, more than a prompt of "
                                    f"at most {budget} tokens can hold; shorten it")
    top_k = _field(body, 'top_k', settings.top_k, int)
    temperature = _field(body, 'temperature', settings.temperature, float)
    options = SamplingOptions(do_sample=True, temperature=settings.temperature if temperature is None else temperature,
                              top_k=top_k or None, top_p=_field(body, 'top_p', settings.top_p, float),
                              seed=_field(body, 'seed', None, int))
    try:
        options.check()
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    return ChatRequest(messages, n, options)


def _field(body, name, default, kind):
    """ body[name] as an int or a float (kind), default if absent; None stays None """
    v = body.get(name, default)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and isinstance(v, float):
        ok = math.isfinite(v) and (kind is float or v.is_integer())
    if not ok:
        raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'} (got {v!r:.40})")
    if kind is int and abs(v) >= 2 ** 64:
        raise RequestError(400, f"{name} is out of range (got an integer of {len(str(abs(int(v))))} digits)")
    return kind(v)
