#!/usr/bin/env python3
"""katar_http: an HTTP task-queue server for polling workers, in one standard-library file.

Producers put tasks in named queues; workers in any language poll over HTTP:

    python katar_http.py --port 3000 --queue jobs:1000     # queue "jobs", workers poll every 1000 ms
    curl -X POST localhost:3000/v1/queue/jobs/tasks -d '{"data": {"n": 1}}'
    curl localhost:3000/v1/queue/jobs                     # {"configuration": {"interval": 1000}}
    curl -X POST localhost:3000/v1/queue/jobs -d '{}'     # {"tasks": [{"_id": ..., "data": ..., "attempt": 1}]}
    curl -X POST localhost:3000/v1/queue/jobs -d '{"tasks": [{"_id": "...", "status": "done"}]}'

The worker protocol (GET the configuration; POST to lease a task and to report tasks done or failed) is the one of
the original katar HTTP worker server, kept exactly. Everything beyond it is opt-in: `max` and `wait` (batches and
long polling) on the same POST, leases that run out when a worker dies, fenced reports carrying the `attempt` they
answer, retries with exponential backoff, dead letters, idempotent reports and insert keys, and producer and
operator routes (insert, list, inspect, wait for a result, cancel, pause, retry, purge, stats). Running work can
be steered: cancelled (the worker is told in `cancel`), followed through its `progress`, leased for as long as its
worker asks (up to `max_lease`), snoozed, capped in run time (`max_run`); GET /v1/workers shows the fleet. And the
flow shaped: groups that take turns with a limit each (`group`, `group_limit`), a rate, a capacity (`max_queued`),
and ages (`expire_after`, `retain`, `key_ttl`). And composed: periodic tasks (`schedules`: cron or every, each slot
run once across restarts), batches that insert one callback task when all their tasks have ended (`batch`,
/v1/batches), and one poll over several queues, in order or by weight (POST /v1/poll).

Task statuses, in katar's words: paused, queued, in progress, done, failed, cancelled. A task is `in progress`
while leased; `failed` is final (a dead letter): a failure that will be retried puts the task back to `queued`.

Delivery is at least once: a task is handed out again when its lease runs out before a report arrives. Leases,
delays and backoffs run on the monotonic clock: setting the wall clock neither expires nor stretches them.

With --journal FILE every change is appended to FILE (checksummed JSON lines) and fsync'd before it is
acknowledged, many requests sharing one fsync; a restart, even after kill -9 or a power cut, replays FILE to the
same state. A change is all or nothing: if it fails halfway it is undone and answered 503. --max-memory bounds
what the queues hold: inserts beyond it are 503 while workers go on draining. A second server on the same journal
with --standby waits for its lock (GET /healthz: 503 standby) and takes over the moment the first one dies; the
active one checks once a second that the lock is still its own, and serves nothing more if not. Queues spread over
several such servers behind a proxy that hashes the queue's name (the README has HAProxy's and nginx's files), or
without one: the tools take several URLs and pick each queue's server by shard_for.

The same file is the client side: `python katar_http.py work URL QUEUE -- CMD` makes any program a worker,
`put` inserts tasks, `stats` prints the queues' figures; `Client` does the same from Python. GET /metrics is
Prometheus text, GET / an operator's page, GET /v1/openapi.json the API's description.

The file reads top to bottom as the architecture:
  1. constants and errors (each error carries its HTTP status; error_reply turns any error into an answer);
  2. the queue core (Broker, Queue, Task): pure Python behind one lock, knowing nothing of HTTP or sockets. Every
     change of state is one record (a dict) applied by Broker._apply; the journal writes exactly those records and
     replays them through the same function, so memory and disk cannot disagree. A commit encodes its records
     first and notes how to put back what applying them changes, so a failure halfway leaves nothing behind. A wait
     (a long poll, a result wait, a batch wait) is a parked Waiter with a deadline, never a blocked thread:
     begin_poll/begin_task park it (a poll of several queues in each one's line), the change that answers it calls
     its wake, end_wait ends it (the Python API blocks on it itself). A schedule's slot is one commit (its task and
     the record that it ran); a batch's callback is a commit of its own right after the one that ended the batch
     (made again at start if the server died in between).
     The Fleet (the workers heard from, the deliveries handed to each) is observed, not state: never journalled,
     each delivery checked against its task when read, so it needs no undoing;
  3. the journal (Journal: append, group commit, fsync, compaction, recovery) and Durability, which decides when a
     change may be acknowledged: a thread of the Python API waits for its records; the event loop collects the
     ticket instead and answers once the journal's flusher thread has written and fsync'd it (with --fsync interval
     or never, the loop makes the write itself, as redis does, and only the interval's fsync is off the loop);
  4. the HTTP layer: framing (frame_head, body_length, frame_chunked: from bytes in memory, never a socket) and
     one BaseHTTPRequestHandler subclass whose methods are the routes (check, call the core, serialise);
  5. large data: the API's description (OpenAPI 3.1, built from the bounds the server enforces) and the page;
  6. the server: one asyncio event loop in a thread of its own owns every socket (Connection per client):
     it frames pipelined requests in order, has the Handler serve them, holds each answer until its journal
     records are durable (one write and one fsync per pass, while it goes on parsing), and runs every deadline
     (request, idle, first authorised request, parked waits, the broker's clock, the ages' timer once a second, the
     schedules' timer at the next slot) from its timer heap;
  7. the client and the worker runner (Client, Runner);
  8. the command line.

Security: --token (admin) and --worker-token (lease and report on named queues only) guard every route but
/healthz; --tls-cert serves HTTPS; every request is bounded (Limits). Without a token the server refuses to listen
beyond 127.0.0.1 and answers only requests that name it by an IP address or localhost (DNS rebinding). Requests
from other sites' web pages (Origin, Sec-Fetch-Site) are refused unless --allow-origin names them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import email.utils
import errno
import functools
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import json
import math
import operator
import os
import random
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, ContextManager, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union
from urllib.parse import parse_qs, quote, unquote, urlsplit

__version__ = "0.1.0"
__all__ = [
    "Broker", "Queue", "KatarServer", "serve", "main", "build_parser", "Limits", "Access", "tls_context",
    "Client", "Runner",
    "Journal", "JournalError", "FSYNC_MODES",
    "KatarError", "BadRequest", "NotFound", "Conflict", "MethodNotAllowed", "RequestTimeout", "NotSupported",
    "Unavailable", "Unauthorized", "Forbidden",
    "PayloadTooLarge", "UnsupportedMediaType", "VersionNotSupported",
    "PAUSED", "QUEUED", "IN_PROGRESS", "DONE", "FAILED", "CANCELLED", "STATUSES", "PRIORITIES",
]

# ---------------------------------------------------------------------------------------------------------------
# 1. Constants and errors: the status words, bounds and defaults; every error a client can cause carries its HTTP
#    status, and error_reply is the one place an error becomes an answer. Then the checks of what clients send
#    (values, queue options) and the time of schedules (cron expressions, slots): pure functions, no state.
# ---------------------------------------------------------------------------------------------------------------

PAUSED, QUEUED, IN_PROGRESS, DONE, FAILED, CANCELLED = "paused", "queued", "in progress", "done", "failed", "cancelled"
STATUSES = (PAUSED, QUEUED, IN_PROGRESS, DONE, FAILED, CANCELLED)
FINAL_STATUSES = (DONE, FAILED, CANCELLED)  # a task in one of these waits for nobody but an operator
PRIORITIES = {"high": 10, "normal": 0, "low": -10}

DEFAULT_INTERVAL_MS = 30000  # the original's default poll interval
# Queue options and their defaults. `configuration` (what GET /v1/queue/<q> returns) is kept beside them.
QUEUE_DEFAULTS: Dict[str, Any] = {
    "lease": 60000,          # ms a leased task stays `in progress` without a report or heartbeat
    "max_attempts": 5,       # deliveries that may end in failure or expiry before the task is a dead letter
    "persistent": False,     # keep done and cancelled tasks (katar's default is to discard them)
    "paused": False,         # a paused queue leases nothing
    "max_in_flight": 0,      # cap on tasks in progress at once; 0 is no cap
    "backoff": 1000,         # ms before the first retry; doubled for each later one
    "max_backoff": 300000,   # ms, the cap on that doubling
    "max_lease": 43200000,   # ms, the longest lease a worker may ask for (a poll's or a heartbeat's `lease`): 12 h
    "max_run": 0,            # ms a delivery may run, heartbeats or not, before it fails ("run time exceeded"); 0: none
    "max_queued": 0,         # tasks waiting (queued or paused) at most: an insert past it is a 503; 0: no cap
    "rate": 0,               # tasks leased per second at most (a token bucket, a float); 0: no limit
    "burst": 1,              # tasks the rate limit lets out at once, after a lull
    "expire_after": 0,       # ms a task may stay queued once due; then it is a dead letter, error "expired"; 0: forever
    "retain": 0,             # ms a finished task the queue keeps (done, failed, cancelled) is kept; 0: until purged
    "key_ttl": 0,            # ms an insert key dedupes after its task finished, kept or not; 0: while it is remembered
    "group_limit": 0,        # tasks of one group in progress at once (1: one at a time, in order); 0: no limit
    "group_on_failure": "block",  # a retrying task holds its group back ("block": order kept) or not ("skip")
    "max_throttle": 300000,  # ms a worker's throttle may stop the queue at most; lowering it shortens one in force
    "schedules": [],         # periodic tasks: [{"name", "cron" or "every", "data", "priority", "missed", "utc_offset"}]
}
# A queue's figures since the server started (stats' `totals`).
TOTALS = ("inserted", "leased", "done", "failed", "retried", "expired", "released", "cancelled", "refused",
          "lease_wait_ms")
MAX_LEASE_BATCH = 10000      # upper bound of `max` on a poll (the HTTP layer has its own, lower, --max-tasks)
MAX_REPORTS = 10000          # reports on one poll
MAX_INSERT_BATCH = 10000     # tasks in one insert
MAX_LIST_LIMIT = 1000        # tasks in one page of a listing
LIST_ORDERS = ("oldest", "newest")  # the orders of a listing
MAX_DELAY_MS = 366 * 86400 * 1000
# Bounds of the queue options, as (lowest, highest).
QUEUE_BOUNDS = {"lease": (1, MAX_DELAY_MS), "max_attempts": (1, 10 ** 6), "max_in_flight": (0, 10 ** 9),
                "backoff": (0, MAX_DELAY_MS), "max_backoff": (0, MAX_DELAY_MS), "max_lease": (1, MAX_DELAY_MS),
                "max_run": (0, MAX_DELAY_MS), "max_queued": (0, 10 ** 9), "burst": (1, 10 ** 6),
                "expire_after": (0, MAX_DELAY_MS), "retain": (0, MAX_DELAY_MS), "key_ttl": (0, MAX_DELAY_MS),
                "group_limit": (0, 10 ** 6), "max_throttle": (0, MAX_DELAY_MS)}
CHOICE_OPTIONS = {"group_on_failure": ("block", "skip")}  # the options that take one of a few words
EXPIRED = "expired"   # the error of a task that stayed queued past its queue's expire_after
AGE_BATCH = 1000      # tasks one tick ends for their age, per kind: a backlog of them is worked off tick by tick
RATE_OPTIONS = {"rate": (0, 10 ** 6)}  # the options that are numbers, not integers (as (lowest, highest))
MIN_RATE = 0.001                       # the lowest rate but 0
RUN_TIME_EXCEEDED = "run time exceeded"  # the error of a delivery that ran past its queue's max_run
WORKER_IDLE_MS = 3600 * 1000  # a worker not heard from for this long is forgotten (GET /v1/workers)
MAX_WORKERS_SEEN = 10000      # workers remembered at once; past that, the one heard from least recently goes
WORKER_TASKS_SHOWN = 100      # tasks GET /v1/workers lists per worker (tasks_held counts them all)
MAX_PRIORITY = 10 ** 9
BATCH_FIELDS = ("id", "callback", "open")   # an insert's "batch", and PUT /v1/batches/<id> (no id)
CALLBACK_FIELDS = ("queue", "data", "priority")
MAX_BATCH_FAILED_IDS = 10000  # ids of dead letters a batch keeps (and its callback's data carries); counts are whole
BATCH_FAILED_SHOWN = 1000     # of which GET /v1/batches/<id> shows the first
MAX_ENDED_BATCHES = 10000     # batches kept after their callback; past that, the oldest is forgotten
BATCH_BYTES = 1000            # the memory estimate of a batch (and MEMO_BYTES a task in it not yet ended)
FAILED_ID_BYTES = 100         # and of each dead letter's id it keeps
MAX_POLL_QUEUES = 32         # queues one poll may name (POST /v1/poll)
MAX_WEIGHT = 10 ** 6         # the highest weight of a queue in such a poll
MAX_TEXT = 65536             # characters in an error
MAX_KEY = 256                # characters in an insert key
MAX_TASK_ID = 256            # characters of a task id in a report (ids are about 21)
MAX_WORKER = 256             # characters in a worker's name
MAX_WAIT_MS = 10 ** 9        # `wait` of a poll or of a result wait (the server cuts it to its --max-wait)
MAX_INTERVAL_MS = 2 ** 31    # configuration.interval
# The fields of a task as inserted; any other is refused (a misspelled field would otherwise be dropped unseen).
TASK_FIELDS = ("data", "priority", "delay", "key", "status", "group")
MAX_GROUP = 256              # characters in a task's group
HISTORY_LIMIT = 20           # attempts remembered per task
HISTORY_ERROR_LIMIT = 1024   # characters of an error kept in each history entry (the task keeps the whole latest one)
FINISHED_MEMORY = 10000      # ids of discarded tasks a non-persistent queue remembers, for idempotent reports
DEFAULT_MAX_WAIT_MS = 30000  # the server's cap on `wait`
DEFAULT_MAX_BODY = 1 << 20   # bytes in a request body
QUEUE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"  # as the API's description gives it (JSON Schema)
QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN[1:-1] + r"\Z")
TASK_ID_PATTERN = "-[0-9]+$"  # what a task id ends with: its sequence number, which orders listings
MAX_ATTEMPT = 2 ** 31        # the highest `attempt` a report may name
# The memory estimate (--max-memory) of what the queues hold, in bytes. Measured on CPython 3.11 (bench --scale):
# a queued task with small data costs about 490 bytes of RSS, a history entry about 450; parsed JSON takes up to
# twice its text.
TASK_BYTES = 600             # a task, its index entries and its slot in the status and id tables
HISTORY_ENTRY_BYTES = 500    # one remembered attempt
MEMO_BYTES = 200             # one discarded task a non-persistent queue remembers (FINISHED_MEMORY of them at most)
QUEUE_BYTES = 4096           # an empty queue
MEMORY_SHARE = 4             # by default the queues may hold a quarter of the machine's memory...
ADDRESS_SPACE_SHARE = 3      # ...and at most a third of the address space the process may have (ulimit -v)


class KatarError(Exception):
    """Root of the errors a client can cause; `status` is the HTTP status it answers with."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, ids: Iterable[str] = (), **fields: Any) -> None:
        super().__init__(message)
        self.ids = list(ids)
        self.fields = fields  # more for a program to act on: the queue named, the known ones, ...

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"error": str(self)}
        if self.ids:
            body["ids"] = self.ids
        body.update(self.fields)
        return body


class BadRequest(KatarError):
    """The request is malformed: a field is missing, of the wrong type or out of range."""
    status = HTTPStatus.BAD_REQUEST


class NotFound(KatarError):
    """No such queue, task or route."""
    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(KatarError):
    """The route exists but not with this method; `allow` lists the methods it has."""
    status = HTTPStatus.METHOD_NOT_ALLOWED

    def __init__(self, message: str, allow: Iterable[str]) -> None:
        super().__init__(message)
        self.allow = sorted(allow)


class Conflict(KatarError):
    """The request contradicts the task's state (a superseded delivery, a finished task, ...)."""
    status = HTTPStatus.CONFLICT


class Unavailable(KatarError):
    """The change could not be made durable (the journal's disk failed): nothing was acknowledged; retry later."""
    status = HTTPStatus.SERVICE_UNAVAILABLE


class JournalError(Exception):
    """The journal cannot be opened: corrupt, in use by another server, or of an unknown version. `line` is the
    corrupt line's number, where one is to blame."""

    def __init__(self, message: str, line: Optional[int] = None) -> None:
        super().__init__(message)
        self.line = line


class JournalLocked(JournalError):
    """The journal is in use: another server holds its lock (a standby waits for it instead)."""


class RequestTimeout(KatarError):
    """The client stopped sending its request before the body was complete."""
    status = HTTPStatus.REQUEST_TIMEOUT


class PayloadTooLarge(KatarError):
    """The request body is larger than the server accepts."""
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(KatarError):
    """The body is declared as something other than JSON."""
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Unauthorized(KatarError):
    """No token, or not a valid one, where the server requires one."""
    status = HTTPStatus.UNAUTHORIZED


class Forbidden(KatarError):
    """A valid token without the right to this route or queue."""
    status = HTTPStatus.FORBIDDEN


class RequestHeaderFieldsTooLarge(KatarError):
    """Too many header lines, or too many bytes of them."""
    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


class URITooLong(KatarError):
    """The request line is longer than the head may be."""
    status = HTTPStatus.REQUEST_URI_TOO_LONG


class NotSupported(KatarError):
    """A method or a transfer coding this server does not implement (RFC 9110 15.6.2)."""
    status = HTTPStatus.NOT_IMPLEMENTED


class VersionNotSupported(KatarError):
    """An HTTP version other than 1.0 and 1.1 (RFC 9110 15.6.6)."""
    status = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED


class MisdirectedRequest(KatarError):
    """The Host names a server this is not (how DNS rebinding gets a web page into a server without a token)."""
    status = HTTPStatus.MISDIRECTED_REQUEST


def error_reply(error: BaseException) -> Tuple[int, Dict[str, Any], List[Tuple[str, str]]]:
    """The one translation of an error into an answer: its status, its JSON body and the headers it needs. An
    error that is not a KatarError is a bug (500), or memory the bound did not foresee (503: the commit was
    undone, nothing changed)."""
    if isinstance(error, KatarError):
        headers = []
        if isinstance(error, MethodNotAllowed):
            headers.append(("Allow", ", ".join(error.allow)))
        elif error.status == HTTPStatus.UNAUTHORIZED:
            headers.append(("WWW-Authenticate", 'Bearer realm="katar_http"'))
        elif error.status == HTTPStatus.SERVICE_UNAVAILABLE:
            headers.append(("Retry-After", "1"))
        return int(error.status), error.to_json(), headers
    if isinstance(error, MemoryError):
        return 503, {"error": "the server is out of memory; nothing was changed: retry later"}, [("Retry-After", "1")]
    return 500, {"error": "internal error"}, []


# Field checks shared by the core and the HTTP layer. Each names the offending field.

def _shown(value: Any, limit: int = 100) -> str:
    """A value as an error message quotes it: its repr, cut short (a client may send a megabyte of it)."""
    text = repr(value[:limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_int(field: str, value: Any, low: int, high: int) -> int:
    # bool is an int to Python but never to a JSON client; floats with no fraction (1.0) are accepted.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{field} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadRequest(f"{field} must be between {low} and {high}, got {value}")
    return value


def _check_number(field: str, value: Any, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise BadRequest(f"{field} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadRequest(f"{field} must be between {low} and {high}, got {value}")
    return value


def _check_text(field: str, value: Any, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise BadRequest(f"{field} is longer than {limit} characters")
    return value


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field} must be true or false, got {type(value).__name__}")
    return value


def _check_priority(value: Any) -> int:
    if isinstance(value, str):
        if value not in PRIORITIES:
            raise BadRequest(f"priority must be an integer or one of {', '.join(PRIORITIES)}, got {_shown(value)}")
        return PRIORITIES[value]
    return _check_int("priority", value, -MAX_PRIORITY, MAX_PRIORITY)


# One encoder for everything the server writes (responses, journal lines): compact, and built once, since
# json.dumps with any argument builds a new encoder on every call.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _json_default(value: Any) -> Any:
    # As the original sent `new Date()`: dates and times travel as ISO 8601 strings.
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _json_value(field: str, value: Any) -> Any:
    """Return `value` as plain JSON values (what a journal can write and a client can read), or raise BadRequest."""
    return _json_sized(field, value)[0]


def _json_sized(field: str, value: Any) -> Tuple[Any, int]:
    """`value` as plain JSON values, and an estimate of the bytes it holds in memory; BadRequest if not JSON."""
    if value is None or isinstance(value, (bool, int, str)) or (
            isinstance(value, float) and value == value and value not in (float("inf"), float("-inf"))):
        return value, _value_bytes(value)
    try:  # a container: copied through its JSON text (what a journal writes), whose length is its estimate
        text = json.dumps(value, default=_json_default, allow_nan=False)
        return json.loads(text), 64 + 2 * len(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"{field} must be JSON: {exc}") from None


def _options_bytes(options: Dict[str, Any]) -> int:
    """The memory estimate of a queue without tasks: its tables, its configuration and its schedules (any JSON a
    user sends)."""
    return QUEUE_BYTES + _value_bytes(options.get("configuration")) + \
        sum(MEMO_BYTES + _value_bytes(schedule) for schedule in options.get("schedules", ()))


def _value_bytes(value: Any) -> int:
    """The memory estimate of a value that is already plain JSON (as _json_sized gives it)."""
    if value is None or isinstance(value, (bool, int, float)):
        return 32
    if isinstance(value, str):
        return 49 + len(value)
    return 64 + 2 * len(_encode(value))


def _check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Validate queue options (the keys of QUEUE_DEFAULTS and `configuration`); return them normalised."""
    checked: Dict[str, Any] = {}
    for name, value in options.items():
        if name == "configuration":
            if not isinstance(value, dict):
                raise BadRequest("configuration must be an object")
            value = _json_value("configuration", dict(value))
            value.setdefault("interval", DEFAULT_INTERVAL_MS)
            _check_int("configuration.interval", value["interval"], 0, MAX_INTERVAL_MS)
        elif name in ("persistent", "paused"):
            _check_bool(name, value)
        elif name in QUEUE_BOUNDS:
            value = _check_int(name, value, *QUEUE_BOUNDS[name])
        elif name in RATE_OPTIONS:
            value = _check_number(name, value, *RATE_OPTIONS[name])
            if 0 < value < MIN_RATE:
                raise BadRequest(f"{name} must be 0 (no limit) or at least {MIN_RATE} (a task in {1 / MIN_RATE:g} s)")
        elif name == "schedules":
            value = _check_schedules(value)
        elif name in CHOICE_OPTIONS:
            if value not in CHOICE_OPTIONS[name]:
                raise BadRequest(f"{name} must be one of {', '.join(CHOICE_OPTIONS[name])}, got {_shown(value)}")
        else:
            raise BadRequest(f"unknown queue option {name!r}; options are configuration, {', '.join(QUEUE_DEFAULTS)}")
        checked[name] = value
    return checked


# Cron expressions (for schedules): five fields, as Vixie cron reads them.
CRON_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names for lowest, lowest + 1, ...)
CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
               ("month", 1, 12, CRON_MONTHS), ("day of week", 0, 7, CRON_DAYS))
CRON_SEARCH_DAYS = 366 * 8  # how far ahead a next fire time is looked for (Feb 29 on a Monday is years away)
CRON_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most days each month may have


class Cron(NamedTuple):
    """A parsed cron expression: the allowed values of each field (day of week 0-6, Sunday 0), and whether the day
    of month and the day of week fields started with "*" (Vixie cron: if either does, a day must match both;
    if neither does, it may match either)."""
    minutes: FrozenSet[int]
    hours: FrozenSet[int]
    days: FrozenSet[int]
    months: FrozenSet[int]
    weekdays: FrozenSet[int]
    any_day: bool
    any_weekday: bool


def parse_cron(text: Any, field: str = "cron") -> Cron:
    """Parse a 5-field cron expression (minute hour day-of-month month day-of-week): each field `*`, a number, a
    name (jan-dec, sun-sat, any case), a range `a-b`, a step `*/n` or `a-b/n` or `a/n` (from a to the highest),
    or a list of those separated by commas; Sunday is 0 or 7. BadRequest names `field` and the part at fault."""
    if not isinstance(text, str):
        raise BadRequest(f"{field} must be a string, like \"*/5 * * * *\"", field=field)
    parts = text.split()
    if len(parts) != 5:
        raise BadRequest(f"{field} has {len(parts)} fields; a cron expression has 5: minute hour day-of-month "
                         f"month day-of-week, like \"*/5 * * * *\"", field=field)
    values = [_cron_field(part, name, low, high, names, field) for part, (name, low, high, names)
              in zip(parts, CRON_FIELDS)]
    weekdays = frozenset(day % 7 for day in values[4])
    return Cron(values[0], values[1], values[2], values[3], weekdays, parts[2].startswith("*"),
                parts[4].startswith("*"))


def _cron_field(text: str, name: str, low: int, high: int, names: Tuple[str, ...], field: str) -> FrozenSet[int]:
    def number(word: str) -> int:
        if word.lower() in names:
            return low + names.index(word.lower())
        if not word.isdigit() or not word.isascii():
            raise BadRequest(f"{field}: {name} {word[:20]!r} is not a number from {low} to {high}"
                             + (f" or a name ({names[0]}-{names[-1]})" if names else ""), field=field)
        value = int(word)
        if not low <= value <= high:
            raise BadRequest(f"{field}: {name} {value} is out of range ({low}-{high})", field=field)
        return value

    allowed: set = set()
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not step_text.isascii() or int(step_text) == 0:
                raise BadRequest(f"{field}: the step in {item[:20]!r} ({name}) must be a whole number above 0",
                                 field=field)
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            start, _, end = span.partition("-")
            first, last = number(start), number(end)
            if first > last:
                raise BadRequest(f"{field}: the range {span[:20]!r} ({name}) runs backwards", field=field)
        else:
            first = number(span)
            last = high if slash else first
        allowed.update(range(first, last + 1, step))
    return frozenset(allowed)


def next_fire(cron: Cron, after_ms: int, utc_offset_minutes: int = 0) -> Optional[int]:
    """The first minute strictly after `after_ms` (ms since the epoch) that `cron` names, read on a clock
    `utc_offset_minutes` ahead of UTC; in ms since the epoch, or None if none comes within CRON_SEARCH_DAYS."""
    offset = utc_offset_minutes * 60000
    epoch = datetime.datetime(1970, 1, 1)  # naive: the clock of utc_offset_minutes, read as it shows
    local = epoch + datetime.timedelta(minutes=(after_ms + offset) // 60000 + 1)
    day = local.date()
    for _ in range(CRON_SEARCH_DAYS):
        if _cron_day(cron, day):
            for hour in sorted(cron.hours):
                for minute in sorted(cron.minutes):
                    moment = datetime.datetime(day.year, day.month, day.day, hour, minute)
                    if moment >= local:
                        return (moment - epoch) // datetime.timedelta(milliseconds=1) - offset
        day += datetime.timedelta(days=1)
    return None


def _cron_day(cron: Cron, day: datetime.date) -> bool:
    """Whether `cron` fires on `day` (at some hour): its month, and its day of month and day of week as Vixie cron
    reads them (both must match if either field starts with "*"; either may, if neither does)."""
    weekday = (day.weekday() + 1) % 7  # Python's Monday 0, cron's Sunday 0
    by_day, by_weekday = day.day in cron.days, weekday in cron.weekdays
    matches = (by_day and by_weekday) if cron.any_day or cron.any_weekday else (by_day or by_weekday)
    return day.month in cron.months and matches


def prev_fire(cron: Cron, upto_ms: int, utc_offset_minutes: int = 0) -> Optional[int]:
    """The last minute at or before `upto_ms` that `cron` names (next_fire's mirror), or None if none came within
    CRON_SEARCH_DAYS."""
    offset = utc_offset_minutes * 60000
    epoch = datetime.datetime(1970, 1, 1)
    local = epoch + datetime.timedelta(minutes=(upto_ms + offset) // 60000)
    day = local.date()
    for _ in range(CRON_SEARCH_DAYS):
        if _cron_day(cron, day):
            for hour in sorted(cron.hours, reverse=True):
                for minute in sorted(cron.minutes, reverse=True):
                    moment = datetime.datetime(day.year, day.month, day.day, hour, minute)
                    if moment <= local:
                        return (moment - epoch) // datetime.timedelta(milliseconds=1) - offset
        day -= datetime.timedelta(days=1)
    return None


# Schedules (the queue option `schedules`): each due slot inserts one task, keyed schedule:<name>:<slot time>.
SCHEDULE_FIELDS = ("name", "cron", "every", "data", "priority", "missed", "utc_offset")
MISSED_CHOICES = ("skip", "once", "all")  # what becomes of slots missed while the server was down (or refusing)
MAX_SCHEDULES = 100          # schedules per queue
MIN_EVERY_MS = 1000          # the shortest `every`
SCHEDULE_GRACE_MS = 60000    # a slot inserted within this of its time is on time; later, it was missed
MAX_MISSED_RUNS = 1000       # missed "all": at most this many missed slots are run, the latest ones
SCHEDULE_RETRY_MS = 1000     # a slot refused (a full queue, the disk failing) is tried again this much later


class Schedule(NamedTuple):
    """A checked schedule: its slots are the minutes `cron` names (on a clock `utc_offset` minutes ahead of UTC),
    or the multiples of `every` ms since the epoch (so that they are the same across restarts)."""
    name: str
    cron: Optional[Cron]
    every: int
    utc_offset: int

    def next_slot(self, after_ms: int) -> Optional[int]:
        """The first slot strictly after `after_ms`."""
        if self.cron is None:
            return (after_ms // self.every + 1) * self.every
        return next_fire(self.cron, after_ms, self.utc_offset)

    def last_slot(self, upto_ms: int) -> Optional[int]:
        """The last slot at or before `upto_ms`."""
        if self.cron is None:
            return upto_ms // self.every * self.every
        return prev_fire(self.cron, upto_ms, self.utc_offset)

    def due(self, handled: int, now: int, missed: str) -> Tuple[List[int], Optional[int]]:
        """The slots to run at `now` when those up to `handled` were run or passed over: every slot on time (due
        within SCHEDULE_GRACE_MS), and of the missed ones none (skip), the latest (once) or the latest
        MAX_MISSED_RUNS (all), oldest first; and the latest slot due, which is then handled (None: none is)."""
        latest = self.last_slot(now)
        if latest is None or latest <= handled:
            return [], None
        slots, slot = [], latest
        while slot is not None and slot > handled and slot >= now - SCHEDULE_GRACE_MS:
            slots.append(slot)
            slot = self.last_slot(slot - 1)
        if missed != "skip":
            while slot is not None and slot > handled and len(slots) < MAX_MISSED_RUNS:
                slots.append(slot)
                if missed == "once":
                    break
                slot = self.last_slot(slot - 1)
        return slots[::-1], latest


def slot_name(slot_ms: int) -> str:
    """A slot's time as its key shows it: UTC, ISO 8601, to the millisecond."""
    moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=slot_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (slot_ms % 1000)


def _check_schedules(value: Any) -> List[Dict[str, Any]]:
    """Validate the option `schedules`: a list of {name, cron or every, data?, priority?, missed?, utc_offset?};
    returns them with their defaults filled in. A BadRequest names the schedule's place and field."""
    if not isinstance(value, list):
        raise BadRequest('schedules must be a list of {"name", "cron" or "every", "data", ...}', field="schedules")
    if len(value) > MAX_SCHEDULES:
        raise BadRequest(f"schedules holds {len(value)}; a queue has at most {MAX_SCHEDULES}", field="schedules")
    checked, names = [], set()
    for index, entry in enumerate(value):
        where = f"schedules[{index}]"
        if not isinstance(entry, dict):
            raise BadRequest(f"{where} must be an object", field=where)
        unknown = [name for name in entry if name not in SCHEDULE_FIELDS]
        if unknown:
            raise BadRequest(f"unknown field {_shown(unknown[0])} in {where}; a schedule's fields are "
                             f"{', '.join(SCHEDULE_FIELDS)}", field=f"{where}.{str(unknown[0])[:100]}")
        name = entry.get("name")
        if not isinstance(name, str) or not QUEUE_NAME.match(name) or len(name) > 100:
            raise BadRequest(f"{where}.name must be 1 to 100 letters, digits, '_', '.' or '-' (not starting with "
                             f"'_', '.' or '-'), got {_shown(name)}", field=f"{where}.name")
        if name in names:
            raise BadRequest(f"{where}.name {name!r} is taken by an earlier schedule: names are unique",
                             field=f"{where}.name")
        names.add(name)
        if ("cron" in entry) == ("every" in entry):
            raise BadRequest(f"{where} needs either cron (\"*/5 * * * *\") or every (ms), not both or neither",
                             field=where)
        schedule: Dict[str, Any] = {"name": name}
        if "cron" in entry:
            cron = parse_cron(entry["cron"], f"{where}.cron")
            if cron.any_weekday and not cron.any_day and \
                    min(cron.days) > max(CRON_MONTH_DAYS[month - 1] for month in cron.months):
                raise BadRequest(f"{where}.cron never fires: no month of {entry['cron']!r} has a day "
                                 f"{min(cron.days)}", field=f"{where}.cron")
            schedule["cron"] = entry["cron"]
        else:
            schedule["every"] = _check_int(f"{where}.every", entry["every"], MIN_EVERY_MS, MAX_DELAY_MS)
        schedule["data"] = _json_value(f"{where}.data", entry.get("data"))
        try:
            schedule["priority"] = _check_priority(entry.get("priority", 0))
        except BadRequest as exc:
            raise BadRequest(f"{where}.{exc}", field=f"{where}.priority") from None
        missed = entry.get("missed", "once")
        if missed not in MISSED_CHOICES:
            raise BadRequest(f"{where}.missed must be one of {', '.join(MISSED_CHOICES)}, got {_shown(missed)}",
                             field=f"{where}.missed")
        schedule["missed"] = missed
        schedule["utc_offset"] = _check_int(f"{where}.utc_offset", entry.get("utc_offset", 0), -1439, 1439)
        checked.append(schedule)
    return checked


def _timing(option: Optional[Dict[str, Any]]) -> Any:
    """What decides a schedule's slots (a change of it starts the schedule anew)."""
    return None if option is None else (option.get("cron"), option.get("every"), option["utc_offset"])


def make_schedule(option: Dict[str, Any]) -> Schedule:
    """The Schedule of a checked `schedules` entry."""
    cron = parse_cron(option["cron"]) if "cron" in option else None
    return Schedule(option["name"], cron, option.get("every", 0), option["utc_offset"])


# ---------------------------------------------------------------------------------------------------------------
# 2. The queue core: Task, Queue, Broker. Pure Python, one lock, no HTTP.
# ---------------------------------------------------------------------------------------------------------------

class Task:
    """One task. `attempt` numbers its deliveries (1, 2, ...); `spent` counts those that ended in failure or expiry,
    which is what `max_attempts` limits (a task handed back does not spend an attempt)."""

    # Few slots: a queue may hold millions of tasks, and each slot is eight bytes of each of them. `size` is the
    # memory estimate of its data, key and result (see _json_sized); the rest of a task's estimate follows from it.
    __slots__ = ("id", "data", "priority", "status", "key", "created_at", "updated_at", "run_at",
                 "attempt", "spent", "worker", "lease_until", "error", "result", "history", "size")
    group: Optional[str] = None  # a task of a group is a GroupedTask: a task without one pays no slot for it

    @staticmethod
    def made(task_id: str, data: Any, priority: int, status: str, key: Optional[str], run_at: int, at: int,
             size: int, group: Optional[str] = None) -> "Task":
        """A new task: a GroupedTask if it has a group."""
        if group is None:
            return Task(task_id, data, priority, status, key, run_at, at, size)
        return GroupedTask(task_id, data, priority, status, key, run_at, at, size, group)

    def __init__(self, task_id: str, data: Any, priority: int, status: str, key: Optional[str],
                 run_at: int, at: int, size: int) -> None:
        self.id, self.data, self.priority, self.status, self.key = task_id, data, priority, status, key
        self.created_at = self.updated_at = at
        self.run_at = run_at
        self.attempt = self.spent = 0
        self.worker: Optional[str] = None
        self.lease_until: Optional[int] = None
        self.error: Optional[str] = None
        self.result: Any = None
        self.history: Any = ()  # a list from the first delivery on: a task that waits needs none
        self.size = size

    @property
    def memory(self) -> int:
        """The estimate of the bytes this task holds (what --max-memory bounds)."""
        total = TASK_BYTES + self.size + (len(self.error) if self.error else 0)
        for entry in self.history:  # a loop, not sum(): this runs twice per task per change
            total += HISTORY_ENTRY_BYTES + (len(entry["error"]) if entry["error"] else 0)
        return total

    def save(self) -> Tuple[Any, ...]:
        """What the apply functions may change, for `restore` to put back if a commit fails halfway. History
        entries other than the latest are never changed in place, so a shallow copy of the list keeps them."""
        history = self.history
        if history:
            return _CHANGING(self), list(history), dict(history[-1])
        return _CHANGING(self), None, None

    def restore(self, state: Tuple[Any, ...]) -> None:
        values, entries, latest = state
        for name, value in zip(_CHANGING_NAMES, values):
            setattr(self, name, value)
        if entries:
            self.history[:] = entries
            self.history[-1].clear()
            self.history[-1].update(latest)

    def latest(self) -> Optional[Dict[str, Any]]:
        """The history entry of the latest delivery, if it is still remembered."""
        if self.history and self.history[-1]["attempt"] == self.attempt:
            return self.history[-1]
        return None

    def delivery(self, attempt: int) -> Optional[Dict[str, Any]]:
        """The history entry of delivery `attempt`, if it is still remembered."""
        for entry in reversed(self.history):
            if entry["attempt"] == attempt:
                return entry
        return None

    def outcome(self, attempt: int) -> Optional[str]:
        entry = self.delivery(attempt)
        return entry["outcome"] if entry is not None else None

    def record(self, queue: str) -> Dict[str, Any]:
        """The whole task as one record, for a compacted journal."""
        return {"op": "task", "q": queue, "id": self.id, "data": self.data, "priority": self.priority,
                "status": self.status, "key": self.key, "created_at": self.created_at, "updated_at": self.updated_at,
                "run_at": self.run_at, "attempt": self.attempt, "spent": self.spent, "worker": self.worker,
                "lease_until": self.lease_until, "error": self.error, "result": self.result,
                "history": [dict(entry) for entry in self.history], "size": self.size, "group": self.group}

    def snapshot(self, queue: str) -> Dict[str, Any]:
        return {
            "_id": self.id, "queue": queue, "status": self.status, "data": self.data, "priority": self.priority,
            "key": self.key, "group": self.group, "attempt": self.attempt, "attempts_spent": self.spent,
            "worker": self.worker,
            "lease_expires_at": self.lease_until, "run_at": self.run_at, "error": self.error, "result": self.result,
            "progress": self.history[-1].get("progress") if self.history else None,
            "history": [dict(entry) for entry in self.history],
            "created_at": self.created_at, "updated_at": self.updated_at,
        }


class GroupedTask(Task):
    """A task with a `group` (see Queue: groups take turns, group_limit)."""

    __slots__ = ("group",)

    def __init__(self, task_id: str, data: Any, priority: int, status: str, key: Optional[str],
                 run_at: int, at: int, size: int, group: str) -> None:
        super().__init__(task_id, data, priority, status, key, run_at, at, size)
        self.group = group


# What the apply functions change of a task (all but id, data, priority, key and created_at); read at once in C.
_CHANGING_NAMES = ("status", "updated_at", "run_at", "attempt", "spent", "worker", "lease_until", "error", "result",
                   "size", "history")
_CHANGING = operator.attrgetter(*_CHANGING_NAMES)


class Waiter:
    """A parked wait: a long poll (wanting up to `max` tasks) or a wait for a task's result. No thread blocks on
    it: whoever parks one gives `wake`, which the core calls (broker lock held, from whichever thread made the
    change) once the wait is answered or the broker closes; the owner then ends it with Queue.end_wait, which
    also ends it at its `deadline` (time.monotonic() seconds) if nothing came. The event loop's wake schedules
    the connection's answer; a thread using the Python API waits on a condition that wake notifies."""

    __slots__ = ("max", "worker", "lease", "task_id", "deadline", "wake", "result", "parked", "queues")

    def __init__(self, wake: Callable[[], None], deadline: float, max_tasks: int = 0, worker: Optional[str] = None,
                 task_id: Optional[str] = None, lease: Optional[int] = None,
                 queues: Optional[Tuple["Queue", ...]] = None) -> None:
        self.max, self.worker, self.lease, self.task_id = max_tasks, worker, lease, task_id
        self.queues = queues  # a long poll over several queues (Broker.begin_poll): parked in each one's line
        self.deadline, self.wake = deadline, wake
        self.result: Any = None   # the leased tasks, or (the finished task's view, its journal ticket)
        self.parked = True        # until end_wait: a wait that ended is skipped where it still sits in a line


class Seen:
    """A worker heard from: a named one (its `worker` id), or an anonymous poller (by its `address`). `held` maps a
    queue's name to the deliveries handed to it there ({task id: attempt}); each is checked against the task when
    read, so none of this needs undoing or journalling."""

    __slots__ = ("worker", "address", "held", "swept", "notices", "last_contact", "last_heartbeat", "waiting")

    def __init__(self, worker: Optional[str], address: Optional[str]) -> None:
        self.worker, self.address = worker, address
        self.held: Dict[str, Dict[str, int]] = {}
        self.swept: Dict[str, int] = {}  # per queue: deliveries still held when last swept
        self.notices: Dict[str, Dict[str, int]] = {}  # per queue: deliveries taken from it, not yet told
        self.last_contact = 0
        self.last_heartbeat: Optional[int] = None
        self.waiting = 0  # its long polls parked now


class Fleet:
    """The workers heard from, for GET /v1/workers, the metrics, and the `cancel` a named worker is told. It is
    observed, not state: it is neither journalled nor undone, and fills again after a restart as workers poll. A
    worker is forgotten WORKER_IDLE_MS after its last contact, and at most MAX_WORKERS_SEEN are remembered (past
    that, the one heard from least recently goes): each contact moves its worker to the end of an ordered table,
    so forgetting only ever looks at the front."""

    def __init__(self) -> None:
        self._seen: "collections.OrderedDict[Tuple[Optional[str], Optional[str]], Seen]" = collections.OrderedDict()

    def contact(self, worker: Optional[str], address: Optional[str], now: int) -> Seen:
        """The worker `worker` (or, anonymous, the poller at `address`) is heard from at `now`."""
        key = (worker, None if worker is not None else address)
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = Seen(worker, address)
        else:
            self._seen.move_to_end(key)
            seen.address = address
        seen.last_contact = now
        self.forget(now)
        return seen

    def forget(self, now: int) -> None:
        """Forget the workers not heard from for WORKER_IDLE_MS, and the least recent beyond MAX_WORKERS_SEEN."""
        seen = self._seen
        while seen and (len(seen) > MAX_WORKERS_SEEN or next(iter(seen.values())).last_contact < now - WORKER_IDLE_MS):
            seen.popitem(last=False)

    def notice(self, worker: str, queue: str, task_id: str, attempt: int) -> None:
        """Delivery `attempt` of task `task_id`, handed to the named `worker` in `queue`, was taken from it: it is
        told in its next answer there (a worker not remembered is told by the 409 of its next report)."""
        seen = self._seen.get((worker, None))
        if seen is not None:
            seen.notices.setdefault(queue, {})[task_id] = attempt

    def told(self, worker: str, queue: str, task_ids: Iterable[str]) -> None:
        """The named `worker` has heard of these (a 409's `cancel`, or a newer delivery of the task handed to it):
        no answer repeats them, where it could be taken for the newer delivery."""
        seen = self._seen.get((worker, None))
        pending = seen.notices.get(queue) if seen is not None else None
        for task_id in task_ids if pending else ():
            pending.pop(task_id, None)

    def workers(self, now: int) -> List[Seen]:
        """Those remembered at `now`, the most recently heard from first."""
        self.forget(now)
        return list(reversed(self._seen.values()))


class Queue:
    """A named queue. Public methods take the broker lock; `_apply_*` methods change state and run only from
    Broker._apply; everything else prepares records or keeps indexes.

    Indexes, rebuilt from the tasks alone (so a journal never needs them):
      _ready    heap of (-priority, id): due queued tasks of no group, best first (ids sort in insertion order, so
                this is first in, first out within a priority);
      _group_ready, _turns
                per group, a heap like _ready of its due tasks; and the line of groups whose turn may come, a heap of
                (-priority of its best task, stamp, turn, group): a lease takes the best of _ready's top and the
                top group's best task, and the group served goes to the back of the line (see _next_ready);
      _delayed  heap of (run_at, id): queued tasks waiting for a delay or a backoff;
      _leases   heap of (lease_until, id, attempt): tasks in progress, soonest expiry first;
      _aging, _retired, _key_ends
                heaps for the ages (expire_after, retain, key_ttl), kept only while their option is on.
    Heap entries go stale when a task moves on; a stale entry is skipped when popped (the task is no longer queued
    and due, or its run_at or lease no longer matches), duplicates are skipped once their task is leased, and the
    heaps are rebuilt when stale entries outnumber live ones. Leasing, reporting, expiring and every timer are heap
    and dict operations: no cost grows with the queue.
    """

    def __init__(self, broker: "Broker", name: str, options: Dict[str, Any]) -> None:
        self.name = name
        self._broker = broker
        self.options = dict(QUEUE_DEFAULTS, configuration={"interval": DEFAULT_INTERVAL_MS})
        self.options.update(options)
        self.memory = _options_bytes(self.options)  # the estimate of what this queue holds, its tasks' `memory` too
        self._tasks: Dict[str, Task] = {}
        # Per status, the ids in the order they entered it: counts, the oldest queued task, purges, listings.
        # Plain dicts keep insertion order and cost less than OrderedDicts; the oldest queued task is the first one
        # iteration finds (stats only: that walk can pass deleted slots, never the queue's hot path).
        self._by_status: Dict[str, Dict[str, Task]] = {status: {} for status in STATUSES}
        self._ready: List[Tuple[int, str]] = []
        self._delayed: List[Tuple[int, str]] = []
        # Groups (a task's `group`): each group's due tasks in a heap of its own, (-priority, id); the groups that
        # may lease take turns through `_turns`, a heap of (-priority of their best task, stamp, turn, group),
        # the live entry of each in `_turn_of`. A group's stamp is its first task's id, then, each time it is
        # served, the newest id there is: it goes to the back of the line, behind every task and group that came
        # before (round robin among equal priorities; ungrouped tasks, by id, take their turn in the same order).
        self._group_ready: Dict[str, List[Tuple[int, str]]] = {}
        self._group_running: Dict[str, int] = {}      # a group's tasks in progress (state: follows the statuses)
        self._group_retrying: Dict[str, set] = {}     # a group's queued tasks waiting for a retry (checked when read)
        self._turns: List[Tuple[int, str, int, str]] = []
        self._turn_of: Dict[str, Tuple[int, str, int]] = {}
        self._turn_count = 0
        self._grouped_entries = 0  # entries in the groups' heaps, stale ones too (see _place)
        self._leases: List[Tuple[int, str, int]] = []
        self._keys: Dict[str, str] = {}
        # Discarded tasks of a non-persistent queue: id -> (status, attempt, its outcome, key), oldest first.
        self._finished: "collections.OrderedDict[str, Tuple[str, int, Optional[str], Optional[str]]]" = \
            collections.OrderedDict()
        # Parked long polls, first come first served; one that ended otherwise (out of time, its client gone) stays
        # in line, marked, until it reaches the front or the line is swept: ending a wait never searches the line.
        self._waiters: "collections.deque[Waiter]" = collections.deque()
        self._parked = 0  # long polls parked in _waiters
        self._parked_by_worker: Dict[str, set] = {}  # a named worker's parked long polls
        self._result_waiters: Dict[str, List[Waiter]] = {}
        self.totals = {name: 0 for name in TOTALS}
        # Observed, not state (neither journalled nor undone): when a worker last polled (ms), and since when tasks
        # have been due with nobody polling since (katar_queue_unattended_seconds).
        self.last_polled = broker._now()
        self._due_since: Optional[int] = None
        self._tokens, self._tokens_at = float(self.options["burst"]), self.last_polled  # the rate limit's bucket
        # Ages, for expire_after and retain: heaps of (when it became due, id) of queued tasks and of (when it
        # finished, id) of kept finished tasks; an entry goes stale when its task moves on, as in the other heaps.
        self._aging: List[Tuple[int, str]] = []
        self._retired: List[Tuple[int, str]] = []
        # key_ttl: the dedupe window of each key whose task finished, key -> (task id, status, when it finished)
        # (state: opened as the task finishes, closed by an "unkey" record), and a heap of (when it finished, key,
        # task id) to close them; a heap entry whose window has changed since is stale.
        self._key_windows: Dict[str, Tuple[str, str, int]] = {}
        self._key_ends: List[Tuple[int, str, str]] = []
        self.throttled_until = 0  # (state: a worker's throttle is journalled) nothing is leased before this (ms)
        # Schedules: each one's Schedule (from the options), and the latest slot of each that was run or passed
        # over (state: "fire" records, which go with the inserts of the slots they run).
        self._schedules = {option["name"]: make_schedule(option) for option in self.options["schedules"]}
        self._fired: Dict[str, int] = {}
        self._upcoming: Dict[str, Tuple[int, Optional[int]]] = {}  # (derived) name -> (handled through, next slot)
        self._out_of_order: set = set()  # during an undo: tables (None: _tasks, or a status) to sort again

    def __len__(self) -> int:
        return len(self._tasks)

    def _set_options(self, options: Dict[str, Any]) -> None:
        """Apply merged options (a `queue` record). An age switched on indexes the tasks already there."""
        was = dict(self.options)
        self.memory -= _options_bytes(self.options)
        self.options.update(options)
        self.memory += _options_bytes(self.options)
        if self.options["schedules"] is not was["schedules"]:
            self._schedules = {option["name"]: make_schedule(option) for option in self.options["schedules"]}
            self._upcoming = {}
        if self.options["expire_after"] and not was["expire_after"]:
            self._reindex_aging()
        if self.options["retain"] and not was["retain"]:
            self._reindex_retired()
        if (self.options["group_limit"], self.options["group_on_failure"]) != \
                (was["group_limit"], was["group_on_failure"]) and self._tasks:
            self._reindex_queued(self._broker._now())  # groups held back before may take turns now, or not

    # -- public surface ------------------------------------------------------------------------------------------

    def describe(self) -> Dict[str, Any]:
        """The queue's name, configuration and options."""
        with self._broker._lock:
            return dict(self.options, name=self.name, configuration=dict(self.options["configuration"]))

    @property
    def configuration(self) -> Dict[str, Any]:
        """What workers receive from GET /v1/queue/<name>: `interval` plus any custom keys."""
        with self._broker._lock:
            return dict(self.options["configuration"])

    def configure(self, **options: Any) -> Dict[str, Any]:
        """Change options (see QUEUE_DEFAULTS) or `configuration`; returns describe()."""
        self._broker.queue(self.name, **options)
        return self.describe()

    def insert(self, tasks: Union[Dict[str, Any], List[Dict[str, Any]]], batch: Optional[Dict[str, Any]] = None) -> Any:
        """Insert one task `{"data", "priority"?, "delay"? ms, "key"?, "status"? queued|paused}` or a list of them.

        Returns a dict (or a list of dicts) `{"_id", "status", "created"}`; `created` is false when `key` matched a
        task the queue still holds or remembers, which is then the task returned. With `batch` {"id", "callback"?,
        "open"?}, the tasks made join that batch (see Broker.put_batch); the insert that makes a batch closes it,
        unless `open` is true."""
        single = isinstance(tasks, dict)
        entries = [tasks] if single else tasks
        if not isinstance(entries, list) or not entries:
            raise BadRequest("tasks must be a task object or a non-empty list of them")
        if len(entries) > MAX_INSERT_BATCH:
            raise BadRequest(f"tasks holds {len(entries)} tasks; at most {MAX_INSERT_BATCH} per insert")
        checked = [self._check_insert("task" if single else f"tasks[{index}]", entry)
                   for index, entry in enumerate(entries)]
        broker = self._broker
        with broker._changing():
            now = broker._now()
            self._close_key_windows(now)
            results, rows, new_keys = [], [], {}
            for data, priority, delay, key, status, size, group in checked:
                if key is not None and (key in self._keys or key in new_keys):
                    known = new_keys.get(key) or (self._keys[key], self._key_status(key))
                    results.append({"_id": known[0], "status": known[1], "created": False})
                    continue
                task_id = broker._next_id()
                if key is not None:
                    new_keys[key] = (task_id, status)
                rows.append([task_id, data, priority, status, key, delay, size] + ([group] if group else []))
                results.append({"_id": task_id, "status": status, "created": True})
            records = []
            if rows:  # one record for the whole request: [id, data, priority, status, key, delay, size, group?]
                self._admit(len(rows))
                broker._admit(sum(TASK_BYTES + row[6] for row in rows))
                records.append({"op": "insert", "q": self.name, "at": now, "tasks": rows})
            if batch is not None:
                before, after, batch_id = broker._plan_batch(batch, now)
                if rows:
                    records[0]["batch"] = batch_id
                records = before + records + after
            if records:
                broker._commit(records)
            self._serve_waiters(now)
        return results[0] if single else results

    def lease(self, max: int = 1, wait: float = 0, worker: Optional[str] = None) -> List[Dict[str, Any]]:
        """Lease up to `max` tasks, waiting up to `wait` ms for the first; returns `[{"_id", "data", "attempt"}]`."""
        return self.poll((), max=max, wait=wait, worker=worker)

    def report(self, reports: List[Dict[str, Any]]) -> None:
        """Apply reports `{"_id", "status", "attempt"?, ...}`: all of them, or none if any is refused."""
        self.poll(reports, max=0)

    def poll(self, reports: Iterable[Dict[str, Any]] = (), max: Optional[int] = None, wait: float = 0,
             worker: Optional[str] = None, lease: Optional[int] = None, throttle: int = 0) -> List[Dict[str, Any]]:
        """The worker's POST: apply `reports` (all or none), then lease up to `max` tasks, waiting up to `wait` ms.
        Without `max`, one task, as the original; but none when every report is a heartbeat or a hand-back: a
        worker keeping a lease alive, or giving a task back, is not asking for more work (a task leased then would
        sit unworked until its lease ran out, or come straight back to the worker that gave it up).
        `lease` (ms, at most the queue's max_lease) is the lease of the tasks leased, and of the heartbeats among
        the reports that give none of their own; without it, the queue's `lease`. `throttle` (ms): the worker was
        told to slow down (a 429 downstream): the queue hands out nothing for that long, to anyone.
        The calling thread blocks while it waits (the Python API); the server parks the wait instead (begin_poll)."""
        return self._block(functools.partial(self.begin_poll, reports, max, wait, worker, lease, throttle))

    def begin_poll(self, reports: Iterable[Dict[str, Any]] = (), max: Optional[int] = None, wait: float = 0,
                   worker: Optional[str] = None, lease: Optional[int] = None, throttle: int = 0, *,
                   wake: Callable[[], None]) -> Union[List[Dict[str, Any]], Waiter]:
        """poll() without blocking: the tasks leased now, or, when it must wait for some, a parked Waiter that
        `wake` announces; end it with end_wait. This is where a wait begins: no thread is held by it."""
        reports, max, wait_ms, worker, lease = _check_poll(reports, max, wait, worker, lease)
        throttle = _check_int("throttle", throttle, 0, MAX_DELAY_MS)
        broker = self._broker
        with broker._changing():
            now = broker._now()
            self._check_lease("lease", lease)
            self._tick(now)
            self.last_polled = now
            try:
                records = self._plan_reports(reports, now, lease) if reports else []
            except Conflict as exc:
                if worker is not None and exc.fields.get("cancel"):
                    broker.fleet.told(worker, self.name, exc.fields["cancel"])
                raise
            throttle = min(throttle, self.options["max_throttle"])
            if throttle and now + throttle > self.throttled_until:
                records.append({"op": "throttle", "q": self.name, "until": now + throttle, "at": now})
            if records:
                broker._commit(records)
            self._serve_waiters(now)  # earlier waiters come first, also for what these reports freed
            leased = self._take(max, worker, now, lease)
            if leased or not max or wait_ms <= 0 or broker._closed:
                return leased
            waiter = Waiter(wake, time.monotonic() + wait_ms / 1000.0, max, worker, lease=lease)
            self._park(waiter)
            return waiter

    def holds(self, task_id: str) -> bool:
        """Whether the task `task_id` is this queue's (held, or remembered since it was discarded)."""
        return task_id in self._tasks or task_id in self._finished

    def _park(self, waiter: Waiter) -> None:
        """Put a long poll in this queue's line (lock held)."""
        self._waiters.append(waiter)
        self._parked += 1
        if waiter.worker is not None:  # so that a cancel of what it holds answers it at once (see _tell)
            self._parked_by_worker.setdefault(waiter.worker, set()).add(waiter)

    def _unpark(self, waiter: Waiter) -> None:
        """A long poll parked here has ended (answered, here or in another of its queues, or not): out of the
        counts; the line itself drops it when it reaches the front, or when ended waits pile up."""
        self._parked -= 1
        if waiter.worker is not None:
            parked = self._parked_by_worker.get(waiter.worker)
            if parked is not None:
                parked.discard(waiter)
                if not parked:
                    del self._parked_by_worker[waiter.worker]
        if len(self._waiters) > 2 * self._parked + 64:  # ended waits pile up behind a long one
            self._waiters = collections.deque(w for w in self._waiters if w.parked)

    def _settle(self, waiter: Waiter, leased: List[Dict[str, Any]]) -> None:
        """Answer a parked long poll with `leased` (from this queue), and wake it. A poll over several queues is
        out of all their lines, and learns which queue each task is from."""
        waiter.parked, waiter.result = False, leased
        if waiter.queues is None:
            self._unpark(waiter)
        else:
            for task in leased:
                task["queue"] = self.name
            for queue in waiter.queues:
                queue._unpark(waiter)
        waiter.wake()

    def task(self, task_id: str, wait: float = 0) -> Dict[str, Any]:
        """A task's full record; with `wait` ms, hold until it is done, failed or cancelled (or the time is up).
        What it answers is durable: a producer told "done" is never told otherwise after a crash."""
        try:
            return self._block(functools.partial(self.begin_task, task_id, wait))
        except Unavailable:
            with self._broker._lock:  # the disk failed: answer what it holds, once memory is back to that
                if not self._broker._on_disk():
                    raise
                return self._task_view(task_id)

    def begin_task(self, task_id: str, wait: float = 0, *, wake: Callable[[], None]) -> Union[Dict[str, Any], Waiter]:
        """task() without blocking: the task's record, or a parked Waiter for its end (see begin_poll)."""
        wait_ms = _check_number("wait", wait, 0, MAX_WAIT_MS)
        broker = self._broker
        with broker._changing():
            self._tick(broker._now())
            task = self._tasks.get(task_id)
            if task is None or wait_ms <= 0 or task.status in FINAL_STATUSES or broker._closed:
                return self._task_view(task_id)
            waiter = Waiter(wake, time.monotonic() + wait_ms / 1000.0, task_id=task_id)
            self._result_waiters.setdefault(task_id, []).append(waiter)
            return waiter

    def end_wait(self, waiter: Waiter) -> Any:
        """End a parked wait, answered or not (out of time, its client gone, the broker closing): the tasks a long
        poll got ([] if none), or the task's record for a result wait (as it finished, or as it is now). Ends
        inside a change: the answer is durable before the caller gives it (or, for the event loop, it is told
        what to wait for)."""
        broker = self._broker
        with broker._changing():
            if waiter.parked:
                waiter.parked = False
                if waiter.task_id is None:
                    for queue in waiter.queues or (self,):
                        queue._unpark(waiter)
                else:
                    waiting = self._result_waiters.get(waiter.task_id, [])
                    waiting.remove(waiter)
                    if not waiting:
                        del self._result_waiters[waiter.task_id]
            if waiter.task_id is None:
                return waiter.result or []
            if waiter.result is None:
                return self._task_view(waiter.task_id)
            view, ticket = waiter.result  # the task as it finished, and the journal ticket of that change
        broker._durability.require(ticket)  # (not covered above if memory was rebuilt meanwhile: the view is older)
        return view

    def _block(self, begin: Callable[..., Any]) -> Any:
        """Run `begin(wake=...)` and, if it parked a wait, block this thread until the wait is answered, runs out
        or the broker closes, running the clock meanwhile (a delay or a lease coming due): no helper thread."""
        broker = self._broker
        woken = threading.Condition(broker._lock)
        outcome = begin(wake=woken.notify)  # the core calls wake with the lock held, as notify wants
        if not isinstance(outcome, Waiter):
            return outcome
        queues = outcome.queues or (self,)  # (a long poll over several queues runs the clock of each)
        with broker._lock:
            while outcome.parked and not broker._closed:
                remaining = outcome.deadline - time.monotonic()
                if remaining <= 0:
                    break
                due = min((at for at in (queue._next_due() for queue in queues) if at is not None), default=None)
                if due is not None:
                    remaining = min(remaining, max(0.001, (due - broker._now()) / 1000.0))
                woken.wait(remaining)
                for queue in queues:
                    if outcome.parked:
                        queue._tick(broker._now())
        return self.end_wait(outcome)

    def set_status(self, task_id: str, status: str) -> Dict[str, Any]:
        """Pause a queued task, resume a paused one, retry a dead letter (`queued`), or cancel (`cancelled`); a task
        in progress is cancelled at once, and its worker is refused (409) and told (`cancel`) when it next reports."""
        allowed = {PAUSED: (QUEUED,), QUEUED: (PAUSED, FAILED), CANCELLED: (QUEUED, PAUSED, FAILED, IN_PROGRESS)}
        if not isinstance(status, str) or status not in allowed:
            raise BadRequest(f"status must be one of {', '.join(allowed)}, got {_shown(status)}")
        broker = self._broker
        with broker._changing():
            now = broker._now()
            self._tick(now)
            task = self._tasks.get(task_id)
            if task is None:
                memo = self._finished.get(task_id)  # a non-persistent queue remembers how its tasks ended
                if memo is None:
                    raise NotFound(f"task {task_id} not found in queue {self.name}", [task_id])
                if memo[0] != status:
                    raise Conflict(f"task {task_id} is {memo[0]}; it cannot become {status}", [task_id])
                return self._task_view(task_id)  # cancelled twice: as harmless as on a persistent queue
            if task.status != status:
                if task.status not in allowed[status]:
                    raise Conflict(f"task {task_id} is {task.status}; it cannot become {status}", [task_id])
                latest = task.latest() if self._open_delivery(task) else None  # its worker may be at it still
                broker._commit([{"op": "status", "q": self.name, "id": task_id, "status": status, "at": now}])
                if latest is not None and status != QUEUED:
                    self._tell(latest["worker"], task_id, latest["attempt"])
                self._serve_waiters(now)
            return self._task_view(task_id)

    def cancel(self, task_id: str) -> Dict[str, Any]:
        """Cancel a queued, paused or running task, or a dead letter."""
        return self.set_status(task_id, CANCELLED)

    def purge(self, status: str) -> int:
        """Delete every task with `status` (not `in progress`: cancel or wait for those); returns how many."""
        if status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {_shown(status)}")
        if status == IN_PROGRESS:
            raise Conflict("tasks in progress cannot be purged; wait for their reports or leases")
        broker = self._broker
        with broker._changing():
            now = broker._now()
            self._tick(now)
            ids = list(self._by_status[status])
            lapsed = [(task.latest()["worker"], task.id, task.attempt) for task in map(self._tasks.__getitem__, ids)
                      if self._open_delivery(task)]  # leases that ran out: their workers may be at them still
            if ids:
                broker._commit([{"op": "purge", "q": self.name, "ids": ids, "at": now}])
            for worker, task_id, attempt in lapsed:
                self._tell(worker, task_id, attempt)
            return len(ids)

    def tasks(self, status: Optional[str] = None, limit: int = 100, after: Optional[str] = None,
              order: str = "oldest") -> Dict[str, Any]:
        """A page of tasks in insertion order, `oldest` or `newest` first: `{"tasks": [...], "next": cursor or
        None}`; the cursor, given as `after`, continues in the same order."""
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {_shown(status)}")
        if order not in LIST_ORDERS:
            raise BadRequest(f"order must be oldest or newest, got {str(order)[:40]!r}")
        limit = _check_int("limit", limit, 1, MAX_LIST_LIMIT)
        if after is not None:
            _seq_of(after)  # a malformed cursor is refused
        newest = order == "newest"
        with self._broker._lock:
            self._tick(self._broker._now())
            # A listing is an operator's tool: it walks the tasks of one status (or all) in insertion order.
            if status is None:
                candidates: Iterable[Task] = reversed(self._tasks.values()) if newest else self._tasks.values()
            else:
                candidates = sorted(self._by_status[status].values(), key=lambda task: task.id, reverse=newest)
            page: List[Dict[str, Any]] = []
            for task in candidates:
                if after is None or (task.id < after if newest else task.id > after):
                    if len(page) == limit:
                        return {"tasks": page, "next": page[-1]["_id"]}
                    page.append(task.snapshot(self.name))
            return {"tasks": page, "next": None}

    def heard_from(self, worker: Optional[str], address: Optional[str], leased: Iterable[Dict[str, Any]] = (),
                   heartbeat: bool = False, waiting: int = 0) -> List[str]:
        """Note a worker's poll of this queue (GET /v1/workers): the tasks it was handed, whether it sent a
        heartbeat, a long poll parked (`waiting` 1) or ended (-1). Returns, for a named worker, the ids of the
        deliveries it was handed here that were taken from it since (cancelled, run past max_run, or leased again
        after its lease ran out): its answer's `cancel`, told once. An anonymous poller (no worker id; several may
        share an address) is told of a cancel only by the 409 of its next report."""
        broker = self._broker
        with broker._lock:
            seen = broker.fleet.contact(worker, address, broker._now())
            if heartbeat:
                seen.last_heartbeat = seen.last_contact
            seen.waiting = max(0, seen.waiting + waiting)
            held = seen.held.setdefault(self.name, {})
            for task in leased:
                held[task["_id"]] = task["attempt"]
            if worker is not None and leased and seen.notices.get(self.name):
                broker.fleet.told(worker, self.name, [task["_id"] for task in leased])
            if len(held) > 2 * seen.swept.get(self.name, 0) + 64:  # swept now and then: the cost stays constant
                for task_id, attempt in list(held.items()):
                    if self._delivery_state(task_id, attempt) in ("taken", "ended"):
                        del held[task_id]
                seen.swept[self.name] = len(held)
            # (checked again: a change the disk then lost is undone, and its notice with it)
            return [task_id for task_id, attempt in seen.notices.pop(self.name, {}).items()
                    if self._taken_from_worker(task_id, attempt)]

    def _delivery_state(self, task_id: str, attempt: int) -> str:
        """Delivery `attempt` of a task, as its worker should see it: "held" (in progress), "lapsed" (its lease ran
        out, but nobody has taken the task since: a report still counts), "taken" (cancelled, run past max_run,
        or leased again: stop), or "ended" (reported, or gone)."""
        task = self._tasks.get(task_id)
        if task is None:
            memo = self._finished.get(task_id)  # discarded: cancelled during this delivery, or ended otherwise
            return "taken" if memo is not None and memo[0] == CANCELLED and memo[1] == attempt and \
                memo[2] in ("cancelled", "expired") else "ended"
        if task.attempt == attempt:
            if task.status == IN_PROGRESS:
                return "held"
            if self._open_delivery(task):
                return "lapsed"
        return "taken" if self._taken_because(task, attempt) is not None else "ended"

    def _taken_from_worker(self, task_id: str, attempt: int) -> bool:
        """Whether delivery `attempt` of a task was taken from its worker: cancelled, past max_run, superseded, or
        the task dropped altogether (purged)."""
        if task_id not in self._tasks and task_id not in self._finished:
            return True
        return self._delivery_state(task_id, attempt) == "taken"

    def held_view(self, held: Dict[str, int], now: int) -> List[Dict[str, Any]]:
        """Lock held: the deliveries of `held` ({task id: attempt}) in progress at `now`, with their lease deadlines
        (one whose lease ran out by then is no longer held, though the clock may not have moved it yet)."""
        return [{"_id": task_id, "queue": self.name, "attempt": attempt,
                 "lease_expires_at": self._tasks[task_id].lease_until}
                for task_id, attempt in held.items()
                if self._delivery_state(task_id, attempt) == "held" and self._tasks[task_id].lease_until > now]

    def unattended_ms(self) -> int:
        """How long tasks have been due with no worker polling this queue since (0 when none is due, or the queue
        is paused): katar_queue_unattended_seconds, the alert that a backlog has nobody working on it."""
        with self._broker._lock:
            now = self._broker._now()
            self._tick(now)
            ready = self._ready
            while ready and not self._due(ready[0], now):  # stale entries at the front go, as a lease drops them
                heapq.heappop(ready)
            turns = self._turns
            while turns and self._turn_of.get(turns[0][3]) != turns[0][:3]:
                heapq.heappop(turns)  # stale
            if not ready and not turns:
                self._due_since = None
            if (not ready and not turns) or self.options["paused"]:
                return 0
            return max(0, now - max(self.last_polled, self._due_since if self._due_since is not None else now))

    def stats(self) -> Dict[str, Any]:
        """Counts per status, the age of the oldest queued task, totals and waiting workers."""
        with self._broker._lock:
            now = self._broker._now()
            self._tick(now)
            queued = self._by_status[QUEUED]
            oldest = next(iter(queued.values())) if queued else None
            return {
                "queue": self.name,
                "counts": {status: len(ids) for status, ids in self._by_status.items()},
                "total": len(self._tasks),
                "oldest_queued": oldest.id if oldest else None,
                "oldest_queued_age_ms": max(0, now - oldest.updated_at) if oldest else None,
                "waiting_workers": self._parked,
                "paused": self.options["paused"],
                "throttled_for_ms": max(0, self.throttled_until - now),
                "groups": len(self._group_running.keys() | {name for name, heap in self._group_ready.items() if heap}),
                "full": bool(self.options["max_queued"]) and len(queued) + len(self._by_status[PAUSED])
                >= self.options["max_queued"],
                "totals": dict(self.totals),
                **({"schedules": self.schedules_view()} if self._schedules else {}),
            }

    # -- validation and planning (under the lock; no state changes) ---------------------------------------------

    def _check_insert(self, where: str, entry: Any) -> Tuple[Any, int, int, Optional[str], str, int, Optional[str]]:
        if not isinstance(entry, dict):
            raise BadRequest(f"{where} must be an object")
        try:
            unknown = [name for name in entry if name not in TASK_FIELDS]
            if unknown:
                raise BadRequest(f"unknown field {_shown(unknown[0])}; a task's fields are {', '.join(TASK_FIELDS)} "
                                 f"(several tasks: {{\"tasks\": [...]}})", field=str(unknown[0])[:100])
            if "data" not in entry:
                raise BadRequest('data is missing: a task carries data (any JSON; null for none), as {"data": ...}')
            data, size = _json_sized("data", entry["data"])
            priority = _check_priority(entry.get("priority", 0))
            delay = _check_int("delay", entry.get("delay", 0), 0, MAX_DELAY_MS)
            key = entry.get("key")
            if "key" in entry:
                key = _check_text("key", key, MAX_KEY)
            status = entry.get("status", QUEUED)
            if status not in (QUEUED, PAUSED):
                raise BadRequest(f"status of a new task must be queued or paused, got {_shown(status)}")
            group = entry.get("group")
            if "group" in entry:
                group = _check_text("group", group, MAX_GROUP)
                if not group:
                    raise BadRequest("group must not be empty: leave it out for a task of no group")
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc}", **exc.fields) from None
        return data, priority, delay, key, status, size + len(key or "") + len(group or ""), group

    def _admit(self, count: int, producer: bool = True) -> None:
        """Lock held: refuse an insert of `count` tasks that would take the queue past its max_queued (503, nothing
        inserted; counted in `refused` if a producer's, not a schedule's). Only inserts are refused: retries,
        hand-backs, leases, reports and purges go on."""
        limit, waiting = self.options["max_queued"], len(self._by_status[QUEUED]) + len(self._by_status[PAUSED])
        if limit and waiting + count > limit:
            self.totals["refused"] += count if producer else 0
            raise Unavailable(f"queue {self.name} holds {waiting} waiting tasks, and at most {limit} (its "
                              f"max_queued): nothing was inserted; retry once workers have drained some",
                              queue=self.name, max_queued=limit)

    def _key_status(self, key: str) -> str:
        """The status of the task `key` names: held, remembered, or (key_ttl) in its window after it finished."""
        task_id = self._keys[key]
        task = self._tasks.get(task_id)
        if task is not None:
            return task.status
        if task_id in self._finished:
            return self._finished[task_id][0]
        return self._key_windows[key][1]

    def _open_delivery(self, task: Task) -> bool:
        """Whether reports for the latest delivery still apply: it is in progress, or its lease ran out and nobody
        has taken the task since (so a slow worker may still finish it)."""
        if task.status == IN_PROGRESS:
            return True
        latest = task.latest()
        return latest is not None and latest["outcome"] == "expired" and task.status in (QUEUED, FAILED)

    def _plan_reports(self, reports: List[Dict[str, Any]], now: int, lease: Optional[int] = None
                      ) -> List[Dict[str, Any]]:
        """Turn reports into records, or raise for the whole request: 404 before 409, each naming its ids. The done
        reports of a request make one record (the common case, and a batch of a hundred is one journal line). A
        409 names in `cancel` the reported tasks whose delivery was taken from the worker (cancelled, run past
        max_run, or leased again after its lease ran out): the worker should stop working on them."""
        records, missing, conflicts, cancel = [], [], [], []
        done: Dict[str, Any] = {"op": "done", "q": self.name, "ids": [], "results": [], "at": now}
        for report in reports:
            task_id, status, attempt = report["_id"], report["status"], report.get("attempt")
            task = self._tasks.get(task_id)
            if task is None:
                memo = self._finished.get(task_id)
                if memo is None:
                    missing.append(task_id)
                elif not (_OUTCOME[status] is not None and memo[2] == _OUTCOME[status] and attempt in (None, memo[1])):
                    conflicts.append((task_id, f"task {task_id} was cancelled" if memo[0] == CANCELLED
                                      else f"task {task_id} is {memo[0]}"))
                    if memo[0] == CANCELLED:
                        cancel.append(task_id)
                continue
            if self._past_max_run(task, now) and attempt in (None, task.attempt):
                conflicts.append((task_id, f"task {task_id} ran past its queue's max_run ({RUN_TIME_EXCEEDED})"))
                cancel.append(task_id)
                continue
            if self._open_delivery(task) and attempt in (None, task.attempt):
                if status == DONE:
                    done["ids"].append(task_id)
                    done["results"].append(report.get("result"))
                    continue
                record = self._report_record(task, report, now, lease)
                if record is not None:
                    records.append(record)
                continue
            if _OUTCOME[status] is not None and task.outcome(attempt or task.attempt) == _OUTCOME[status]:
                continue  # this report was applied before: succeed without effect (a heartbeat never is)
            taken = self._taken_because(task, attempt or task.attempt)
            if taken is not None:
                conflicts.append((task_id, taken))
                cancel.append(task_id)
            elif attempt is not None and attempt > task.attempt:
                conflicts.append((task_id, f"task {task_id} has had no delivery {attempt}"))
            elif attempt is not None and attempt < task.attempt:
                conflicts.append((task_id, f"delivery {attempt} of task {task_id} was superseded by {task.attempt}"))
            else:
                conflicts.append((task_id, f"task {task_id} is {task.status}, not in progress"))
        if missing:
            raise NotFound(f"no task {', '.join(missing)} in queue {self.name}", missing)
        if conflicts:
            raise Conflict("; ".join(reason for _, reason in conflicts), [task_id for task_id, _ in conflicts],
                           **({"cancel": cancel} if cancel else {}))
        if done["ids"]:
            records.append(done)
        return records

    def _taken_because(self, task: Task, attempt: int) -> Optional[str]:
        """Why delivery `attempt` of `task` was taken from its worker (cancelled; run past max_run; its lease ran
        out and the task went on without it), or None: it is open, ended otherwise, or is not remembered."""
        entry = task.delivery(attempt)
        outcome = entry["outcome"] if entry is not None else None
        if outcome == "cancelled" or (outcome == "expired" and task.status == CANCELLED and attempt == task.attempt):
            return f"task {task.id} was cancelled"
        if outcome == "failed" and entry is not None and entry["error"] == RUN_TIME_EXCEEDED:
            return f"task {task.id} ran past its queue's max_run ({RUN_TIME_EXCEEDED})"
        if outcome == "expired" and not (attempt == task.attempt and self._open_delivery(task)):
            if task.attempt > attempt:  # (the words an original worker's log shows)
                return f"delivery {attempt} of task {task.id} was superseded by {task.attempt}"
            return f"task {task.id} lost its lease (it ran out) and is {task.status}"
        return None

    def _past_max_run(self, task: Task, now: int) -> bool:
        """Whether the latest delivery of `task`, its lease run out, has also run past max_run by `now`: then no
        late report revives it (one still in progress fails from the clock)."""
        latest, limit = task.latest(), self.options["max_run"]
        return bool(limit) and task.status != IN_PROGRESS and latest is not None and \
            latest["outcome"] == "expired" and self._open_delivery(task) and now >= latest["leased_at"] + limit

    def _check_lease(self, field: str, lease: Optional[int]) -> None:
        """Lock held: a lease a worker asks for may be at most the queue's max_lease."""
        if lease is not None and lease > self.options["max_lease"]:
            raise BadRequest(f"{field} is {lease} ms; queue {self.name} allows at most its max_lease, "
                             f"{self.options['max_lease']} ms: ask for less, or raise max_lease", field=field)

    def _lease_until(self, now: int, lease: Optional[int], leased_at: int) -> int:
        """When a lease taken or renewed at `now` runs out: `lease` ms (the queue's if None) from now, but never
        past the delivery's max_run (counted from `leased_at`), which heartbeats cannot extend."""
        until = now + (min(lease, self.options["max_lease"]) if lease is not None else self.options["lease"])
        if self.options["max_run"]:
            until = min(until, leased_at + self.options["max_run"])
        return until

    def _report_record(self, task: Task, report: Dict[str, Any], now: int,
                       lease: Optional[int] = None) -> Optional[Dict[str, Any]]:
        status, base = report["status"], {"q": self.name, "id": task.id, "at": now}
        if status == IN_PROGRESS:
            lease = report.get("lease", lease)
            self._check_lease("lease" if "lease" not in report else "tasks[].lease", lease)
            latest = task.latest()
            record = dict(base, op="heartbeat",
                          until=self._lease_until(now, lease, latest["leased_at"] if latest else now))
            if "progress" in report:
                record["progress"] = report["progress"]
            return record
        if status == QUEUED:
            if task.status != IN_PROGRESS:
                return None
            if report.get("retry_after"):  # snoozed: due later, no attempt spent
                return dict(base, op="release", run_at=now + report["retry_after"])
            return dict(base, op="release")
        # failed: retry after a backoff while attempts remain, unless the worker says not to.
        spent = task.spent + (1 if task.status == IN_PROGRESS else 0)  # an expiry already spent this attempt
        retry_at = None
        if report.get("retry", True) and spent < self.options["max_attempts"] and task.status != FAILED:
            delay = report.get("retry_after")
            retry_at = now + (delay if delay is not None else self._backoff(spent))
        error = report["error"]
        if self._broker._over_bound():  # reports always work; past the bound their errors keep only their start
            error = error[:HISTORY_ERROR_LIMIT]
        return dict(base, op="fail", outcome="failed", error=error, retry_at=retry_at)

    def _backoff(self, spent: int) -> int:
        """Exponential backoff with equal jitter: half the doubled delay, plus up to as much again at random."""
        delay = min(self.options["max_backoff"], self.options["backoff"] * 2 ** min(spent - 1, 40))
        return delay // 2 + self._broker._random.randint(0, delay - delay // 2)

    # -- time: due delays and expired leases -----------------------------------------------------------------------

    def _tick(self, now: int) -> None:
        """Move tasks whose delay has passed to the ready heap, and expire leases that ran out."""
        writable = self._broker._durability.writable()  # first: it may rebuild the tables bound below
        tasks = self._tasks
        self._come_due(now)
        if not writable:
            return  # the journal's disk fails: reads go on, expiries and hand-offs wait for it
        leases = self._leases
        while leases and leases[0][0] <= now:
            until, task_id, attempt = heapq.heappop(leases)
            task = tasks.get(task_id)
            if task is None or task.status != IN_PROGRESS or task.attempt != attempt or task.lease_until != until:
                continue
            dead = task.spent + 1 >= self.options["max_attempts"]
            latest = task.latest()
            if self.options["max_run"] and latest is not None and now >= latest["leased_at"] + self.options["max_run"]:
                # Ran past its cap: a failed attempt, retried after a backoff or dead-lettered as a failure is.
                record = {"op": "fail", "q": self.name, "id": task_id, "at": now, "outcome": "failed",
                          "error": RUN_TIME_EXCEEDED, "retry_at": None if dead else now + self._backoff(task.spent + 1)}
            else:
                record = {"op": "fail", "q": self.name, "id": task_id, "at": now, "outcome": "expired",
                          "error": "lease expired", "retry_at": None if dead else now}
            try:
                self._broker._commit([record])
            except Unavailable:
                heapq.heappush(leases, (until, task_id, attempt))  # it expires on a later tick
                return
            if record["error"] == RUN_TIME_EXCEEDED:
                self._tell(task.worker, task_id, task.attempt)
        self._end_aged(now)
        self._close_key_windows(now)
        self._serve_waiters(now)

    def _come_due(self, now: int) -> None:
        """Move the tasks whose delay or backoff has passed by `now` to the ready heaps (a group's retry among
        them, so that it keeps its place before its group's next task)."""
        delayed, tasks = self._delayed, self._tasks
        while delayed and delayed[0][0] <= now:
            run_at, task_id = heapq.heappop(delayed)
            task = tasks.get(task_id)
            if task is not None and task.status == QUEUED and task.run_at == run_at:
                self._ready_now(task, run_at)

    def _end_aged(self, now: int) -> None:
        """End the tasks whose age is up (lock held): queued past expire_after (a dead letter, error "expired"),
        finished past retain (dropped); at most AGE_BATCH of each a tick."""
        for heap, age, op, alive in ((self._aging, self.options["expire_after"], "expire",
                                      lambda task, at: task.status == QUEUED and
                                      max(task.run_at, task.updated_at) == at),
                                     (self._retired, self.options["retain"], "purge",
                                      lambda task, at: task.status in FINAL_STATUSES and task.updated_at == at)):
            if not age:
                continue
            ids: Dict[str, Tuple[int, str]] = {}
            while heap and heap[0][0] + age <= now and len(ids) < AGE_BATCH:
                entry = heapq.heappop(heap)
                task = self._tasks.get(entry[1])
                if task is not None and alive(task, entry[0]):
                    ids[entry[1]] = entry
            if not ids:
                continue
            try:
                self._broker._commit([{"op": op, "q": self.name, "ids": list(ids), "at": now}])
            except Unavailable:
                for entry in ids.values():  # they end on a later tick
                    heapq.heappush(heap, entry)

    def _close_key_windows(self, now: int) -> None:
        """Close the dedupe windows of keys whose task finished key_ttl ago (all of them, key_ttl switched off):
        the key may make a new task again. At most AGE_BATCH a tick, in one record."""
        ends, ttl, closing = self._key_ends, self.options["key_ttl"], []
        while ends and (not ttl or ends[0][0] + ttl <= now) and len(closing) < AGE_BATCH:
            at, key, task_id = heapq.heappop(ends)
            window = self._key_windows.get(key)
            if window is not None and window[0] == task_id and window[2] == at:
                closing.append([key, task_id, at])
        if closing:
            try:
                self._broker._commit([{"op": "unkey", "q": self.name, "keys": closing, "at": now}])
            except Unavailable:
                for key, task_id, at in closing:  # they close on a later tick
                    heapq.heappush(ends, (at, key, task_id))

    def _set_window(self, key: str, window: Optional[Tuple[str, str, int]]) -> None:
        """Open (or replace, or with None close) the dedupe window of `key`, its bytes in the estimate; in a live
        commit, noting how to put it back."""
        old = self._key_windows.get(key)
        undo = self._broker._undo
        if undo is not None:
            undo.append((self._set_window, key, old))
        if old is not None:
            self.memory -= MEMO_BYTES + len(key)
            del self._key_windows[key]
        if window is not None:
            self.memory += MEMO_BYTES + len(key)
            self._key_windows[key] = window

    def run_ages(self, now: int) -> None:
        """For a queue with expire_after, retain or key windows open: end what is due by `now` (broker lock held).
        The server runs it every AGE_SECONDS; any request to the queue does too."""
        if self.options["expire_after"] or self.options["retain"] or self._key_ends:
            self._tick(now)

    # -- schedules -----------------------------------------------------------------------------------------------

    def run_schedules(self, now: int) -> Optional[int]:
        """Insert a task for each slot of the queue's schedules due by `now` (broker lock held, in a change): one
        commit holds the inserts and the "fire" record of the slots they run, so a slot runs once across restarts,
        crashes and replays. Returns when a slot is next due (ms), or None. A slot the queue cannot take (its
        max_queued, --max-memory, a failing disk) is tried again SCHEDULE_RETRY_MS later; if that makes it late,
        its schedule's `missed` decides."""
        if not self._schedules:
            return None
        rows, fired = [], []
        for option in self.options["schedules"]:
            name = option["name"]
            handled = self._fired.get(name)
            if handled is None:  # (a schedule whose start was not recorded starts now)
                fired.append([name, now])
                continue
            upcoming = self._next_after(name, handled)
            if upcoming is None or upcoming > now:
                continue  # (the common case, and a schedule that fires once in years: no search of the calendar)
            slots, latest = self._schedules[name].due(handled, now, option["missed"])
            if latest is None:
                continue
            fired.append([name, latest])
            for slot in slots:
                key = f"schedule:{name}:{slot_name(slot)}"
                if key not in self._keys:  # (the key of a slot run before, while its task is remembered)
                    rows.append([self._broker._next_id(), option["data"], option["priority"], QUEUED, key, 0,
                                 _value_bytes(option["data"]) + len(key)])
        if fired:
            try:
                if rows:
                    self._admit(len(rows), producer=False)
                    self._broker._admit(sum(TASK_BYTES + row[6] for row in rows))
                self._broker._commit(([{"op": "insert", "q": self.name, "at": now, "tasks": rows}] if rows else []) +
                                     [{"op": "fire", "q": self.name, "at": now, "slots": fired}])
            except Unavailable:
                return now + SCHEDULE_RETRY_MS
            if rows:
                self._serve_waiters(now)
        return self._next_slot()

    def _next_slot(self) -> Optional[int]:
        """When the next slot of any schedule is due (ms), or None."""
        times = [self._next_after(name, handled) for name, handled in self._fired.items() if name in self._schedules]
        times = [at for at in times if at is not None]
        return min(times) if times else None

    def _next_after(self, name: str, handled: int) -> Optional[int]:
        """The first slot of schedule `name` after `handled`, found once (a cron's calendar search is not free)."""
        known = self._upcoming.get(name)
        if known is None or known[0] != handled:
            known = self._upcoming[name] = (handled, self._schedules[name].next_slot(handled))
        return known[1]

    def schedules_view(self) -> List[Dict[str, Any]]:
        """Lock held: each schedule's next slot (ms since the epoch, and as text), and the time through which its
        slots were run or passed over."""
        view = []
        for name, schedule in self._schedules.items():
            handled = self._fired.get(name)
            upcoming = self._next_after(name, handled) if handled is not None else None
            view.append({"name": name, "next_fire_ms": upcoming,
                         "next_fire": slot_name(upcoming) if upcoming is not None else None,
                         "handled_through": slot_name(handled) if handled is not None else None})
        return view

    def fired_slots(self) -> List[List[Any]]:
        """Lock held: [schedule name, the latest slot run or passed over], for a compacted journal."""
        return [[name, slot] for name, slot in self._fired.items() if name in self._schedules]

    def _apply_fire(self, rec: Dict[str, Any]) -> None:
        undo = self._broker._undo
        for name, slot in rec["slots"]:
            if undo is not None:
                undo.append((self._put_back_fired, name, self._fired.get(name)))
            self._fired[name] = slot
        for name in [name for name in self._fired if name not in self._schedules]:  # schedules taken away
            if undo is not None:
                undo.append((self._put_back_fired, name, self._fired[name]))
            del self._fired[name]

    def _put_back_fired(self, name: str, slot: Optional[int]) -> None:
        if slot is None:
            self._fired.pop(name, None)
        else:
            self._fired[name] = slot

    def _tell(self, worker: Optional[str], task_id: str, attempt: int) -> None:
        """A delivery of task `task_id` was taken from `worker`: note it for its next answer's `cancel`, and answer
        its parked long polls now (with no tasks), so that it hears at once rather than when its wait ends."""
        if worker is None:
            return  # an anonymous worker learns from the 409 of its next report
        self._broker.fleet.notice(worker, self.name, task_id, attempt)
        for waiter in list(self._parked_by_worker.get(worker, ())):
            if waiter.parked:
                self._settle(waiter, [])

    def _next_due(self) -> Optional[int]:
        """When the next delayed task comes due or the next lease runs out (ms), if ever; and, while long polls
        wait for tasks that are due, when the throttle ends or the rate limit lets the next one out."""
        times = [heap[0][0] for heap in (self._delayed, self._leases) if heap]
        if self._parked and (self._ready or self._turns):
            if self.throttled_until > self._broker._now():
                times.append(self.throttled_until)
            if self.options["rate"] and self._tokens < 1:
                times.append(self._tokens_at + min(MAX_DELAY_MS, math.ceil((1 - self._tokens) * 1000 /
                                                                           self.options["rate"])))
        return min(times) if times else None

    def _refill(self, now: int) -> float:
        """The rate limit's token bucket at `now`: it fills at `rate` a second, up to `burst` (observed, not state:
        a restarted server starts with a full bucket). Returns the tokens there are."""
        if now > self._tokens_at:
            self._tokens = min(float(self.options["burst"]),
                               self._tokens + (now - self._tokens_at) * self.options["rate"] / 1000.0)
            self._tokens_at = now
        return self._tokens

    # -- leasing and waiting ---------------------------------------------------------------------------------------

    def _take(self, max_tasks: int, worker: Optional[str], now: int, lease: Optional[int] = None
              ) -> List[Dict[str, Any]]:
        """Lease up to `max_tasks` ready tasks (respecting pause and max_in_flight) and return what workers see."""
        limit = max_tasks
        if self.options["max_in_flight"]:
            limit = min(limit, self.options["max_in_flight"] - len(self._by_status[IN_PROGRESS]))
        if self.options["rate"]:
            limit = min(limit, int(self._refill(now)))
        if limit <= 0 or self.options["paused"] or now < self.throttled_until:
            return []
        self._come_due(now)  # (a change that serves waiters without the whole clock: an insert, a resume)
        ready, tasks, ids, picked, taking = self._ready, self._tasks, [], set(), {}
        if self._turns:  # groups wait for their turn: the general way
            while len(ids) < limit:
                task_id = self._next_ready(now, picked, taking)
                if task_id is None:
                    break
                ids.append(task_id)
                picked.add(task_id)
        else:  # (no group has a task due: the ready heap alone, the hot path)
            while ready and len(ids) < limit:
                _, task_id = heapq.heappop(ready)
                task = tasks.get(task_id)
                if task is not None and task.status == QUEUED and task.run_at <= now and task_id not in picked:
                    ids.append(task_id)
                    picked.add(task_id)
        if not self._ready and not self._turns:
            self._due_since = None  # nothing is due: nobody is missed
        if not ids:
            return []
        try:
            self._broker._commit([{"op": "lease", "q": self.name, "ids": ids, "worker": worker,
                                   "until": self._lease_until(now, lease, now), "at": now}])
        except Unavailable:
            for task_id in ids:  # back in line (an entry the undo re-placed too is a harmless duplicate)
                self._ready_now(tasks[task_id], now)
            raise
        if self.options["rate"]:
            self._tokens -= len(ids)
        leased = []
        for task_id in ids:
            task = tasks[task_id]
            if task.attempt > 1:  # a delivery whose lease ran out is now superseded: its worker must stop
                earlier = task.delivery(task.attempt - 1)
                if earlier is not None and earlier["outcome"] == "expired" and earlier["worker"] != worker:
                    self._tell(earlier["worker"], task_id, earlier["attempt"])
            leased.append({"_id": task_id, "data": task.data, "attempt": task.attempt})
        return leased

    def _serve_waiters(self, now: int) -> None:
        """Hand ready tasks to parked long polls, oldest first, so that nobody barges ahead of them."""
        while self._waiters:  # (read each time: settling a wait may sweep the line into a new one)
            waiter = self._waiters[0]
            if not waiter.parked:
                self._waiters.popleft()  # it ended already (out of time, its client gone, served by another queue)
                continue
            try:
                leased = self._take(waiter.max, waiter.worker, now, waiter.lease)
            except Unavailable:
                return  # the change that called for this stands; the waiter goes on waiting
            if not leased:
                return
            self._waiters.popleft()
            self._settle(waiter, leased)

    def run_clock(self, now: int) -> Optional[int]:
        """For a queue with parked long polls: hand them the tasks whose delay ended or whose lease ran out by
        `now` (broker lock held). Returns when the next such moment comes (ms), or None. The server runs it from
        a timer; a thread blocked in the Python API runs the clock itself."""
        if not self._parked:
            return None
        self._tick(now)
        return self._next_due() if self._parked else None

    def wake_all(self) -> None:
        """The broker closes (lock held): every parked wait is woken, to end at once (a wait over several queues
        may be woken more than once: waking is idempotent)."""
        for waiter in list(self._waiters) + [w for waiting in self._result_waiters.values() for w in waiting]:
            if waiter.parked:
                waiter.wake()

    def _task_view(self, task_id: str) -> Dict[str, Any]:
        task = self._tasks.get(task_id)
        if task is not None:
            return task.snapshot(self.name)
        memo = self._finished.get(task_id)
        if memo is None:
            raise NotFound(f"task {task_id} not found in queue {self.name}", [task_id])
        # A non-persistent queue discarded it; what is remembered is its end.
        return {"_id": task_id, "queue": self.name, "status": memo[0], "attempt": memo[1], "discarded": True}

    # -- state changes: run only from Broker._apply, live or in replay ------------------------------------------
    # Each apply function passes every task it changes through _touch first (which notes how to put it back if the
    # commit fails halfway, and takes its bytes out of the memory estimate) and through _hold after, if the queue
    # still holds it.

    def _apply_insert(self, rec: Dict[str, Any]) -> None:
        at, tasks, by_status = rec["at"], self._tasks, self._by_status
        undo = self._broker._undo
        for row in rec["tasks"]:
            task_id, data, priority, status, key, delay = row[:6]
            size = row[6] if len(row) > 6 else _value_bytes(data) + len(key or "")  # journals of version 1
            # Without a delay, run_at is the very int of `at`: one object less per task.
            task = Task.made(task_id, data, priority, status, key, at + delay if delay else at, at, size,
                             row[7] if len(row) > 7 else None)
            if undo is not None:
                undo.append((self._put_back, task, None))
            tasks[task_id] = task
            by_status[status][task_id] = task
            if key is not None:
                self._keys[key] = task_id
            if status == QUEUED:
                self._place(task, at)
            self._hold(task)
            if "batch" in rec:
                self._broker._join_batch(rec["batch"], task_id)
        self.totals["inserted"] += len(rec["tasks"])

    def _apply_lease(self, rec: Dict[str, Any]) -> None:
        at, until, worker = rec["at"], rec["until"], rec["worker"]
        for task_id in rec["ids"]:
            task = self._touch(self._tasks[task_id])
            self.totals["lease_wait_ms"] += max(0, at - max(task.updated_at, task.run_at))  # queued and due
            task.attempt += 1
            task.worker, task.lease_until = worker, until
            if not task.history:
                task.history = []
            elif "progress" in task.history[-1]:  # progress is kept for the latest delivery only
                task.size -= _value_bytes(task.history[-1].pop("progress"))
            task.history.append({"attempt": task.attempt, "worker": worker, "leased_at": at, "ended_at": None,
                                 "outcome": None, "error": None, "duration_ms": None})
            del task.history[:-HISTORY_LIMIT]
            self._move(task, IN_PROGRESS, at)
            heapq.heappush(self._leases, (until, task_id, task.attempt))
            self._hold(task)
        self.totals["leased"] += len(rec["ids"])
        if len(self._leases) > 2 * len(self._by_status[IN_PROGRESS]) + 1024:
            self._reindex_leases()

    def _apply_heartbeat(self, rec: Dict[str, Any]) -> None:
        task = self._touch(self._tasks[rec["id"]])
        latest = task.latest()
        if latest is not None and latest["outcome"] == "expired":
            # Revived after its lease ran out (nobody took the task): as if it never expired.
            task.spent -= 1
            latest.update(outcome=None, error=None, ended_at=None, duration_ms=None)
        task.lease_until = rec["until"]
        if "progress" in rec and latest is not None:
            if "progress" in latest:
                task.size -= _value_bytes(latest["progress"])
            latest["progress"] = rec["progress"]
            task.size += _value_bytes(rec["progress"])
            if task.id in self._result_waiters:  # those following the task hear of its progress
                self._broker._answers.append((self._answer, task.id, task.snapshot(self.name)))
        self._move(task, IN_PROGRESS, rec["at"])
        heapq.heappush(self._leases, (rec["until"], task.id, task.attempt))
        self._hold(task)

    def _apply_done(self, rec: Dict[str, Any]) -> None:
        at, keep = rec["at"], self.options["persistent"]
        for task_id, result in zip(rec["ids"], rec["results"]):
            task = self._touch(self._tasks[task_id])
            self._end_delivery(task, "done", None, at)
            task.result, task.error = result, None
            if keep and result is not None:
                task.size += _value_bytes(result)
            self._finish(task, DONE, at)
        self.totals["done"] += len(rec["ids"])

    def _apply_fail(self, rec: Dict[str, Any]) -> None:
        task, at, outcome = self._touch(self._tasks[rec["id"]]), rec["at"], rec["outcome"]
        was_dead = task.status == FAILED  # a late failure report on a task its expiry already dead-lettered
        self._end_delivery(task, outcome, rec["error"], at)
        task.error = rec["error"]
        if outcome == "expired":
            self.totals["expired"] += 1
        if rec["retry_at"] is None:
            self.totals["failed"] += 0 if was_dead else 1
            self._finish(task, FAILED, at)
        else:
            self.totals["retried"] += 1
            self._requeue(task, rec["retry_at"], at)
            self._hold(task)

    def _apply_unkey(self, rec: Dict[str, Any]) -> None:
        """Dedupe windows closed (key_ttl): each key no longer names its finished task, which may be kept still."""
        for key, task_id, at in rec["keys"]:
            window = self._key_windows.get(key)
            if window is None or window[0] != task_id or window[2] != at:
                continue
            self._set_window(key, None)
            task = self._tasks.get(task_id)
            alone = task is None and task_id not in self._finished  # only the window kept it
            if self._keys.get(key) == task_id and (task is None or task.status in FINAL_STATUSES) and \
                    (self.options["key_ttl"] or alone):
                if self._broker._undo is not None:
                    self._broker._undo.append((self._keys.__setitem__, key, task_id))
                del self._keys[key]

    def _apply_expire(self, rec: Dict[str, Any]) -> None:
        """Queued tasks past their expire_after: dead letters, error "expired" (no delivery ends: none ran)."""
        at = rec["at"]
        for task_id in rec["ids"]:
            task = self._touch(self._tasks[task_id])
            task.error = EXPIRED
            self._finish(task, FAILED, at)
        self.totals["failed"] += len(rec["ids"])

    def _apply_throttle(self, rec: Dict[str, Any]) -> None:
        """A worker's throttle, or (`shorten`) a throttle in force cut to a lowered max_throttle."""
        undo = self._broker._undo
        if undo is not None:
            undo.append((setattr, self, "throttled_until", self.throttled_until))
        if rec.get("shorten"):
            self.throttled_until = min(self.throttled_until, rec["until"])
        else:
            self.throttled_until = max(self.throttled_until, rec["until"])

    def _apply_release(self, rec: Dict[str, Any]) -> None:
        task = self._touch(self._tasks[rec["id"]])
        self._end_delivery(task, "queued", None, rec["at"])
        self.totals["released"] += 1
        self._requeue(task, rec.get("run_at", rec["at"]), rec["at"])  # run_at: snoozed
        self._hold(task)

    def _apply_status(self, rec: Dict[str, Any]) -> None:
        task, status, at = self._touch(self._tasks[rec["id"]]), rec["status"], rec["at"]
        if status == CANCELLED:
            self.totals["cancelled"] += 1
            if task.status == IN_PROGRESS:  # its delivery ends here; its worker is told when it next reports
                self._end_delivery(task, "cancelled", None, at)
            self._finish(task, CANCELLED, at)
            return
        if status == PAUSED:
            self._move(task, PAUSED, at)
        else:
            if task.status == FAILED:
                task.spent = 0  # an operator retries a dead letter: it gets its attempts back
                task.run_at = at
            self._requeue(task, task.run_at, at)
        self._hold(task)

    def _apply_task(self, rec: Dict[str, Any]) -> None:
        size = rec["size"] if "size" in rec else _value_bytes(rec["data"]) + len(rec["key"] or "")
        task = Task.made(rec["id"], rec["data"], rec["priority"], rec["status"], rec["key"],
                         rec["run_at"], rec["created_at"], size, rec.get("group"))
        for field in ("updated_at", "attempt", "spent", "worker", "lease_until", "error", "result"):
            setattr(task, field, rec[field])
        task.history = [dict(entry) for entry in rec["history"]] or ()
        self._tasks[task.id] = task
        self._by_status[task.status][task.id] = task
        if task.key is not None:
            self._keys[task.key] = task.id
        if task.status == QUEUED:
            self._place(task, rec["updated_at"])
        elif task.status == IN_PROGRESS:
            heapq.heappush(self._leases, (task.lease_until, task.id, task.attempt))
            if task.group is not None:
                self._count_running(task.group, QUEUED, IN_PROGRESS)
        elif task.status in FINAL_STATUSES and self.options["retain"]:
            heapq.heappush(self._retired, (task.updated_at, task.id))
        self._hold(task)

    def key_windows(self) -> List[List[Any]]:
        """Lock held: the open dedupe windows (key_ttl), as [key, task id, status, when it finished], for a
        compacted journal."""
        return [[key, task_id, status, at] for key, (task_id, status, at) in self._key_windows.items()]

    def _apply_restore(self, rec: Dict[str, Any]) -> None:
        self.totals.update(rec["totals"])
        self.throttled_until = rec.get("throttled_until", 0)
        self._fired.update(rec.get("fired", ()))
        for key, task_id, status, at in rec.get("keys", ()):
            self._set_window(key, (task_id, status, at))
            heapq.heappush(self._key_ends, (at, key, task_id))
            self._keys.setdefault(key, task_id)
        for task_id, status, attempt, outcome, key in rec["finished"]:
            self._finished[task_id] = (status, attempt, outcome, key)
            self.memory += MEMO_BYTES + len(key or "")
            if key is not None:
                self._keys.setdefault(key, task_id)
        # Each status lists its tasks in the order they entered it, which is the order of updated_at.
        for status, tasks in self._by_status.items():
            ordered = sorted(tasks.values(), key=lambda task: task.updated_at)
            self._by_status[status] = {task.id: task for task in ordered}

    def _adopt(self, other: "Queue") -> None:
        """Take the state of `other` (rebuilt from the journal), keeping this queue's waiters."""
        for name in ("options", "_tasks", "_by_status", "_ready", "_delayed", "_leases", "_keys", "_finished",
                     "throttled_until", "_aging", "_retired", "_key_windows", "_key_ends", "_group_ready",
                     "_group_running", "_group_retrying", "_turns", "_turn_of", "_turn_count", "_grouped_entries",
                     "totals", "memory", "_schedules", "_fired", "_upcoming"):
            setattr(self, name, getattr(other, name))

    def _apply_purge(self, rec: Dict[str, Any]) -> None:
        for task_id in rec["ids"]:
            task = self._tasks.get(task_id)
            if task is not None:
                self._broker._task_ended(task_id, CANCELLED, rec.get("at", 0))  # (a queued task purged never ran)
                self._touch(task)
                del self._tasks[task_id]
                del self._by_status[task.status][task_id]
                if task.group is not None and task.status == QUEUED:
                    self._not_retrying(task)
                if task.key is not None and self._keys.get(task.key) == task_id and \
                        not self._in_window(task.key, task_id):
                    del self._keys[task.key]

    def _in_window(self, key: str, task_id: str) -> bool:
        """Whether `key` of task `task_id` (finished, about to be forgotten or dropped) still dedupes (key_ttl)."""
        window = self._key_windows.get(key)
        return bool(self.options["key_ttl"]) and window is not None and window[0] == task_id

    # -- helpers of the apply functions ----------------------------------------------------------------------------

    def _touch(self, task: Task) -> Task:
        """Before an apply function changes `task`: in a live commit, note how to put it back; and take its
        bytes out of the memory estimate (_hold puts them back in once the change is made)."""
        undo = self._broker._undo
        if undo is not None:
            undo.append((self._put_back, task, task.save()))
        self.memory -= task.memory
        return task

    def _hold(self, task: Task) -> None:
        self.memory += task.memory

    def _put_back(self, task: Task, state: Optional[Tuple[Any, ...]]) -> None:
        """Undo a failed commit's change to `task`: make it what `state` (Task.save) says, or remove it if it was
        new (state None). Heap entries it left behind are stale, and skipped as any stale entry is."""
        held = self._tasks.get(task.id) is task
        changed_from = task.status  # (what the failed commit made of it, held or discarded)
        if held:
            del self._by_status[task.status][task.id]
            if task.key is not None and self._keys.get(task.key) == task.id:
                del self._keys[task.key]
            if state is None:
                del self._tasks[task.id]
        if state is None:
            return
        task.restore(state)
        if task.group is not None and changed_from != task.status:
            self._count_running(task.group, changed_from, task.status)
        self._finished.pop(task.id, None)
        if not held:
            self._tasks[task.id] = task
            self._out_of_order.add(None)
        self._by_status[task.status][task.id] = task
        self._out_of_order.add(task.status)
        if task.key is not None:
            self._keys[task.key] = task.id
        if task.status == QUEUED:
            self._place(task, self._broker._now())
        elif task.status == IN_PROGRESS:
            heapq.heappush(self._leases, (task.lease_until, task.id, task.attempt))

    def _put_back_totals(self, totals: Dict[str, int], memory: int) -> None:
        """Undo, the last step for a queue: its totals and memory estimate, and the order of its tables (tasks in
        the order they were made; each status in the order tasks entered it, as _apply_restore orders them). Only
        tables that tasks were put back into are sorted again."""
        self.totals, self.memory = totals, memory
        for status in self._out_of_order:
            table = self._tasks if status is None else self._by_status[status]
            ordered = sorted(table.items(), key=lambda item: (0 if status is None else item[1].updated_at, item[0]))
            table.clear()
            table.update(ordered)
        self._out_of_order.clear()

    def _put_back_memo(self, task_id: str, memo: Tuple[str, int, Optional[str], Optional[str]]) -> None:
        self._finished[task_id] = memo
        self._finished.move_to_end(task_id, last=False)
        if memo[3] is not None:
            self._keys.setdefault(memo[3], task_id)

    def _move(self, task: Task, status: str, at: int) -> None:
        del self._by_status[task.status][task.id]
        self._by_status[status][task.id] = task
        if task.group is not None:
            self._count_running(task.group, task.status, status)
            if task.status == QUEUED and status != QUEUED:
                self._not_retrying(task)
        task.status, task.updated_at = status, at
        if status != IN_PROGRESS:
            task.lease_until = None

    def _count_running(self, group: str, was: str, now_is: str) -> None:
        """Keep a group's count of tasks in progress as one of them changes status; one ending frees its group to
        take a turn again (at the back of the line)."""
        running = self._group_running
        if was == IN_PROGRESS and now_is != IN_PROGRESS:
            left = running.pop(group, 1) - 1
            if left > 0:
                running[group] = left
            self._offer_turn(group, to_the_back=group not in self._turn_of)
        elif now_is == IN_PROGRESS and was != IN_PROGRESS:
            running[group] = running.get(group, 0) + 1

    def _requeue(self, task: Task, run_at: int, at: int) -> None:
        """Back to `queued`, due at `run_at`: a retry, a hand-back, a resume."""
        task.run_at = run_at
        self._move(task, QUEUED, at)
        self._place(task, at)

    def _place(self, task: Task, now: int) -> None:
        """Index a queued task in the ready (or its group's) or the delayed heap; earlier entries go stale."""
        if task.run_at <= now:
            self._ready_now(task, now)
        else:
            heapq.heappush(self._delayed, (task.run_at, task.id))
            if task.group is not None and task.attempt and self.options["group_on_failure"] == "block":
                self._group_retrying.setdefault(task.group, set()).add(task.id)  # a retry holds its group back
        if len(self._ready) + len(self._delayed) + self._grouped_entries > 2 * len(self._by_status[QUEUED]) + 1024:
            self._reindex_queued(now)
        if self.options["expire_after"]:
            heapq.heappush(self._aging, (max(task.run_at, task.updated_at), task.id))  # due, or resumed, then
            if len(self._aging) > 2 * len(self._by_status[QUEUED]) + 1024:
                self._reindex_aging()

    # Heaps are rebuilt from the tasks they index when stale entries outnumber live ones: the cost, proportional to
    # the live entries, is spread over at least as many operations, so it stays constant per operation.

    def _ready_now(self, task: Task, now: int) -> None:
        """A queued task is due: in the ready heap, or its group's (which then takes its turn)."""
        if self._due_since is None:
            self._due_since = now  # (first: when it came due, not when its group's turn is offered)
        if task.group is None:
            heapq.heappush(self._ready, (-task.priority, task.id))
        else:
            self._not_retrying(task)
            heapq.heappush(self._group_ready.setdefault(task.group, []), (-task.priority, task.id))
            self._grouped_entries += 1
            self._offer_turn(task.group)

    def _not_retrying(self, task: Task) -> None:
        """A task of a group is no longer waiting for its retry (it came due, or left the queue): it no longer
        holds its group back, which gets a turn if it has tasks due."""
        retrying = self._group_retrying.get(task.group)
        if retrying is not None and task.id in retrying:
            retrying.discard(task.id)
            if not retrying:
                del self._group_retrying[task.group]
            if task.group not in self._turn_of:
                self._offer_turn(task.group)

    def _offer_turn(self, group: str, to_the_back: bool = False) -> None:
        """Give `group` (with due tasks) an entry in the line of turns, or a better one for a better task; to the
        back of the line once it has been served."""
        heap, turn = self._group_ready.get(group), self._turn_of.get(group)
        if not heap:
            return
        best = heap[0][0]
        if turn is not None and not to_the_back:
            if best >= turn[0]:
                return  # its entry stands
            stamp, count = turn[1], turn[2]
        else:
            stamp = heap[0][1] if turn is None and not to_the_back else self._broker.last_id()
            self._turn_count += 1
            count = self._turn_count
        self._turn_of[group] = (best, stamp, count)
        heapq.heappush(self._turns, (best, stamp, count, group))
        if self._due_since is None:  # a group freed (or due) with nobody polling since: unattended from now
            self._due_since = self._broker._now()
        if len(self._turns) > 2 * len(self._turn_of) + 1024:  # stale entries (a group's better task) dropped
            self._turns = [turn + (name,) for name, turn in self._turn_of.items()]
            heapq.heapify(self._turns)

    def _group_open(self, group: str, now: int, taking: Dict[str, int]) -> bool:
        """Whether `group` may have one more task in progress (with `taking` more about to be leased)."""
        limit = self.options["group_limit"]
        if limit and self._group_running.get(group, 0) + taking.get(group, 0) >= limit:
            return False
        retrying = self._group_retrying.get(group)
        if retrying and self.options["group_on_failure"] == "block":
            for task_id in list(retrying):
                task = self._tasks.get(task_id)
                if task is None or task.status != QUEUED or task.run_at <= now or task.group != group:
                    retrying.discard(task_id)
            if not retrying:
                del self._group_retrying[group]
            return not retrying
        return True

    def _next_ready(self, now: int, picked: set, taking: Dict[str, int]) -> Optional[str]:
        """The next task to lease, or None: the best due ungrouped task, or the best task of the group whose turn
        it is, whichever comes first by priority, then id or stamp. Stale entries met on the way are dropped; a
        group that may not lease now leaves the line until a task of it finishes or comes due."""
        ready, turns = self._ready, self._turns
        while ready and not self._due(ready[0], now, picked):
            heapq.heappop(ready)
        while turns:
            best, stamp, count, group = turns[0]
            if self._turn_of.get(group) != (best, stamp, count):
                heapq.heappop(turns)  # stale
                continue
            heap = self._group_ready.get(group, [])
            while heap and not self._due(heap[0], now, picked):
                heapq.heappop(heap)
                self._grouped_entries -= 1
            if not heap or not self._group_open(group, now, taking):
                heapq.heappop(turns)
                del self._turn_of[group]
                if not heap:
                    self._group_ready.pop(group, None)
                continue
            if heap[0][0] != best:  # its best task changed: the same place in line, another priority
                heapq.heappop(turns)
                self._turn_of[group] = (heap[0][0], stamp, count)
                heapq.heappush(turns, (heap[0][0], stamp, count, group))
                continue
            break
        if ready and (not turns or ready[0] <= turns[0][:2]):
            return heapq.heappop(ready)[1]
        if not turns:
            return None
        group = heapq.heappop(turns)[3]
        del self._turn_of[group]
        heap = self._group_ready[group]
        task_id = heapq.heappop(heap)[1]
        self._grouped_entries -= 1
        taking[group] = taking.get(group, 0) + 1
        if heap:
            self._offer_turn(group, to_the_back=True)
        else:
            del self._group_ready[group]
        return task_id

    def _due(self, entry: Tuple[int, str], now: int, picked: Iterable[str] = ()) -> bool:
        """Whether a ready heap's entry (-priority, id) names a task queued and due at `now` (not one stale, or
        already picked). (_take's hot path makes the same check inline.)"""
        task = self._tasks.get(entry[1])
        return task is not None and task.status == QUEUED and task.run_at <= now and entry[1] not in picked

    def _reindex_queued(self, now: int) -> None:
        self._ready, self._delayed = [], []
        self._group_ready, self._group_retrying, self._turns, self._turn_of = {}, {}, [], {}
        for task in self._by_status[QUEUED].values():
            if task.run_at <= now:
                if task.group is None:
                    self._ready.append((-task.priority, task.id))
                else:
                    self._group_ready.setdefault(task.group, []).append((-task.priority, task.id))
            else:
                self._delayed.append((task.run_at, task.id))
                if task.group is not None and task.attempt and self.options["group_on_failure"] == "block":
                    self._group_retrying.setdefault(task.group, set()).add(task.id)
        heapq.heapify(self._ready)
        heapq.heapify(self._delayed)
        self._grouped_entries = sum(len(heap) for heap in self._group_ready.values())
        for group, heap in self._group_ready.items():
            heapq.heapify(heap)
            self._offer_turn(group)

    def _reindex_aging(self) -> None:
        self._aging = [(max(task.run_at, task.updated_at), task.id) for task in self._by_status[QUEUED].values()]
        heapq.heapify(self._aging)

    def _reindex_retired(self) -> None:
        self._retired = [(task.updated_at, task.id) for status in FINAL_STATUSES
                         for task in self._by_status[status].values()]
        heapq.heapify(self._retired)

    def _reindex_leases(self) -> None:
        self._leases = [(task.lease_until, task.id, task.attempt)
                        for task in self._by_status[IN_PROGRESS].values()]
        heapq.heapify(self._leases)

    def _end_delivery(self, task: Task, outcome: str, error: Optional[str], at: int) -> None:
        """Close the history entry of the latest delivery; failures and expiries spend an attempt, once. The entry
        keeps the error's first HISTORY_ERROR_LIMIT characters: a worker's error costs memory in every entry."""
        latest = task.latest()
        first_end = latest is None or latest["outcome"] is None
        if outcome in ("failed", "expired") and first_end:
            task.spent += 1
        if latest is not None:
            latest.update(outcome=outcome, error=error if error is None else error[:HISTORY_ERROR_LIMIT],
                          ended_at=at, duration_ms=at - latest["leased_at"])

    def _finish(self, task: Task, status: str, at: int) -> None:
        """Move a task (touched) to a final status: kept, or (done and cancelled on a non-persistent queue)
        discarded and remembered. Dead letters (failed) are always kept. Result waiters are answered once the
        commit has succeeded."""
        self._move(task, status, at)
        self._broker._task_ended(task.id, status, at)
        if task.id in self._result_waiters:
            self._broker._answers.append((self._answer, task.id, task.snapshot(self.name)))
        if task.key is not None and self.options["key_ttl"]:
            self._set_window(task.key, (task.id, status, at))
            heapq.heappush(self._key_ends, (at, task.key, task.id))
        if status == FAILED or self.options["persistent"]:
            self._hold(task)
            if self.options["retain"]:
                heapq.heappush(self._retired, (at, task.id))
                if len(self._retired) > 2 * sum(len(self._by_status[s]) for s in FINAL_STATUSES) + 1024:
                    self._reindex_retired()
            return
        del self._tasks[task.id]
        del self._by_status[status][task.id]
        latest = task.latest()
        self._finished[task.id] = (status, task.attempt, latest["outcome"] if latest else None, task.key)
        self.memory += MEMO_BYTES + len(task.key or "")
        undo = self._broker._undo
        while len(self._finished) > FINISHED_MEMORY:
            old_id, memo = self._finished.popitem(last=False)
            self.memory -= MEMO_BYTES + len(memo[3] or "")
            if undo is not None:
                undo.append((self._put_back_memo, old_id, memo))
            if memo[3] is not None and self._keys.get(memo[3]) == old_id and not self._in_window(memo[3], old_id):
                del self._keys[memo[3]]  # the key's window closes when its task is forgotten (without key_ttl)

    def _answer(self, task_id: str, result: Tuple[Dict[str, Any], int]) -> None:
        """Hand a finished task's view (and the journal ticket that makes it durable) to those waiting for it."""
        for waiter in self._result_waiters.pop(task_id, ()):
            waiter.parked, waiter.result = False, result
            waiter.wake()


_OUTCOME = {DONE: "done", FAILED: "failed", QUEUED: "queued", IN_PROGRESS: None}


_TASK_ID_END = re.compile(TASK_ID_PATTERN.replace("[0-9]+", "([0-9]+)")[:-1] + r"\Z")


def _seq_of(task_id: Any) -> int:
    """The sequence number inside a task id ("<epoch>-<seq>"), which orders listings; BadRequest if malformed."""
    found = _TASK_ID_END.search(task_id) if isinstance(task_id, str) else None
    if found is None:
        raise BadRequest(f"after must be a task id (as the `next` of a page), got {str(task_id)[:100]!r}")
    return int(found.group(1))



def _check_reports(reports: Iterable[Any]) -> List[Dict[str, Any]]:
    """Validate the shape of every report before anything is applied; a repeated id is refused."""
    if not isinstance(reports, (list, tuple)):
        raise BadRequest("tasks must be a list of reports")
    if len(reports) > MAX_REPORTS:
        raise BadRequest(f"tasks holds {len(reports)} reports; at most {MAX_REPORTS} per request")
    checked, seen = [], set()
    for index, report in enumerate(reports):
        where = f"tasks[{index}]"
        if not isinstance(report, dict):
            raise BadRequest(f"{where} must be an object with _id and status")
        task_id = report.get("_id")
        if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID:
            raise BadRequest(f"{where}._id must be a task id string (at most {MAX_TASK_ID} characters)")
        if task_id in seen:
            raise BadRequest(f"{where}: task {task_id} is reported twice", [task_id])
        seen.add(task_id)
        status = report.get("status")
        if not isinstance(status, str) or status not in _OUTCOME:
            raise BadRequest(f"{where}.status must be done, failed, in progress or queued, got {_shown(status)}", [task_id])
        item: Dict[str, Any] = {"_id": task_id, "status": status}
        try:
            if report.get("attempt") is not None:
                item["attempt"] = _check_int("attempt", report["attempt"], 1, MAX_ATTEMPT)
            # Each field is checked whatever the status (a done report with "error": 5 is a client's bug to see);
            # null stands for absent, as original workers may send it.
            error = None if report.get("error") is None else _check_text("error", report["error"])
            retry = None if report.get("retry") is None else _check_bool("retry", report["retry"])
            retry_after = report.get("retry_after")
            if retry_after is not None:
                retry_after = _check_int("retry_after", retry_after, 0, MAX_DELAY_MS)
            lease = None if report.get("lease") is None else _check_int("lease", report["lease"], 1, MAX_DELAY_MS)
            progress = _json_value("progress", report["progress"]) if "progress" in report else None
            if status == IN_PROGRESS:  # a heartbeat: its new lease, and how far the work has come
                if lease is not None:
                    item["lease"] = lease
                if "progress" in report:
                    item["progress"] = progress
            if status == QUEUED and retry_after is not None:  # a snooze
                item["retry_after"] = retry_after
            if status == FAILED:
                if error is None:
                    raise BadRequest("a failed report needs an error string")
                item["error"] = error
                if retry is not None:
                    item["retry"] = retry
                if retry_after is not None:
                    item["retry_after"] = retry_after
            if status == DONE and "result" in report:
                item["result"] = _json_value("result", report["result"])
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc}", [task_id]) from None
        checked.append(item)
    return checked


def _check_poll(reports: Iterable[Any], max: Optional[int], wait: float, worker: Optional[str],
                lease: Optional[int]) -> Tuple[List[Dict[str, Any]], int, float, Optional[str], Optional[int]]:
    """A poll's fields checked (of one queue or several): its reports, `max` (without it, 1; but 0 when every
    report is a heartbeat or a hand-back), `wait` in ms, `worker` and `lease`."""
    reports = _check_reports(reports)
    if max is None:
        max = 0 if reports and all(report["status"] in (IN_PROGRESS, QUEUED) for report in reports) else 1
    max = _check_int("max", max, 0, MAX_LEASE_BATCH)
    wait_ms = _check_number("wait", wait, 0, MAX_WAIT_MS)
    if worker is not None:
        worker = _check_text("worker", worker, MAX_WORKER)
    if lease is not None:
        lease = _check_int("lease", lease, 1, MAX_DELAY_MS)
    return reports, max, wait_ms, worker, lease


def _format_size(size: int) -> str:
    """Bytes as a person reads them, as --max-memory takes them: 1.5G, 341M, 20K."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f}G"
    return f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"


def default_max_memory() -> int:
    """The default of --max-memory: a quarter of the machine's memory, and no more than a third of the address
    space the process may have (ulimit -v), since the interpreter, threads and a compaction need the rest."""
    try:
        bound = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MEMORY_SHARE
    except (AttributeError, ValueError, OSError):
        bound = 1 << 30  # the platform will not say: 1 GiB
    try:
        import resource  # POSIX
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            bound = min(bound, soft // ADDRESS_SPACE_SHARE)
    except (ImportError, OSError, ValueError):
        pass
    return bound


class Batch:
    """Tasks that end together: when the batch is closed and each of its tasks has ended (done, dead letter,
    cancelled or purged; each counted once, when it first ends), one callback task is inserted into the callback
    queue. State, changed only by records: "batch" (made, closed), an insert's "batch" (its tasks join), the ends of
    its tasks, and "callback" (the callback task inserted, in the same commit as its insert)."""

    __slots__ = ("id", "callback", "open", "total", "counts", "failed_ids", "callback_id", "created_at", "ended_at")

    def __init__(self, batch_id: str, callback: Dict[str, Any], created_at: int) -> None:
        self.id, self.callback, self.created_at = batch_id, callback, created_at
        self.open = True
        self.total = 0  # tasks that joined
        self.counts = {DONE: 0, FAILED: 0, CANCELLED: 0}
        self.failed_ids: List[str] = []  # the dead letters, the first MAX_BATCH_FAILED_IDS
        self.callback_id: Optional[str] = None
        self.ended_at: Optional[int] = None

    @property
    def pending(self) -> int:
        return self.total - sum(self.counts.values())

    def state(self) -> Tuple[Any, ...]:
        """What the records change, to put back after a failed commit."""
        return (self.open, self.total, dict(self.counts), len(self.failed_ids), self.callback_id, self.ended_at)

    def put_back(self, state: Tuple[Any, ...]) -> None:
        self.open, self.total, self.counts, failed, self.callback_id, self.ended_at = state
        del self.failed_ids[failed:]

    def view(self) -> Dict[str, Any]:
        return {"id": self.id, "open": self.open, "ended": self.ended_at is not None, "total": self.total,
                "counts": dict(self.counts, pending=self.pending), "failed": self.failed_ids[:BATCH_FAILED_SHOWN],
                "callback": dict(self.callback, task=self.callback_id), "created_at": self.created_at,
                "ended_at": self.ended_at}

    def callback_data(self) -> Dict[str, Any]:
        """The callback task's data."""
        return {"batch": self.id, "counts": dict(self.counts), "failed": list(self.failed_ids),
                "data": self.callback.get("data")}

    def record(self, pending: List[str]) -> Dict[str, Any]:
        """The batch as one record, for a compacted journal; `pending` its tasks not yet ended."""
        return {"op": "batch", "id": self.id, "callback": self.callback, "open": self.open, "at": self.created_at,
                "state": {"total": self.total, "counts": dict(self.counts), "failed": list(self.failed_ids),
                          "callback_id": self.callback_id, "ended_at": self.ended_at, "pending": pending}}


def _check_batch_id(value: Any, field: str = "batch.id") -> str:
    if not isinstance(value, str) or not QUEUE_NAME.match(value):
        raise BadRequest(f"{field} must be 1 to 128 letters, digits, '_', '.' or '-' (not starting with '_', '.' or "
                         f"'-'), got {_shown(value)}", field=field)
    return value


def _check_callback(value: Any, field: str = "batch.callback") -> Dict[str, Any]:
    """A batch's callback: {"queue", "data"?, "priority"?}."""
    if not isinstance(value, dict):
        raise BadRequest(f'{field} must be an object like {{"queue": "reports", "data": ...}}', field=field)
    unknown = [name for name in value if name not in CALLBACK_FIELDS]
    if unknown:
        raise BadRequest(f"unknown field {_shown(unknown[0])} in {field}; its fields are {', '.join(CALLBACK_FIELDS)}",
                         field=field)
    queue = value.get("queue")
    if not isinstance(queue, str) or not QUEUE_NAME.match(queue):
        raise BadRequest(f"{field}.queue must name a queue, got {_shown(queue)}", field=f"{field}.queue")
    callback = {"queue": queue, "data": _json_value(f"{field}.data", value.get("data"))}
    try:
        callback["priority"] = _check_priority(value.get("priority", 0))
    except BadRequest as exc:
        raise BadRequest(f"{field}.{exc}", field=f"{field}.priority") from None
    return callback


class Broker:
    """The queues and the one lock that guards all of their state.

    `clock` is anything with time() and monotonic(), as the time module (the default); tests inject a fake one.
    Time in the core is the wall clock read once, at start, plus the monotonic time since: a step of the wall
    clock (NTP, an operator) neither expires nor stretches a lease. Across a restart the journal's times are
    measured against the wall clock again, and never run backwards behind the latest one the journal holds.
    `random` draws the backoff jitter. `max_memory` bounds the estimate of what the queues hold (inserts beyond it
    are refused with Unavailable; 0: no bound; None: default_max_memory()).

    Every state change goes through `_commit(records)` -> `_apply(record)`, which a journal can write and replay.
    A commit is all or nothing: its records are encoded before memory changes, and if applying them fails
    halfway, what they changed is put back (each apply function notes how, through Queue._touch).
    """

    def __init__(self, clock: Any = time, random_source: Optional[random.Random] = None,
                 journal: Union[None, str, "Journal"] = None, max_memory: Optional[int] = None) -> None:
        # This lock guards every queue, task, index and waiter list below; conditions of waiters are built on it.
        self._lock = threading.Lock()
        self._clock = clock
        self._origin = (clock.time() * 1000.0, clock.monotonic())  # (wall ms, monotonic s) when time began
        self._random = random_source or random.Random()
        self._queues: Dict[str, Queue] = {}
        self._seq = 0
        # Ids are "<epoch>-<seq>": a fresh epoch per broker (kept in the journal), so that a worker still holding
        # an id from before a restart of an in-memory server cannot report on an unrelated task with that number.
        self._epoch = "%08x" % random.SystemRandom().getrandbits(32)
        self._closed = False
        self.max_memory = default_max_memory() if max_memory is None else max_memory
        self._memory = 0   # the sum of the queues' memory estimates
        self._live = 0     # tasks held, all queues together: what a compacted journal would hold
        self._undo: Optional[List[Tuple[Any, ...]]] = None   # during a live commit: how to put back its changes
        self._answers: List[Tuple[Any, ...]] = []            # result waiters to answer once the commit stands
        self.fleet = Fleet()  # the workers heard from (observed, not state; guarded by the lock too)
        # Batches (state): by id; the batch of each task not yet ended; those ended whose callback is not inserted
        # yet (it goes in a commit of its own, right after the one that ended the batch, or after a restart); those
        # whose callback is in, oldest first (the oldest is forgotten past MAX_ENDED_BATCHES).
        self._batches: Dict[str, Batch] = {}
        self._batch_of: Dict[str, str] = {}
        self._callbacks_due: Dict[str, None] = {}
        self._completed: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._batch_waiters: Dict[str, List[Waiter]] = {}
        self._latest = 0   # the latest time a replayed record carries
        self._journal: Optional[Journal] = None
        self._durability = Durability(self._lock, None, self._rebuild, self._snapshot, self._send_callbacks)
        if journal is not None:
            journal = Journal(journal) if isinstance(journal, str) else journal
            self._load(journal)
            self._journal = journal
            self._durability = Durability(self._lock, journal, self._rebuild, self._snapshot, self._send_callbacks)
            if self._now() < self._latest:  # the wall clock is behind the journal: time goes on from its end
                self._origin = (float(self._latest), clock.monotonic())
            if journal.records == 0:
                with self._changing():
                    self._commit([self._header()])
            if self._callbacks_due:  # a batch ended just before the server stopped: its callback goes in now
                with self._changing():
                    pass  # (the change's follow-up sends it)

    def _now(self) -> int:
        wall_ms, monotonic = self._origin
        return int(round(wall_ms + (self._clock.monotonic() - monotonic) * 1000.0))

    def last_id(self) -> str:
        """The id of the task made last (lock held): ids sort in the order tasks were made."""
        return f"{self._epoch}-{self._seq:012d}"

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._epoch}-{self._seq:012d}"  # zero-padded: ids sort in the order they were made

    def queue(self, name: str, **options: Any) -> Queue:
        """Return the queue `name`, creating it; given options (QUEUE_DEFAULTS keys or `configuration`) are set."""
        if not isinstance(name, str) or not QUEUE_NAME.match(name):
            raise BadRequest(f"queue name must be 1 to 128 letters, digits, '_', '.' or '-', got {_shown(name)}")
        options = _check_options(options)
        with self._changing():
            queue = self._queues.get(name)
            if queue is None or options:
                merged = dict(queue.options) if queue is not None else {}
                merged.update(options)
                self._admit(_options_bytes(merged) - (_options_bytes(queue.options) if queue is not None else 0))
                records = [{"op": "queue", "q": name, "options": merged}]
                now = self._now()
                timing = {option["name"]: _timing(option) for option in (queue.options["schedules"] if queue else ())}
                starts = [[option["name"], now] for option in merged.get("schedules", ())
                          if timing.get(option["name"]) != _timing(option)]
                if starts:  # a schedule new, or timed anew, runs the slots after now
                    records.append({"op": "fire", "q": name, "at": now, "slots": starts})
                if queue is not None and queue.throttled_until > now + merged["max_throttle"]:
                    records.append({"op": "throttle", "q": name, "until": now + merged["max_throttle"], "at": now,
                                    "shorten": True})  # an operator lowers max_throttle: the throttle in force too
                self._commit(records)
                queue = self._queues[name]
                queue._serve_waiters(self._now())  # a resumed queue or a raised cap may serve waiting polls
            return queue

    def get(self, name: str) -> Queue:
        """The queue `name`, or NotFound. Its `error` is the original's words exactly ("Queue not found"), which
        its workers may compare; the fields `queue` and `queues` name the queue asked for and those there are."""
        queue = self._queues.get(name)
        if queue is None:
            raise NotFound("Queue not found", queue=name, queues=self.names(100))
        return queue

    # -- batches --------------------------------------------------------------------------------------------------

    def put_batch(self, batch_id: str, callback: Optional[Dict[str, Any]] = None, open: Optional[bool] = None
                  ) -> Tuple[bool, Dict[str, Any]]:
        """Make a batch (PUT /v1/batches/<id>): its `callback` {"queue", "data"?, "priority"?}, open for inserts
        unless `open` is false (a batch closed with no task ends at once); or close one (`open` false). Returns
        (whether it was made, its view)."""
        batch_id = _check_batch_id(batch_id, "id")
        if callback is not None:
            callback = _check_callback(callback, "callback")
        if open is not None:
            _check_bool("open", open)
        with self._changing():
            made = batch_id not in self._batches
            records = self._batch_records(batch_id, callback, open, self._now(), "callback")
            if records:
                self._commit(records)
            return made, self._batches[batch_id].view()

    def _batch_records(self, batch_id: str, callback: Optional[Dict[str, Any]], open: Optional[bool], now: int,
                       field: str) -> List[Dict[str, Any]]:
        """Lock held: the "batch" records that make batch `batch_id` (with `callback`) or change whether it is open;
        Conflict for a change a batch refuses (a closed one is closed for good)."""
        batch = self._batches.get(batch_id)
        if batch is None:
            if callback is None:
                raise BadRequest(f"batch {batch_id} is new: give its {field} ({{\"queue\": ..., \"data\": ...}})",
                                 field=field)
            if callback["queue"] not in self._queues:  # (lock held: not get(), whose error lists the queues)
                raise NotFound(f"no queue {callback['queue']} for the callback of batch {batch_id}: make it first",
                               queue=callback["queue"], queues=heapq.nsmallest(100, self._queues))
            self._admit(BATCH_BYTES + _value_bytes(callback))  # (--max-memory: batches count as tasks do)
            return [{"op": "batch", "id": batch_id, "callback": callback, "open": True if open is None else open,
                     "at": now}]
        if callback is not None and callback != batch.callback:
            raise Conflict(f"batch {batch_id} has another callback ({_shown(batch.callback)}); a batch's callback "
                           f"cannot change", [batch_id])
        if open and not batch.open:
            raise Conflict(f"batch {batch_id} is closed: no task can join it any more; make another batch",
                           [batch_id])
        if open is False and batch.open:
            return [{"op": "batch", "id": batch_id, "open": False, "at": now}]
        return []

    def _plan_batch(self, spec: Any, now: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], str]:
        """Lock held: for an insert that carries `batch` {"id", "callback"?, "open"?}: the
        records to commit before the insert (the batch made) and after it (closed: the insert that makes a batch
        closes it unless `open` is true), and the batch's id."""
        if not isinstance(spec, dict):
            raise BadRequest('batch must be an object like {"id": "nightly-42", "callback": {"queue": "reports"}}',
                             field="batch")
        unknown = [name for name in spec if name not in BATCH_FIELDS]
        if unknown:
            raise BadRequest(f"unknown field {_shown(unknown[0])} in batch; its fields are {', '.join(BATCH_FIELDS)}",
                             field="batch")
        batch_id = _check_batch_id(spec.get("id"))
        callback = _check_callback(spec["callback"]) if "callback" in spec else None
        open = _check_bool("batch.open", spec["open"]) if "open" in spec else None
        existing = self._batches.get(batch_id)
        if existing is not None and not existing.open:
            raise Conflict(f"batch {batch_id} is closed: no task can join it any more; make another batch",
                           [batch_id])
        before = self._batch_records(batch_id, callback, True if existing is None else None, now, "batch.callback")
        after = [] if open or (existing is not None and open is None) else \
            [{"op": "batch", "id": batch_id, "open": False, "at": now}]
        return before, after, batch_id

    def batches(self, limit: int = 100) -> Dict[str, Any]:
        """The batches not ended yet (GET /v1/batches), the oldest first, at most `limit` of them; and how many
        there are, and how many ended batches are remembered."""
        limit = _check_int("limit", limit, 1, MAX_LIST_LIMIT)
        with self._lock:
            shown = []
            for batch in self._batches.values():  # (ended ones, at most MAX_ENDED_BATCHES, are passed over)
                if len(shown) >= limit:
                    break
                if batch.callback_id is None:
                    shown.append(batch.view())
            return {"batches": shown, "not_ended": len(self._batches) - len(self._completed),
                    "ended": len(self._completed)}

    def batch(self, batch_id: str, wait: float = 0) -> Dict[str, Any]:
        """A batch's view (GET /v1/batches/<id>); with `wait` ms, hold until it has ended (its callback is in)."""
        woken = threading.Condition(self._lock)
        outcome = self.begin_batch(batch_id, wait, wake=woken.notify)
        if not isinstance(outcome, Waiter):
            return outcome
        with self._lock:
            while outcome.parked and not self._closed and time.monotonic() < outcome.deadline:
                woken.wait(outcome.deadline - time.monotonic())
        return self.end_batch_wait(outcome)

    def begin_batch(self, batch_id: str, wait: float = 0, *, wake: Callable[[], None]
                    ) -> Union[Dict[str, Any], Waiter]:
        """batch() without blocking: its view, or a parked Waiter for its end (see Queue.begin_poll)."""
        wait_ms = _check_number("wait", wait, 0, MAX_WAIT_MS)
        with self._changing():
            batch = self._batches.get(batch_id)
            if batch is None:
                raise NotFound(f"no batch {str(batch_id)[:200]}", [str(batch_id)[:200]])
            if wait_ms <= 0 or batch.callback_id is not None or self._closed:
                return batch.view()
            waiter = Waiter(wake, time.monotonic() + wait_ms / 1000.0, task_id=batch_id)
            self._batch_waiters.setdefault(batch_id, []).append(waiter)
            return waiter

    def end_batch_wait(self, waiter: Waiter) -> Dict[str, Any]:
        """End a batch wait (answered or not): the batch as it is (on disk: the answer is durable)."""
        with self._changing():
            if waiter.parked:
                waiter.parked = False
                waiting = self._batch_waiters.get(waiter.task_id, [])
                if waiter in waiting:
                    waiting.remove(waiter)
                if not waiting:
                    self._batch_waiters.pop(waiter.task_id, None)
            batch = self._batches.get(waiter.task_id)
            if batch is None:
                raise NotFound(f"no batch {waiter.task_id} (forgotten: more than {MAX_ENDED_BATCHES} ended since)",
                               [waiter.task_id])
            return batch.view()

    def _join_batch(self, batch_id: str, task_id: str) -> None:
        batch = self._batches[batch_id]
        if self._undo is not None:
            self._undo.append((self._put_back_batch, batch, batch.state(), task_id, None))
        batch.total += 1
        self._batch_of[task_id] = batch_id
        self._memory += MEMO_BYTES

    def _task_ended(self, task_id: str, status: str, at: int) -> None:
        """A task ended (done, dead letter, cancelled, purged before its end): counted in its batch, if any, once."""
        batch_id = self._batch_of.pop(task_id, None)
        if batch_id is None:
            return
        batch = self._batches[batch_id]
        if self._undo is not None:
            self._undo.append((self._put_back_batch, batch, batch.state(), None, task_id))
        batch.counts[status] += 1
        if status == FAILED and len(batch.failed_ids) < MAX_BATCH_FAILED_IDS:
            batch.failed_ids.append(task_id)
            self._memory += FAILED_ID_BYTES
        self._memory -= MEMO_BYTES
        self._check_batch_end(batch, at)

    def _check_batch_end(self, batch: Batch, at: int) -> None:
        if not batch.open and batch.pending == 0 and batch.ended_at is None:
            batch.ended_at = at
            self._callbacks_due[batch.id] = None

    def _apply_batch(self, rec: Dict[str, Any]) -> None:
        batch = self._batches.get(rec["id"])
        if "state" in rec:  # a compacted journal's: the whole batch
            state = rec["state"]
            batch = self._batches[rec["id"]] = Batch(rec["id"], rec["callback"], rec["at"])
            batch.open, batch.total, batch.counts = rec["open"], state["total"], dict(state["counts"])
            batch.failed_ids, batch.callback_id, batch.ended_at = list(state["failed"]), state["callback_id"], \
                state["ended_at"]
            for task_id in state["pending"]:
                self._batch_of[task_id] = batch.id
            self._memory += BATCH_BYTES + _value_bytes(batch.callback) + MEMO_BYTES * len(state["pending"]) + \
                FAILED_ID_BYTES * len(batch.failed_ids)
            if batch.callback_id is not None:
                self._completed[batch.id] = None
            elif batch.ended_at is not None:
                self._callbacks_due[batch.id] = None
            return
        if batch is None:
            batch = self._batches[rec["id"]] = Batch(rec["id"], rec["callback"], rec["at"])
            self._memory += BATCH_BYTES + _value_bytes(batch.callback)
            if self._undo is not None:
                self._undo.append((self._forget_batch, batch.id))
        elif self._undo is not None:
            self._undo.append((self._put_back_batch, batch, batch.state(), None, None))
        batch.open = rec["open"]
        self._check_batch_end(batch, rec["at"])

    def _apply_callback(self, rec: Dict[str, Any]) -> None:
        """The callback task of an ended batch was inserted (by the insert of the same commit)."""
        batch = self._batches[rec["id"]]
        if self._undo is not None:
            self._undo.append((self._put_back_batch, batch, batch.state(), None, None))
        batch.callback_id = rec["task"]
        self._callbacks_due.pop(batch.id, None)
        self._completed[batch.id] = None
        if self._undo is not None and batch.id in self._batch_waiters:
            self._answers.append((self._answer_batch, batch.id, batch.view()))
        while len(self._completed) > MAX_ENDED_BATCHES:
            old_id, _ = self._completed.popitem(last=False)
            old = self._batches.pop(old_id)
            self._memory -= BATCH_BYTES + _value_bytes(old.callback) + FAILED_ID_BYTES * len(old.failed_ids)
            if self._undo is not None:
                self._undo.append((self._put_back_forgotten, old))

    def _answer_batch(self, batch_id: str, result: Tuple[Dict[str, Any], int]) -> None:
        for waiter in self._batch_waiters.pop(batch_id, ()):
            if waiter.parked:
                waiter.parked, waiter.result = False, result
                waiter.wake()

    def _put_back_batch(self, batch: Batch, state: Tuple[Any, ...], joined: Optional[str],
                        ended: Optional[str]) -> None:
        batch.put_back(state)
        if joined is not None:
            self._batch_of.pop(joined, None)
        if ended is not None:
            self._batch_of[ended] = batch.id
        if batch.callback_id is None:
            self._completed.pop(batch.id, None)
        if batch.ended_at is None or batch.callback_id is not None:
            self._callbacks_due.pop(batch.id, None)
        elif batch.callback_id is None:
            self._callbacks_due[batch.id] = None

    def _forget_batch(self, batch_id: str) -> None:
        self._batches.pop(batch_id, None)
        self._callbacks_due.pop(batch_id, None)

    def _put_back_forgotten(self, batch: Batch) -> None:
        self._batches[batch.id] = batch
        self._completed[batch.id] = None
        self._completed.move_to_end(batch.id, last=False)

    def _send_callbacks(self) -> None:
        """Lock held, as a change ends (Durability.follow_up, never inside one of its steps): insert the callback
        task of each batch the change ended, in a commit of its own with the "callback" record that says so, and
        hand it to a waiting poll; one the disk refuses is sent after the next change (the ages' timer makes one a
        second), or at restart."""
        if not self._callbacks_due:
            return  # (every change ends here: the usual case costs one test)
        for batch_id in list(self._callbacks_due):
            batch = self._batches[batch_id]
            queue = self._queues[batch.callback["queue"]]
            now, task_id, data = self._now(), self._next_id(), batch.callback_data()
            key = f"batch:{batch.id}"
            row = [task_id, data, batch.callback["priority"], QUEUED, key, 0, _value_bytes(data) + len(key)]
            try:
                self._commit([{"op": "insert", "q": queue.name, "at": now, "tasks": [row]},
                              {"op": "callback", "id": batch.id, "task": task_id, "at": now}])
            except Unavailable:
                return
            queue._serve_waiters(now)

    # -- one poll over several queues -----------------------------------------------------------------------------

    def poll(self, queues: Union[List[str], Dict[str, float]], reports: Iterable[Dict[str, Any]] = (),
             max: Optional[int] = None, wait: float = 0, worker: Optional[str] = None,
             lease: Optional[int] = None) -> List[Dict[str, Any]]:
        """Queue.poll over several queues (POST /v1/poll). `queues` lists them in priority order (a lease takes
        from the first one with a task ready, then the next, up to `max`), or maps them to weights (each poll
        draws its order at random in proportion to the weights, as Sidekiq's weighted queues do). `reports` may
        name tasks of any of them, and are applied all or none; a long poll waits on all of them at once. Each
        task leased carries its `queue`. Blocks while it waits (see begin_poll)."""
        named, _ = self._poll_queues(queues)
        return named[0]._block(functools.partial(self.begin_poll, queues, reports, max, wait, worker, lease))

    def begin_poll(self, queues: Union[List[str], Dict[str, float]], reports: Iterable[Dict[str, Any]] = (),
                   max: Optional[int] = None, wait: float = 0, worker: Optional[str] = None,
                   lease: Optional[int] = None, *, wake: Callable[[], None]) -> Union[List[Dict[str, Any]], Waiter]:
        """poll() without blocking: the tasks leased now, or a Waiter parked in the line of each queue (the first
        to have a task answers it); end it with end_wait."""
        named, weights = self._poll_queues(queues)
        reports, max, wait_ms, worker, lease = _check_poll(reports, max, wait, worker, lease)
        with self._changing():
            now = self._now()
            for queue in named:
                queue._check_lease("lease", lease)
            for queue in named:
                queue._tick(now)
                queue.last_polled = now
            mine: Dict[str, List[Dict[str, Any]]] = {}
            missing = []
            for report in reports:
                owner = next((queue for queue in named if queue.holds(report["_id"])), None)
                if owner is None:
                    missing.append(report["_id"])
                else:
                    mine.setdefault(owner.name, []).append(report)
            if missing:
                raise NotFound(f"no task {', '.join(missing)} in queue {' or '.join(q.name for q in named)}", missing)
            records: List[Dict[str, Any]] = []
            for name, its_reports in mine.items():
                try:
                    records += self._queues[name]._plan_reports(its_reports, now, lease)
                except Conflict as exc:
                    if worker is not None and exc.fields.get("cancel"):
                        self.fleet.told(worker, name, exc.fields["cancel"])
                    raise
            if records:
                self._commit(records)
            for name in mine:
                self._queues[name]._serve_waiters(now)
            leased = self._take_from(named, weights, max, worker, now, lease)
            if leased or not max or wait_ms <= 0 or self._closed:
                return leased
            waiter = Waiter(wake, time.monotonic() + wait_ms / 1000.0, max, worker, lease=lease, queues=tuple(named))
            for queue in named:
                queue._park(waiter)
            return waiter

    def heard_from(self, queues: List[str], worker: Optional[str], address: Optional[str],
                   leased: Iterable[Dict[str, Any]] = (), heartbeat: bool = False, waiting: int = 0) -> List[str]:
        """Queue.heard_from for a poll of several queues (each leased task names its `queue`): the ids the worker
        should stop, of all of them."""
        leased, cancel = list(leased), []
        for index, name in enumerate(queues):
            queue = self._queues.get(name)
            if queue is not None:
                cancel += queue.heard_from(worker, address, [task for task in leased if task["queue"] == name],
                                           heartbeat, waiting if index == 0 else 0)  # (one wait, counted once)
        return cancel

    def end_wait(self, waiter: Waiter) -> List[Dict[str, Any]]:
        """End a wait begin_poll parked (see Queue.end_wait): the tasks it got, each with its `queue`."""
        assert waiter.queues
        return waiter.queues[0].end_wait(waiter)

    def _poll_queues(self, queues: Any) -> Tuple[List[Queue], Optional[List[float]]]:
        """The queues a poll names, in order, and their weights (None: in that order, strictly)."""
        if isinstance(queues, dict):
            names, weights = list(queues), [_check_number(f"queues.{name}"[:120], weight, 0, MAX_WEIGHT)
                                            for name, weight in queues.items()]
            if not all(weights):
                raise BadRequest("a queue's weight must be above 0 (leave the queue out instead)", field="queues")
        elif isinstance(queues, list):
            names, weights = queues, None
        else:
            raise BadRequest('queues must be a list of queue names in priority order, or an object of names and '
                             'weights, like ["critical", "default"] or {"critical": 3, "default": 1}',
                             field="queues")
        if not 1 <= len(names) <= MAX_POLL_QUEUES:
            raise BadRequest(f"queues names {len(names)} queues; a poll names 1 to {MAX_POLL_QUEUES}", field="queues")
        if len(set(map(str, names))) != len(names) or not all(isinstance(name, str) for name in names):
            raise BadRequest("queues must name each queue once, by its name (a string)", field="queues")
        return [self.get(name) for name in names], weights

    def _take_from(self, named: List[Queue], weights: Optional[List[float]], max_tasks: int,
                   worker: Optional[str], now: int, lease: Optional[int]) -> List[Dict[str, Any]]:
        """Lease up to `max_tasks` from `named` in order, or in an order drawn by `weights`; each task with its
        `queue`."""
        order = named if weights is None else self._draw(named, weights)
        leased: List[Dict[str, Any]] = []
        for queue in order:
            if len(leased) >= max_tasks:
                break
            try:
                got = queue._take(max_tasks - len(leased), worker, now, lease)
            except Unavailable:
                if leased:
                    break  # what was leased stands; the rest waits for the disk
                raise
            for task in got:
                task["queue"] = queue.name
            leased += got
        return leased

    def _draw(self, named: List[Queue], weights: List[float]) -> List[Queue]:
        """An order of `named` drawn at random, each next queue picked in proportion to its weight among those
        left: over many polls of busy queues, each queue's share of first places is its share of the weights."""
        pool, order = list(zip(weights, named)), []
        while pool:
            pick = self._random.random() * sum(weight for weight, _ in pool)
            for index, (weight, queue) in enumerate(pool):
                pick -= weight
                if pick < 0 or index == len(pool) - 1:
                    order.append(queue)
                    del pool[index]
                    break
        return order

    def names(self, limit: int) -> List[str]:
        """The first `limit` queue names in sorted order."""
        with self._lock:  # another thread may be adding a queue
            names = list(self._queues)
        return heapq.nsmallest(limit, names)  # outside the lock: a server may have many queues

    def __contains__(self, name: object) -> bool:
        return name in self._queues

    def queues(self) -> List[Queue]:
        with self._lock:
            return list(self._queues.values())

    def worker_counts(self) -> Dict[str, int]:
        """How many workers were heard from, per queue name (those the fleet remembers)."""
        with self._lock:
            return dict(collections.Counter(name for seen in self.fleet.workers(self._now()) for name in seen.held))

    def workers(self, queue: Optional[str] = None) -> List[Dict[str, Any]]:
        """The workers heard from in the last WORKER_IDLE_MS (of one queue, if named), the most recent first: each
        its id (or null and its address, for an anonymous poller), the queues it polled, whether a long poll of
        its waits now, the tasks it holds with their lease deadlines (the first WORKER_TASKS_SHOWN, and how many),
        its last contact and last heartbeat (ms)."""
        if queue is not None:
            self.get(queue)
        with self._lock:
            view, now = [], self._now()
            for seen in self.fleet.workers(now):
                if queue is not None and queue not in seen.held:
                    continue
                tasks = [held for name, table in seen.held.items() if name in self._queues
                         for held in self._queues[name].held_view(table, now)]
                view.append({"worker": seen.worker, "address": seen.address, "queues": sorted(seen.held),
                             "waiting": seen.waiting > 0, "tasks": tasks[:WORKER_TASKS_SHOWN],
                             "tasks_held": len(tasks), "last_contact": seen.last_contact,
                             "last_heartbeat": seen.last_heartbeat})
            return view

    def close(self) -> None:
        """Answer every parked long poll and result wait now, make later waits return at once, and close the
        journal (after writing what is pending)."""
        with self._lock:
            self._closed = True
            for queue in self._queues.values():
                queue.wake_all()
            for waiters in self._batch_waiters.values():
                for waiter in waiters:
                    waiter.wake()
        self._durability.close()

    def deferring(self) -> ContextManager["Promise"]:
        """For a caller that must not block (the server's event loop): changes made in this thread inside are not
        waited for; the Promise collects the journal ticket the caller must see settled() before answering."""
        return self._durability.deferring()

    def settled(self, ticket: int) -> Optional[bool]:
        """Whether the changes up to `ticket` are durable: True, False if the disk lost them (answer 503), or None
        while they are being written (after request_flush)."""
        return self._durability.settled(ticket)

    def lost_because(self) -> str:
        """Why the latest changes the disk lost were lost (for the 503 of the requests that made them)."""
        journal = self._journal
        return str(journal.last_failure or "the journal is closed") if journal is not None else ""

    def request_flush(self) -> None:
        """Have what changed written to the journal without waiting (the event loop asks once per pass)."""
        self._durability.request_flush()

    def on_settled(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from any thread, journal lock held: it must not block) whenever journal tickets become
        durable or lost. Nothing to hear of without a journal."""
        if self._journal is not None:
            self._journal.settle_listeners.append(listener)

    def run_ages(self) -> None:
        """End the tasks whose age is up (expire_after, retain) and close the key windows that are (key_ttl), in
        every queue that has any; the server calls it every AGE_SECONDS, so that ages end without a request. And
        check that the journal's lock is still this server's (Journal.check_lock)."""
        if self._journal is not None:
            self._journal.check_lock()
        with self._changing():
            now = self._now()
            for queue in self._queues.values():
                queue.run_ages(now)  # (and, as every change ends, a callback a failing disk held back is sent)

    def run_schedules(self) -> Optional[float]:
        """Insert the tasks of the schedules' slots due now, in every queue; returns the seconds until a slot is
        next due, or None. The server calls it from a timer set for that moment; a program using the Broker alone
        calls it itself."""
        return self._each_queue(Queue.run_schedules, writable_only=True)

    def next_due(self) -> Optional[float]:
        """Run the clock for the parked long polls (a delay ended, a lease ran out: their tasks go to the polls);
        returns the seconds until that is next needed, or None. The server calls it from a timer."""
        return self._each_queue(Queue.run_clock)

    def _each_queue(self, run: Callable[[Queue, int], Optional[int]], writable_only: bool = False) -> Optional[float]:
        """In one change, `run(queue, now)` for every queue; the seconds until the soonest time they return (ms), or
        None. With `writable_only`, nothing runs while the journal's disk fails (SCHEDULE_RETRY_MS: ask again)."""
        with self._changing():
            if writable_only and not self._durability.writable():
                return SCHEDULE_RETRY_MS / 1000.0
            now, due = self._now(), None
            for queue in self._queues.values():
                at = run(queue, now)
                if at is not None and (due is None or at < due):
                    due = at
        return None if due is None else max(0.0, (due - self._now()) / 1000.0)

    # -- durability -----------------------------------------------------------------------------------------------

    def _changing(self) -> ContextManager[None]:
        """Hold the lock for a change; on leaving, the change is durable (or, deferring, its ticket noted): this
        is what makes a 2xx mean "on disk". See Durability."""
        return self._durability.changing()

    def _on_disk(self) -> bool:
        return self._durability.on_disk()

    def _rebuild(self, journal: "Journal") -> None:
        """Replace the state of every queue by what the journal's durable part builds; waiters stay where they
        are."""
        fresh = Broker(clock=self._clock, random_source=self._random, max_memory=self.max_memory)
        journal.read_back(fresh._replay)
        for name in list(self._queues):
            if name not in fresh._queues:
                del self._queues[name]
        for name, queue in fresh._queues.items():
            if name in self._queues:
                self._queues[name]._adopt(queue)
            else:
                queue._broker = self
                self._queues[name] = queue
        self._epoch, self._seq = fresh._epoch, fresh._seq
        self._memory, self._live = fresh._memory, fresh._live
        self._batches, self._batch_of, self._completed = fresh._batches, fresh._batch_of, fresh._completed
        self._callbacks_due = fresh._callbacks_due

    def _load(self, journal: "Journal") -> None:
        """Open the journal and replay it; with repair, a record that cannot be applied is set aside with the
        rest of the file, and the replay starts again from an empty state."""
        try:
            journal.open()
            while True:
                try:
                    journal.replay(self._replay)
                    return
                except JournalError as exc:
                    if not journal.repair or exc.line is None:
                        raise
                    journal.cut(exc.line)
                    self._queues, self._seq, self._memory, self._live = {}, 0, 0, 0
        except BaseException:
            journal.close()  # refusing to start must not keep the journal locked
            raise

    def _replay(self, record: Dict[str, Any]) -> None:
        """Apply one record read from the journal."""
        self._apply(record)
        at = record.get("at")
        if isinstance(at, int) and at > self._latest:
            self._latest = at

    def _header(self) -> Dict[str, Any]:
        # `at`: a compacted journal holds no other record of the time, and time must not run back behind it.
        return {"op": "journal", "version": JOURNAL_VERSION, "epoch": self._epoch, "seq": self._seq,
                "at": self._now()}

    def _snapshot(self) -> List[Dict[str, Any]]:
        """The live state as records (lock held): what a compacted journal starts with."""
        records = [self._header()]
        for queue in self._queues.values():
            records.append({"op": "queue", "q": queue.name,
                            "options": dict(queue.options, configuration=dict(queue.options["configuration"]))})
            records.extend(task.record(queue.name) for task in queue._tasks.values())
            records.append({"op": "restore", "q": queue.name, "totals": dict(queue.totals),
                            "finished": [[task_id] + list(memo) for task_id, memo in queue._finished.items()],
                            "throttled_until": queue.throttled_until, "keys": queue.key_windows(),
                            "fired": queue.fired_slots()})
        pending: Dict[str, List[str]] = {}
        for task_id, batch_id in self._batch_of.items():
            pending.setdefault(batch_id, []).append(task_id)
        for batch_id in list(self._completed) + [b for b in self._batches if b not in self._completed]:
            records.append(self._batches[batch_id].record(pending.get(batch_id, [])))
        return records

    def compact(self) -> None:
        """Rewrite the journal now as a snapshot of the live state (it also happens by itself as the journal
        grows). Serving goes on meanwhile; only taking the snapshot holds the lock. OSError if it failed (the
        journal is then unchanged)."""
        self._durability.compact()

    def health(self) -> Optional[str]:
        """Why changes cannot be made durable now (a journal that failed, or a write or fsync that has hung for
        longer than STALL_SECONDS), or None."""
        return self._journal.trouble() if self._journal is not None else None

    def lost_journal(self) -> bool:
        """Whether this broker lost its journal's lock to another server: what it holds may be out of date, so a
        server serves nothing more from it."""
        return self._journal is not None and self._journal.lock_lost

    def memory(self) -> Tuple[int, int]:
        """The estimate of the bytes the queues hold, and its bound (0: none)."""
        return self._memory, self.max_memory

    def _over_bound(self) -> bool:
        return bool(self.max_memory) and self._memory > self.max_memory

    def _admit(self, size: int) -> None:
        """Lock held: refuse a change that would take the memory estimate past max_memory."""
        if size > 0 and self.max_memory and self._memory + size > self.max_memory:
            raise Unavailable(f"the queues hold about {_format_size(self._memory)} of the "
                              f"{_format_size(self.max_memory)} this server may use (--max-memory): inserts wait "
                              f"until workers drain tasks; retry later")

    # -- the one place state changes ------------------------------------------------------------------------------

    def _commit(self, records: List[Dict[str, Any]]) -> None:
        """Apply records in order and queue them for the journal (lock held); all of them, or none. Memory is
        changed first, the disk next; the request that made the change answers only once the disk has it (see
        _changing)."""
        journal = self._journal
        # After a failure, memory is put back (by Durability.writable) at the start of the next change, never in its middle.
        if journal is not None and (journal.failed is not None or journal.closed):
            raise Unavailable(f"the journal cannot be written ({journal.failed or 'closed'}); nothing was changed")
        try:
            lines = journal.encode(records) if journal is not None else b""
        except Exception as exc:  # MemoryError, or a value the encoder refuses: nothing has changed yet
            raise Unavailable(f"the change could not be written ({type(exc).__name__}: {exc}); "
                              f"nothing was changed") from None
        saved, self._undo, self._answers = (self._memory, self._live), [], []
        try:
            for record in records:
                self._apply(record)
            if journal is not None:
                try:
                    journal.append(lines, len(records))
                except BaseException:
                    journal.fail(OSError(errno.EIO, "a journal append failed halfway"))  # drops what it queued
                    raise
        except Exception as exc:
            undone = self._revert(saved, exc)
            raise Unavailable(f"the change failed ({type(exc).__name__}) and "
                              f"{'was undone; nothing was changed' if undone else 'memory is being rebuilt'}: "
                              f"retry later") from None
        finally:
            self._undo = None
        ticket = journal.ticket if journal is not None else 0
        for answer, task_id, view in self._answers:
            answer(task_id, (view, ticket))
        if journal is not None and not self._closed:
            self._durability.maybe_compact(self._live + 2 * len(self._queues))

    def _revert(self, saved: Tuple[int, int], error: BaseException) -> bool:
        """Put back what a failed commit changed (lock held); whether that worked. Should it fail too, memory no
        longer matches the journal: the journal is marked failed, so that memory is rebuilt from it before the next
        change."""
        details = "".join(traceback.format_exception_only(type(error), error)).strip()
        try:
            for action, *args in reversed(self._undo or ()):
                action(*args)
            self._memory, self._live = saved
        except Exception as second:
            if self._journal is None:
                warn(f"a change failed ({details}) and could not be undone ({second!r}): memory may hold part of "
                     f"it; restart the server")
            else:
                self._journal.fail(OSError(errno.EIO, f"a change could not be undone: {second!r}"))
            return False
        warn(f"a change failed and was undone, nothing was changed: {details}")
        return True

    def _apply(self, record: Dict[str, Any]) -> None:
        op = record["op"]
        if op == "journal":
            if record["version"] not in JOURNAL_VERSIONS:
                raise JournalError(f"journal version {record['version']} is not one of "
                                   f"{', '.join(map(str, JOURNAL_VERSIONS))}")
            self._epoch, self._seq = record["epoch"], max(self._seq, record["seq"])
            return
        if op == "queue":
            self._apply_queue(record)
            return
        if op in ("batch", "callback"):
            getattr(self, "_apply_" + op)(record)
            return
        queue = self._queues[record["q"]]
        memory, held = queue.memory, len(queue)
        if self._undo is not None:
            self._undo.append((queue._put_back_totals, dict(queue.totals), memory))
        if op == "insert":
            self._seq = max(self._seq, _seq_of(record["tasks"][-1][0]))
        getattr(queue, "_apply_" + op)(record)
        self._memory += queue.memory - memory
        self._live += len(queue) - held

    def _apply_queue(self, record: Dict[str, Any]) -> None:
        queue = self._queues.get(record["q"])
        if self._undo is not None:
            self._undo.append((self._put_back_queue, record["q"], None if queue is None else dict(queue.options)))
        if queue is None:
            queue = self._queues[record["q"]] = Queue(self, record["q"], _check_options(record["options"]))
            self._memory += queue.memory
        else:
            memory = queue.memory
            queue._set_options(record["options"])
            self._memory += queue.memory - memory

    def _put_back_queue(self, name: str, options: Optional[Dict[str, Any]]) -> None:
        if options is None:
            self._queues.pop(name, None)  # (its making may be what failed)
        else:
            self._queues[name]._set_options(options)


def warn(message: str) -> None:
    """A problem the operator should hear of, on stderr, whatever the log level."""
    print("katar_http: " + message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# 3. The journal: the core's records as checksummed lines, appended, fsync'd in groups, compacted, replayed
# ---------------------------------------------------------------------------------------------------------------

JOURNAL_VERSION = 2          # a line is the CRC-32 of the record's JSON (8 hex digits), a space, the JSON
JOURNAL_VERSIONS = (1, 2)    # version 1 (bare JSON lines, no checksum) still loads; new lines get checksums
REPAIR_HINT = ("Nothing was changed. To keep the records before that line and set the rest aside, "
               "start once with --repair-journal (Journal(..., repair=True)).")
FSYNC_MODES = ("always", "interval", "never")
COMPACT_MIN_RECORDS = 10000  # never compact a journal shorter than this
COMPACT_RATIO = 4            # compact when the journal holds this many times more records than the live state
COMPACT_RETRY = (1.0, 300.0)  # seconds before a failed compaction is tried again: the first wait, and the cap
STALL_SECONDS = 5.0          # a write or fsync pending this long makes the server report itself degraded
READ_CHUNK = 1 << 20         # bytes read at a time when replaying: a journal is streamed, never read whole
LINE_LIMIT = 1 << 30         # a longer line (a zero-filled tail, say) is damage, read past without being held


def journal_line(record: Dict[str, Any]) -> bytes:
    """One record as a journal line: the CRC-32 of its JSON, a space, the JSON, a newline."""
    body = _encode(record).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse_line(line: bytes, checksummed: bool) -> Dict[str, Any]:
    """A journal line (without its newline) as a record; ValueError if it is damaged. A line that starts with
    '{' is a version 1 line, without a checksum: accepted only where `checksummed` is false."""
    if line[:1] == b"{":
        if checksummed:
            raise ValueError("the line has no checksum")
        body = line
    else:
        body = line[9:]
        if line[8:9] != b" " or int(line[:8], 16) != zlib.crc32(body):
            raise ValueError("its checksum does not match its content")
    record = json.loads(body)
    if not isinstance(record, dict) or "op" not in record:
        raise ValueError("not a record")
    return record


def _journal_start(line: bytes) -> bool:
    """Whether a first line is (or, cut short by a crash, begins) a journal header, checksummed or not: another
    file given as --journal is refused, never cut or set aside."""
    body = line[9:] if re.match(rb"[0-9a-f]{8} ", line) else line
    header = b'{"op":"journal"'
    return body.startswith(header) or (len(body) < len(header) and header.startswith(body.rstrip(b"\n")))


def _lines(fd: int, end: Optional[int] = None) -> Iterator[Tuple[int, int, Optional[bytes], bool]]:
    """(offset, length, line, whole) of each line of the open file `fd`, up to `end` bytes; `whole` is false for a
    last line without its newline. Read a chunk at a time: memory holds one chunk and one line, whatever the size
    of the file. A line longer than LINE_LIMIT comes as None (it is damage: it is measured, not held)."""
    position, offset = 0, 0
    pieces: List[bytes] = []  # the start of a line that spans chunks
    held = 0                  # its length so far
    while True:
        size = READ_CHUNK if end is None else min(READ_CHUNK, end - position)
        chunk = os.pread(fd, size, position) if size > 0 else b""
        if not chunk:
            break
        position += len(chunk)
        start, newline = 0, chunk.find(b"\n")
        while newline >= 0:
            length = held + newline + 1 - start
            line = b"".join(pieces) + chunk[start:newline + 1] if held <= LINE_LIMIT else None
            yield offset, length, line if length <= LINE_LIMIT else None, True
            offset, pieces, held = offset + length, [], 0
            start, newline = newline + 1, chunk.find(b"\n", newline + 1)
        held += len(chunk) - start
        pieces = [] if held > LINE_LIMIT else pieces + [chunk[start:]]
    if held:
        yield offset, held, b"".join(pieces) if held <= LINE_LIMIT else None, False


def _lock_file(fd: int, path: str) -> None:
    """Take the advisory lock of the open file `fd` for this process; JournalError if another holds it. The kernel
    releases it when the process dies, even by kill -9."""
    try:
        import fcntl  # POSIX
    except ImportError:
        return  # no advisory locks on this platform: one writer is then the operator's promise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise JournalLocked(f"{path} is in use by another katar_http server (pid {_lock_holder(fd)}); "
                            f"one journal has one writer (or start this one with --standby)") from None


def wait_for_lock(path: str) -> None:
    """Block until nobody holds the lock of the journal at `path` (its holder died, or let it go), then let it go
    at once: the caller then opens the journal, and takes the lock, or waits again if another was quicker (or if
    the holder moved its lock to a compacted file: the lock moves with the file)."""
    import fcntl  # (a standby needs POSIX advisory locks)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes it when the holder's lock goes, even after kill -9
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The pid that holds the flock on the open file `fd`, as /proc/locks tells it (Linux), or "unknown": for the
    message of a second server refused. (Only a message: /proc/locks is read a page at a time while other processes
    change it, and can skip a line, so it is never the evidence that this process lost its own lock.)"""
    status = os.fstat(fd)
    device = "%02x:%02x:%d" % (os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            return next((fields[4] for fields in map(str.split, handle)
                         if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device), "unknown")
    except OSError:
        return "unknown"


def _lock_refused(fd: int) -> bool:
    """Ask again for the lock this process holds on the open file `fd`, without waiting: where the lock lives in this
    kernel that changes nothing; on NFS it asks the NFS server, which refuses once the lock went to another machine
    (this one's lease ran out while the network was cut, and a standby took it). True if refused."""
    try:
        import fcntl  # POSIX
    except ImportError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    return False


class Journal:
    """An append-only file of checksummed lines, one per record of Broker._apply.

    Writers encode their records before changing memory (encode), append them under the broker lock (cheap: it
    queues bytes), then wait(ticket) outside it. The first waiter becomes the flusher: it writes everything queued
    in one write() and, with fsync "always", one fsync, then wakes the others; requests that arrived meanwhile
    share the next one (group commit). With "interval" a background thread fsyncs every `fsync_interval` seconds
    and waiters need only the write; with "never" the operating system decides. A failed write or fsync marks the
    journal failed: every unsynced ticket is lost (its waiter raises Unavailable) and the broker rebuilds memory
    from what the file holds.

    The lock is the file's own (flock on the open journal), so a second server reaching the same file through a
    symbolic or hard link is refused. After each write the journal checks that its path still names the file it
    writes, at the length it wrote: a journal deleted, replaced or truncated under the server fails, loudly, for
    good (until a restart), and what the write put in the open file is taken out again.

    Lines are read back a chunk at a time (replay, rebuild, repair). A last line without its newline is torn (a
    crash mid-write; never acknowledged): cut off, its bytes kept in FILE.torn-TIME. Any other line that does not
    parse or whose checksum fails is damage: the journal refuses to open, or with `repair` sets it and what follows
    aside in FILE.corrupt-TIME.

    `_write` and `_fsync` are os.write and os.fsync, as attributes so that tests can make the disk fail.
    """

    def __init__(self, path: str, fsync: str = "always", fsync_interval: float = 1.0, repair: bool = False) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        self.path = os.path.realpath(path)  # through a symbolic link, compaction replaces the file, not the link
        self.fsync, self.fsync_interval, self.repair = fsync, fsync_interval, repair
        self._write, self._fsync = os.write, os.fsync
        self._fd: Optional[int] = None
        # This lock guards everything below; it is taken inside the broker lock, never the other way round. `_cond`
        # is for the rare waits on a flush in progress (reset, compaction, close); each request waiting for its
        # records has a condition of its own in `_waiting`, so that a flush wakes only those it made durable.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._waiting: List[Tuple[int, threading.Condition]] = []
        self._pending: List[bytes] = []    # encoded records not yet written
        self._appended = 0                 # tickets handed out (one per append)
        self._durable = 0                  # tickets whose records are written (and fsync'd, with "always")
        self._lost: List[Tuple[int, int]] = []  # (after, upto): tickets a failure lost, one range per failure
        self._flushing = False             # one thread writes at a time (a flush, an interval fsync, a compaction)
        self._io_since: Optional[float] = None  # monotonic time the write or fsync under way began
        self._written = 0                  # bytes of the file written
        self._synced = 0                   # bytes of the file fsync'd
        self.failed: Optional[OSError] = None
        self.last_failure: Optional[OSError] = None  # the latest failure, kept after a reset (what lost tickets)
        self.rolled_back = False           # memory was rebuilt from the durable part after the failure
        self._generation = 0               # failures so far: a compaction begun before one must not finish
        self.records = 0                   # records in the file, to decide when to compact
        self._compacting: Optional[List[bytes]] = None  # records appended since the snapshot being written
        self._compaction_running = False
        self._lock_lost = False            # the lock was refused (check_lock): for good, no reset brings it back
        self._compact_after = 0.0          # monotonic time before which no compaction starts (after a failure)
        self._compact_wait = COMPACT_RETRY[0]
        self._closed = False
        self._flusher: Optional[threading.Thread] = None  # writes for callers that must not block (request_flush)
        self._flush_wanted = False
        # Called (mutex held; they must not block) whenever tickets become durable or lost: the event loop learns
        # here that answers it holds back may go.
        self.settle_listeners: List[Callable[[], None]] = []
        self.compaction_hook: Callable[[str], None] = lambda step: None  # tests stop a compaction between steps

    @property
    def closed(self) -> bool:
        return self._closed

    # -- opening and replay ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the journal (creating it) and take its lock. The path is opened again if, between the open and the
        lock, a compaction of another server renamed a new file over it."""
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # writes land at the end
            except FileNotFoundError:
                folder = os.path.dirname(os.path.abspath(self.path))
                raise JournalError(f"the folder {folder} of the journal {self.path} does not exist: create it "
                                   f"(mkdir -p {shlex.quote(folder)}), or give --journal a path in a folder that "
                                   f"does") from None
            except NotADirectoryError:
                raise JournalError(f"a part of the journal's path {self.path} is a file, not a folder: give "
                                   f"--journal a path in a folder") from None
            except IsADirectoryError:
                raise JournalError(f"{self.path} is a folder: give --journal a file's path, like "
                                   f"{os.path.join(self.path, 'tasks.journal')}") from None
            try:
                _lock_file(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if self._names(fd):
                self._fd = fd
                break
            os.close(fd)
        else:
            raise JournalError(f"{self.path} keeps being replaced while it is opened; is another program writing it?")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path + ".compact")  # what a compaction cut short left behind
        if self.fsync == "interval":
            threading.Thread(target=self._sync_periodically, name="katar_http fsync", daemon=True).start()

    def _names(self, fd: int, size: Optional[int] = None, at_least: int = 0) -> bool:
        """Whether the journal's path still names the open file `fd` (not deleted, renamed away or replaced), and
        the file is `size` bytes long, or at least `at_least` (nobody truncated it, as a log rotation's copytruncate
        does)."""
        try:
            here, there = os.stat(self.path), os.fstat(fd)
        except OSError:
            return False
        return (there.st_nlink > 0 and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
                and (there.st_size == size if size is not None else there.st_size >= at_least))

    def replay(self, apply: Callable[[Dict[str, Any]], None]) -> None:
        """Pass every record of the file to `apply`, in order, reading it line by line; cut off a torn last line.
        A record that cannot be applied is a JournalError naming its line."""
        assert self._fd is not None
        good = self._scan(apply, None, self.repair)
        os.ftruncate(self._fd, good)  # drops a torn tail, if any
        os.fsync(self._fd)
        self._written = self._synced = good

    def _scan(self, apply: Callable[[Dict[str, Any]], None], end: Optional[int], repair: bool) -> int:
        """Apply the records of the first `end` bytes (all: None); returns the bytes that hold whole, sound lines.
        A damaged last line is a torn write, cut off with a warning. A damaged line with lines after it is damage:
        refused, or with `repair` set aside with the rest of the file."""
        assert self._fd is not None
        checksummed, good, self.records = True, 0, 0
        for number, (offset, length, line, whole) in enumerate(_lines(self._fd, end), 1):
            if number == 1 and not _journal_start(line or b""):
                raise JournalError(f"{self.path} is not a katar_http journal (its first line is not a journal "
                                   f"header). Nothing was changed: give --journal a new file, or a journal")
            if not whole:
                self._torn(number, offset, length)  # the last line, cut short by a crash: never acknowledged
                break
            try:
                if line is None:
                    raise ValueError(f"it is {length} bytes long, more than any record")
                if number == 1 and line[:1] == b"{":  # version 1 journals start with a bare header
                    record = _parse_line(line[:-1], False)
                    checksummed = not (record["op"] == "journal" and record.get("version") == 1)
                else:
                    record = _parse_line(line[:-1], checksummed)
            except (ValueError, RecursionError) as exc:
                return self._damaged(number, offset, exc, repair)
            try:
                apply(record)
            except Exception as exc:  # a record that parses (its checksum holds) and still cannot be applied
                raise JournalError(f"{self.path}: line {number} cannot be applied ({type(exc).__name__}: {exc}). "
                                   f"{REPAIR_HINT}", number) from None
            self.records += 1
            good = offset + length
        return good

    def _torn(self, number: int, offset: int, length: int) -> None:
        """A last line without its newline: what a crash in the middle of a write leaves. It is cut off (by the
        caller); its bytes are kept in FILE.torn-TIME."""
        saved = self._save_from(offset, "torn")
        warn(f"{self.path}: cut off a torn last line (line {number}, {length} bytes from byte {offset}: an "
             f"interrupted write, never acknowledged); its bytes are in {saved}")

    def _damaged(self, number: int, offset: int, exc: Exception, repair: bool) -> int:
        if not repair:
            raise JournalError(f"{self.path}: line {number} (byte {offset}) is damaged ({exc}). {REPAIR_HINT}",
                               number)
        self._set_aside(number, offset)
        return offset

    def _save_from(self, offset: int, kind: str) -> str:
        """Copy the file from `offset` to the end into a new file FILE.KIND-TIME (fsync'd; -2, -3... if that
        exists: a set-aside file is never overwritten); returns its name."""
        assert self._fd is not None
        saved, number = f"{self.path}.{kind}-{int(time.time())}", 1
        while True:
            try:
                out = open(saved, "xb")
                break
            except FileExistsError:
                number += 1
                saved = f"{self.path}.{kind}-{int(time.time())}-{number}"
        with out:
            position = offset
            chunk = os.pread(self._fd, READ_CHUNK, position)
            while chunk:
                out.write(chunk)
                position += len(chunk)
                chunk = os.pread(self._fd, READ_CHUNK, position)
            out.flush()
            os.fsync(out.fileno())
        return saved

    def _set_aside(self, number: int, offset: int) -> None:
        """Repair: copy the file from `offset` (line `number`) to FILE.corrupt-TIME, say exactly what that drops,
        and truncate the journal there."""
        assert self._fd is not None
        saved = self._save_from(offset, "corrupt")
        dropped: Dict[str, int] = collections.Counter()
        lines = unreadable = 0
        for count, (_, _, line, _) in enumerate(_lines(self._fd), 1):
            if count < number:
                continue
            lines += 1
            try:
                dropped[_parse_line((line or b"").rstrip(b"\n"), False)["op"]] += 1
            except (ValueError, KeyError, RecursionError):
                unreadable += 1
        lines += number - 1
        what = ", ".join(f"{count} {op}" for op, count in sorted(dropped.items()))
        warn(f"{self.path}: line {number} (byte {offset}) is damaged; kept the {number - 1} lines before it and "
             f"set aside the {lines - number + 1} lines from it on in {saved}: {unreadable} unreadable, and records "
             f"that parse: {what or 'none'}")
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self._written = self._synced = offset

    def cut(self, number: int) -> None:
        """Repair after a line that parsed but could not be applied: set it and the rest aside; the broker then
        replays what remains."""
        assert self._fd is not None
        offset = 0
        for count, (start, _, _, _) in enumerate(_lines(self._fd), 1):
            if count == number:
                offset = start
                break
        self._set_aside(number, offset)

    # -- appending and group commit -------------------------------------------------------------------------------

    @staticmethod
    def encode(records: List[Dict[str, Any]]) -> bytes:
        """The lines of `records` (before memory changes: an encoding failure changes nothing)."""
        return b"".join([journal_line(record) for record in records])

    def append(self, data: bytes, count: int) -> int:
        """Queue `count` encoded records for writing (broker lock held); returns the ticket to wait for."""
        with self._cond:
            self._pending.append(data)
            if self._compacting is not None:
                self._compacting.append(data)
            self._appended += 1
            self.records += count
            return self._appended

    @property
    def ticket(self) -> int:
        """The ticket of the latest append: waiting for it covers everything appended so far."""
        return self._appended

    def wait(self, ticket: int) -> None:
        """Return once the records up to `ticket` are durable; raise Unavailable if the disk lost them."""
        with self._cond:
            while True:
                # A ticket a failure lost stays lost, even once a reset lets later ones be written (a waiter woken
                # by the failure may only get here after that reset). After a failure nothing more is written
                # until reset(): the file may end in half a batch.
                state = self._state(ticket)
                if state:
                    return
                if state is False:
                    raise Unavailable(f"the journal could not be written ({self.failed or 'closed'}); "
                                      f"nothing was acknowledged: retry later")
                if self._flushing:
                    waiter = threading.Condition(self._mutex)
                    self._waiting.append((ticket, waiter))
                    waiter.wait()
                    continue
                self._flush_locked()

    def settled(self, ticket: int) -> Optional[bool]:
        """Whether the records up to `ticket` are durable: True, False if a failure lost them, None while they are
        pending (request_flush writes them)."""
        with self._cond:
            return self._state(ticket)

    def _state(self, ticket: int) -> Optional[bool]:
        if self._lost and any(after < ticket <= upto for after, upto in self._lost):
            return False
        if self._durable >= ticket:
            return True
        return False if self.failed is not None or self._closed else None

    def request_flush(self) -> None:
        """Have what is pending written soon, for a caller that must not block on the disk (the event loop asks
        once per pass, so everything it handled in that pass shares one write). With fsync "always" the flusher
        thread writes and fsyncs while the caller goes on. With "interval" and "never" the write (to the page cache,
        no fsync) is made here and now, as redis writes its append-only file from its event loop: handing it to a
        thread would cost more than the write. The settle listeners hear when it is done."""
        with self._cond:
            if self._closed:
                return
            if self.fsync != "always":
                if self._pending and not self._flushing and self.failed is None:
                    self._flush_locked()  # (if another write is under way, its end calls the listeners: ask again)
                return
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_forever, name="katar_http flusher", daemon=True)
                self._flusher.start()
            self._flush_wanted = True
            self._cond.notify_all()

    def _flush_forever(self) -> None:
        with self._cond:
            while not self._closed:
                if self._flush_wanted and not self._flushing:
                    self._flush_wanted = False
                    if self._pending and self.failed is None:
                        self._flush_locked()
                    continue
                self._cond.wait()

    def _flush_locked(self) -> None:
        """Write (and fsync) everything pending, releasing the condition during the I/O; then check that the
        path still names the file written."""
        self._flushing, self._io_since = True, time.monotonic()
        upto, pending, self._pending = self._appended, self._pending, []
        self._cond.release()
        error: Optional[OSError] = None
        size = 0
        try:
            batch = b"".join(pending)
            size = _write_all(self._fd, batch, self._write)
            if self.fsync == "always":
                self._fsync(self._fd)
            if not self._names(self._fd, self._written + size):  # taken away (before or while it was written)
                with contextlib.suppress(OSError):  # (never a file whose lock went to another server)
                    if os.fstat(self._fd).st_size >= self._written + size and not _lock_refused(self._fd):
                        os.ftruncate(self._fd, self._written)  # the open file keeps only what was acknowledged
                raise OSError(errno.ESTALE, self._taken_away())
        except (OSError, MemoryError) as exc:
            error = exc if isinstance(exc, OSError) else OSError(errno.ENOMEM, "out of memory while writing")
        finally:
            self._cond.acquire()
            self._flushing, self._io_since = False, None
        if error is None:
            self._written += size
            if self.fsync == "always":
                self._synced = self._written
            self._durable = max(self._durable, upto)
        else:
            self._fail(error)
        self._wake()

    def _wake(self) -> None:
        """After a flush (or a failure, a reset, a compaction, a close): wake the requests whose records are
        durable (or lost), and one of the others, to lead the next flush; then whoever waits on `_cond`."""
        still: List[Tuple[int, threading.Condition]] = []
        for ticket, waiter in self._waiting:
            if ticket <= self._durable or self.failed is not None or self._closed:
                waiter.notify()
            else:
                still.append((ticket, waiter))
        if still and not self._flushing:
            still.pop(0)[1].notify()
        self._waiting = still
        self._cond.notify_all()
        for listener in self.settle_listeners:
            listener()

    def fail(self, error: OSError) -> None:
        """Mark the journal failed from outside (memory could not be put back after a failed commit): memory is
        then rebuilt from the file before the next change."""
        with self._cond:
            self._fail(error)
            self._wake()

    def _fail(self, error: OSError) -> None:
        if self.failed is None:
            warn(f"the journal {self.path} failed: {error}. Changes are refused (503) until it can be written.")
        self.failed, self.rolled_back, self.last_failure = error, False, error
        if self._appended > self._durable:
            self._lost.append((self._durable, self._appended))
        self._pending = []
        self._generation += 1

    def _sync_periodically(self) -> None:
        while True:
            time.sleep(self.fsync_interval)
            with self._cond:
                if self._closed:
                    return
                while self._flushing:
                    self._cond.wait()
                if self.failed or self._synced == self._written:
                    continue
                self._flushing, self._io_since = True, time.monotonic()
                written = self._written
            error = None
            try:
                self._fsync(self._fd)
            except OSError as exc:
                error = exc
            with self._cond:
                self._flushing, self._io_since = False, None
                if error is None:
                    self._synced = written
                else:
                    self._fail(error)
                self._wake()

    def _taken_away(self) -> str:
        return (f"{self.path} was deleted, replaced or truncated while the server ran, so it no longer holds what "
                f"is acknowledged: changes are refused until a restart. The server's open file still holds it all: "
                f"before restarting, copy /proc/{os.getpid()}/fd/{self._fd} over {self.path} (Linux)")

    def _durable_bytes(self) -> int:
        return self._synced if self.fsync != "never" else self._written

    def reset(self) -> None:
        """After a failure: drop everything after the last durable byte, so the file holds only what it held
        before the failure. Raises OSError while the disk still fails, or for good once the file was deleted or
        replaced. Broker lock held (no appends)."""
        with self._cond:
            while self._flushing:
                self._cond.wait()
            keep = self._durable_bytes()
            if not self._lock_lost and _lock_refused(self._fd):  # the failure may be the lock's loss (NFS: EIO)
                self._lock_lost = True
            if self._lock_lost:  # then the file may be another server's now: never cut it
                raise OSError(errno.ENOLCK, f"this server lost the lock of {self.path}: it writes nothing more")
            if not self._names(self._fd, at_least=keep):
                raise OSError(errno.ESTALE, self._taken_away())
            self._pending = []
            os.ftruncate(self._fd, keep)
            self._fsync(self._fd)
            _fsync_folder(self.path)  # owed, if a compaction's could not be done
            self._written = self._synced = keep
            self._durable = self._appended
            self.failed = None
            self._wake()

    def read_back(self, apply: Callable[[Dict[str, Any]], None]) -> None:
        """Pass the records of the durable part of the file to `apply`, for the broker to rebuild memory from.
        Read from the open file, which is the journal's even if its path was taken away."""
        with self._cond:
            while self._flushing:
                self._cond.wait()
            size = self._durable_bytes()
        if os.fstat(self._fd).st_size < size:  # truncated by another program: what memory came from is gone
            raise OSError(errno.ESTALE, self._taken_away())
        self._scan(apply, size, False)

    def check_lock(self) -> None:
        """Fail the journal, for good, if this process no longer holds its lock: a standby may have taken over, and
        two servers must never write one journal. The server asks once a second. The lock is asked for again,
        without waiting: where the lock lives in this kernel it cannot be taken away and nothing changes; on NFS the
        NFS server refuses it once it went to another machine."""
        with self._cond:
            fd = self._fd
            if fd is None or self._closed or self.failed is not None or self._compaction_running:
                return
            if _lock_refused(fd):
                self._lock_lost = True
                self._fail(OSError(errno.ENOLCK, f"this server no longer holds the lock of {self.path} (refused "
                                                 f"when asked for again): another server may write it now, so this "
                                                 f"one writes nothing more; restart it (as a standby)"))
                self._wake()

    @property
    def lock_lost(self) -> bool:
        """Whether the lock was refused (check_lock): another server may own the file now."""
        return self._lock_lost

    def trouble(self) -> Optional[str]:
        """Why records cannot be made durable now, or None."""
        with self._cond:  # not while a flush or a compaction holds the file (the path may name the new one)
            failed, since = self.failed, self._io_since
            if failed is None and not self._flushing and self._fd is not None and not self._closed and not \
                    self._names(self._fd, at_least=self._written):
                failed = OSError(errno.ESTALE, self._taken_away())
        if failed is not None:
            return f"the journal cannot be written: {failed}"
        if since is not None and time.monotonic() - since > STALL_SECONDS:
            return f"a journal write or fsync has been pending for {time.monotonic() - since:.0f} s"
        return None

    # -- compaction -----------------------------------------------------------------------------------------------

    def wants_compaction(self, live_records: int) -> bool:
        return (not self._compaction_running and not self.failed and self.records >= COMPACT_MIN_RECORDS
                and self.records > COMPACT_RATIO * max(live_records, 1) and time.monotonic() >= self._compact_after)

    def begin_compaction(self) -> Optional[int]:
        """Broker lock held, as the snapshot is taken: records from now on also go to the new file. Returns what
        compact() needs, or None if a compaction is under way or the journal failed."""
        with self._cond:
            if self._compaction_running or self.failed is not None or self._closed:
                return None
            self._compaction_running, self._compacting = True, []
            return self._generation

    def compact(self, snapshot: List[Dict[str, Any]], generation: int) -> None:
        """Write the snapshot to a temporary file beside the journal and fsync it; then, holding off every other
        write, add what was appended since the snapshot (the tail), fsync, rename it over the journal and fsync the
        folder. Records appended after the tail was taken stay pending, for the new file. A crash at any step
        leaves a journal that loads: the old one until the rename, the new one after. A failure removes the
        temporary file and holds off the next compaction (1 s, doubling up to 5 min)."""
        temporary = self.path + ".compact"
        fd = os.open(temporary, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)  # it becomes the journal
        renamed = False
        try:
            _lock_file(fd, temporary)  # the lock moves with the file: no moment without one
            size = 0
            for start in range(0, len(snapshot), 10000):
                size += _write_all(fd, self.encode(snapshot[start:start + 10000]))
            os.fsync(fd)
            self.compaction_hook("snapshot written")
            with self._cond:
                while self._flushing:
                    self._cond.wait()
                if self.failed is not None or self._generation != generation or self._closed:
                    # records in the snapshot or the tail may have been refused since: keep the old file
                    raise OSError(errno.EIO, f"the journal failed during compaction: {self.failed or 'closed'}")
                self._flushing, self._io_since = True, time.monotonic()  # no other write until the new file is in
                tail, self._compacting = self._compacting or [], None
                upto, covered, records_then = self._appended, len(self._pending), self.records
            folder_error: Optional[OSError] = None
            try:
                size += _write_all(fd, b"".join(tail))
                os.fsync(fd)
                self.compaction_hook("tail written")
                os.replace(temporary, self.path)
                renamed = True
                try:
                    _fsync_folder(self.path)  # before anything in the new file is acknowledged: a power cut keeps it
                except OSError as exc:
                    folder_error = exc
            finally:
                with self._cond:
                    if renamed:  # the new file is the journal: write there from now on
                        self._fd, fd = fd, self._fd
                        self._written = self._synced = size
                        del self._pending[:covered]  # in the snapshot or the tail; what came later stays pending
                        self.records = len(snapshot) + sum(chunk.count(b"\n") for chunk in tail) + (
                            self.records - records_then)
                        if folder_error is None:
                            self._durable = max(self._durable, upto)
                        else:
                            self._fail(folder_error)
                    self._flushing, self._io_since = False, None
                    self._wake()
            if folder_error is not None:
                raise folder_error
            self.compaction_hook("renamed")
            self._compact_wait = COMPACT_RETRY[0]
        except OSError:
            self._compact_after = time.monotonic() + self._compact_wait
            self._compact_wait = min(2 * self._compact_wait, COMPACT_RETRY[1])
            raise
        finally:
            os.close(fd)  # the old journal's descriptor, once the new one is in place
            if not renamed:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            with self._cond:
                self._compaction_running, self._compacting = False, None

    def close(self) -> None:
        """Flush what is pending, then release the file and its lock."""
        with self._cond:
            if self._closed or self._fd is None:
                self._closed = True
                return
            while self._flushing:
                self._cond.wait()
            if self._pending and not self.failed:
                self._flush_locked()
            self._closed = True
            self._wake()
            os.close(self._fd)


class Promise:
    """What a caller that must not block collects while it changes state (Broker.deferring): the journal ticket
    its answer must wait for (0: none)."""

    __slots__ = ("ticket",)

    def __init__(self) -> None:
        self.ticket = 0


class _Change:
    """`with durability.changing():` (a class, not a generator: it wraps every request's change)."""

    __slots__ = ("durability",)

    def __init__(self, durability: "Durability") -> None:
        self.durability = durability

    def __enter__(self) -> None:
        durability = self.durability
        durability._lock.acquire()
        try:
            durability.writable()  # after a disk failure, memory is put back first: never in the middle of a change
        except BaseException:
            durability._lock.release()
            raise

    def __exit__(self, kind: Any, value: Any, trace: Any) -> None:
        if kind is not None:
            self.durability._lock.release()  # a change that raised has nothing to wait for
            return
        try:
            self.durability.follow_up()  # (at the end of the change: never inside one of its steps)
        finally:
            self.durability.finish_change()


class _Deferral:
    """`with durability.deferring() as promise:` for one thread."""

    __slots__ = ("local", "promise")

    def __init__(self, local: threading.local) -> None:
        self.local, self.promise = local, Promise()

    def __enter__(self) -> Promise:
        self.local.promise = self.promise
        return self.promise

    def __exit__(self, *exc: Any) -> None:
        self.local.promise = None


class Durability:
    """The coordination of durability: when a change made in memory may be acknowledged, and what happens when
    the disk refuses it. The Broker owns one and holds its lock (`lock`, the broker's) around every change; the
    journal makes the records durable. Without a journal a change is acknowledged as soon as it is made.

    A caller that may block (a thread of the Python API) waits after leaving the lock until the journal holds what
    it changed (changing, require). The event loop must not block: inside deferring() the ticket to wait for is
    collected instead, and the loop answers once settled(ticket), having asked the journal to write
    (Journal.request_flush: the flusher thread writes and fsyncs for "always"). After a disk failure, memory is rebuilt from the durable part of the file at the
    start of the next change (writable), never in the middle of one. Compactions start here, in a thread of their
    own, when the journal has grown well past the state (`snapshot` gives the state as records, lock held)."""

    def __init__(self, lock: threading.Lock, journal: Optional[Journal], rebuild: Callable[[Journal], None],
                 snapshot: Callable[[], List[Dict[str, Any]]], follow_up: Callable[[], None] = lambda: None) -> None:
        self._lock, self.journal = lock, journal
        self._rebuild, self._snapshot = rebuild, snapshot
        self.follow_up = follow_up  # lock held, as a change ends well: the changes it calls for (a batch's callback)
        self._rebuilt_upto = 0  # the journal's ticket when memory was last rebuilt from the disk
        self._local = threading.local()  # per thread: the Promise of a deferring caller
        self._compaction: Optional[threading.Thread] = None

    def changing(self) -> "_Change":
        """Hold the lock for a change; on leaving, wait (without the lock) until what was committed is durable,
        or note its ticket for a deferring caller. This is what makes a 2xx mean "on disk"."""
        return _Change(self)

    def finish_change(self) -> None:
        """Lock held, as a change ends: release the lock, then require what the change needs durable."""
        ticket = self.journal.ticket if self.journal is not None else 0
        self._lock.release()
        if ticket and ticket > self._rebuilt_upto:  # else memory was rebuilt from the disk since: it is there
            self.require(ticket)

    def require(self, ticket: int) -> None:
        """The caller's answer needs the records up to `ticket` durable: wait for them (Unavailable if the disk lost
        them), or, deferring, note the ticket."""
        if not ticket or self.journal is None:
            return
        promise = getattr(self._local, "promise", None)
        if promise is not None:
            promise.ticket = max(promise.ticket, ticket)
            return
        try:
            self.journal.wait(ticket)
        except Unavailable:
            with self._lock:
                self.writable()  # put memory back to what the disk holds, if the disk lets us already
            raise

    def deferring(self) -> "_Deferral":
        """Inside, this thread's changes are not waited for: their ticket goes to the Promise yielded."""
        return _Deferral(self._local)

    def request_flush(self) -> None:
        """Have the journal write what is pending without waiting for it (see Journal.request_flush)."""
        if self.journal is not None:
            self.journal.request_flush()

    def settled(self, ticket: int) -> Optional[bool]:
        """True once the records up to `ticket` are durable, None while pending, False if the disk lost them (then
        memory is put back to what the disk holds, if the disk lets it already)."""
        if not ticket or self.journal is None:
            return True
        state = self.journal.settled(ticket)
        if state is False:
            with self._lock:
                try:
                    self.writable()
                except Exception as exc:  # a bug in the rebuild: the next change tries again; answer the 503 now
                    warn(f"memory could not be put back to what the journal holds yet: {exc!r}")
        return state

    def writable(self) -> bool:
        """Whether changes can be journalled now (lock held). After a disk failure, memory is first rebuilt from
        the durable part of the file, so that it never holds what the disk lost; then the journal is truncated to
        that part, which succeeds once the disk works again (and never if the file was deleted or replaced)."""
        journal = self.journal
        if journal is None or journal.failed is None:
            return journal is None or not journal.closed
        if not journal.rolled_back:
            try:
                self._rebuild(journal)
                journal.rolled_back, self._rebuilt_upto = True, journal.ticket
            except (OSError, MemoryError, JournalError):
                return False
        try:
            journal.reset()
        except OSError:
            return False
        return True

    def on_disk(self) -> bool:
        """Lock held: whether the journal failed and memory was rebuilt from what it holds since (so that what
        memory shows is on disk, while nothing new is written)."""
        journal = self.journal
        return journal is not None and journal.failed is not None and journal.rolled_back

    def compact(self) -> None:
        """Rewrite the journal now as a snapshot of the state; only taking the snapshot holds the lock."""
        with self._lock:
            journal = self.journal
            generation = journal.begin_compaction() if journal is not None else None
            if generation is None:
                return  # no journal, or a compaction is already running
            snapshot = self._snapshot()
        journal.compact(snapshot, generation)

    def maybe_compact(self, live_records: int) -> None:
        """Lock held: start a compaction in the background when the journal has grown well past the state."""
        journal = self.journal
        if journal is None or not journal.wants_compaction(live_records):
            return
        generation = journal.begin_compaction()
        if generation is not None:
            self._compaction = threading.Thread(target=self._compact_quietly,
                                                args=(journal, self._snapshot(), generation),
                                                name="katar_http compaction", daemon=True)
            self._compaction.start()

    @staticmethod
    def _compact_quietly(journal: Journal, snapshot: List[Dict[str, Any]], generation: int) -> None:
        try:
            journal.compact(snapshot, generation)
        except OSError as exc:
            warn(f"compaction of {journal.path} failed, the journal is unchanged: {exc}")

    def join_compaction(self, timeout: Optional[float] = None) -> None:
        """Wait for the compaction running in the background, if any, to end."""
        if self._compaction is not None:
            self._compaction.join(timeout)

    def close(self) -> None:
        """Let a compaction under way finish, then close the journal (writing what is pending). The lock is held
        meanwhile: a change cannot slip its records in after the last write (they would never be written, and every
        answer after them would wait for them in vain)."""
        self.join_compaction()
        if self.journal is not None:
            with self._lock:
                self.journal.close()


def _write_all(fd: int, data: bytes, write: Callable[[int, Any], int] = os.write) -> int:
    """Write all of `data` (a write may take only part of it); returns its length."""
    view = memoryview(data)
    while view:
        view = view[write(fd, view):]
    return len(data)


def _fsync_folder(path: str) -> None:
    """Make a rename durable: fsync the folder that holds the file. OSError if the disk fails; a no-op where
    folders cannot be opened or synced (EINVAL: the file system does not sync folders)."""
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# 4. The HTTP layer: parse, authenticate, call the core, serialise. No queue logic here.
# ---------------------------------------------------------------------------------------------------------------

# One route table: path template -> {method: handler}. The matcher decides 404 against 405 (with Allow) from it, a
# 404 names the route closest to the path asked for, and the OpenAPI document describes exactly these templates.
ROUTE_TABLE: List[Tuple[str, Dict[str, str]]] = [
    ("/healthz", {"GET": "route_health"}),
    ("/metrics", {"GET": "route_metrics"}),
    ("/v1/openapi.json", {"GET": "route_openapi"}),
    ("/", {"GET": "route_page"}),
    ("/ui", {"GET": "route_page"}),
    ("/v1/queues", {"GET": "route_queues"}),
    ("/v1/workers", {"GET": "route_workers"}),
    ("/v1/poll", {"POST": "route_multi_poll"}),
    ("/v1/batches", {"GET": "route_batches"}),
    ("/v1/batches/{batch}", {"GET": "route_batch", "PUT": "route_put_batch"}),
    ("/v1/queue/{queue}", {"GET": "route_configuration", "POST": "route_poll", "PUT": "route_put_queue"}),
    ("/v1/queue/{queue}/stats", {"GET": "route_stats"}),
    ("/v1/queue/{queue}/tasks", {"GET": "route_list", "POST": "route_insert", "DELETE": "route_purge"}),
    ("/v1/queue/{queue}/tasks/{id}", {"GET": "route_task", "PATCH": "route_patch_task", "DELETE": "route_cancel_task"}),
]


_DECIMAL = re.compile(r"-?[0-9]+")  # a query's integer, as JSON writes one
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")  # a query's number, as JSON writes one


def _route_pattern(template: str) -> "re.Pattern[str]":
    """A template's regular expression: each {parameter} is one path segment, captured; the rest is literal."""
    return re.compile("/".join("([^/]+)" if part.startswith("{") else re.escape(part) for part in template.split("/")))


ROUTES = [(_route_pattern(template), methods) for template, methods in ROUTE_TABLE]
OPEN_PATHS = ("/healthz", "/v1/openapi.json", "/", "/ui")  # answered without a token or an origin (no data)
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE"  # what a page of an --allow-origin may send, after its preflight
CORS_HEADERS = "authorization, content-type"
# The fields of each request body; any other is a 400 that names it.
POLL_FIELDS = ("tasks", "max", "wait", "worker", "lease", "throttle")
MULTI_POLL_FIELDS = ("queues", "tasks", "max", "wait", "worker", "lease")
QUEUE_FIELDS = ("configuration",) + tuple(QUEUE_DEFAULTS)
WORKER_ROUTES = ("route_configuration", "route_poll", "route_multi_poll")  # all a worker token may do, on its queues
JSON_MEDIA = ("", "application/json")
# curl -d and many HTTP libraries label a JSON body as a form or as text; such a body is accepted when it is JSON.
LENIENT_MEDIA = ("application/x-www-form-urlencoded", "text/plain")
# Headers that must not differ when repeated (RFC 9112 6.3: conflicting lengths are how requests get smuggled).
SINGLE_HEADERS = ("content-length", "transfer-encoding", "content-type", "authorization", "host", "expect")
Reply = Tuple[int, Any]
# RFC 9110 5.1: a header name is a token; "Bad Name" or "Name :" is how a request gets read two ways by two servers.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_NAME = re.compile(_TOKEN)
# RFC 9112 2.2: lines end with CRLF. A bare LF, a bare CR or a NUL is refused wherever it is, however the bytes
# arrive: a server that takes a bare LF as a line end in one place and not in another frames requests two ways.
_BAD_HEAD_BYTE = re.compile(rb"[\r\n\x00]")
BAD_FRAMING = "a request head may not hold a bare LF, a bare CR or a NUL: end each line with CRLF"
# RFC 9110 5.5: a field value is visible characters, spaces and tabs (and obs-text); no other control character.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Header lines (a head decoded as latin-1, after its request line): each a name, a colon, a value as above.
_FIELD = _TOKEN + r":[\t\x20-\x7e\x80-\xff]*"  # the complement of _BAD_VALUE, in a value
_FIELDS = re.compile(_FIELD + r"(?:\r\n" + _FIELD + r")*")
# RFC 9112 3.2 and RFC 3986 3.2.2: Host is uri-host [":" port]; an IP literal in brackets, or a reg-name.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_CHUNKS = 4096  # chunks in one chunked body: each costs a few microseconds of Python
# RFC 9110 9.1: a method the server does not implement on any resource is 501 (TRACE, CONNECT, QUERY, BREW); one
# it implements but not on the target resource is 405 with Allow.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


# Workers ask for the same few targets over and over: splitting and routing each once saves about 12 us of a
# request's CPU (of 150 to 200). The caches are small: a client sending endless new targets pins a few MB at most.

@functools.lru_cache(maxsize=256)
def _split_target(target: str) -> Tuple[str, str]:
    """The path and query of a request target: of the usual one (/path?query, where //x/y is a path too), and of an
    absolute one (http://host/path). A target urlsplit refuses (a broken IPv6 host) has no path."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    try:
        parts = urlsplit(target)
    except ValueError:
        return "", ""
    return parts.path, parts.query


def _authority(target: str, host_header: str) -> str:
    """The host (and port) a request is addressed to: that of an absolute target (RFC 9112 3.2.2: the Host header
    is then ignored), or the Host header. Lowercase."""
    if not target.startswith("/"):  # as _split_target reads it
        try:
            netloc = urlsplit(target).netloc
        except ValueError:
            netloc = ""
        if netloc:
            return netloc.lower()
    return host_header.strip().lower()


@functools.lru_cache(maxsize=256)  # a server is asked for by a few names only
def _host_of(authority: str) -> str:
    """The host of an authority (host[:port], [v6]:port), a trailing dot taken off a name; the whole authority
    when what follows the host is not a port (not a name this server has)."""
    if authority.startswith("["):
        host, _, port = authority[1:].partition("]")
    else:
        host, _, port = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    host = host[:-1] if host.endswith(".") and ":" not in host else host
    if port and not (port.startswith(":") and port[1:].isdigit()) and not port.isdigit():
        return authority
    return host


@functools.lru_cache(maxsize=256)
def _route(path: str) -> Tuple[Dict[str, str], Tuple[str, ...]]:
    """The methods of the route `path` matches, and its parameters unescaped; NotFound if none matches."""
    for pattern, methods in ROUTES:
        found = pattern.fullmatch(path)
        if found:
            try:
                return methods, tuple(unquote(group, errors="strict") for group in found.groups())
            except UnicodeDecodeError:
                raise NotFound(f"no route {path[:200]}: its escapes are not UTF-8") from None
    closest = _closest_route(path)
    hint = f"; did you mean {closest}?" if closest else "."
    raise NotFound(f"no route {path[:200]}{hint} Every route is described at GET /v1/openapi.json",
                   **({"closest": closest} if closest else {}))


def _closest_route(path: str) -> Optional[str]:
    """The route most like `path`, its parameters taken from `path`: /v1/queues/jobs/tasks is most like
    /v1/queue/jobs/tasks. A route is like a path with as many segments whose words are each the route's word,
    one letter off, or its first four letters or more; /v1 may be missing. None when no route is like it. Cheap:
    a few comparisons of short words, whatever the path (a typo's 404 costs about what any request does)."""
    best: Optional[Tuple[int, str]] = None
    stripped = int(len(path) > 1 and path.endswith("/"))  # /v1/queues/ is /v1/queues with one thing wrong
    segments = (path[:-1] if stripped else path).split("/")
    variants = [segments] if path.startswith("/v1/") else [segments, ["", "v1"] + segments[1:]]
    for found in variants:
        for template, _ in ROUTE_TABLE:
            parts = template.split("/")
            if len(parts) != len(found) or template == "/":
                continue
            misses = stripped
            for part, segment in zip(parts, found):
                if part.startswith("{"):
                    misses += 0 if segment else 9
                elif part != segment:
                    misses += 1 if _near(segment, part) else 9
            misses += len(variants) > 1 and found is not segments
            if misses < 9 and (best is None or misses < best[0]):
                best = (misses, "/".join(segment if part.startswith("{") else part
                                         for part, segment in zip(parts, found)))
    return best[1] if best and best[0] else None


def _near(segment: str, word: str) -> bool:
    """Whether `segment` is `word` mistyped: one letter off (added, dropped or changed), another case, or the
    first four letters or more of it."""
    typed = segment.lower()
    if typed == word or (len(typed) >= 4 and word.startswith(typed)):
        return True
    if abs(len(typed) - len(word)) > 1:
        return False
    same = next((i for i, (a, b) in enumerate(zip(typed, word)) if a != b), min(len(typed), len(word)))
    return typed[same + 1:] == word[same + 1:] or typed[same:] == word[same + 1:] or typed[same + 1:] == word[same:]


class Limits(NamedTuple):
    """What one client may ask of the server; each is a command-line flag. Going past one is a 4xx (or a 503 for
    connections) with a JSON error, never a hang."""

    max_body: int = DEFAULT_MAX_BODY       # bytes in a request body (413)
    max_tasks: int = 1000                  # tasks in an insert, reports in a poll, and `max` (400)
    max_data: int = 65536                  # bytes of one task's data, or of a reported result, as JSON (413)
    max_depth: int = 32                    # nesting of arrays and objects in a body (400)
    max_wait: int = DEFAULT_MAX_WAIT_MS    # ms a long poll or a result wait may last (longer ones are cut to it)
    max_headers: int = 64                  # header lines in a request (431)
    max_head_bytes: int = 16384            # bytes of the request line and headers together (431, 414)
    idle_timeout: float = 60.0             # seconds a connection may wait between requests
    request_timeout: float = 30.0          # seconds from a request's first byte to the end of its body (408)
    first_request_timeout: float = 10.0    # seconds a new connection has to complete its first authorised request
    max_connections: int = 0               # connections served at once (0: as the file-descriptor limit allows);
                                           # beyond, a quick 503 and close


@functools.lru_cache(maxsize=256)  # each request asks, and a server is asked for by a few names only
def _is_address(host: str) -> bool:
    """Whether `host` is an IP address: as written (127.0.0.1, ::1) or in the older forms a browser or curl also
    takes for one (127.1, 0x7f.0.0.1, 2130706433): DNS cannot rebind any of them."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        return False
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        return False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Access:
    """Who may do what. An admin token may use every route; a worker token may only read the configuration of,
    lease from and report to the queues it names ("*": every queue). With no token at all every route is open,
    which is why the server refuses to listen beyond this machine without one."""

    ADMIN: Optional[FrozenSet[str]] = None

    def __init__(self, admin: Iterable[str] = (), workers: Optional[Dict[str, Iterable[str]]] = None) -> None:
        # Tokens are kept as SHA-256 digests and compared in constant time: neither their content nor their
        # length can be learnt from response times.
        self._grants: List[Tuple[bytes, Optional[FrozenSet[str]]]] = [(_digest(t), self.ADMIN) for t in admin if t]
        for token, queues in (workers or {}).items():
            self._grants.append((_digest(token), frozenset(queues)))

    @property
    def open(self) -> bool:
        return not self._grants

    def scope(self, authorization: Optional[str]) -> Optional[FrozenSet[str]]:
        """The queues the bearer token grants (ADMIN: all routes), or Unauthorized."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this server needs a token: send Authorization: Bearer <token>")
        digest, found, matched = _digest(token.strip()), self.ADMIN, False
        for known, queues in self._grants:
            if hmac.compare_digest(known, digest):  # no early exit: the same work whichever token matches
                found, matched = queues, True
        if not matched:
            raise Unauthorized("the token is not valid")
        return found

    def visible(self, scope: Optional[FrozenSet[str]], queues: List[str], exists: Callable[[str], bool]) -> List[str]:
        """The queues `scope` may know of: `queues` (all there are) for an admin or "*", else those of its own
        that `exists`."""
        if scope is self.ADMIN or "*" in scope:
            return queues
        return sorted(name for name in scope if exists(name))[:100]

    def check(self, scope: Optional[FrozenSet[str]], route: str, queue: Optional[str]) -> None:
        """Forbidden unless `scope` may use `route` on `queue`."""
        if scope is self.ADMIN:
            return
        if route not in WORKER_ROUTES:
            raise Forbidden("a worker token may only read the configuration of, lease from and report to its queues")
        if route == "route_multi_poll" and queue is None:
            return  # its queues are in its body: the route checks each one
        if "*" not in scope and queue not in scope:
            raise Forbidden(f"this worker token is not for queue {queue}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decode = json.JSONDecoder(parse_constant=_refuse_constant).decode  # built once, as _encode

def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` (iterative: a deep value cannot exhaust the stack)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


_date_cache = [0, ""]


def _http_date() -> str:
    """The Date header, formatted once a second rather than once a request."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


# -- framing: a request's bytes, from a buffer the event loop fills, without blocking --------------------------

def frame_head(buffer: bytearray, limits: "Limits") -> Optional[Tuple[int, Tuple[str, str, str, Dict[str, str]]]]:
    """The request head at the start of `buffer`: (the offset where its body begins, (method, target, version,
    headers)), or None while it is incomplete. Empty lines before a request line are skipped (RFC 9112 2.2). Raises
    the KatarError to answer (the connection then closes) for a head that breaks a rule or a limit."""
    start = 0
    while buffer.startswith(b"\r\n", start):
        start += 2
    end = buffer.find(b"\r\n\r\n", start, start + limits.max_head_bytes + 4)
    head = buffer[start:end if end >= 0 else start + limits.max_head_bytes + 4]
    crlf = head.count(b"\r\n")
    # RFC 9112 2.2: a bare LF, a bare CR or a NUL anywhere in a head is refused, however the bytes arrive (a CR
    # at the very end of an incomplete head may be the start of a CRLF still to come).
    bare_cr = head.count(b"\r") - crlf - (end < 0 and head.endswith(b"\r"))
    if head.count(b"\n") != crlf or bare_cr or b"\0" in head:
        raise BadRequest(BAD_FRAMING)
    if end < 0:
        if len(head) > limits.max_head_bytes:
            if crlf == 0:
                raise URITooLong(f"the request line is longer than {limits.max_head_bytes} bytes")
            raise RequestHeaderFieldsTooLarge(f"the headers are longer than {limits.max_head_bytes} bytes")
        if crlf > limits.max_headers + 1:
            raise RequestHeaderFieldsTooLarge(f"a request may have at most {limits.max_headers} header lines")
        return None
    return end + 4, parse_head(head.decode("latin-1"), limits)


def parse_head(head: str, limits: "Limits") -> Tuple[str, str, str, Dict[str, str]]:
    """The request line and header lines (CRLF-separated, without the empty line) as (method, target, version,
    headers); header names lowercase, a repeated header joined with commas (or refused where repeats would be read
    two ways)."""
    request_line, _, fields = head.partition("\r\n")
    if len(request_line) > limits.max_head_bytes - 4:
        raise URITooLong(f"the request line is longer than {limits.max_head_bytes} bytes")
    parts = request_line.split(" ")  # RFC 9112 3: single spaces, no other whitespace
    if len(parts) != 3 or not _HEADER_NAME.fullmatch(parts[0]):
        raise BadRequest("the request line must be METHOD TARGET HTTP/1.1")
    method, target, version = parts
    found = _VERSION.fullmatch(version)
    if not found:
        raise BadRequest(f"the request line must end with the HTTP version, like HTTP/1.1, not {version[:16]!r}")
    if found.group(1) != "1":
        raise VersionNotSupported(f"this server speaks HTTP/1.1 and HTTP/1.0, not {version}")
    version = "HTTP/1.0" if found.group(2) == "0" else "HTTP/1.1"  # RFC 9110 2.5: a later 1.x is read as 1.1
    lines = fields.split("\r\n") if fields else []
    if len(lines) > limits.max_headers:
        raise RequestHeaderFieldsTooLarge(f"a request may have at most {limits.max_headers} header lines")
    if fields and not _FIELDS.fullmatch(fields):  # one pass for the usual head; line by line to say what is wrong
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                raise BadRequest("a header line must be Name: value")
            if _BAD_VALUE.search(value):
                raise BadRequest(f"the value of header {name[:100].lower()} holds a control character")
    headers: Dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name, value = name.lower(), value.strip(" \t")  # RFC 9110 5.5: only spaces and tabs around a value
        if name not in headers:
            headers[name] = value
        elif name == "host":
            raise BadRequest("a request has one Host header (RFC 9112 3.2)")
        elif name in SINGLE_HEADERS:
            if headers[name] != value:
                raise BadRequest(f"conflicting {name} headers")
        else:
            headers[name] += ", " + value
    if version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest("an HTTP/1.1 request needs a Host header (RFC 9112 3.2)")
    if not _HOST.fullmatch(headers.get("host", "")):
        raise BadRequest("the Host header must be a host name or IP address and an optional port (RFC 9112 3.2)")
    return method, target, version, headers


def body_length(version: str, headers: Dict[str, str], limits: "Limits") -> Optional[int]:
    """How the body after this head is framed: its length in bytes, -1 for chunked, or None when it cannot be
    framed here (conflicting or unknown framing, a length past max_body): the handler then refuses the request
    if it reads the body, and the connection closes after the answer, since its stream can no longer be read."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if "content-length" in headers or coding.lower() != "chunked" or version != "HTTP/1.1":
            return None
        return -1
    text = headers.get("content-length", "0") or "0"
    if not text.isdigit() or not text.isascii() or len(text) > 18 or int(text) > limits.max_body:
        return None
    return int(text)


def frame_chunked(buffer: bytearray, start: int, limits: "Limits") -> Optional[Tuple[bytes, int]]:
    """A chunked body (RFC 9112 7.1) starting at `start`: (the body, the offset after it), or None while it is
    incomplete. Size lines in hex (extensions ignored), each chunk and line ending in CRLF, trailers checked as
    headers are and dropped; the bytes on the wire, framing included, count toward max_body."""
    body, at = bytearray(), start
    for _ in range(MAX_CHUNKS + 1):
        end = buffer.find(b"\r\n", at, at + 1024)
        if end < 0:
            if len(buffer) - at >= 1024 or _BAD_HEAD_BYTE.search(buffer, at, len(buffer) - 1):
                raise BadRequest("a chunk size line must be hex digits ending in CRLF")
            return None
        line = bytes(buffer[at:end])
        if _BAD_HEAD_BYTE.search(line):
            raise BadRequest("a chunk size line must be hex digits ending in CRLF")
        digits = line.split(b";", 1)[0].rstrip(b" \t")  # RFC 9112 7.1.1: space only before a ";"
        if not _CHUNK_SIZE.fullmatch(digits):
            raise BadRequest("a chunk size must be hex digits")
        chunk, at = int(digits, 16), end + 2
        if at - start + chunk + (2 if chunk else 0) > limits.max_body:
            raise PayloadTooLarge(f"the body is over {limits.max_body} bytes, the most this server accepts")
        if not chunk:
            break
        if len(buffer) < at + chunk + 2:
            return None
        if buffer[at + chunk:at + chunk + 2] != b"\r\n":
            raise BadRequest("a chunk must be as long as its size says, then CRLF")
        body += buffer[at:at + chunk]
        at += chunk + 2
    else:
        raise BadRequest(f"a chunked body may have at most {MAX_CHUNKS} chunks: send larger ones")
    for _ in range(limits.max_headers + 1):  # trailer fields: checked as headers are, then dropped
        end = buffer.find(b"\r\n", at, at + limits.max_head_bytes)
        if end < 0:
            if len(buffer) - at >= limits.max_head_bytes:
                raise RequestHeaderFieldsTooLarge(f"a trailer line is longer than {limits.max_head_bytes} bytes")
            if _BAD_HEAD_BYTE.search(buffer, at, len(buffer) - 1):
                raise BadRequest("a trailer line must be Name: value, and the trailer end with an empty line")
            return None
        line, at = bytes(buffer[at:end]), end + 2
        if not line:
            return bytes(body), at
        name, colon, value = line.decode("latin-1").partition(":")
        if (_BAD_HEAD_BYTE.search(line) or not colon or not _HEADER_NAME.fullmatch(name) or
                _BAD_VALUE.search(value)):
            raise BadRequest("a trailer line must be Name: value, and the trailer end with an empty line")
    raise RequestHeaderFieldsTooLarge(f"a request may have at most {limits.max_headers} trailer lines")


class Parked(NamedTuple):
    """A route's answer that is not ready yet: the core parked a wait (`waiter`); `finish()` gives the answer
    once the wait has ended (answered, out of time, the client gone)."""

    waiter: Waiter
    finish: Callable[[], "Reply"]


class Text(str):
    """A response body that is text, not JSON, with its content type."""

    def __new__(cls, text: str, content_type: str) -> "Text":
        value = super().__new__(cls, text)
        value.content_type = content_type
        return value


def metrics_text(broker: Broker, requests: Dict[Tuple[str, int], int]) -> str:
    """The Prometheus text exposition of the queues and of the HTTP requests served."""
    lines: List[str] = []

    def family(name: str, kind: str, about: str, samples: Iterable[Tuple[str, str, Any]]) -> None:
        """One metric family: its HELP and TYPE lines, then (suffix, labels, value) samples."""
        lines.extend([f"# HELP {name} {about}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{suffix}{{{labels}}} {value}" for suffix, labels, value in samples)

    stats = [queue.stats() for queue in broker.queues()]
    family("katar_tasks", "gauge", "Tasks in a queue, by status.",
           [("", f'queue="{s["queue"]}",status="{status}"', n) for s in stats for status, n in s["counts"].items()])
    family("katar_task_events_total", "counter", "Task events since the server started: inserted, leased, done, "
           "failed (dead letters), retried, expired, released, cancelled.",
           [("", f'queue="{s["queue"]}",event="{event}"', n) for s in stats
            for event, n in s["totals"].items() if event != "lease_wait_ms"])
    family("katar_lease_wait_seconds", "summary", "How long leased tasks waited, due, before a worker took them.",
           [(suffix, f'queue="{s["queue"]}"', value) for s in stats
            for suffix, value in (("_sum", s["totals"]["lease_wait_ms"] / 1000.0), ("_count", s["totals"]["leased"]))])
    family("katar_oldest_queued_age_seconds", "gauge", "How long the oldest queued task has waited.",
           [("", f'queue="{s["queue"]}"', (s["oldest_queued_age_ms"] or 0) / 1000.0) for s in stats])
    family("katar_waiting_workers", "gauge", "Long polls waiting for a task.",
           [("", f'queue="{s["queue"]}"', s["waiting_workers"]) for s in stats])
    family("katar_queue_groups", "gauge", "Groups with tasks due or in progress.",
           [("", f'queue="{s["queue"]}"', s["groups"]) for s in stats])
    family("katar_queue_throttled_seconds", "gauge", "How long the queue still hands out nothing (a worker's "
           "throttle).", [("", f'queue="{s["queue"]}"', s["throttled_for_ms"] / 1000.0) for s in stats])
    family("katar_schedule_next_fire_timestamp_seconds", "gauge", "When a schedule's next slot is due (seconds "
           "since the epoch).", [("", f'queue="{s["queue"]}",schedule="{schedule["name"]}"',
                                  schedule["next_fire_ms"] / 1000.0) for s in stats
                                 for schedule in s.get("schedules", ()) if schedule["next_fire_ms"] is not None])
    batches = broker.batches(1)
    family("katar_batches", "gauge", "Batches not ended yet, and ended ones remembered.",
           [("", 'state="not_ended"', batches["not_ended"]), ("", 'state="ended"', batches["ended"])])
    seen = broker.worker_counts()
    family("katar_queue_workers", "gauge", "Workers heard from in the last hour (named ones by id, anonymous "
           "pollers by address).", [("", f'queue="{s["queue"]}"', seen.get(s["queue"], 0)) for s in stats])
    family("katar_queue_unattended_seconds", "gauge", "How long tasks have been due with no worker polling the "
           "queue since: a backlog that nobody works on.",
           [("", f'queue="{queue.name}"', queue.unattended_ms() / 1000.0) for queue in broker.queues()])
    used, bound = broker.memory()
    family("katar_memory_bytes", "gauge", "The estimate of the memory the queues hold, and its bound "
           "(--max-memory; 0: none).", [("", 'kind="estimate"', used), ("", 'kind="bound"', bound)])
    family("katar_http_requests_total", "counter", "HTTP requests answered, by route and status code.",
           [("", f'route="{route}",code="{code}"', n) for (route, code), n in sorted(requests.items())])
    return "\n".join(lines) + "\n"


_STATUS_LINES = {int(status): "HTTP/1.1 %d %s" % (status, status.phrase) for status in HTTPStatus}


def http_response(status: int, payload: Any, headers: Iterable[Tuple[str, str]] = (),
                  server: Optional[str] = None) -> Tuple[bytes, bytes]:
    """An answer as bytes: its head and its body. A payload is JSON, or a Text (the metrics, the page)."""
    status = int(status)
    content_type = "application/json"
    if isinstance(payload, Text):
        body, content_type = payload.encode(), payload.content_type
    else:
        body = b"" if status == HTTPStatus.NO_CONTENT else _encode(payload).encode()
    lines = [_STATUS_LINES[status]]
    if server:
        lines += ["Server: " + server, "Date: " + _http_date()]
    if status != HTTPStatus.NO_CONTENT:
        lines += ["Content-Type: " + content_type, "Content-Length: %d" % len(body)]
    lines += ["%s: %s" % header for header in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body


class Handler(BaseHTTPRequestHandler):
    """The routes, one method each, and what every request goes through: the Host and Origin checks, the token,
    the route table, the body's checks, one call into the core, the answer. One Handler serves one connection's
    requests in turn; the event loop (Connection) frames each request from the bytes it has read and calls
    `handle_request`, so nothing here reads or writes a socket, or waits: a route whose answer must wait (a long
    poll, a result wait) returns a Parked wait, and the connection calls `resume` when it has ended."""

    protocol_version = "HTTP/1.1"
    server_version = "katar_http/" + __version__
    server: "HTTPServer"

    def __init__(self, channel: "Connection", client_address: Any, server: "HTTPServer") -> None:
        # Not the base class's __init__, which would read and answer requests from a socket at once.
        self.channel, self.client_address, self.server = channel, client_address, server
        self.request = None
        # Until it has sent one complete request that passed authentication, a connection has a short deadline:
        # strangers that connect and idle, or trickle, cannot hold the connection slots for long.
        self.authorised = False
        self.command, self.path, self.request_version, self.headers = "", "", "HTTP/1.1", {}
        self.close_connection = True
        self.undo: Optional[Callable[[], None]] = None  # what to put back if the answer never leaves

    def handle_request(self, head: Tuple[str, str, str, Dict[str, str]], body: Optional[bytes]) -> None:
        """Serve one framed request: `body` is None when it could not be framed (read_object then says why)."""
        self.command, self.path, self.request_version, self.headers = head
        self.body, self.body_read, self.body_size = body, False, 0
        self.undo = None
        connection = self.headers.get("connection")
        tokens = {token.strip().lower() for token in connection.split(",")} if connection else ()
        self.close_connection = "close" in tokens or (self.request_version == "HTTP/1.0" and "keep-alive" not in tokens)
        if body is None and self._declared_body():
            self.close_connection = True  # the body was not read: the stream can no longer be framed
        self.dispatch()

    def refuse_head(self, error: KatarError) -> None:
        """Answer a head that broke a rule or a limit; the connection closes after it."""
        self.command, self.path, self.request_version, self.headers = "", "", "HTTP/1.1", {}
        self.close_connection = True
        self.respond(*error_reply(error))

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write("%s - %s\n" % (self.address_string(), format % args))

    # -- dispatch ----------------------------------------------------------------------------------------------------

    def dispatch(self) -> None:
        self.started = time.monotonic()
        self.extra_headers: List[Tuple[str, str]] = []
        access = self.server.access
        route = self.route_name = "unknown"
        try:
            path = _split_target(self.path)[0]
            if access.open:
                self.check_host()
            if path not in OPEN_PATHS:
                self.extra_headers += self.check_origin()
            if self.command == "OPTIONS" and self.extra_headers and "access-control-request-method" in self.headers:
                route, status, payload = "preflight", HTTPStatus.NO_CONTENT, None  # an allowed page's preflight
                self.extra_headers += [("Access-Control-Allow-Methods", CORS_METHODS),
                                       ("Access-Control-Allow-Headers", CORS_HEADERS),
                                       ("Access-Control-Max-Age", "600")]
            else:
                route, status, payload = self.route_request(access, path)
                if isinstance(payload, Parked):
                    self.channel.park(payload)
                    return
        except Exception as exc:
            status, payload = self.failure(exc)
        self.answer(route, status, payload)

    def resume(self, parked: Parked) -> None:
        """A parked route's wait has ended: finish it and answer."""
        try:
            status, payload = parked.finish()
        except Exception as exc:
            status, payload = self.failure(exc)
        self.answer(self.route_name, status, payload)

    def lost_answer(self, close: bool) -> bytes:
        """What an answer becomes when the disk lost the records it acknowledged: a 503, nothing changed."""
        status, payload, headers = error_reply(Unavailable(
            f"the journal could not be written ({self.server.broker.lost_because()}); nothing was acknowledged: "
            f"retry later"))
        return self.answer_bytes(status, payload, headers, close)

    def handed_back_answer(self, close: bool) -> bytes:
        """What a poll's answer becomes when its worker hung up before it could be written: no tasks (they went
        back)."""
        return self.answer_bytes(HTTPStatus.NO_CONTENT, None, [], close)

    def answer_bytes(self, status: int, payload: Any, headers: List[Tuple[str, str]], close: bool) -> bytes:
        """An answer put in place of one already made (its request's Connection choice kept)."""
        head, body = http_response(status, payload, headers + ([("Connection", "close")] if close else []),
                                   self.server_version)
        return head + body

    def failure(self, exc: Exception) -> Reply:
        """An error as an answer; one that is not a KatarError is a bug: counted, logged, answered JSON."""
        if not isinstance(exc, (KatarError, MemoryError)):
            self.server.internal_errors += 1
            self.log_error("internal error on %s %s", self.command, _split_target(self.path)[0])
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        status, payload, extra = error_reply(exc)
        self.extra_headers += extra
        return status, payload

    def answer(self, route: str, status: int, payload: Any) -> None:
        self.server.count(self.route_name if route == "unknown" else route, status)
        size = self.respond(status, payload, self.extra_headers)
        if not self.server.quiet:  # never the query, the headers (tokens) or the body (task data)
            sys.stderr.write('%s "%s %s" %d %d %.1fms\n' % (
                self.address_string(), self.command, _split_target(self.path)[0], status, size,
                (time.monotonic() - self.started) * 1000))

    def route_request(self, access: Access, path: str) -> Tuple[str, int, Any]:
        """Authenticate, route and run the request: (route, status, payload)."""
        if self.server.standby and path != "/healthz":
            raise Unavailable("this server is a standby: it serves once the active server's journal is free; "
                              "send requests to the active server")
        if path != "/healthz" and self.server.broker.lost_journal():  # (reads too: what it holds may be stale)
            raise Unavailable("this server lost its journal's lock to another server, which may serve the queues "
                              "now: send requests to the active server, and restart this one with --standby")
        scope = access.ADMIN
        if not access.open and path not in OPEN_PATHS:
            scope = access.scope(self.headers.get("authorization"))  # before routing: 401 reveals no routes
        self.authorised = self.authorised or access.open or path not in OPEN_PATHS
        route, params, self.query = self.match()
        self.route_name = route  # counted under its route even when it fails
        access.check(scope, route, params[0] if params else None)
        self.scope = scope
        try:
            status, payload = getattr(self, route)(*params)
        except NotFound as exc:
            if "queues" in exc.fields:  # a worker token learns only of its own queues
                exc.fields["queues"] = access.visible(scope, exc.fields["queues"], self.server.broker.__contains__)
            raise
        return route, status, payload

    def check_host(self) -> None:
        """Without a token, answer only requests addressed to this machine by an IP address, localhost, or a
        name of --allow-host: a web page whose own name is made to point here (DNS rebinding) sends its own."""
        host = _host_of(_authority(self.path, self.headers.get("host", "")))
        if not host or host == "localhost" or host in self.server.allowed_hosts or _is_address(host):
            return
        raise MisdirectedRequest(f"this server answers requests for an IP address or localhost; to use the name "
                                 f"{host[:100]!r}, start it with --allow-host {host[:100]}")

    def check_origin(self) -> List[Tuple[str, str]]:
        """Keep browsers out of the data: a request sent by a page of another site (its Origin is not this
        server's, or Sec-Fetch-Site says cross-site) is Forbidden, unless --allow-origin names that page's origin;
        then returns the CORS headers that let it read the answer. curl and workers send neither header."""
        origin = self.headers.get("origin")
        if origin is not None:
            origin = origin.strip().lower()
            if origin in self.server.allowed_origins:
                return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
            # This server's own page: the origin's host and port are the Host (its scheme may be a TLS proxy's).
            if origin.partition("://")[2] != _authority(self.path, self.headers.get("host", "")):
                raise Forbidden(f"requests from the web page of {origin[:100]} are refused: a page may use this "
                                f"server only if it is started with --allow-origin {origin[:100]}")
        fetch_site = self.headers.get("sec-fetch-site")
        if fetch_site and {site.strip().lower() for site in fetch_site.split(",")} & {"cross-site", "same-site"}:
            raise Forbidden("requests from the web pages of other sites are refused (Sec-Fetch-Site); allow a "
                            "page's origin with --allow-origin")
        return []

    def match(self) -> Tuple[str, List[str], Dict[str, List[str]]]:
        if self.command not in METHODS:
            raise NotSupported(f"{self.command[:20]} is not a method this server implements: it has "
                               f"{', '.join(METHODS)}")
        path, query = _split_target(self.path)
        if not path.startswith("/"):
            raise BadRequest(f"the request target must be a path, got {self.path[:200]!r}")
        methods, params = _route(path)
        command = "GET" if self.command == "HEAD" else self.command  # HEAD: the GET, without its body
        if command not in methods:
            raise MethodNotAllowed(f"{self.command} is not allowed on {path}",
                                   list(methods) + (["HEAD"] if "GET" in methods else []))
        return methods[command], list(params), parse_qs(query, keep_blank_values=True) if query else {}

    def respond(self, status: int, payload: Any, headers: Iterable[Tuple[str, str]] = ()) -> int:
        """Hand the connection the whole answer, status line, headers and body, as one piece of bytes; returns
        the body's size. A payload is JSON, or a Text (the metrics, the page)."""
        headers = list(headers)
        if self.close_connection:
            headers.append(("Connection", "close"))
        elif self.request_version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))  # RFC 9112 9.3: an HTTP/1.0 client keeps it only if told
        head, body = http_response(status, payload, headers, self.server_version)
        self.channel.deliver(head if self.command == "HEAD" else head + body, self.close_connection, self.undo)
        self.undo = None
        return len(body)

    # -- request parts -------------------------------------------------------------------------------------------

    def _declared_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0") not in ("", "0")

    def read_object(self) -> Dict[str, Any]:
        """The request body as a JSON object; an empty body is {} (as a bare POST from the original's workers)."""
        limits = self.server.limits
        coding = self.headers.get("transfer-encoding")
        if coding is not None:
            if "content-length" in self.headers:  # RFC 9112 6.3: how requests get smuggled
                raise BadRequest("a request has a Content-Length or a Transfer-Encoding, not both")
            if coding.lower() != "chunked" or self.request_version != "HTTP/1.1":  # (spaces and tabs are off)
                raise NotSupported(f"the transfer coding {coding[:40]!r} is not supported: send the body chunked "
                                   f"(HTTP/1.1) or with a Content-Length")
        else:
            length_text = self.headers.get("content-length", "0") or "0"
            if not length_text.isdigit() or not length_text.isascii() or len(length_text) > 18:
                raise BadRequest(f"Content-Length must be a number of bytes, got {length_text[:20]!r}")
            if int(length_text) > limits.max_body:
                raise PayloadTooLarge(f"the body is {length_text} bytes; this server accepts at most {limits.max_body}")
        media = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in JSON_MEDIA + LENIENT_MEDIA and not media.endswith("+json"):
            raise UnsupportedMediaType(f"the body must be JSON (application/json), not {media[:100]}")
        raw = self.body
        if raw is None:  # (the connection framed every body that the checks above let through)
            raise BadRequest("the body could not be read")
        self.body_read, self.body_size = True, len(raw)
        if not raw.strip():
            if media in LENIENT_MEDIA:
                raise BadRequest("the body must be JSON; an empty form is not")
            return {}
        try:
            body = _decode(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
        return body

    @staticmethod
    def check_fields(what: str, body: Dict[str, Any], known: Tuple[str, ...],
                     nullable: Tuple[str, ...] = ()) -> None:
        """Refuse a field the body may not hold (a misspelled one would otherwise be ignored, silently), and null
        where a value is expected (leave a field out for its default)."""
        for name, value in body.items():
            if name not in known:
                raise BadRequest(f"unknown field {name[:100]!r} in {what}; its fields are {', '.join(known)}",
                                 field=name[:100])
            if value is None and name not in nullable:
                raise BadRequest(f"{name} is null; leave it out for its default, or send a value", field=name)

    def check_count(self, field: str, items: Any) -> None:
        if isinstance(items, list) and len(items) > self.server.limits.max_tasks:
            raise BadRequest(f"{field} holds {len(items)} items; this server takes at most "
                             f"{self.server.limits.max_tasks} per request")

    def check_values(self, field: str, items: Any, key: str, single: bool = False) -> None:
        """Each item's `key` (data, result, configuration: any JSON the server keeps) must nest no deeper than
        max_depth and stay under max_data bytes of JSON. Other fields are dropped unread, and a body smaller than
        max_data cannot hold a larger value, so the usual request costs next to nothing here."""
        if not isinstance(items, list):
            return
        limits = self.server.limits
        for index, item in enumerate(items):
            where = f"{field}.{key}" if single else f"{field}[{index}].{key}"
            value = item.get(key) if isinstance(item, dict) else None
            if isinstance(value, (dict, list)) and _too_deep(value, limits.max_depth):
                raise BadRequest(f"{where} nests arrays and objects deeper than {limits.max_depth}")
            if self.body_size > limits.max_data:
                try:
                    size = len(_encode(value))
                except (ValueError, TypeError) as exc:  # 1e999 parses as a float JSON cannot write back
                    raise BadRequest(f"{where} must be JSON: {exc}") from None
                if size > limits.max_data:
                    raise PayloadTooLarge(f"{where} is larger than {limits.max_data} bytes of JSON")

    def check_errors(self, reports: Any) -> None:
        """A report's error may have as many characters as the server's max_data bytes (up to MAX_TEXT): what
        a task keeps of its failures is bounded by the same flag as its data."""
        limit = min(MAX_TEXT, self.server.limits.max_data)
        for index, report in enumerate(reports if isinstance(reports, list) else ()):
            error = report.get("error") if isinstance(report, dict) else None
            if isinstance(error, str) and len(error) > limit:
                raise BadRequest(f"tasks[{index}].error is longer than {limit} characters (--max-data)")

    def query_value(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.query.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise BadRequest(f"query parameter {name} is given {len(values)} times")
        return values[0]

    def query_number(self, name: str, default: int) -> float:
        text = self.query_value(name)
        if text is None:
            return default
        if _DECIMAL.fullmatch(text):  # ASCII only: int() would also take "1_0", " 2" and other scripts' digits
            return int(text)
        if _NUMBER.fullmatch(text):
            value = float(text)  # 2.5, 1e3
            if value not in (float("inf"), float("-inf")):
                return value
        raise BadRequest(f"{name} must be a number, got {text[:40]!r}")

    def capped_wait(self, wait: Any) -> float:
        """`wait` beyond the server's limit is cut to it (not refused), as a proxy cuts a long poll."""
        return min(_check_number("wait", wait, 0, MAX_WAIT_MS), self.server.limits.max_wait)

    # -- routes: each returns (status, payload) ------------------------------------------------------------------

    def route_metrics(self) -> Reply:
        return HTTPStatus.OK, Text(metrics_text(self.server.broker, self.server.request_counts()),
                                   "text/plain; version=0.0.4; charset=utf-8")

    def route_openapi(self) -> Reply:
        return HTTPStatus.OK, openapi_document(self.server.limits, not self.server.access.open)

    def route_page(self) -> Reply:
        return HTTPStatus.OK, Text(PAGE, "text/html; charset=utf-8")

    def route_health(self) -> Reply:
        if self.server.standby:  # a balancer in front sends the traffic to the active server
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "standby", "version": __version__}
        trouble = self.server.broker.health()
        if trouble is not None:  # a balancer in front may send the traffic elsewhere
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded", "reason": trouble, "version": __version__}
        return HTTPStatus.OK, {"status": "ok", "version": __version__}

    def route_queues(self) -> Reply:
        return HTTPStatus.OK, {"queues": [queue.stats() for queue in self.server.broker.queues()],
                               "server": self.server.identity}

    def route_workers(self) -> Reply:
        return HTTPStatus.OK, {"workers": self.server.broker.workers(self.query_value("queue"))}

    def route_configuration(self, name: str) -> Reply:
        return HTTPStatus.OK, {"configuration": self.server.broker.get(name).configuration}

    def route_poll(self, name: str) -> Reply:
        queue = self.server.broker.get(name)
        body = self.read_object()
        self.check_fields("a poll", body, POLL_FIELDS)
        reports, max_tasks, wait, worker = self.poll_fields(body)
        outcome = queue.begin_poll(reports, max=max_tasks, wait=wait, worker=worker, lease=body.get("lease"),
                                   throttle=body.get("throttle", 0), wake=self.channel.wake)
        return self.polled(outcome, reports, worker, queue.end_wait, queue.heard_from,
                           functools.partial(self.hand_back, queue))

    def route_multi_poll(self) -> Reply:
        broker = self.server.broker
        body = self.read_object()
        self.check_fields("a poll of several queues", body, MULTI_POLL_FIELDS)
        queues = body.get("queues")
        if not isinstance(queues, (list, dict)) or not all(isinstance(name, str) for name in queues):
            raise BadRequest('queues must name the queues to poll, in order (["critical", "default"]) or with '
                             'weights ({"critical": 3, "default": 1})', field="queues")
        for name in queues:  # a worker token polls its own queues only
            self.server.access.check(self.scope, "route_poll", name)
        reports, max_tasks, wait, worker = self.poll_fields(body)
        outcome = broker.begin_poll(queues, reports, max=max_tasks, wait=wait, worker=worker, lease=body.get("lease"),
                                    wake=self.channel.wake)
        return self.polled(outcome, reports, worker, broker.end_wait,
                           functools.partial(broker.heard_from, list(queues)), self.hand_back_over)

    def poll_fields(self, body: Dict[str, Any]) -> Tuple[Any, Optional[int], float, Any]:
        """A poll body's reports (their values bounded), `max` (bounded by --max-tasks), `wait` (cut to --max-wait)
        and `worker`; the core checks the rest."""
        reports = body.get("tasks", [])
        self.check_count("tasks", reports)
        self.check_values("tasks", reports, "result")
        self.check_values("tasks", reports, "progress")
        self.check_errors(reports)
        max_tasks = body.get("max")
        if max_tasks is not None:
            max_tasks = _check_int("max", max_tasks, 0, self.server.limits.max_tasks)
        return reports, max_tasks, self.capped_wait(body.get("wait", 0)), body.get("worker")

    def polled(self, outcome: Union[List[Dict[str, Any]], Waiter], reports: List[Any], worker: Optional[str],
               end_wait: Callable[[Waiter], List[Dict[str, Any]]], heard_from: Callable[..., List[str]],
               hand_back: Callable[[List[Dict[str, Any]]], None]) -> Reply:
        """A poll's answer (of one queue, or of several: the core's `end_wait` and `heard_from`, and how to
        `hand_back` tasks): the tasks leased now, or the parked wait for them."""
        address = self.client_address[0]
        if not isinstance(outcome, Waiter):
            heartbeat = any(report.get("status") == IN_PROGRESS for report in reports)  # (checked by the core)
            return self.leased(outcome, heard_from(worker, address, outcome, heartbeat), hand_back)
        heard_from(worker, address, heartbeat=any(report.get("status") == IN_PROGRESS for report in reports),
                   waiting=1)

        def finish() -> Reply:
            leased = end_wait(outcome)
            if leased and self.channel.gone:
                hand_back(leased)  # the worker hung up while it waited
                heard_from(outcome.worker, address, waiting=-1)
                return HTTPStatus.NO_CONTENT, None
            return self.leased(leased, heard_from(outcome.worker, address, leased, waiting=-1), hand_back)
        return HTTPStatus.OK, Parked(outcome, finish)

    def leased(self, tasks: List[Dict[str, Any]], cancel: List[str],
               hand_back: Callable[[List[Dict[str, Any]]], None]) -> Reply:
        """A poll's answer: the tasks leased, and `cancel` (only when there is any, so that the original's
        answer keeps its shape), the deliveries the worker should stop (see Queue.heard_from); 204 when there is
        neither."""
        if not tasks and not cancel:
            return HTTPStatus.NO_CONTENT, None
        if tasks:
            self.undo = functools.partial(hand_back, tasks)  # if the answer never reaches the worker
        return HTTPStatus.OK, dict(tasks=tasks, **({"cancel": cancel} if cancel else {}))

    @staticmethod
    def hand_back(queue: Queue, tasks: List[Dict[str, Any]]) -> None:
        """Give back leased tasks whose worker hung up before their answer could reach it: now, unspent, rather
        than when their lease runs out (that would count as a failed attempt and hold them from live workers)."""
        with contextlib.suppress(KatarError):
            queue.report([{"_id": task["_id"], "attempt": task["attempt"], "status": QUEUED} for task in tasks])

    def hand_back_over(self, tasks: List[Dict[str, Any]]) -> None:
        """hand_back() for tasks of several queues (each names its own)."""
        by_queue: Dict[str, List[Dict[str, Any]]] = {}
        for task in tasks:
            by_queue.setdefault(task["queue"], []).append(task)
        for name, its_tasks in by_queue.items():
            with contextlib.suppress(KatarError):
                self.hand_back(self.server.broker.get(name), its_tasks)

    def route_put_queue(self, name: str) -> Reply:
        body = self.read_object()
        self.check_fields("a queue's options", body, QUEUE_FIELDS)
        self.check_values("queue", [body], "configuration", single=True)
        self.check_values("schedules", body.get("schedules"), "data")  # (their data, as a task's: bounded)
        existed = name in self.server.broker
        queue = self.server.broker.queue(name, **body)
        if "schedules" in body:
            self.server.arm_schedules()  # the first slot of a new schedule may come before the timer rings
        return (HTTPStatus.OK if existed else HTTPStatus.CREATED), queue.describe()

    def route_stats(self, name: str) -> Reply:
        return HTTPStatus.OK, self.server.broker.get(name).stats()

    def route_insert(self, name: str) -> Reply:
        queue = self.server.broker.get(name)
        body = self.read_object()
        if not body:
            raise BadRequest('an insert needs a body: one task {"data": ...} or a list {"tasks": [{"data": ...}]}')
        if "batch" in body and body["batch"] is None:
            raise BadRequest("batch is null; leave it out for no batch", field="batch")
        batch = body.pop("batch", None)
        if batch is not None:
            self.check_values("batch", [batch.get("callback") if isinstance(batch, dict) else None], "data",
                              single=True)
        if "tasks" in body:
            self.check_fields("an insert of a list", body, ("tasks", "batch"))
            if not isinstance(body["tasks"], list):
                raise BadRequest("tasks must be a list of task objects")
            self.check_count("tasks", body["tasks"])
            self.check_values("tasks", body["tasks"], "data")
            results = queue.insert(body["tasks"], batch=batch)
        else:
            self.check_values("task", [body], "data", single=True)  # its fields: checked by the core
            results = [queue.insert(body, batch=batch)]
        created = any(result["created"] for result in results)
        return (HTTPStatus.CREATED if created else HTTPStatus.OK), {"tasks": results}

    def route_batches(self) -> Reply:
        return HTTPStatus.OK, self.server.broker.batches(int(self.query_number("limit", 100)))

    def route_batch(self, batch_id: str) -> Reply:
        broker = self.server.broker
        outcome = broker.begin_batch(batch_id, wait=self.capped_wait(self.query_number("wait", 0)),
                                     wake=self.channel.wake)
        if isinstance(outcome, Waiter):
            return HTTPStatus.OK, Parked(outcome, lambda: (HTTPStatus.OK, broker.end_batch_wait(outcome)))
        return HTTPStatus.OK, outcome

    def route_put_batch(self, batch_id: str) -> Reply:
        body = self.read_object()
        self.check_fields("a batch", body, ("callback", "open"))
        self.check_values("callback", [body.get("callback")], "data", single=True)
        made, view = self.server.broker.put_batch(batch_id, body.get("callback"), body.get("open"))
        return (HTTPStatus.CREATED if made else HTTPStatus.OK), view

    def route_list(self, name: str) -> Reply:
        queue = self.server.broker.get(name)
        return HTTPStatus.OK, queue.tasks(status=self.query_value("status"), limit=self.query_number("limit", 100),
                                          after=self.query_value("after"), order=self.query_value("order", "oldest"))

    def route_purge(self, name: str) -> Reply:
        queue = self.server.broker.get(name)
        status = self.query_value("status")
        if status is None:
            raise BadRequest("purge needs ?status= (done, failed, cancelled, queued or paused)")
        return HTTPStatus.OK, {"purged": queue.purge(status)}

    def route_task(self, name: str, task_id: str) -> Reply:
        queue = self.server.broker.get(name)
        outcome = queue.begin_task(task_id, wait=self.capped_wait(self.query_number("wait", 0)), wake=self.channel.wake)
        if isinstance(outcome, Waiter):
            return HTTPStatus.OK, Parked(outcome, lambda: (HTTPStatus.OK, queue.end_wait(outcome)))
        return HTTPStatus.OK, outcome

    def route_patch_task(self, name: str, task_id: str) -> Reply:
        queue = self.server.broker.get(name)
        body = self.read_object()
        self.check_fields("a change of status", body, ("status",))
        return HTTPStatus.OK, queue.set_status(task_id, body.get("status"))

    def route_cancel_task(self, name: str, task_id: str) -> Reply:
        return HTTPStatus.OK, self.server.broker.get(name).cancel(task_id)


# ---------------------------------------------------------------------------------------------------------------
# 5. Large data: the API's description (OpenAPI 3.1) and the operator's page. Both are served as they are; the
#    description is built from the same bounds the core and the handler enforce, for the server's own Limits.
# ---------------------------------------------------------------------------------------------------------------

def _schema(kind: Any, **more: Any) -> Dict[str, Any]:
    return dict({"type": kind}, **more)


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": "#/components/schemas/" + name}


def _integer(low: int, high: int, **more: Any) -> Dict[str, Any]:
    return _schema("integer", minimum=low, maximum=high, **more)


def _object(properties: Dict[str, Any], required: Iterable[str] = (), closed: bool = True,
            **more: Any) -> Dict[str, Any]:
    """An object schema; `closed` (no other properties) where the server refuses unknown fields."""
    schema = _schema("object", properties=properties, **more)
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _json(description: str, schema: Dict[str, Any]) -> Dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, media: str) -> Dict[str, Any]:
    return {"description": description, "content": {media: {"schema": _schema("string")}}}


def _api_schemas(limits: "Limits") -> Dict[str, Any]:
    """The shared schemas, named as a generated client names its types."""
    any_json = {"description": "any JSON value"}
    nullable_int = _schema(["integer", "null"])
    nullable_text = _schema(["string", "null"])
    def option_schema(name: str, value: Any) -> Dict[str, Any]:
        if isinstance(value, bool):
            return _schema("boolean")
        if name in RATE_OPTIONS:
            return _schema("number", minimum=RATE_OPTIONS[name][0], maximum=RATE_OPTIONS[name][1])
        if name in CHOICE_OPTIONS:
            return _schema("string", enum=list(CHOICE_OPTIONS[name]))
        if name == "schedules":
            return _schema("array", maxItems=MAX_SCHEDULES, items=_ref("Schedule"))
        return _integer(*QUEUE_BOUNDS[name])
    queue_options = {name: option_schema(name, value) for name, value in QUEUE_DEFAULTS.items()}
    return {
        "TaskId": _schema("string", minLength=1, maxLength=MAX_TASK_ID, example="5f0c2a9e-000000000042",
                          description="a task id: the server's random prefix, then a sequence number"),
        "Configuration": _object(
            {"interval": _integer(0, MAX_INTERVAL_MS, description="ms between polls, for a worker that does not "
                                                                  "long-poll")},
            required=["interval"], closed=False,
            description="what workers receive: `interval`, and any other keys the operator set"),
        "ConfigurationReply": _object({"configuration": _ref("Configuration")}, required=["configuration"]),
        "Report": _object({
            "_id": _ref("TaskId"),
            "status": _schema("string", enum=[DONE, FAILED, IN_PROGRESS, QUEUED],
                              description="done; failed (needs `error`); in progress: a heartbeat that extends "
                                          "the lease; queued: hand the task back unworked (with retry_after: "
                                          "snooze it, no attempt spent)"),
            "attempt": _schema(["integer", "null"], minimum=1, maximum=MAX_ATTEMPT,
                               description="the delivery this report answers (fencing); null or absent: the latest"),
            "error": _schema(["string", "null"], maxLength=min(MAX_TEXT, limits.max_data),
                             description="why it failed (with status failed); null: none"),
            "result": dict(any_json, description=f"what it produced (with status done): at most {limits.max_data} "
                                                 f"bytes of JSON (413), nested at most {limits.max_depth} deep"),
            "retry": _schema(["boolean", "null"], description="false: a dead letter at once (with status failed)"),
            "retry_after": _schema(["integer", "null"], minimum=0, maximum=MAX_DELAY_MS,
                                   description="ms before the retry (with status failed), or before the task is "
                                               "due again (with status queued: a snooze, no attempt spent)"),
            "lease": _schema(["integer", "null"], minimum=1, maximum=MAX_DELAY_MS,
                             description="with status in progress: the new lease, ms from now (at most the "
                                         "queue's max_lease; never past its max_run)"),
            "progress": dict(any_json, description=f"with status in progress: how far it has come, kept on the "
                                                   f"task (at most {limits.max_data} bytes of JSON)")},
            required=["_id", "status"], closed=False,
            **{"if": {"properties": {"status": {"const": FAILED}}, "required": ["status"]},
               "then": {"required": ["error"], "properties": {"error": _schema("string")}}}),
        "PollRequest": _object({
            "tasks": _schema("array", items=_ref("Report"), maxItems=limits.max_tasks,
                             description="reports to apply first: all of them, or none; each task once"),
            "max": _integer(0, limits.max_tasks, description="lease up to this many tasks (default 1, but 0 "
                                                             "when every report is a heartbeat)"),
            "wait": _schema("number", minimum=0, maximum=MAX_WAIT_MS,
                            description=f"ms to wait for a task when none is ready (long poll; the server cuts it "
                                        f"to {limits.max_wait} ms)"),
            "worker": _schema("string", maxLength=MAX_WORKER, description="a name for the worker, kept in history; "
                                                                           "a named worker is told `cancel`"),
            "lease": _integer(1, MAX_DELAY_MS, description="ms of lease for the tasks leased, and for the heartbeats "
                                                           "without their own (at most the queue's max_lease)"),
            "throttle": _integer(0, MAX_DELAY_MS, description="ms the queue hands out nothing, to anyone (the worker "
                                                              "was told to slow down: a 429 downstream)")}),
        "LeasedTask": _object({"_id": _ref("TaskId"), "data": any_json, "attempt": _integer(1, MAX_ATTEMPT),
                               "queue": _schema("string", description="its queue (a poll of several queues)")},
                              required=["_id", "data", "attempt"], closed=False),
        "MultiPollRequest": _object({
            "queues": {"oneOf": [
                _schema("array", items=_schema("string", pattern=QUEUE_NAME_PATTERN), minItems=1,
                        maxItems=MAX_POLL_QUEUES, uniqueItems=True,
                        description="in priority order: a lease takes from the first with a task ready, then the "
                                    "next, up to max"),
                _schema("object", minProperties=1, maxProperties=MAX_POLL_QUEUES,
                        additionalProperties=_schema("number", exclusiveMinimum=0, maximum=MAX_WEIGHT),
                        description="weights: each poll draws its order at random in proportion to them")]},
            "tasks": _schema("array", items=_ref("Report"), maxItems=limits.max_tasks,
                             description="reports on tasks of any of the queues, applied first: all, or none"),
            "max": _integer(0, limits.max_tasks, description="lease up to this many tasks, from all the queues"),
            "wait": _schema("number", minimum=0, maximum=MAX_WAIT_MS,
                            description=f"ms to wait for a task of any of the queues (the server cuts it to "
                                        f"{limits.max_wait} ms)"),
            "worker": _schema("string", maxLength=MAX_WORKER, description="a name for the worker"),
            "lease": _integer(1, MAX_DELAY_MS, description="ms of lease (at most each queue's max_lease)")},
            required=["queues"]),
        "Leased": _object({
            "tasks": _schema("array", items=_ref("LeasedTask")),
            "cancel": _schema("array", items=_ref("TaskId"), description="tasks this (named) worker was handed that "
                              "were taken from it since (cancelled, run past max_run, leased again after its lease "
                              "ran out): stop working on them, report nothing. Absent when there is none")},
            required=["tasks"]),
        "WorkerTask": _object({"_id": _ref("TaskId"), "queue": _schema("string"), "attempt": _schema("integer"),
                               "lease_expires_at": nullable_int}, required=["_id", "queue", "attempt"]),
        "Worker": _object({
            "worker": _schema(["string", "null"], description="its id; null: an anonymous poller, known by address"),
            "address": nullable_text, "queues": _schema("array", items=_schema("string")),
            "waiting": _schema("boolean", description="a long poll of its waits now"),
            "tasks": _schema("array", items=_ref("WorkerTask"), maxItems=WORKER_TASKS_SHOWN,
                             description=f"the deliveries it holds (the first {WORKER_TASKS_SHOWN})"),
            "tasks_held": _schema("integer", description="how many deliveries it holds"),
            "last_contact": _schema("integer"), "last_heartbeat": nullable_int},
            required=["worker", "address", "queues", "waiting", "tasks", "tasks_held", "last_contact",
                      "last_heartbeat"]),
        "WorkerList": _object({"workers": _schema("array", items=_ref("Worker"))}, required=["workers"]),
        "TaskInput": _object({
            "data": dict(any_json, description=f"the task's data, handed to the worker as it is (null for none): at "
                                               f"most {limits.max_data} bytes of JSON (413), nested at most "
                                               f"{limits.max_depth} deep"),
            "priority": {"oneOf": [_integer(-MAX_PRIORITY, MAX_PRIORITY),
                                   _schema("string", enum=list(PRIORITIES))],
                         "description": "higher first; high is 10, normal 0, low -10"},
            "delay": _integer(0, MAX_DELAY_MS, description="ms before it may be leased"),
            "key": _schema("string", maxLength=MAX_KEY, description="an insert with a key the queue holds or "
                                                                    "remembers creates nothing"),
            "group": _schema("string", minLength=1, maxLength=MAX_GROUP,
                             description="its group: at most group_limit of a group in progress at once, groups take "
                                         "turns"),
            "status": _schema("string", enum=[QUEUED, PAUSED]),
            "batch": _ref("BatchJoin")}, required=["data"]),
        "Insert": {"oneOf": [_ref("TaskInput"), _ref("TaskList")]},
        "TaskList": _object({"tasks": _schema("array", items=_ref("TaskInput"), minItems=1,
                                              maxItems=min(limits.max_tasks, MAX_INSERT_BATCH)),
                             "batch": _ref("BatchJoin")},
                            required=["tasks"]),
        "Callback": _object({"queue": _schema("string", pattern=QUEUE_NAME_PATTERN,
                                              description="the queue the callback task goes to (it must exist)"),
                             "data": dict(any_json, description="carried in the callback task's data, as `data`"),
                             "priority": {"oneOf": [_integer(-MAX_PRIORITY, MAX_PRIORITY),
                                                    _schema("string", enum=list(PRIORITIES))]}},
                            required=["queue"]),
        "BatchJoin": _object({
            "id": _schema("string", pattern=QUEUE_NAME_PATTERN, description="the batch the tasks made join"),
            "callback": _ref("Callback"),
            "open": _schema("boolean", description="false closes the batch after this insert; true keeps it open. "
                                                   "Left out: the insert that makes a batch closes it, later ones "
                                                   "leave it as it is")},
            required=["id"], description="needs callback when the batch is new"),
        "BatchInput": _object({"callback": _ref("Callback"),
                               "open": _schema("boolean", description="false: closed (no task joins it any more)")}),
        "Batch": _object({
            "id": _schema("string"), "open": _schema("boolean"),
            "ended": _schema("boolean", description="closed, and every task of it ended"),
            "total": _schema("integer"),
            "counts": _object({name: _schema("integer") for name in (DONE, FAILED, CANCELLED, "pending")},
                              required=[DONE, FAILED, CANCELLED, "pending"]),
            "failed": _schema("array", items=_ref("TaskId"), maxItems=BATCH_FAILED_SHOWN,
                              description="the dead letters among its tasks (the first ones)"),
            "callback": _object({"queue": _schema("string"), "data": any_json, "priority": _schema("integer"),
                                 "task": _schema(["string", "null"], description="the callback task, once inserted")},
                                required=["queue", "task"], closed=False),
            "created_at": _schema("integer"), "ended_at": nullable_int},
            required=["id", "open", "ended", "total", "counts", "failed", "callback"]),
        "Inserted": _object({"tasks": _schema("array", items=_object({
            "_id": _ref("TaskId"), "status": _schema("string", enum=list(STATUSES)),
            "created": _schema("boolean", description="false: a task with this key existed, and is the one named")},
            required=["_id", "status", "created"]))}, required=["tasks"]),
        "HistoryEntry": _object({
            "attempt": _schema("integer"), "worker": nullable_text, "leased_at": _schema("integer"),
            "ended_at": nullable_int, "outcome": _schema(["string", "null"], enum=[
                "done", "failed", "expired", "queued", "released", "cancelled", "stopped", None]),
            "error": nullable_text, "duration_ms": nullable_int,
            "progress": dict(any_json, description="the latest delivery's last progress")}, closed=False),
        "Task": _object({
            "_id": _ref("TaskId"), "queue": _schema("string"), "status": _schema("string", enum=list(STATUSES)),
            "data": any_json, "priority": _schema("integer"), "key": nullable_text, "group": nullable_text,
            "attempt": _schema("integer"),
            "attempts_spent": _schema("integer"), "worker": nullable_text, "lease_expires_at": nullable_int,
            "run_at": _schema("integer"), "error": nullable_text, "result": any_json,
            "progress": dict(any_json, description="the last progress its latest delivery reported (null: none)"),
            "history": _schema("array", items=_ref("HistoryEntry")), "created_at": _schema("integer"),
            "updated_at": _schema("integer"),
            "discarded": _schema("boolean", description="true: the queue is not persistent, and dropped the task "
                                                        "when it ended; only its status and attempt are left")},
            required=["_id", "queue", "status", "attempt"], closed=False,
            description="times are ms since the epoch"),
        "TaskPage": _object({"tasks": _schema("array", items=_ref("Task")), "next": nullable_text},
                            required=["tasks", "next"]),
        "Stats": _object({
            "queue": _schema("string"),
            "counts": _object({status: _schema("integer") for status in STATUSES}, required=STATUSES),
            "total": _schema("integer"), "oldest_queued": nullable_text, "oldest_queued_age_ms": nullable_int,
            "waiting_workers": _schema("integer"), "paused": _schema("boolean"),
            "throttled_for_ms": _schema("integer", description="how long the queue still hands out nothing (a "
                                                               "worker's throttle)"),
            "full": _schema("boolean", description="the queue holds its max_queued: inserts are refused"),
            "groups": _schema("integer", description="groups with tasks due or in progress"),
            "schedules": _schema("array", description="with schedules: each one's next slot", items=_object({
                "name": _schema("string"),
                "next_fire_ms": nullable_int,
                "next_fire": _schema(["string", "null"], description="UTC, ISO 8601; null: it never fires again"),
                "handled_through": _schema(["string", "null"], description="slots up to this time were run or "
                                                                           "passed over (missed: skip)")},
                required=["name", "next_fire_ms", "next_fire", "handled_through"])),
            "totals": _object({name: _schema("integer") for name in TOTALS}, required=TOTALS, closed=False)},
            required=["queue", "counts", "total", "oldest_queued", "oldest_queued_age_ms", "waiting_workers",
                      "paused", "totals"], closed=False),
        "QueueList": _object({"queues": _schema("array", items=_ref("Stats")), "server": _object({
            "host": _schema("string", description="the machine's name"),
            "address": _schema("string", description="the address and port it listens on"),
            "pid": _schema("integer")}, required=["host", "address", "pid"],
            description="which server answered (queues spread over several servers)")},
            required=["queues", "server"]),
        "ConfigurationInput": _object(
            {"interval": _integer(0, MAX_INTERVAL_MS, description=f"default {DEFAULT_INTERVAL_MS}")}, closed=False,
            description=f"what workers will receive: `interval`, and any other keys; at most {limits.max_data} "
                        f"bytes of JSON (413), nested at most {limits.max_depth} deep"),
        "Schedule": _object({
            "name": _schema("string", pattern=QUEUE_NAME_PATTERN, maxLength=100,
                            description="unique in its queue; each slot's task has the key schedule:<name>:<slot "
                                        "time, UTC ISO 8601 to the ms>"),
            "cron": _schema("string", example="*/5 * * * *", description="minute hour day-of-month month "
                                                                       "day-of-week: numbers, names, ranges, steps, "
                                                                       "lists; Sunday 0 or 7 (either cron or every)"),
            "every": _integer(MIN_EVERY_MS, MAX_DELAY_MS, description="ms: slots at the multiples of it since the "
                                                                      "epoch (either cron or every)"),
            "data": dict(any_json, description="each task's data"),
            "priority": _schema(["integer", "string"], description="each task's priority (or high, normal, low)"),
            "missed": _schema("string", enum=list(MISSED_CHOICES),
                              description=f"slots more than {SCHEDULE_GRACE_MS // 1000} s late (the server was down, "
                                          f"the queue full): skip them, run the latest once (default), or run them "
                                          f"all (the latest {MAX_MISSED_RUNS})"),
            "utc_offset": _integer(-1439, 1439, description="minutes ahead of UTC the cron fields are read in "
                                                            "(a fixed offset; default 0)")},
            required=["name"], description="a periodic task: cron or every"),
        "QueueOptions": _object(dict(queue_options, configuration=_ref("ConfigurationInput"))),
        "Queue": _object(dict(queue_options, name=_schema("string"), configuration=_ref("Configuration")),
                         required=["name", "configuration"] + list(QUEUE_DEFAULTS), closed=False),
        "StatusChange": _object({"status": _schema("string", enum=[PAUSED, QUEUED, CANCELLED])}, required=["status"]),
        "Purged": _object({"purged": _schema("integer")}, required=["purged"]),
        "Health": _object({"status": _schema("string", enum=["ok", "degraded"]), "version": _schema("string"),
                           "reason": _schema("string", description="with degraded: what fails")},
                          required=["status", "version"]),
        "Error": _object({
            "error": _schema("string"), "ids": _schema("array", items=_ref("TaskId"), description="the tasks "
                                                                                                 "to blame"),
            "queue": _schema("string", description="with Queue not found: the queue asked for"),
            "queues": _schema("array", items=_schema("string"), description="with Queue not found: those there are"),
            "field": _schema("string", description="the field to blame"),
            "closest": _schema("string", description="with a path no route has: the route most like it"),
            "max_queued": _schema("integer", description="with a full queue (503): its max_queued"),
            "cancel": _schema("array", items=_ref("TaskId"), description="with a refused poll (409): the reported "
                              "tasks taken from the worker (cancelled, run past max_run, leased again): stop them")},
            required=["error"], closed=False),
    }


def _operation(operation_id: str, summary: str, responses: Dict[str, Any], body: Optional[str] = None,
               example: Any = None, query: Iterable[Dict[str, Any]] = (), path: Iterable[str] = (),
               open_route: bool = False, body_required: bool = True) -> Dict[str, Any]:
    operation: Dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "responses": dict(responses, default=_json("an error", _ref("Error")))}
    parameters = [dict(PATH_PARAMETERS[name], name=name, **{"in": "path"}, required=True) for name in path]
    parameters += [dict(parameter, **{"in": "query"}) for parameter in query]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": body_required, "content": {"application/json": {
            "schema": _ref(body), "example": example}}}
    if open_route:
        operation["security"] = []  # no token needed, even on a server that has tokens
    return operation


PATH_PARAMETERS = {
    "queue": {"schema": _schema("string", pattern=QUEUE_NAME_PATTERN), "description": "the queue's name"},
    "id": {"schema": _schema("string", minLength=1), "description": "the task's id"},
    "batch": {"schema": _schema("string", pattern=QUEUE_NAME_PATTERN), "description": "the batch's id"},
}


@functools.lru_cache(maxsize=8)
def openapi_document(limits: "Limits", tokens: bool = True) -> Dict[str, Any]:
    """The API as this server serves it: its Limits give the bounds of batches, and a server without tokens
    declares no security (every route is open there). A test checks that every route is here with its parameters,
    that every bound the server enforces is, and that examples and answers fit."""
    document = _openapi(limits)
    if not tokens:
        del document["security"], document["components"]["securitySchemes"]
        for item in document["paths"].values():
            for operation in item.values():
                operation.pop("security", None)
    return document


def _openapi(limits: "Limits") -> Dict[str, Any]:
    queue, task = ("queue",), ("queue", "id")
    page = _text("the operator's page", "text/html")
    return {
        "openapi": "3.1.0",
        "info": {"title": "katar_http", "version": __version__,
                 "description": "A task-queue server for polling workers. Send Authorization: Bearer <token> when "
                                "the server has tokens; a worker token may only read the configuration of, lease "
                                "from and report to its queues."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": _api_schemas(limits)},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": _operation("health", "Health: 503 while changes cannot be made durable", {
                "200": _json("ok", _ref("Health")),
                "503": _json("degraded: the journal fails, or a write or fsync has hung for over 5 s", _ref("Health"))},
                open_route=True)},
            "/metrics": {"get": _operation("metrics", "Prometheus metrics", {
                "200": _text("the Prometheus text exposition (version 0.0.4)", "text/plain")})},
            "/v1/openapi.json": {"get": _operation("openapi", "This document", {
                "200": _json("OpenAPI 3.1", _schema("object"))}, open_route=True)},
            "/": {"get": _operation("page", "The operator's page", {"200": page}, open_route=True)},
            "/ui": {"get": _operation("pageUi", "The operator's page", {"200": page}, open_route=True)},
            "/v1/queues": {"get": _operation("listQueues", "Every queue's stats", {
                "200": _json("stats", _ref("QueueList"))})},
            "/v1/workers": {"get": _operation("listWorkers", "The workers heard from in the last hour", {
                "200": _json("the workers, the most recently heard from first", _ref("WorkerList"))}, query=[
                    {"name": "queue", "schema": _schema("string"), "description": "only those that polled it"}])},
            "/v1/batches": {"get": _operation("listBatches", "The batches not ended yet, oldest first", {
                "200": _json("batches", _object({"batches": _schema("array", items=_ref("Batch")),
                                                 "not_ended": _schema("integer"), "ended": _schema("integer")},
                                                required=["batches", "not_ended", "ended"]))},
                query=[{"name": "limit", "schema": _integer(1, MAX_LIST_LIMIT, default=100)}])},
            "/v1/batches/{batch}": {
                "get": _operation("getBatch", "A batch's counts; with wait, wait for it to end", {
                    "200": _json("the batch", _ref("Batch"))}, path=["batch"], query=[
                        {"name": "wait", "schema": _schema("number", minimum=0, maximum=MAX_WAIT_MS),
                         "description": f"ms to wait for the batch to end (cut to {limits.max_wait})"}]),
                "put": _operation("putBatch", "Make a batch (empty, open for inserts), or close one", {
                    "200": _json("changed", _ref("Batch")), "201": _json("made", _ref("Batch"))},
                    body="BatchInput", path=["batch"], body_required=False,  # (an existing batch: no change)
                    example={"callback": {"queue": "reports", "data": {"kind": "nightly"}}})},
            "/v1/poll": {"post": _operation("pollQueues", "Report tasks, then lease from several queues at once", {
                "200": _json("leased tasks, each naming its queue, and those to stop", _ref("Leased")),
                "204": {"description": "no task in any of the queues, none to stop"}},
                body="MultiPollRequest",
                example={"queues": ["critical", "default"], "max": 1, "wait": 20000, "worker": "w1"})},
            "/v1/queue/{queue}": {
                "get": _operation("getConfiguration", "The queue's configuration, for its workers", {
                    "200": _json("configuration", _ref("ConfigurationReply"))}, path=queue),
                "post": _operation("poll", "Report tasks, then lease the next ones", {
                    "200": _json("leased tasks, and those to stop", _ref("Leased")),
                    "204": {"description": "no task to hand out and none to stop (the reports, if any, were "
                                           "applied)"}},
                    body="PollRequest", path=queue, body_required=False,  # the original's workers send none
                    example={"tasks": [{"_id": "5f0c2a9e-000000000001", "status": "done"}], "max": 1, "wait": 20000}),
                "put": _operation("putQueue", "Create or reconfigure the queue", {
                    "200": _json("changed", _ref("Queue")), "201": _json("created", _ref("Queue"))},
                    body="QueueOptions", path=queue, body_required=False,
                    example={"lease": 30000, "configuration": {"interval": 1000}})},
            "/v1/queue/{queue}/stats": {"get": _operation("queueStats", "The queue's figures", {
                "200": _json("stats", _ref("Stats"))}, path=queue)},
            "/v1/queue/{queue}/tasks": {
                "get": _operation("listTasks", "A page of tasks, oldest first", {
                    "200": _json("tasks and the cursor of the next page", _ref("TaskPage"))}, path=queue, query=[
                        {"name": "status", "schema": _schema("string", enum=list(STATUSES))},
                        {"name": "limit", "schema": _integer(1, MAX_LIST_LIMIT, default=100)},
                        {"name": "after", "schema": _schema("string", pattern=TASK_ID_PATTERN),
                         "description": "the `next` of the page before"},
                        {"name": "order", "schema": _schema("string", enum=list(LIST_ORDERS), default="oldest")}]),
                "post": _operation("insertTasks", "Insert one task, or a list", {
                    "201": _json("created", _ref("Inserted")),
                    "200": _json("nothing new: every key was known", _ref("Inserted"))},
                    body="Insert", path=queue, example={"tasks": [{"data": {"n": 1}, "priority": "high"}]}),
                "delete": _operation("purgeTasks", "Delete every task of one status", {
                    "200": _json("how many", _ref("Purged"))}, path=queue, query=[
                        {"name": "status", "required": True,
                         "schema": _schema("string", enum=[s for s in STATUSES if s != IN_PROGRESS])}])},
            "/v1/queue/{queue}/tasks/{id}": {
                "get": _operation("getTask", "One task; with wait, hold until it ends", {
                    "200": _json("the task", _ref("Task"))}, path=task, query=[
                        {"name": "wait", "schema": _schema("number", minimum=0, maximum=MAX_WAIT_MS),
                         "description": "ms to wait for the task to be done, failed or cancelled, or to report "
                                        "progress"}]),
                "patch": _operation("changeTaskStatus", "Pause, resume, retry or cancel", {
                    "200": _json("the task", _ref("Task"))}, body="StatusChange", path=task,
                    example={"status": "queued"}),
                "delete": _operation("cancelTask", "Cancel a task: queued, paused, running, or a dead letter", {
                    "200": _json("the task", _ref("Task"))}, path=task)},
        },
    }


# The operator's page: self-contained (no external assets), data only through the JSON routes, and built with
# textContent, never innerHTML: task errors are written by clients.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>katar_http</title><link rel="icon" href="data:,">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}h2{font-size:1.1em}form{margin:1em 0}
table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}#status{color:#666}button{margin-left:.3em}.scroll{overflow-x:auto}
.dead{margin:.5em 0 1.5em;font-size:13px;table-layout:fixed;width:100%;max-width:70em}.dead td{text-align:left}
.dead td.error{color:#a00;overflow-wrap:anywhere;white-space:pre-wrap}.dead td.actions{width:11em}
.dead td.id{width:14em;overflow-wrap:anywhere}.dead td.attempt{width:6em}.dead td.progress{overflow-wrap:anywhere}
@media (max-width:40em){.dead,.dead tr,.dead td,.dead td.id,.dead td.attempt,.dead td.actions{display:block;width:auto}
.dead tr{padding:.4em 0;border-bottom:1px solid #ddd}.dead td{border:0;padding:.1em 0}}
</style></head><body>
<h1>katar_http <span id="server"></span></h1>
<form id="auth"><label>Admin token <input id="token" type="password" size="30" autocomplete="off"></label>
<button>Use</button> <span id="status"></span></form>
<div class="scroll"><table id="queues"><thead><tr><th>queue</th><th>queued</th><th>in progress</th><th>paused</th><th>done</th>
<th>failed</th><th>cancelled</th><th>waiting workers</th><th>oldest queued task</th><th></th></tr></thead>
<tbody></tbody></table></div>
<h2>Workers heard from in the last hour</h2>
<div class="scroll"><table id="workers"><thead><tr><th>worker</th><th>queues</th><th>waiting</th><th>holds</th>
<th>last contact</th><th>last heartbeat</th></tr></thead><tbody></tbody></table></div>
<h2>Batches not ended yet</h2>
<div class="scroll"><table id="batches"><thead><tr><th>batch</th><th>open</th><th>done</th><th>failed</th>
<th>cancelled</th><th>pending</th><th>callback queue</th></tr></thead><tbody></tbody></table></div>
<div id="running"></div>
<div id="letters"></div>
<script>
"use strict";
// Rows are kept by key and updated in place: a refresh never replaces a button under the pointer.
const statuses = ["queued", "in progress", "paused", "done", "failed", "cancelled"];
const LETTERS = 20;  // dead letters shown per queue, the newest first
const RUNNING = 20;  // running tasks shown per queue, the oldest first
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("katar_token") || "";
document.getElementById("auth").onsubmit = event => {
  event.preventDefault(); sessionStorage.setItem("katar_token", tokenInput.value); refresh();
};
function call(method, path, body) {
  const headers = {"Content-Type": "application/json"};
  const token = sessionStorage.getItem("katar_token");
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)}).then(async r => {
    const payload = r.status === 204 ? null : await r.json();
    if (!r.ok) throw new Error(r.status + " " + (payload && payload.error));
    return payload;
  });
}
function show(text) { document.getElementById("status").textContent = text; }
function button(parent, label, action) {
  const b = document.createElement("button"); b.textContent = label;
  b.onclick = () => action().then(refresh, e => show(e.message)); parent.appendChild(b); return b;
}
// The row of `key` in `parent`, made by `make(row)` the first time, placed at `index`; its cells are row.cells.
function keep(parent, key, index, make) {
  let row = parent.rows ? Array.from(parent.rows).find(r => r.dataset.key === key) : null;
  if (!row) {
    row = document.createElement("tr"); row.dataset.key = key; make(row);
  }
  if (parent.rows[index] !== row) parent.insertBefore(row, parent.rows[index] || null);
  return row;
}
function cells(row, count, classes) {
  for (let i = 0; i < count; i++) {
    const c = document.createElement("td"); c.className = classes[i] || ""; row.appendChild(c);
  }
}
function prune(parent, keys) { for (const r of Array.from(parent.rows)) if (!keys.has(r.dataset.key)) r.remove(); }
const q = name => encodeURIComponent(name);
function section(kind, name) {
  const id = kind + "-" + name;
  let box = document.getElementById(id);
  if (!box) {
    box = document.createElement("div"); box.id = id;
    box.appendChild(document.createElement("h2"));
    const table = document.createElement("table"); table.className = "dead"; box.appendChild(table);
    document.getElementById(kind).appendChild(box);
  }
  return box;
}
const ago = ms => ms === null ? "-" : ((Date.now() - ms) / 1000).toFixed(1) + " s ago";
async function refreshBatches() {
  const {batches} = await call("GET", "/v1/batches");
  const body = document.querySelector("#batches tbody"), keys = new Set();
  batches.forEach((b, index) => {
    keys.add(b.id);
    const row = keep(body, b.id, index, r => cells(r, 7, []));
    [b.id, b.open ? "yes" : "closed", b.counts.done, b.counts.failed, b.counts.cancelled, b.counts.pending,
     b.callback.queue].forEach((text, i) => { row.cells[i].textContent = text; });
  });
  prune(body, keys);
}
async function refreshWorkers() {
  const {workers} = await call("GET", "/v1/workers");
  const body = document.querySelector("#workers tbody"), keys = new Set();
  workers.forEach((w, index) => {
    const key = w.worker === null ? "@" + w.address : "=" + w.worker;
    keys.add(key);
    const row = keep(body, key, index, r => cells(r, 6, []));
    row.cells[0].textContent = w.worker === null ? "anonymous at " + w.address : w.worker;
    row.cells[1].textContent = w.queues.join(", ");
    row.cells[2].textContent = w.waiting ? "yes" : "no";
    row.cells[3].textContent = w.tasks.length ? w.tasks.map(t => t._id + " (lease " +
      ((t.lease_expires_at - Date.now()) / 1000).toFixed(0) + " s)").join(", ") +
      (w.tasks_held > w.tasks.length ? " and " + (w.tasks_held - w.tasks.length) + " more" : "") : "-";
    row.cells[4].textContent = ago(w.last_contact);
    row.cells[5].textContent = ago(w.last_heartbeat);
  });
  prune(body, keys);
}
// One section per queue that has tasks of a kind (running, dead letters): a heading, and a row per task with a
// button or two, kept in place across refreshes.
async function taskSections(kind, queues, count, query, heading, classes, buttons, fill) {
  const sections = new Set();
  for (const s of queues) {
    if (!count(s)) continue;
    sections.add(kind + "-" + s.queue);
    const {tasks} = await call("GET", "/v1/queue/" + q(s.queue) + "/tasks?" + query);
    const box = section(kind, s.queue), table = box.querySelector("table");
    box.querySelector("h2").textContent = heading(s, tasks);
    const keys = new Set();
    tasks.forEach((t, index) => {
      keys.add(t._id);
      const path = "/v1/queue/" + q(s.queue) + "/tasks/" + q(t._id);
      fill(keep(table, t._id, index, r => { cells(r, classes.length, classes); buttons(r.cells[3], path, t); }), t);
    });
    prune(table, keys);
  }
  for (const box of Array.from(document.getElementById(kind).children)) if (!sections.has(box.id)) box.remove();
}
const refreshRunning = queues => taskSections("running", queues, s => s.counts["in progress"],
  "status=in%20progress&limit=" + RUNNING,
  (s, tasks) => "Running in " + s.queue + ": the oldest " + tasks.length + " of " + s.counts["in progress"],
  ["id", "attempt", "progress", "actions"],
  (cell, path, t) => button(cell, "Cancel", () => confirm("Cancel running task " + t._id +
                                                          "? Its worker is told to stop.")
                                                  ? call("DELETE", path) : Promise.resolve()),
  (row, t) => {
    row.cells[0].textContent = t._id;
    row.cells[1].textContent = "attempt " + t.attempt + (t.worker ? " by " + t.worker : "");
    row.cells[2].textContent = t.progress === null ? "no progress reported" : "progress: " + JSON.stringify(t.progress);
  });
const refreshLetters = queues => taskSections("letters", queues, s => s.counts.failed,
  "status=failed&order=newest&limit=" + LETTERS,
  (s, tasks) => "Dead letters of " + s.queue + ": the newest " + tasks.length + " of " + s.counts.failed,
  ["id", "attempt", "error", "actions"],
  (cell, path, t) => {
    button(cell, "Retry", () => call("PATCH", path, {status: "queued"}));
    button(cell, "Cancel", () => confirm("Cancel task " + t._id + "? It will not be retried.")
           ? call("DELETE", path) : Promise.resolve());
  },
  (row, t) => {
    row.cells[0].textContent = t._id;
    row.cells[1].textContent = "attempt " + t.attempt;
    row.cells[2].textContent = t.error;
  });
async function refresh() {
  try {
    const {queues, server} = await call("GET", "/v1/queues");
    document.getElementById("server").textContent = "on " + server.host + " (" + server.address + ")";
    const body = document.querySelector("#queues tbody");
    const shown = new Set();
    queues.forEach((s, index) => {
      shown.add(s.queue);
      const row = keep(body, s.queue, index, r => {
        cells(r, 10, []);
        r.toggle = button(r.cells[9], "", () => call("PUT", "/v1/queue/" + q(s.queue),
                                                     {paused: r.toggle.textContent === "Pause"}));
      });
      row.cells[0].textContent = s.queue + (s.paused ? " (paused)" : "") + (s.full ? " (full)" : "") +
        (s.groups ? " (" + s.groups + " groups)" : "") +
        (s.throttled_for_ms ? " (throttled for " + (s.throttled_for_ms / 1000).toFixed(0) + " s)" : "") +
        (s.schedules || []).map(x => " (schedule " + x.name + ": next " + (x.next_fire || "never") + ")").join("");
      statuses.forEach((status, i) => { row.cells[i + 1].textContent = s.counts[status]; });
      row.cells[7].textContent = s.waiting_workers;
      row.cells[8].textContent = s.oldest_queued === null ? "-"
        : s.oldest_queued + ", " + (s.oldest_queued_age_ms / 1000).toFixed(1) + " s";
      row.toggle.textContent = s.paused ? "Resume" : "Pause";
    });
    prune(body, shown);
    await refreshWorkers();
    await refreshBatches();
    await refreshRunning(queues);
    await refreshLetters(queues);
    show("updated " + new Date().toLocaleTimeString());
  } catch (e) { show(e.message); }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


# ---------------------------------------------------------------------------------------------------------------
# 6. The server: one asyncio event loop, in a thread of its own, owns every socket. It frames requests from the
#    bytes it has read, has each connection's Handler serve them in order, and holds an answer back until the
#    journal records behind it are durable (the journal's flusher thread writes what a pass produced with one write
#    and one fsync, while the loop goes on; with --fsync interval or never the loop makes that one write itself).
#    Every deadline is a timer in the loop's heap: the first authorised request's, a request's, the idle one, parked
#    waits, the broker's clock, the ages' tick, the schedules' next slot. Nothing on the loop blocks.
# ---------------------------------------------------------------------------------------------------------------

REQUESTS_PER_PASS = 32   # requests of one connection served in a pass before the other connections get a turn
MAX_PIPELINED = 64       # answers a connection may have held back for the disk before its requests wait
LINGER_SECONDS = 0.5     # after a last answer, how long what the client still sends is read (and dropped)
CLOCK_SECONDS = 0.1      # while waits are parked, the broker's clock runs at least this often
AGE_SECONDS = 1.0        # how often tasks whose age is up (expire_after, retain) are ended without a request
SCHEDULE_CHECK_SECONDS = 60.0  # the schedules' timer rings at least this often (a schedule set from another thread)
FD_RESERVE = 64          # file descriptors kept for the journal, a compaction, the listener and the interpreter


# The quick answer past the connection cap, made once.
def _refusal() -> bytes:
    status, payload, headers = error_reply(Unavailable("the server is at its connection limit; retry later"))
    return b"".join(http_response(status, payload, headers + [("Connection", "close")]))


REFUSAL = _refusal()


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (each connection holds one); returns the
    limit in force."""
    try:
        import resource  # POSIX
    except ImportError:
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class HTTPServer:
    """What the routes see of the server (the Handler's `server`): the broker, the limits, the tokens, the
    browser and host rules, the request counts. And the loop's own bookkeeping: the connections, the answers held
    back for the disk (in ticket order), the broker's clock. All of it runs on the loop's thread, but call_soon
    and settle_soon, which any thread may call."""

    def __init__(self, broker: Broker, limits: Limits, access: Access, tls: Optional[ssl.SSLContext], quiet: bool,
                 allow_origins: Iterable[str], allow_hosts: Iterable[str], max_connections: int) -> None:
        self.broker, self.limits, self.access, self.tls, self.quiet = broker, limits, access, tls, quiet
        self.allowed_origins = frozenset(origin.strip().lower().rstrip("/") for origin in allow_origins)
        self.allowed_hosts = frozenset(host.strip().lower().rstrip(".") for host in allow_hosts)
        self.fd_connections = max_connections  # the cap when limits.max_connections is 0
        self.internal_errors = 0  # 500s answered: each one is a bug
        self.connections: set = set()
        self.parked = 0           # connections whose request is a parked wait
        self.closing = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread = 0
        self._listener: Optional[asyncio.AbstractServer] = None
        self._requests: Dict[Tuple[str, int], int] = collections.Counter()
        self._held: "collections.deque[Tuple[int, Connection]]" = collections.deque()  # (ticket, connection)
        self._flush_asked = False
        self._settle_asked = False
        self.settling = False     # _settle is releasing held answers (the only place they leave)
        self._clock: Optional[asyncio.TimerHandle] = None
        self._clock_at = 0.0
        self._schedule_timer: Optional[asyncio.TimerHandle] = None
        self.standby = False      # a standby answers /healthz 503 and refuses the rest until it takes over
        self.identity: Dict[str, Any] = {}  # which server this is (GET /v1/queues): its host, address, pid
        self._resources_warned = -10.0
        self.refusing = 0         # connections past the cap being answered 503 and closed

    async def open(self, sock: socket.socket) -> None:
        """Start serving the listening socket `sock` on the running loop."""
        self.loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        address = sock.getsockname()
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(),
                         "address": ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]}
        self.loop.set_exception_handler(self._loop_error)
        self.broker.on_settled(self.settle_soon)
        # (The handshake is asyncio's, on the loop, with its own deadline; loop.start_tls per connection, which would
        # count a connection in its handshake against the cap, loses the ClientHello on Python 3.8.)
        handshake = min(self.limits.request_timeout, self.limits.first_request_timeout) if self.tls else None
        self._listener = await self.loop.create_server(lambda: Connection(self), sock=sock, ssl=self.tls,
                                                       ssl_handshake_timeout=handshake, backlog=1024)
        self.loop.call_later(AGE_SECONDS, self._run_ages)
        self.arm_schedules()

    def promote(self, broker: Broker) -> None:
        """(On the loop.) A standby takes over: `broker` (replayed from the journal it now holds) is served."""
        self.broker, self.standby = broker, False
        broker.on_settled(self.settle_soon)
        self.arm_schedules()

    def arm_schedules(self) -> None:
        """Run the schedules' slots due now, and set the timer for the moment the next one is due (on the loop;
        again whenever a queue's options change). Their records reach the disk with the next flush."""
        if self.closing:
            return
        try:
            with self.broker.deferring() as promise:
                delay = self.broker.run_schedules()
            if promise.ticket:
                self.broker.request_flush()
        except KatarError:
            delay = SCHEDULE_RETRY_MS / 1000.0  # the journal fails: try again soon
        if self._schedule_timer is not None:
            self._schedule_timer.cancel()
        delay = SCHEDULE_CHECK_SECONDS if delay is None else min(SCHEDULE_CHECK_SECONDS, delay + 0.001)
        self._schedule_timer = self.loop.call_later(delay, self.arm_schedules)

    def _run_ages(self) -> None:
        """Every AGE_SECONDS: end the tasks whose age is up; their records reach the disk with the next flush."""
        if self.closing:
            return
        try:
            with self.broker.deferring() as promise:
                self.broker.run_ages()
            if promise.ticket:
                self.broker.request_flush()
        except KatarError:
            pass  # the journal fails: the next round tries again
        self.loop.call_later(AGE_SECONDS, self._run_ages)

    def _loop_error(self, loop: Any, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            return  # a client that went away mid-way, or spoke bad TLS: nothing to tell the operator
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            now = time.monotonic()
            if now >= self._resources_warned + 10:  # asyncio retries the accept: say it once in a while
                self._resources_warned = now
                warn(f"cannot accept connections: {exc.strerror} (open files: raise ulimit -n, or lower "
                     f"--max-connections below it)")
            return
        self.internal_errors += 1
        warn(f"event loop: {context.get('message')}: {exc!r}")
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    def count(self, route: str, status: int) -> None:
        self._requests[(route[6:] if route.startswith("route_") else route, int(status))] += 1

    def request_counts(self) -> Dict[Tuple[str, int], int]:
        return dict(self._requests)

    @property
    def max_connections(self) -> int:
        return self.limits.max_connections or self.fd_connections

    @property
    def active(self) -> int:
        """Connections being served."""
        return len(self.connections)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop: queued directly from the loop's own thread, through its wake-up pipe from
        any other (a thread of the Python API that served a parked poll, the journal's flusher)."""
        loop = self.loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(callback)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(callback)

    # -- answers held back for the disk ----------------------------------------------------------------------------

    def hold(self, ticket: int, connection: "Connection") -> None:
        """An answer of `connection` waits for journal ticket `ticket`; the flusher is asked once, at the end of the
        pass, so that everything handled in this pass shares one write and one fsync."""
        self._held.append((ticket, connection))
        if not self._flush_asked:
            self._flush_asked = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_asked = False
        self.broker.request_flush()

    def settle_soon(self) -> None:
        """The journal made tickets durable (or lost them): release the answers waiting for them. Any thread."""
        if not self._settle_asked:
            self._settle_asked = True
            self.call_soon(self._settle)

    def _settle(self) -> None:
        """Release the held answers whose tickets are durable, in ticket order (answers held for the disk leave
        only from here: one whose records are durable never overtakes an earlier one, so whoever sees a task
        leased knows its worker has been sent it)."""
        self._settle_asked = False
        held, settled = self._held, self.broker.settled
        self.settling = True
        try:
            while held:
                ticket, connection = held[0]
                if settled(ticket) is None:
                    break
                held.popleft()
                connection.send_answers()
        finally:
            self.settling = False
        if held:  # written after the flush began: the next one takes them
            self.broker.request_flush()

    # -- the broker's clock ----------------------------------------------------------------------------------------

    def arm_clock(self) -> None:
        """While waits are parked, hand them what a delay ending or a lease running out frees, at that moment."""
        if not self.parked:
            return
        with self.broker.deferring():  # (what the clock changes is answered by the waits it serves)
            delay = self.broker.next_due()
        # A change made through the Python API (a delayed insert from another thread) does not reach this timer:
        # while waits are parked, it rings at least every CLOCK_SECONDS.
        at = self.loop.time() + min(CLOCK_SECONDS, max(delay if delay is not None else CLOCK_SECONDS, 0.002))
        if self._clock is not None:
            if self._clock_at <= at:
                return
            self._clock.cancel()
        self._clock_at, self._clock = at, self.loop.call_at(at, self._run_clock)

    def _run_clock(self) -> None:
        self._clock = None
        self.arm_clock()

    # -- stopping --------------------------------------------------------------------------------------------------

    async def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()  # (not wait_closed: from Python 3.12 on it waits for every connection)

    async def drain(self, timeout: float) -> None:
        """Read no more requests; let the answers under way (held for the disk, or being written) go out, for at
        most `timeout` seconds; then close every connection."""
        self.closing = True
        deadline = self.loop.time() + timeout
        for connection in list(self.connections):
            connection.stop_reading()
        while any(connection.answers for connection in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.005)
        for connection in list(self.connections):
            connection.close()
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.005)


class Connection(asyncio.Protocol):
    """One client connection on the event loop. It reads without blocking, frames requests one after another
    (pipelined ones in order, a bounded number a pass), has its Handler serve each, and writes the answers in
    request order, each once the journal holds what it acknowledges. Its one timer enforces the deadline of the
    moment: a new connection's first authorised request, a request's (from its first byte to the end of its body),
    the idle one between requests, a client that does not read its answers, the lingering close."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.transport: Any = None
        self.handler: Optional[Handler] = None
        self.buffer = bytearray()
        # [bytes or None, ticket, close, undo]: undo puts back what the answer hands out if it is never written
        self.answers: "collections.deque[List[Any]]" = collections.deque()
        self.head: Optional[Tuple[str, str, str, Dict[str, str]]] = None  # a framed head whose body is awaited
        self.body_at, self.length, self.continued = 0, None, False
        self.parked: Optional[Parked] = None
        self.park_timer: Optional[asyncio.TimerHandle] = None
        self.gone = False           # the client closed its end, or the connection broke
        self.refused = False        # past the connection cap: answered 503, lingering
        self.hung_up = False        # the client closed its end (a FIN, which a plain close() sends too)
        self.closing = False        # the last answer is out or on its way: what comes is read and dropped
        self.reading = True
        self.write_paused = False
        self.processing = False
        self.request_started = 0.0  # loop time of the first byte of the request being read
        self.first_deadline = 0.0
        self.deadline: Optional[float] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_at = 0.0

    # -- the transport's callbacks -----------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections or server.closing:
            transport.write(REFUSAL)
            if server.refusing >= 64:  # a flood: no lingering, the descriptors are what is short
                self.closing = True
                transport.close()
                return
            server.refusing += 1
            self.refused = True
            self.linger()
            return
        server.connections.add(self)
        self.handler = Handler(self, transport.get_extra_info("peername") or ("-", 0), server)
        self.first_deadline = server.loop.time() + server.limits.first_request_timeout
        self.watch()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.handler is None:
            return  # lingering: read and dropped
        if not self.buffer and self.head is None:
            self.request_started = self.server.loop.time()
        self.buffer += data
        self.process()

    def eof_received(self) -> bool:
        if self.closing:
            return False  # the lingering close is done: close now
        self.gone = self.hung_up = True
        if self.parked is not None:  # a worker that hung up while it waited: its wait ends now
            self.resume()
        else:
            self.process()  # what was asked before the end is answered, then the connection closes
        return not self.closing

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.refused:
            self.server.refusing -= 1
        self.gone = self.hung_up = self.closing = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.parked is not None:
            self.resume()
        self.drop_answers()

    def drop_answers(self, upto: Optional[int] = None) -> None:
        """The client is gone with answers unwritten (held for the disk, say): what they hand out goes back (of the
        first `upto` answers, which stay in line; of all, which are dropped)."""
        answers = list(self.answers)[:upto] if upto is not None else list(self.answers)
        undos = [answer[3] for answer in answers if answer[3] is not None]
        for answer in answers:
            answer[3] = None
        if upto is None:
            self.answers.clear()
        if undos:
            with self.server.broker.deferring() as promise:
                for undo in undos:
                    undo()
            if promise.ticket:
                self.server.broker.request_flush()

    def pause_writing(self) -> None:
        self.write_paused = True  # a client that does not read its answers: read none of its requests either
        self.throttle()
        self.watch()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.process()

    # -- requests ----------------------------------------------------------------------------------------------------

    def process(self) -> None:
        """Serve the complete requests in the buffer, in order, until one parks, a bounded number a pass."""
        if self.processing:
            return
        self.processing = True
        exhausted = False  # every complete request in the buffer has been served
        try:
            served = 0
            while self.parked is None and not self.closing and not self.write_paused and \
                    len(self.answers) < MAX_PIPELINED:
                if served == REQUESTS_PER_PASS:
                    self.server.loop.call_soon(self.process)  # the other connections' turn first
                    break
                request = self.frame() if self.buffer else None
                if request is None:
                    exhausted = True
                    break
                served += 1
                self.serve(*request)
        finally:
            self.processing = False
        if self.gone and exhausted and not self.closing and not self.answers and self.parked is None:
            if self.head is not None:  # the client ended its side in the middle of a body
                self.refuse(BadRequest("the body ended before the length its head gives (Content-Length, chunks)"))
            else:
                self.close()  # everything it asked is answered (a head cut short gets no answer)
            return
        self.throttle()
        self.watch()

    def frame(self) -> Optional[Tuple[Tuple[str, str, str, Dict[str, str]], Optional[bytes]]]:
        """The next complete request (its head, and its body or None if it cannot be framed), or None."""
        limits = self.server.limits
        try:
            if self.head is None:
                found = frame_head(self.buffer, limits)
                if found is None:
                    return None
                self.body_at, self.head = found
                self.length, self.continued = body_length(self.head[2], self.head[3], limits), False
            if self.length is None:
                body, end = None, self.body_at
            elif self.length >= 0:
                end = self.body_at + self.length
                if len(self.buffer) < end:
                    self.send_continue()
                    return None
                body = bytes(self.buffer[self.body_at:end])
            else:
                chunked = frame_chunked(self.buffer, self.body_at, limits)
                if chunked is None:
                    self.send_continue()
                    return None
                body, end = chunked
        except KatarError as exc:
            self.refuse(exc)
            return None
        head, self.head = self.head, None
        del self.buffer[:end]
        return head, body

    def refuse(self, error: KatarError) -> None:
        """Answer a request that cannot be read to its end (a head or a body that breaks a rule, a body that
        stalls or stops), and close."""
        self.head = None
        self.answers.append([None, 0, True, None])
        assert self.handler is not None
        self.handler.refuse_head(error)
        self.send_answers()

    def send_continue(self) -> None:
        """Expect: 100-continue: tell a client that waits before sending its body to go on (curl waits a second
        otherwise); once per request, and only when no earlier answer is still to come before it."""
        assert self.head is not None
        if (not self.continued and not self.answers and self.head[2] == "HTTP/1.1"
                and self.head[3].get("expect", "").lower() == "100-continue"):
            self.continued = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def serve(self, head: Tuple[str, str, str, Dict[str, str]], body: Optional[bytes]) -> None:
        self.answers.append([None, 0, False, None])
        assert self.handler is not None
        with self.server.broker.deferring() as promise:
            self.handler.handle_request(head, body)
        self.hold(promise.ticket)
        if self.buffer:
            self.request_started = self.server.loop.time()  # the next request is here already: its time runs
        if self.parked is None:
            self.send_answers()
        if self.server.parked:
            self.server.arm_clock()  # this request may have put in a delayed task, or leased one

    def hold(self, ticket: int) -> None:
        if ticket:
            answer = self.answers[-1]
            answer[1] = max(answer[1], ticket)
            self.server.hold(ticket, self)

    def deliver(self, data: bytes, close: bool, undo: Optional[Callable[[], None]] = None) -> None:
        """The Handler's answer to the request being served (the last one begun); `undo` puts back what it hands
        out (leased tasks) should it never be written."""
        answer = self.answers[-1]
        answer[0], answer[2], answer[3] = data, close, undo
        if close:
            self.closing = True  # nothing after this request is read

    def send_answers(self) -> None:
        """Write the answers that are ready, in order: each once the journal holds its ticket (a ticket the disk
        lost turns its answer into a 503); after the last one of a connection that closes, close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        settled = self.server.broker.settled
        answers = self.answers
        while answers:
            data, ticket, close, undo = answers[0]
            if data is None:
                break
            if ticket:
                if not self.server.settling:  # held answers leave from HTTPServer._settle, in ticket order
                    self.server.settle_soon()
                    return
                state = settled(ticket)
                if state is None:
                    return
                assert self.handler is not None
                if state is False:
                    data = self.handler.lost_answer(close)
                elif undo is not None and self.hung_up:
                    # Tasks held back for the disk while their worker closed its end: a client that closes after
                    # asking (a timeout, a killed process) cannot be told from one that only stopped sending, and
                    # a task written to nobody would sit in progress for a whole lease. Handed back instead.
                    self.drop_answers(upto=1)
                    data = self.handler.handed_back_answer(close)
            answers.popleft()
            transport.write(data)
            if close:
                self.linger()
                return
        if not self.processing and self.parked is None:
            self.process()  # what is buffered behind; a client that has hung up is closed once all is answered
        else:
            self.watch()

    # -- parked waits ------------------------------------------------------------------------------------------------

    def park(self, parked: Parked) -> None:
        """The request being served waits (Handler: a route returned Parked): until the core wakes it, or its
        deadline. The connection reads no further request meanwhile: answers go out in order."""
        self.parked = parked
        self.server.parked += 1
        self.park_timer = self.server.loop.call_at(parked.waiter.deadline, self.resume)  # (both time.monotonic)
        if self.gone:  # the client has closed its end already: nobody would read what the wait brings
            self.server.loop.call_soon(self.resume)
        self.server.arm_clock()

    def wake(self) -> None:
        """The core answered the parked wait (any thread, broker lock held): resume on the loop."""
        self.server.call_soon(self.resume)

    def resume(self) -> None:
        parked = self.parked
        if parked is None:
            return  # resumed already (woken, and out of time in the same pass)
        self.parked = None
        self.server.parked -= 1
        if self.park_timer is not None:
            self.park_timer.cancel()
            self.park_timer = None
        assert self.handler is not None
        with self.server.broker.deferring() as promise:
            self.handler.resume(parked)
        self.hold(promise.ticket)
        self.send_answers()

    # -- deadlines and closing ---------------------------------------------------------------------------------------

    def watch(self) -> None:
        """Set the deadline of the moment, and the timer if it must ring sooner than it is set to."""
        if self.closing or self.handler is None:
            return
        limits, now = self.server.limits, self.server.loop.time()
        deadline: Optional[float]
        if self.write_paused:
            deadline = now + limits.idle_timeout
        elif self.parked is not None or self.answers:
            deadline = None  # the wait has its own deadline; the disk answers, or fails, in its time
        elif self.buffer or self.head is not None:
            deadline = self.request_started + limits.request_timeout
        else:
            deadline = now + limits.idle_timeout
        if not self.handler.authorised:
            deadline = self.first_deadline if deadline is None else min(deadline, self.first_deadline)
        self.set_deadline(deadline)

    def set_deadline(self, deadline: Optional[float]) -> None:
        self.deadline = deadline
        if deadline is not None and (self.timer is None or deadline < self.timer_at):
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at, self.timer = deadline, self.server.loop.call_at(deadline, self.ring)

    def ring(self) -> None:
        self.timer = None
        if self.deadline is None:
            return
        if self.server.loop.time() < self.deadline:  # moved later since the timer was set: set it again
            self.set_deadline(self.deadline)
            return
        if self.closing or self.write_paused:
            self.transport.abort()  # lingered long enough, or a client that does not read
        elif self.head is not None and self.trusted(self.head[3]):
            self.refuse(RequestTimeout(f"the body did not arrive within {self.server.limits.request_timeout:g} s"))
        else:
            self.close()  # quiet too long, or a head that trickles: closed without a word

    def trusted(self, headers: Dict[str, str]) -> bool:
        """Whether a request with these headers would pass authentication (a stranger's stalled request is cut
        off without a word, as a head that trickles is)."""
        access = self.server.access
        if access.open:
            return True
        try:
            access.scope(headers.get("authorization"))
        except KatarError:
            return False
        return True

    def throttle(self) -> None:
        """Read while the client reads its answers and its requests waiting here stay within one request's size."""
        limits = self.server.limits
        want = (not self.write_paused and len(self.answers) < MAX_PIPELINED and
                len(self.buffer) <= limits.max_head_bytes + limits.max_body + 65536)
        if want != self.reading and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def linger(self) -> None:
        """After the last answer: stop sending and read (dropping it) what the client still sends, until it closes
        or LINGER_SECONDS pass. Closing with part of a request unread resets the connection, and a reset can
        destroy the answer before the client reads it: the 414 to a long request line, the 503 to one connection
        too many."""
        self.closing = True
        self.buffer = bytearray()
        transport = self.transport
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered
            self.deadline = None
            self.set_deadline(self.server.loop.time() + LINGER_SECONDS + transport.get_write_buffer_size() / 1e5)
        else:
            transport.close()

    def stop_reading(self) -> None:
        """The server stops: serve no further request; close now if nothing is under way."""
        if self.parked is None and not self.answers:
            self.close()
        else:
            self.gone = True  # close once the answers under way are out

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # (what is buffered is written first)


def tls_context(cert_file: str, key_file: Optional[str] = None) -> ssl.SSLContext:
    """A server context for HTTPS: TLS 1.2 and newer, the standard library's default ciphers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class KatarServer:
    """A running HTTP(S) front for a broker: one event loop in a background thread. `start()` (or serve())
    starts it; `close()` stops accepting, answers parked waits with 204, lets the writes in flight finish and the
    journal fsync, and closes. `access` holds the tokens (none: open), `tls` an ssl.SSLContext, `allow_origins`
    the web pages (origins, like https://dash.example) that may use the API from a browser, and `allow_hosts`
    the names besides localhost and IP addresses by which a server without a token may be reached.
    `limits.max_connections` 0 serves as many connections as the file-descriptor limit allows (raised, at start,
    to the hard limit): `max_connections` is the figure in force."""

    def __init__(self, broker: Broker, host: str = "127.0.0.1", port: int = 3000, *, limits: Limits = Limits(),
                 access: Optional[Access] = None, tls: Optional[ssl.SSLContext] = None, quiet: bool = True,
                 allow_origins: Iterable[str] = (), allow_hosts: Iterable[str] = (), standby: bool = False) -> None:
        self.broker = broker
        self.fd_limit = raise_fd_limit()
        self.max_connections = limits.max_connections or max(16, self.fd_limit - FD_RESERVE)
        self.httpd = HTTPServer(broker, limits, access or Access(), tls, quiet, allow_origins, allow_hosts,
                                self.max_connections)
        self.httpd.standby = standby
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Connections the kernel completes before they are accepted (it caps this at net.core.somaxconn): a fleet
        # of workers reconnecting at once must not wait seconds for dropped SYNs to be sent again.
        self._socket = socket.create_server((host, port), family=family, backlog=1024)
        self.host, self.port = self._socket.getsockname()[:2]
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % ("https" if self.httpd.tls else "http", host, self.port)

    def start(self) -> "KatarServer":
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failed: List[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.httpd.open(self._socket))
            except BaseException as exc:  # reported to start()'s caller
                failed.append(exc)
                return
            finally:
                started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="katar_http loop", daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            self._thread.join()
            self._thread = None
            loop.close()
            raise failed[0]
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, answer parked waits, let the answers under way go out (their records fsync'd), close."""
        loop, thread = self._loop, self._thread
        if thread is not None and loop is not None:
            asyncio.run_coroutine_threadsafe(self.httpd.stop_listening(), loop).result()
        self.broker.close()  # parked waits wake and answer; the journal writes and fsyncs what is pending
        if thread is not None and loop is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.httpd.drain(timeout), loop).result(timeout + 5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._thread = None
        self._socket.close()

    def take_over(self, broker: Broker) -> None:
        """A standby (standby=True: /healthz 503, every other route 503) serves `broker` from now on."""
        old, self.broker = self.broker, broker
        if self._loop is not None:
            done = threading.Event()
            self._loop.call_soon_threadsafe(lambda: (self.httpd.promote(broker), done.set()))
            done.wait()
        else:
            self.httpd.promote(broker)
        old.close()

    def config(self, queue: Union[str, Queue], config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Get, or set (replacing it, `interval` defaulting to 30000), the configuration workers receive."""
        target = self.broker.get(queue.name if isinstance(queue, Queue) else queue)
        if config is not None:
            target.configure(configuration=config)
        return target.configuration

    def __enter__(self) -> "KatarServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(broker: Broker, port: int = 3000, host: str = "127.0.0.1", **options: Any) -> KatarServer:
    """Serve `broker` over HTTP from a background thread; options are KatarServer's."""
    return KatarServer(broker, host, port, **options).start()


# ---------------------------------------------------------------------------------------------------------------
# 7. The client and the worker runner: any program becomes a worker
# ---------------------------------------------------------------------------------------------------------------

_ERRORS_BY_STATUS = {error.status: error for error in (
    BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, RequestTimeout, Conflict, NotSupported,
    VersionNotSupported, PayloadTooLarge, URITooLong, UnsupportedMediaType, RequestHeaderFieldsTooLarge, Unavailable)}
CONNECTION_ERRORS = (OSError, http.client.HTTPException)  # the server is away: retry


class Client:
    """A client of a katar_http server, standard library only; `work`, `put` and `stats` use it, and so can you.

    One keep-alive connection per thread. An error the server answers raises the KatarError of its status
    (BadRequest, NotFound, Conflict, Unavailable, ...); a server that cannot be reached raises one of
    CONNECTION_ERRORS, which are worth retrying."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0,
                 tls: Optional[ssl.SSLContext] = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        self.url, self.timeout, self._tls = url.rstrip("/"), timeout, tls
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = "Bearer " + token
        self._local = threading.local()

    def request(self, method: str, path: str, body: Any = None, wait_ms: float = 0) -> Tuple[int, Any]:
        """One request; returns (status, payload). The timeout allows for a long poll's `wait_ms`."""
        timeout = self.timeout + wait_ms / 1000.0
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self._https:
                connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
            else:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.connection = connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        try:
            connection.request(method, self._prefix + path, body=None if body is None else _encode(body).encode(),
                               headers=self._headers)
            response = connection.getresponse()
            raw = response.read()
        except CONNECTION_ERRORS:
            connection.close()
            self._local.connection = None
            raise
        is_json = (response.getheader("Content-Type") or "").startswith("application/json")
        payload = json.loads(raw) if raw and is_json else raw.decode("utf-8", "replace")
        if response.status >= 400:
            details = payload if isinstance(payload, dict) else {"error": str(payload)}
            error = KatarError.__new__(_ERRORS_BY_STATUS.get(response.status, KatarError))
            KatarError.__init__(error, details.get("error", "HTTP %d" % response.status), details.get("ids", ()),
                                **{name: value for name, value in details.items() if name not in ("error", "ids")})
            error.status = response.status
            raise error
        return response.status, payload

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def configuration(self, queue: str) -> Dict[str, Any]:
        return self.request("GET", "/v1/queue/" + quote(queue, safe=""))[1]["configuration"]

    def insert(self, queue: str, tasks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Insert tasks ({"data", "priority"?, "delay"?, "key"?}); returns [{"_id", "status", "created"}]."""
        return self.request("POST", "/v1/queue/%s/tasks" % quote(queue, safe=""), {"tasks": tasks})[1]["tasks"]

    def poll(self, queue: "Polled", reports: Iterable[Dict[str, Any]] = (), max: int = 1, wait: float = 0,
             worker: Optional[str] = None, lease: Optional[int] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
        """Report `reports`, then lease up to `max` tasks, waiting up to `wait` ms: (the tasks, `cancel`: the
        deliveries this worker should stop, see GET /v1/workers). A refused report raises Conflict, whose
        fields["cancel"] names the reported tasks taken from the worker. `queue` may be several queues: a list
        in priority order or a dict of weights (POST /v1/poll); each task then names its `queue`."""
        body: Dict[str, Any] = {"tasks": list(reports), "max": max, "wait": wait}
        if worker:
            body["worker"] = worker
        if lease is not None:
            body["lease"] = lease
        status, payload = self.request("POST", *self._poll_target(queue, body), wait_ms=wait)
        if status != HTTPStatus.OK:
            return [], []
        return payload["tasks"], payload.get("cancel", [])

    def lease(self, queue: str, max: int = 1, wait: float = 0, worker: Optional[str] = None,
              reports: Iterable[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
        """Report `reports`, then lease up to `max` tasks, waiting up to `wait` ms; returns the tasks."""
        return self.poll(queue, reports, max=max, wait=wait, worker=worker)[0]

    def report(self, queue: "Polled", reports: Iterable[Dict[str, Any]]) -> None:
        self.request("POST", *self._poll_target(queue, {"tasks": list(reports), "max": 0}))

    @staticmethod
    def _poll_target(queue: "Polled", body: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        """The path and body of a poll of one queue (its name), or of several (a list, or a dict of weights)."""
        if isinstance(queue, str):
            return "/v1/queue/" + quote(queue, safe=""), body
        return "/v1/poll", dict(body, queues=queue)

    def heartbeat(self, queue: "Polled", task_id: str, attempt: Optional[int] = None, worker: Optional[str] = None,
                  **more: Any) -> List[str]:
        """Keep a lease; `more` may give `progress` and `lease` (ms from now). Returns `cancel` (see poll)."""
        return self.poll(queue, [dict(more, _id=task_id, status=IN_PROGRESS, attempt=attempt)], max=0,
                         worker=worker)[1]

    def task(self, queue: str, task_id: str, wait: float = 0) -> Dict[str, Any]:
        path = "/v1/queue/%s/tasks/%s" % (quote(queue, safe=""), quote(task_id, safe=""))
        return self.request("GET", path + (f"?wait={wait:g}" if wait else ""), wait_ms=wait)[1]

    def stats(self, queue: Optional[str] = None) -> List[Dict[str, Any]]:
        """The stats of one queue, or of every queue, as a list."""
        if queue is not None:
            return [self.request("GET", "/v1/queue/%s/stats" % quote(queue, safe=""))[1]]
        return self.request("GET", "/v1/queues")[1]["queues"]


def shard_for(urls: List[str], queue: str) -> str:
    """The server of `urls` that holds `queue`, for setups that spread queues over servers without a proxy: the one
    whose hash with the queue's name is highest (rendezvous hashing). Every tool picks the same one, in any order of
    the URLs, and adding or removing a server moves only the queues of that server. A URL is hashed without the
    spaces around it and its trailing slashes (as the tools give it); otherwise as written."""
    return max(urls, key=lambda url: hashlib.sha256(f"{url.strip().rstrip('/')}\n{queue}".encode()).digest())


Polled = Union[str, List[str], Dict[str, float]]  # what a worker polls: one queue, several in order, or weighted


def parse_polled(text: str) -> Polled:
    """`work`'s QUEUE: one name, several separated by commas in priority order ("critical,default"), or with
    weights ("critical:3,default:1")."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) == 1 and ":" not in parts[0]:
        return parts[0]
    if not any(":" in part for part in parts):
        return parts
    weights: Dict[str, float] = {}
    for part in parts:
        name, colon, weight = part.partition(":")
        try:
            weights[name] = float(weight) if colon else 1.0
        except ValueError:
            raise ValueError(f"the weight of {name} must be a number, like critical:3,default:1") from None
    return weights


class Runner:
    """Runs a command once per task of a queue: the task's data as JSON on its stdin, KATAR_TASK_ID, KATAR_QUEUE
    and KATAR_ATTEMPT in its environment. Exit 0 reports done, with stdout as the result (JSON when it parses,
    else text, capped at `max_output` bytes); any other exit, a signal or the timeout reports failed with the tail
    of stderr. Heartbeats keep the lease while the command runs, every `heartbeat` seconds, and carry its progress:
    the last line it wrote to the file named in KATAR_PROGRESS_FILE (JSON when it parses, else text). When the
    server says a running delivery was taken from this worker (cancelled, run past the queue's max_run, or leased
    again after its lease ran out: a heartbeat's 409, or `cancel` in an answer), the command is stopped at once
    (SIGTERM to its process group, SIGKILL `cancel_grace` seconds later), nothing is reported for it, and one line
    is logged: a cancel reaches a running command within `heartbeat` seconds and a round trip. `stop()` (SIGTERM,
    SIGINT) takes no new task, lets running ones finish for `grace` seconds, reports the rest failed, and returns.

    Reports are retried with backoff and jitter until the server takes them: a report is idempotent, so a retry
    after a lost answer has no second effect, and a delivery that was superseded meanwhile is refused (409) and
    dropped. Leases are retried the same way, so a restarting server is simply waited for."""

    def __init__(self, client: Client, queue: Polled, command: List[str], concurrency: int = 1,
                 timeout: Optional[float] = None, wait: int = 5000, heartbeat: float = 2.0, grace: float = 30.0,
                 worker: Optional[str] = None, max_output: int = 65536, cancel_grace: float = 5.0,
                 log: Callable[[str], None] = lambda line: print("katar_http work: " + line, file=sys.stderr,
                                                                  flush=True), quiet: bool = False) -> None:
        self.client, self.queue, self.command, self.concurrency = client, queue, command, concurrency
        self.timeout, self.wait, self.heartbeat, self.grace = timeout, wait, heartbeat, grace
        self.cancel_grace = cancel_grace
        self.worker = worker or "%s:%d" % (socket.gethostname(), os.getpid())
        self.max_output, self.log, self.quiet = max_output, log, quiet
        self.stopping = threading.Event()
        self._changed = threading.Condition()
        # Deliveries are (task id, attempt): the same task may come back to this worker while an earlier delivery
        # of it still runs here (its lease ran out), and each must be stopped, or reported, on its own.
        self._running: Dict[Tuple[str, int], Optional[subprocess.Popen]] = {}
        self._stopped: set = set()  # deliveries stopped because this worker stops
        self._taken: Dict[Tuple[str, int], str] = {}  # deliveries the server took away -> why
        self._since: Dict[Tuple[str, int], float] = {}  # delivery -> when it was handed to this worker
        self._awaited: set = set()  # deliveries whose command's output is still open (its group may be signalled)
        self._random = random.Random()

    def stop(self) -> None:
        self.stopping.set()
        with self._changed:
            self._changed.notify_all()

    def run(self) -> int:
        """Work until stop(); 0 when stopped cleanly, 1 when the server refuses this worker (token, queue)."""
        names = [self.queue] if isinstance(self.queue, str) else list(self.queue)
        intervals = []
        for name in names:  # (each one checked: a misspelled queue stops the worker at once)
            configuration = self._retry("read the configuration", lambda: self.client.configuration(name))
            if configuration is None:
                return 0 if self.stopping.is_set() else 1
            intervals.append(configuration.get("interval", DEFAULT_INTERVAL_MS))
        interval = min(intervals) / 1000.0
        if not self.quiet:
            command = " ".join(shlex.quote(part) for part in self.command).replace("\n", "\\n")
            self.log(f"working on {', '.join(names)} at {self.client.url}, {self.concurrency} at a time, "
                     f"as {self.worker}: "
                     f"{command[:200]}")
        threads: List[threading.Thread] = []
        while not self.stopping.is_set():
            with self._changed:
                while len(self._running) >= self.concurrency and not self.stopping.is_set():
                    self._changed.wait()
                free = self.concurrency - len(self._running)
            if self.stopping.is_set():
                break
            sent = time.monotonic()
            polled = self._retry("lease", lambda: self.client.poll(self.queue, max=free, wait=self.wait,
                                                                   worker=self.worker))
            if polled is None:
                if self.stopping.is_set():
                    break
                return 1
            tasks, cancel = polled
            self._take_away_all(cancel, sent)
            if self.stopping.is_set() and tasks:  # taken as we were told to stop: give them back untouched
                self._report([{"_id": t["_id"], "attempt": t["attempt"], "status": QUEUED} for t in tasks])
                break
            for task in tasks:
                with self._changed:
                    earlier = [key for key in self._running if key[0] == task["_id"]]
                for delivery in earlier:  # its lease ran out here, and the task came back: the old run must stop
                    self._take_away(delivery, f"superseded by delivery {task['attempt']}, handed to this worker")
                with self._changed:
                    self._running[(task["_id"], task["attempt"])] = None  # its slot is taken before it starts
                    self._since[(task["_id"], task["attempt"])] = time.monotonic()
                thread = threading.Thread(target=self._run_task, args=(task,), name="katar task " + task["_id"])
                thread.start()
                threads.append(thread)
            if not tasks and not self.wait:
                self.stopping.wait(interval)
        self._finish(threads)
        self.client.close()
        if not self.quiet:
            self.log("stopped")
        return 0

    def _finish(self, threads: List[threading.Thread]) -> None:
        """Let running tasks end within the grace period, then stop the rest (they are reported failed)."""
        deadline = time.monotonic() + self.grace
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._changed:
            for delivery, process in self._running.items():
                if process is not None and delivery in self._awaited:
                    self._stopped.add(delivery)
                    _signal_group(process, signal.SIGKILL)
        for thread in threads:
            thread.join()

    def _run_task(self, task: Dict[str, Any]) -> None:
        task_id, attempt = delivery = task["_id"], task["attempt"]
        descriptor, progress_file = tempfile.mkstemp(prefix="katar-progress-")
        os.close(descriptor)
        environment = dict(os.environ, KATAR_TASK_ID=task_id, KATAR_QUEUE=task.get("queue") or str(self.queue),
                           KATAR_ATTEMPT=str(attempt),
                           KATAR_PROGRESS_FILE=progress_file)
        report: Dict[str, Any] = {"_id": task_id, "attempt": attempt}
        started = time.monotonic()
        try:
            # A session of its own: a ^C meant for the worker does not kill the task, which may finish.
            process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=environment, start_new_session=True)
        except OSError as exc:
            report.update(status=FAILED, error=f"cannot run {self.command[0]}: {exc}")
        else:
            with self._changed:
                self._running[delivery] = process
                self._awaited.add(delivery)
                stop_now = delivery in self._taken  # taken away while it was starting
            if stop_now:
                self._stop_command(delivery, process)
            beating = threading.Event()
            heart = threading.Thread(target=self._beat, args=(task_id, attempt, beating, progress_file), daemon=True)
            heart.start()
            report.update(self._outcome(process, task))
            with self._changed:
                self._awaited.discard(delivery)  # its output closed: its group is not signalled any more
            beating.set()
        with contextlib.suppress(OSError):
            os.unlink(progress_file)
        with self._changed:
            taken = self._taken.pop(delivery, None)
        if taken is not None:  # the server ended this delivery: there is nothing to report
            self.log("%s attempt %d stopped after %d ms: %s" % (task_id, attempt, (time.monotonic() - started) * 1000,
                                                                taken))
        else:
            if not self.quiet:  # one line per task: what ran, how it ended, how long it took
                why = " (%s)" % report["error"].splitlines()[0][:200] if report["status"] == FAILED and report[
                    "error"].strip() else ""
                self.log("%s attempt %d %s%s in %d ms" % (task_id, attempt, report["status"], why,
                                                          (time.monotonic() - started) * 1000))
            self._report([report])
        self.client.close()  # this thread's connection: the thread ends here
        with self._changed:
            self._running.pop(delivery, None)
            self._since.pop(delivery, None)
            self._changed.notify_all()

    def _outcome(self, process: subprocess.Popen, task: Dict[str, Any]) -> Dict[str, Any]:
        data = _encode(task["data"]).encode() + b"\n"  # a line, for shell `read` as much as for JSON readers
        try:
            out, err = process.communicate(data, timeout=self.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)  # (its output is open: the group is still there)
            out, err = process.communicate()
            timed_out = True
        tail = err[-2000:].decode("utf-8", "replace").strip()
        if (task["_id"], task["attempt"]) in self._stopped:
            return {"status": FAILED, "error": "the worker stopped before the task finished: " + tail}
        if timed_out:
            return {"status": FAILED, "error": f"timed out after {self.timeout:g} s: {tail}"}
        if process.returncode < 0:
            return {"status": FAILED, "error": f"killed by signal {-process.returncode}: {tail}"}
        if process.returncode:
            return {"status": FAILED, "error": f"exit {process.returncode}: {tail}"}
        return {"status": DONE, "result": self._result(out)}

    def _result(self, out: bytes) -> Any:
        if len(out) > self.max_output:
            return out[:self.max_output].decode("utf-8", "replace") + "... (cut at %d bytes)" % self.max_output
        try:
            return json.loads(out)
        except ValueError:
            return out.decode("utf-8", "replace").rstrip("\n")

    def _beat(self, task_id: str, attempt: int, done: threading.Event, progress_file: str) -> None:
        sent = None  # the progress line last sent
        while not done.wait(self.heartbeat):
            more, line = {}, _last_line(progress_file)
            if line is not None and line != sent:
                with contextlib.suppress(ValueError):
                    more["progress"] = json.loads(line)
                more.setdefault("progress", line)
            asked = time.monotonic()
            try:
                cancel = self.client.heartbeat(self.queue, task_id, attempt, worker=self.worker, **more)
                sent = line if more else sent
            except (Conflict, NotFound) as exc:  # this delivery (its attempt is in the report) was taken, or is gone
                if task_id in (exc.fields.get("cancel") or []) or (isinstance(exc, NotFound) and task_id in exc.ids):
                    self._take_away((task_id, attempt), str(exc))
                else:
                    self.log(f"heartbeat for {task_id} refused: {exc}")
                continue
            except CONNECTION_ERRORS + (KatarError,) as exc:
                self.log(f"heartbeat for {task_id} failed: {exc}")
                continue
            self._take_away_all(cancel, asked)
        self.client.close()  # this thread's connection

    def _take_away_all(self, cancel: List[str], asked: float) -> None:
        """`cancel` of an answer to a request sent at `asked`: the deliveries of these tasks handed to this worker
        before then were taken from it; stop them. (One handed to it since is newer than what the answer knew.)"""
        for task_id in cancel:
            with self._changed:
                deliveries = [key for key in self._running if key[0] == task_id and self._since.get(key, 0) < asked]
            for delivery in deliveries:
                self._take_away(delivery, "the server took it away (cancelled, past max_run, or its lease lost)")

    def _take_away(self, delivery: Tuple[str, int], why: str) -> None:
        """The server ended a delivery this worker runs: stop its command; _run_task then reports nothing for it."""
        with self._changed:
            process = self._running.get(delivery, False)
            if process is False or delivery in self._taken:
                return  # not running here (any more), or being stopped already
            self._taken[delivery] = why
            awaited = delivery in self._awaited
        if process is not None and awaited:  # else it has not started (_run_task stops it as it starts), or ended
            self._stop_command(delivery, process)

    def _stop_command(self, delivery: Tuple[str, int], process: subprocess.Popen) -> None:
        """SIGTERM to the command's process group, SIGKILL cancel_grace seconds later if its output is still open
        (its leader may have exited while a child that ignores SIGTERM holds on)."""
        _signal_group(process, signal.SIGTERM)
        killer = threading.Timer(self.cancel_grace, self._kill_if_awaited, (delivery, process))
        killer.daemon = True
        killer.start()

    def _kill_if_awaited(self, delivery: Tuple[str, int], process: subprocess.Popen) -> None:
        with self._changed:
            if delivery in self._awaited and self._running.get(delivery) is process:
                _signal_group(process, signal.SIGKILL)

    def _report(self, reports: List[Dict[str, Any]]) -> None:
        """Send reports until the server takes them (or refuses them for good); give up only when stopping and
        past the grace period."""
        give_up_at = None
        for delay in self._backoff():
            try:
                self.client.report(self.queue, reports)
                return
            except (Conflict, NotFound) as exc:
                self.log(f"report of {', '.join(r['_id'] for r in reports)} refused: {exc}")
                return
            except CONNECTION_ERRORS + (KatarError,) as exc:
                self.log(f"report of {', '.join(r['_id'] for r in reports)} failed, retrying: {exc}")
            if self.stopping.is_set():
                give_up_at = give_up_at or time.monotonic() + self.grace
                if time.monotonic() > give_up_at:
                    self.log(f"gave up reporting {', '.join(r['_id'] for r in reports)}: their leases will run out")
                    return
            time.sleep(delay)

    def _retry(self, what: str, call: Callable[[], Any]) -> Any:
        """Call until it succeeds; None if the server refuses this worker for good, or when stopping."""
        for delay in self._backoff():
            try:
                return call()
            except (Unauthorized, Forbidden, NotFound) as exc:
                self.log(f"cannot {what}: {exc}")
                return None
            except CONNECTION_ERRORS + (KatarError,) as exc:
                self.log(f"cannot {what}, retrying in {delay:.1f} s: {exc}")
            if self.stopping.wait(delay):
                return None
        return None

    def _backoff(self) -> Iterator[float]:
        """Delays for retries: doubling from 0.25 s to 10 s, each with jitter, so restarted servers are not
        stampeded by every worker at once."""
        delay = 0.25
        while True:
            yield delay / 2 + self._random.uniform(0, delay / 2)
            delay = min(delay * 2, 10.0)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal a command's process group (a session of its own: its id is the command's pid). Callers signal only
    while the command's output is still open, so the group is still there and its id not reused."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signum)


def _last_line(path: str, limit: int = 65536) -> Optional[str]:
    """The last non-empty line of the file at `path` (of its last `limit` bytes), or None."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - limit))
            lines = file.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    lines = [line for line in lines if line.strip()]
    return lines[-1] if lines else None


# ---------------------------------------------------------------------------------------------------------------
# 8. The command line
# ---------------------------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  python katar_http.py --port 3000 --queue jobs:1000        queue "jobs", workers poll every second
  python katar_http.py --queue jobs --queue mail:5000       two queues (jobs polls every 30 s, the default)
  python katar_http.py --config queues.json                 queues and their options from a file:
      {"queues": {"jobs": {"configuration": {"interval": 1000}, "lease": 30000, "max_attempts": 3}}}
  python katar_http.py --queue jobs --journal jobs.journal  keep the tasks across restarts and crashes

the client side (see: katar_http.py work --help):
  python katar_http.py work http://127.0.0.1:3000 jobs -c 4 -- ./process-one-task   run a command per task
  python katar_http.py put http://127.0.0.1:3000 jobs '{"n": 1}'                   insert a task, print its id
  python katar_http.py stats http://127.0.0.1:3000                                 the queues' figures
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="katar_http.py", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An HTTP task-queue server for polling workers (standard library only).")
    defaults = Limits()
    group = parser.add_argument_group("serving")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; any other needs a token)")
    group.add_argument("--port", type=_port, default=3000, help="port to listen on (default 3000; 0 picks a free one)")
    group.add_argument("--queue", action="append", default=[], metavar="NAME[:INTERVAL]",
                       help="create a queue; INTERVAL is the poll interval in ms sent to workers (default 30000); "
                            "repeat for more queues")
    group.add_argument("--config", metavar="FILE",
                       help='JSON file {"queues": {NAME: {"configuration": {...}, "lease": MS, ...}}}')
    group.add_argument("--log-level", choices=("info", "warning"), default="info",
                       help="info: a line per request on stderr (method, path, status, bytes, ms; never tokens, "
                            "queries or data); warning: only problems, such as a torn journal tail, a failed "
                            "compaction or an internal error (default %(default)s)")
    group.add_argument("--quiet", action="store_true", help="the same as --log-level warning")
    group = parser.add_argument_group("durability")
    group.add_argument("--journal", metavar="FILE",
                       help="keep every change in this append-only file and reload it at start (default: memory only)")
    group.add_argument("--standby", action="store_true",
                       help="with --journal: if another server holds the journal, listen anyway (GET /healthz "
                            "answers 503 standby, every other route 503) and take over the moment it stops")
    group.add_argument("--fsync", choices=FSYNC_MODES, default="always",
                       help="always: answer a change only once it is fsync'd (default, loses nothing); "
                            "interval: fsync every --fsync-interval (power loss may lose that much); "
                            "never: leave it to the OS (survives a crash of this process, not of the machine)")
    group.add_argument("--fsync-interval", type=int, default=1000, metavar="MS",
                       help="with --fsync interval, how often to fsync (default %(default)s)")
    group.add_argument("--repair-journal", action="store_true",
                       help="if the journal has a corrupt line, keep the records before it and set the rest aside "
                            "in FILE.corrupt-TIME instead of refusing to start")
    group = parser.add_argument_group("security")
    group.add_argument("--token", action="append", default=[], metavar="TOKEN",
                       help="admin token: every route needs Authorization: Bearer TOKEN (also KATAR_TOKEN; repeat "
                            "to accept several, e.g. while rotating)")
    group.add_argument("--token-file", metavar="FILE", help="read the admin token from FILE (its first line)")
    group.add_argument("--worker-token", action="append", default=[], metavar="QUEUES=TOKEN",
                       help="a token that may only read the configuration of, lease from and report to QUEUES "
                            "(comma-separated names, or *)")
    group.add_argument("--worker-token-file", metavar="FILE", help="worker tokens from FILE, one QUEUES=TOKEN a line")
    group.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM; may hold the key)")
    group.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    group.add_argument("--insecure", action="store_true",
                       help="listen beyond this machine without any token (anyone who reaches it controls it)")
    group.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web page origin (like https://dash.example) that may use the API from a browser; "
                            "requests from other sites' pages are refused (403). Repeat for more")
    group.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="without a token, requests must name this server by an IP address or localhost (so a "
                            "web page cannot reach it by DNS rebinding, 421); allow another name. Repeat for more")
    group = parser.add_argument_group("limits (each answered with a JSON error, never a hang)")
    group.add_argument("--max-body", type=int, default=defaults.max_body, metavar="BYTES",
                       help="largest request body (413; default %(default)s)")
    group.add_argument("--max-tasks", type=int, default=defaults.max_tasks, metavar="N",
                       help=f"tasks in one insert, reports in one poll, and max (default %(default)s, "
                            f"at most {MAX_INSERT_BATCH})")
    group.add_argument("--max-data", type=int, default=defaults.max_data, metavar="BYTES",
                       help="largest data of one task, or result of one report, as JSON (413; default %(default)s)")
    group.add_argument("--max-depth", type=int, default=defaults.max_depth, metavar="N",
                       help="deepest nesting of arrays and objects in a body (default %(default)s)")
    group.add_argument("--max-wait", type=int, default=defaults.max_wait, metavar="MS",
                       help="longest long poll or result wait (longer ones are cut to it; default %(default)s)")
    group.add_argument("--max-headers", type=int, default=defaults.max_headers, metavar="N",
                       help="header lines in a request (431; default %(default)s)")
    group.add_argument("--max-head-bytes", type=int, default=defaults.max_head_bytes, metavar="BYTES",
                       help="bytes of request line and headers (414/431; default %(default)s)")
    group.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, metavar="SECONDS",
                       help="close a connection idle between requests for this long (default %(default)s)")
    group.add_argument("--request-timeout", type=float, default=defaults.request_timeout, metavar="SECONDS",
                       help="cut off a client whose request (head and body) takes longer (408; default %(default)s)")
    group.add_argument("--first-request-timeout", type=float, default=defaults.first_request_timeout,
                       metavar="SECONDS", help="a new connection must complete one authorised request within this "
                                               "long, or be closed (default %(default)s)")
    group.add_argument("--max-connections", type=int, default=defaults.max_connections, metavar="N",
                       help="connections served at once; more get a quick 503 (default: as many as the "
                            "file-descriptor limit allows, which the server raises to its hard limit at start)")
    group.add_argument("--max-memory", type=_memory_size, metavar="BYTES",
                       help="bound on the estimate of what the queues hold (tasks, histories, keys, results); "
                            "inserts beyond it are 503 while leases, reports and purges go on. Takes K, M, G "
                            "suffixes; 0 is no bound (default: a quarter of the machine's memory, at most a third "
                            "of ulimit -v: %s here)" % _format_size(default_max_memory()))
    parser.add_argument("--version", action="version", version="katar_http " + __version__)
    return parser


def _port(text: str) -> int:
    """A --port value: 0 to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535 (0 picks a free one), got {text!r}")
    return int(text)


def _memory_size(text: str) -> int:
    """A --max-memory value: bytes, or with a K, M or G suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes like 512M or 2G, got {text!r}")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def load_queues(broker: Broker, config_file: Optional[str], queue_specs: List[str]) -> None:
    """Create the queues of --config and --queue (a --queue interval overrides the file's). They are applied after
    the journal is replayed: the options they name win over the journal's; the rest (other options, queues made
    with PUT) stay as the journal has them."""
    if config_file:
        with open(config_file, encoding="utf-8") as handle:
            document = json.load(handle)
        queues = document.get("queues") if isinstance(document, dict) else None
        if not isinstance(queues, dict) or len(document) != 1:
            raise BadRequest(f'{config_file}: expected {{"queues": {{NAME: {{options}}}}}} and nothing else')
        for name, options in queues.items():
            if not isinstance(options, dict):
                raise BadRequest(f"{config_file}: the options of queue {name} must be an object")
            try:
                broker.queue(name, **options)
            except BadRequest as exc:
                raise BadRequest(f"{config_file}: queue {name}: {exc}") from None
    for spec in queue_specs:
        name, _, interval = spec.partition(":")
        queue = broker.queue(name)
        if interval:
            if not (interval.isascii() and interval.isdigit()):
                raise BadRequest(f"--queue {spec}: the interval must be milliseconds, like jobs:1000")
            configuration = dict(queue.configuration, interval=int(interval))
            queue.configure(configuration=configuration)


def load_access(args: argparse.Namespace, environ: Dict[str, str]) -> Access:
    """The tokens of --token, KATAR_TOKEN, --token-file, --worker-token and --worker-token-file."""
    admin = list(args.token) + ([environ["KATAR_TOKEN"]] if environ.get("KATAR_TOKEN") else [])
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as handle:
            admin.append(handle.readline().strip())
    specs = list(args.worker_token)
    if args.worker_token_file:
        with open(args.worker_token_file, encoding="utf-8") as handle:
            specs += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    workers: Dict[str, List[str]] = {}
    for spec in specs:
        queues, equals, token = spec.partition("=")
        names = [name.strip() for name in queues.split(",") if name.strip()]
        if not equals or not token.strip() or not names:
            raise ValueError("a worker token is QUEUES=TOKEN, like jobs,mail=TOKEN (what was given is not shown)")
        workers[token.strip()] = names
    if any(not token for token in admin):
        raise ValueError("an admin token is empty")
    return Access(admin, workers)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (every address it names is a loopback one)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


TOOLS = ("work", "put", "stats")


def build_tool_parser(tool: str) -> argparse.ArgumentParser:
    """The parsers of `katar_http.py work|put|stats URL ...`, the client side of the file."""
    about = {"work": "Run a command once per task of QUEUE, as a reliable worker.",
             "put": "Insert tasks: DATA as JSON, or one JSON value per line on stdin; prints their ids.",
             "stats": "Print the figures of every queue, or of QUEUE, as a table."}[tool]
    parser = argparse.ArgumentParser(prog=f"katar_http.py {tool}", description=about)
    parser.add_argument("url", metavar="URL", help="the server, like http://127.0.0.1:3000; or several, separated by "
                        "commas, over which the queues are spread (each queue's server: shard_for)")
    parser.add_argument("--token", help="bearer token (default: $KATAR_TOKEN)")
    parser.add_argument("--cafile", metavar="FILE", help="trust this certificate for https:// (a self-signed one)")
    if tool == "stats":
        parser.add_argument("queue", metavar="QUEUE", nargs="?")
        return parser
    parser.add_argument("queue", metavar="QUEUE", help="the queue; for work, several in priority order "
                        "(critical,default) or with weights (critical:3,default:1)" if tool == "work" else None)
    if tool == "put":
        parser.add_argument("data", metavar="DATA", nargs="?", help="the task's data as JSON (else read stdin)")
        parser.add_argument("--priority", default=0, help="an integer, or high, normal, low")
        parser.add_argument("--delay", type=int, default=0, metavar="MS")
        parser.add_argument("--key", help="idempotency key (one task only)")
        return parser
    parser.add_argument("-c", "--concurrency", type=int, default=1, metavar="N", help="tasks run at once (default 1)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="fail a task that runs longer")
    parser.add_argument("--wait", type=int, default=5000, metavar="MS",
                        help="long-poll for this long (default %(default)s; 0 polls at the queue's interval)")
    parser.add_argument("--heartbeat", type=float, default=2.0, metavar="SECONDS",
                        help="extend the lease this often while a task runs, and hear of a cancel (default "
                             "%(default)s); keep it below the queue's lease")
    parser.add_argument("--cancel-grace", type=float, default=5.0, metavar="SECONDS",
                        help="a command the server cancelled gets SIGTERM, then SIGKILL this much later "
                             "(default %(default)s)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM or SIGINT, how long running tasks may still take (default %(default)s)")
    parser.add_argument("--worker", help="the id recorded on leased tasks (default host:pid)")
    parser.add_argument("--max-output", type=int, default=65536, metavar="BYTES", help="cap on the result from stdout")
    parser.add_argument("--quiet", action="store_true",
                        help="no line per task on stderr (id, attempt, outcome, ms); problems are still logged")
    parser.epilog = "The command follows --: katar_http.py work URL QUEUE [options] -- CMD [ARGS...]"
    return parser


def run_tool(tool: str, argv: List[str], environ: Dict[str, str]) -> int:
    command: List[str] = []
    if tool == "work" and "--" in argv:  # what follows -- is the command, options and all
        command, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    args = build_tool_parser(tool).parse_args(argv)
    args.command = command
    urls = list(dict.fromkeys(url.strip().rstrip("/") for url in args.url.split(",") if url.strip()))
    try:
        polled = parse_polled(args.queue) if tool == "work" else args.queue
        names = [] if polled is None else [polled] if isinstance(polled, str) else list(polled)
        shards = sorted({shard_for(urls, name) for name in names}) if names else urls
        if tool == "work" and len(shards) > 1:
            raise ValueError(f"the queues {', '.join(names)} live on different servers ({', '.join(shards)}): "
                             f"start one work per server")
        tls = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
        clients = [Client(url, token=args.token or environ.get("KATAR_TOKEN"), tls=tls) for url in shards]
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"katar_http {tool}: {exc}", file=sys.stderr)
        return 2
    try:
        if tool == "work":
            return run_worker(clients[0], args)
        if tool == "put":
            return run_put(clients[0], args)
        return run_stats(clients, args)
    except KatarError as exc:
        print(f"katar_http {tool}: {exc.status} {exc}", file=sys.stderr)
        return 1
    except CONNECTION_ERRORS as exc:
        print(f"katar_http {tool}: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


def run_worker(client: Client, args: argparse.Namespace) -> int:
    command = args.command
    if not command:
        print("katar_http work: give the command after --, like: work URL jobs -- ./process.sh", file=sys.stderr)
        return 2
    try:
        polled = parse_polled(args.queue)
    except ValueError as exc:
        print(f"katar_http work: {exc}", file=sys.stderr)
        return 2
    runner = Runner(client, polled, command, concurrency=max(1, args.concurrency), timeout=args.timeout,
                    wait=args.wait, heartbeat=args.heartbeat, grace=args.grace, worker=args.worker,
                    max_output=args.max_output, quiet=args.quiet, cancel_grace=args.cancel_grace)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: runner.stop())
    return runner.run()


def run_put(client: Client, args: argparse.Namespace) -> int:
    texts = [args.data] if args.data is not None else [line for line in sys.stdin if line.strip()]
    priority: Any = int(args.priority) if str(args.priority).lstrip("-").isdigit() else args.priority
    try:
        tasks = [{"data": json.loads(text), "priority": priority, "delay": args.delay} for text in texts]
    except ValueError as exc:
        print(f"katar_http put: the data is not JSON ({exc}); text is JSON with quotes: put URL QUEUE '\"hello\"'",
              file=sys.stderr)
        return 2
    if args.key:
        if len(tasks) != 1:
            print("katar_http put: --key names one task", file=sys.stderr)
            return 2
        tasks[0]["key"] = args.key
    for start in range(0, len(tasks), 1000):
        for created in client.insert(args.queue, tasks[start:start + 1000]):
            print(created["_id"])
    return 0


def run_stats(clients: List[Client], args: argparse.Namespace) -> int:
    columns = ("queued", "in progress", "paused", "done", "failed", "cancelled")
    rows = [["queue", *columns, "waiting", "oldest queued"]]
    for stats in (stats for client in clients for stats in client.stats(args.queue)):
        age = stats["oldest_queued_age_ms"]
        rows.append([stats["queue"], *(str(stats["counts"][c]) for c in columns), str(stats["waiting_workers"]),
                     "-" if age is None else f"{age / 1000:.1f} s"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))).rstrip())
    return 0


def main(argv: Optional[List[str]] = None, environ: Optional[Dict[str, str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return run_tool(argv[0], argv[1:], dict(os.environ) if environ is None else environ)
    args = build_parser().parse_args(argv)
    try:
        access = load_access(args, dict(os.environ) if environ is None else environ)
        tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"katar_http: {exc}", file=sys.stderr)
        return 2
    if access.open and not is_loopback(args.host) and not args.insecure:
        print(f"katar_http: refusing to listen on {args.host or 'every address'} without a token: anyone who can "
              f"reach it could read, change and delete every task. Give a token (--token, --token-file or "
              f"KATAR_TOKEN; --worker-token for workers), or --insecure if the network is yours alone.",
              file=sys.stderr)
        return 2
    limits = Limits(max_body=args.max_body, max_tasks=args.max_tasks, max_data=args.max_data,
                    max_depth=args.max_depth, max_wait=args.max_wait, max_headers=args.max_headers,
                    max_head_bytes=args.max_head_bytes, idle_timeout=args.idle_timeout,
                    request_timeout=args.request_timeout, first_request_timeout=args.first_request_timeout,
                    max_connections=args.max_connections)
    if args.standby and not args.journal:
        print("katar_http: --standby needs --journal FILE: the journal another server holds, to take over",
              file=sys.stderr)
        return 2
    standby = False
    try:
        broker = open_broker(args)
    except JournalLocked as exc:
        if not args.standby:
            print(f"katar_http: {exc}", file=sys.stderr)
            return 1
        standby, broker = True, Broker(max_memory=args.max_memory)  # (serves nothing until it takes over)
    except (JournalError, OSError) as exc:
        print(f"katar_http: {exc}", file=sys.stderr)
        return 1
    try:
        if not standby:
            load_queues(broker, args.config, args.queue)
    except (OSError, ValueError, KatarError) as exc:
        print(f"katar_http: {exc}", file=sys.stderr)
        broker.close()
        return 2
    try:
        server = KatarServer(broker, args.host, args.port, limits=limits, access=access, tls=tls,
                             quiet=args.quiet or args.log_level != "info", allow_origins=args.allow_origin,
                             allow_hosts=args.allow_host, standby=standby)
    except OSError as exc:
        print(f"katar_http: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        broker.close()
        return 1
    stop, outcome = threading.Event(), [0]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"katar_http {__version__} (up to {server.max_connections} connections at once; open files "
          f"{server.fd_limit}{'; a standby: waiting for the journal ' + args.journal if standby else ''}) "
          f"listening on {server.url}", file=sys.stderr, flush=True)
    for queue in broker.queues():
        print(f"  queue {queue.name}: {server.url}/v1/queue/{queue.name}", file=sys.stderr, flush=True)
    if standby:
        threading.Thread(target=stand_by, args=(server, args, stop, outcome), name="katar_http standby",
                         daemon=True).start()
    stop.wait()
    print("katar_http: stopping", file=sys.stderr, flush=True)
    server.close()
    return outcome[0]


def open_broker(args: argparse.Namespace) -> Broker:
    """The broker the command line asks for: journalled (replayed) or in memory. JournalLocked if another server
    holds the journal."""
    journal = None
    if args.journal:
        journal = Journal(args.journal, fsync=args.fsync, fsync_interval=args.fsync_interval / 1000.0,
                          repair=args.repair_journal)
    return Broker(journal=journal, max_memory=args.max_memory)


def stand_by(server: KatarServer, args: argparse.Namespace, stop: threading.Event, outcome: List[int]) -> None:
    """A standby's thread: wait until the journal's lock is free (the active server stopped, or was killed: the
    kernel lets its lock go), open and replay the journal, and have the server serve it. Should that fail (a
    damaged journal, a bad --config), the server stops, exit status 1 or 2."""
    while not stop.is_set():
        try:
            wait_for_lock(args.journal)
            freed = time.monotonic()
            broker = open_broker(args)
        except JournalLocked:
            continue  # another standby was quicker, or the active server compacted (its lock moved)
        except (JournalError, OSError) as exc:
            print(f"katar_http: cannot take over {args.journal}: {exc}", file=sys.stderr, flush=True)
            outcome[0] = 1
            stop.set()
            return
        try:
            load_queues(broker, args.config, args.queue)
        except (OSError, ValueError, KatarError) as exc:
            print(f"katar_http: {exc}", file=sys.stderr, flush=True)
            broker.close()
            outcome[0] = 2
            stop.set()
            return
        server.take_over(broker)
        print(f"katar_http: took over {args.journal} {(time.monotonic() - freed) * 1000:.0f} ms after it was "
              f"free ({sum(len(queue) for queue in broker.queues())} tasks); serving on {server.url}",
              file=sys.stderr, flush=True)
        return


if __name__ == "__main__":
    sys.exit(main())
