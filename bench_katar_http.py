#!/usr/bin/env python3
"""Benchmarks for katar_http, standard library only.

    python3 bench_katar_http.py            # the table, about a minute
    python3 bench_katar_http.py --quick    # a smoke run, about twenty seconds (with --connections for 500)
    python3 bench_katar_http.py --scale    # 1,000 against 1,000,000 queued tasks, memory per task, replay time
    python3 bench_katar_http.py --connections      # 10,000 parked long polls: memory each, delivery, a new worker
    python3 bench_katar_http.py --flow     # 100,000 groups; a rate-limited queue's CPU; a flood beside a served queue
    python3 bench_katar_http.py --fsync interval   # the journal rows with another durability
    python3 bench_katar_http.py --server FILE      # measure another katar_http.py (default: the one beside this)

It starts katar_http.py in a subprocess and, in the same run, a do-nothing baseline: a ThreadingHTTPServer whose
HTTP/1.1 handler reads the JSON body and answers a small JSON 200. Both are driven by separate client processes
over keep-alive connections, with the same request bodies, and every figure is printed with its ratio to the
baseline measured in this run (these machines are shared and noisy: absolute numbers travel badly, ratios less).

Workloads (P producers, C workers):
  W1   inserts, one task per request              W1b  inserts, 100 tasks per request
  W2   drain, one task per request, the report of the last task riding on the request for the next
  W3   drain, max 100 per request, the reports of the previous batch on the same request
  W4   long-poll latency: one worker parked with `wait` (the bench checks the stats' waiting_workers before each
       insert, so every sample is insert -> receipt by a parked worker), a task inserted every 20 ms; p50 and p99
       insert -> receipt, set against the baseline's p50 round trip of one small request on one keep-alive
       connection, measured in the same run with as many sequential requests as W4 has samples, one every 20 ms
       like W4's inserts (back to back, on processes that never sleep, it is about a third of that: printed too)
and W1, W2, W3 again with --journal (fsync always, group commit). Each drain starts from its own prefill (what
the insert rows left is purged first). The run ends with the project's bars (issue 12's) and whether this run met
each.

--connections (python3 bench_katar_http.py --connections; --connections-count N, default 10,000, --connections-wait
MS, default 30,000): katar_http in memory with --max-connections N + 1000; client processes (non-blocking sockets
and a selector, no thread per connection) open N keep-alive connections, each sending one long poll {"max": 1,
"wait": MS}, until the stats say N workers wait; the server's RSS (VmRSS) before and after gives its memory per
parked connection. Then producers insert N tasks (each task's data carries its insert time) as fast as they can, one
a request (--connections-batch N for more), and the clients time each 200: insert -> delivery p50, p99 and max, and
how many of the N were delivered; then a new worker connects and, after one more insert, polls with wait 0: it must
get that task. Bars: <= 10 KB of RSS per parked connection, p99 insert -> delivery <= 1 s, all N delivered, the new
worker served.

--flow (python3 bench_katar_http.py --flow; --scale runs it too): W2 drains a queue whose tasks are spread over
100,000 groups (--flow-groups) against the same queue without groups (bar: >= 0.8x); the server's CPU while four long
polls wait for the tokens of a rate-limited queue (rate 0.01/s), against the same server idle (bar: idle + 5 ms a
second); producers inserting into a queue that is full (max_queued 1000, no workers), beside as many producers of a
queue served as usual: that queue's insert rate against its rate alone (bar: >= 0.4x; the one loop is shared with
the flood, so half is a fair share).
"""

import argparse
import collections
import contextlib
import errno
import json
import multiprocessing
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
KATAR = os.path.join(HERE, "katar_http.py")  # the server measured, unless --server names another
QUEUE = "bench"
DATA = "x" * 60  # 60 bytes of task data, as the bars assume


# -- the baseline: the least an http.server can do per request ------------------------------------------------------

class NothingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # http.server writes headers and body in two sends: with Nagle's algorithm on, each response then waits for a
    # delayed ACK (~40 ms) and the baseline collapses to ~90 requests a second. A fair baseline turns it off.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        json.loads(self.rfile.read(length) or b"{}")
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


def run_baseline_server() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NothingHandler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


# -- servers under test ---------------------------------------------------------------------------------------------

class Server:
    """A server in a subprocess: katar_http (optionally with a journal) or the baseline."""

    def __init__(self, kind: str, journal: str = "", fsync: str = "always", program: str = KATAR,
                 max_connections: int = 1024, extra: tuple = ()) -> None:
        self.kind = kind
        if kind == "baseline":
            command = [sys.executable, os.path.abspath(__file__), "--baseline-server"]
        else:
            command = [sys.executable, program, "--port", "0", "--quiet",
                       "--queue", QUEUE, "--max-connections", str(max_connections)] + list(extra)
            if journal:
                command += ["--journal", journal, "--fsync", fsync]
        self.command = command
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kind == "baseline":
            self.port = int(self.process.stdout.readline())
        else:
            line = ""
            while "listening on" not in line:
                line = self.process.stderr.readline()
                if not line:
                    raise SystemExit("katar_http did not start: " + self.process.stderr.read())
            self.port = int(line.rsplit(":", 1)[1])
        self.ready_after = time.monotonic() - self.started
        # What the server writes from now on is read as it comes (its last lines kept): a full pipe would stall it.
        self.last_lines: "collections.deque[str]" = collections.deque(maxlen=20)
        self.readers = [threading.Thread(target=self._drain, args=(stream,), daemon=True)
                        for stream in (self.process.stdout, self.process.stderr)]
        for reader in self.readers:
            reader.start()

    def _drain(self, stream) -> None:
        for line in stream:
            self.last_lines.append(line.rstrip("\n"))

    def cpu_seconds(self) -> float:
        """User and system CPU the server process has used: a steadier measure than throughput on a busy machine."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for reader in self.readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


# -- clients: each runs in its own process --------------------------------------------------------------------------

class RawConnection:
    """A keep-alive client on a raw socket: a request is one send, an answer is read by its Content-Length. Lighter
    than http.client (which costs the client as much CPU as the server spends), so that on a machine of two cores
    the rows measure the server, not the clients: the issue that set the bars measured with such clients."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes = b"") -> tuple:
        self.socket.sendall(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(), len(body), body))
        while True:
            parsed = _parse_response(self.buffer)
            if parsed is not None:
                status, payload, self.buffer = parsed
                return status, payload
            chunk = self.socket.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk

    def close(self) -> None:
        self.socket.close()


def _connect(port: int) -> RawConnection:
    return RawConnection(port)


def _post(connection: RawConnection, path: str, body: bytes) -> tuple:
    return connection.request("POST", path, body)


def insert_client(port: int, per_request: int, seconds: float, start_at: float) -> int:
    """Insert tasks for `seconds`; returns how many."""
    body = json.dumps({"tasks": [{"data": DATA}] * per_request} if per_request > 1 else {"data": DATA}).encode()
    connection = _connect(port)
    while time.time() < start_at:
        time.sleep(0.001)
    done, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        status, _ = _post(connection, f"/v1/queue/{QUEUE}/tasks", body)
        if status not in (200, 201):
            raise SystemExit(f"insert answered {status}")
        done += per_request
    connection.close()
    return done


def drain_client(port: int, per_request: int, seconds: float, budget: int, start_at: float) -> int:
    """Lease `per_request` at a time, the reports of the previous batch riding along, until the queue is empty
    (katar_http), `budget` tasks were moved, or for `seconds` (the baseline, which has no queue)."""
    connection = _connect(port)
    while time.time() < start_at:
        time.sleep(0.001)
    reports, moved, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end and not (budget and moved >= budget):
        status, payload = _post(connection, f"/v1/queue/{QUEUE}",
                                json.dumps({"tasks": reports, "max": per_request}).encode())
        if status == 204:
            break
        tasks = json.loads(payload).get("tasks")
        if tasks is None:  # the baseline: pretend it handed out a full batch of the same shape
            tasks = [{"_id": "00000000-%d" % (moved + i), "data": DATA, "attempt": 1} for i in range(per_request)]
        reports = [{"_id": task["_id"], "status": "done"} for task in tasks]
        moved += len(tasks)
    if reports and budget:
        _post(connection, f"/v1/queue/{QUEUE}", json.dumps({"tasks": reports, "max": 0}).encode())
    connection.close()  # on a 204 the last reports were applied: they rode on that request
    return moved


def latency_client(port: int, count: int, start_at: float) -> list:
    """Long-poll with wait; each task's data is the wall time of its insert; returns receipt - insert (ms)."""
    connection = _connect(port)
    latencies, reports = [], []
    while len(latencies) < count:
        status, payload = _post(connection, f"/v1/queue/{QUEUE}",
                                json.dumps({"tasks": reports, "wait": 5000}).encode())
        received = time.time()
        reports = []
        if status == 200:
            for task in json.loads(payload)["tasks"]:
                latencies.append((received - task["data"]) * 1000.0)
                reports.append({"_id": task["_id"], "status": "done"})
    if reports:
        _post(connection, f"/v1/queue/{QUEUE}", json.dumps({"tasks": reports, "max": 0}).encode())
    return latencies


def roundtrip_client(port: int, count: int, gap: float, start_at: float) -> list:
    """`count` sequential requests on one keep-alive connection, `gap` seconds apart, each the body of W4's long
    poll; returns each round trip (ms), from the request's first byte sent to its response read."""
    connection = _connect(port)
    body = json.dumps({"tasks": [], "wait": 5000}).encode()
    _post(connection, f"/v1/queue/{QUEUE}", body)  # the connection's first request, not timed
    times = []
    for _ in range(count):
        began = time.perf_counter()
        _post(connection, f"/v1/queue/{QUEUE}", body)
        times.append((time.perf_counter() - began) * 1000.0)
        if gap:
            time.sleep(gap)
    connection.close()
    return times


def raise_fd_limit(need: int) -> str:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard one; a complaint if that leaves fewer than
    `need` descriptors, else ""."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    if soft != resource.RLIM_INFINITY and soft < need:
        return (f"the open-file limit (ulimit -n) is {soft}, hard limit {hard}: {need} are needed here; raise it "
                f"(as root: ulimit -n {need}) or ask for fewer --connections-count")
    return ""


def _parse_response(buffer: bytes) -> tuple:
    """One whole HTTP/1.1 response at the start of `buffer`: (status, body, the rest), or None if incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if status == 204 or status == 304 or 100 <= status < 200:
        return status, b"", buffer[start:]
    if "content-length" in headers:
        stop = start + int(headers["content-length"])
        return (status, buffer[start:stop], buffer[stop:]) if len(buffer) >= stop else None
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, at = b"", start
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(buffer[at:line_end].split(b";")[0], 16)
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)  # the end of any trailers
                if trailer_end < 0:
                    return None
                return status, body, buffer[trailer_end + 4:]
            if len(buffer) < line_end + 2 + size + 2:
                return None
            body += buffer[line_end + 2:line_end + 2 + size]
            at = line_end + 2 + size + 2
    raise ValueError(f"a {status} response with neither Content-Length nor chunked body")


class _Parked:
    """One of park_client's connections."""
    __slots__ = ("sock", "out", "buffer", "connected", "delivered", "attempts")

    def __init__(self) -> None:
        self.sock, self.out, self.buffer, self.connected, self.delivered, self.attempts = None, b"", b"", False, 0, 0


def park_client(port: int, count: int, wait: int, pipe) -> None:
    """Hold `count` keep-alive connections, each with one long poll {"max": 1, "wait": wait} in flight, on
    non-blocking sockets and one selector (no thread per connection); time each 200 as it arrives (its task's data
    carries its insert time); a 204 (the wait ran out) is answered with the same poll again. Talks to the bench
    through `pipe`: sends ("ready",), waits for "go"; sends ("results", {...}) once every connection has its task
    or when sent "report"; closes everything on "close"."""
    complaint = raise_fd_limit(count + 64)
    if complaint:
        pipe.send(("error", complaint))
        return
    body = json.dumps({"max": 1, "wait": wait}).encode()
    request = (f"POST /v1/queue/{QUEUE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    selector = selectors.DefaultSelector()
    selector.register(pipe.fileno(), selectors.EVENT_READ, None)
    pipe.send(("ready",))
    if pipe.recv() != "go":
        return
    began = time.time()
    figures = {"connected": 0, "sent": 0, "delivered": 0, "repolls": 0, "connect_errors": 0, "closed": 0,
               "other_statuses": {}, "all_sent_after": None, "latencies": [], "ids": []}
    backlog = collections.deque(_Parked() for _ in range(count))  # connections still to open
    connecting = 0
    in_flight = 64  # connects not yet completed: a gentle ramp, so the server's listen queue does not overflow

    def start_connect(parked: _Parked) -> None:
        nonlocal connecting
        parked.attempts += 1
        parked.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        parked.sock.setblocking(False)
        parked.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = parked.sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        selector.register(parked.sock, selectors.EVENT_WRITE, parked)
        connecting += 1

    def send(parked: _Parked) -> None:
        try:
            written = parked.sock.send(parked.out)
        except BlockingIOError:
            written = 0
        parked.out = parked.out[written:]
        selector.modify(parked.sock, selectors.EVENT_WRITE if parked.out else selectors.EVENT_READ, parked)

    def forget(parked: _Parked) -> None:
        selector.unregister(parked.sock)
        parked.sock.close()

    def report() -> None:
        pipe.send(("results", figures))

    reported = closing = False
    while not closing:
        while backlog and connecting < in_flight:
            start_connect(backlog.popleft())
        for key, mask in selector.select(0.5):
            parked = key.data
            if parked is None:
                message = pipe.recv()
                if message == "report" and not reported:
                    report()
                    reported = True
                closing = closing or message == "close"
                continue
            if not parked.connected:
                connecting -= 1
                error = parked.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    figures["connect_errors"] += 1
                    forget(parked)
                    if parked.attempts < 5:
                        backlog.append(parked)
                    continue
                parked.connected = True
                figures["connected"] += 1
                parked.out = request
                figures["sent"] += 1
                if figures["sent"] == count:
                    figures["all_sent_after"] = time.time() - began
                send(parked)
                continue
            if mask & selectors.EVENT_WRITE:
                send(parked)
                continue
            try:
                data = parked.sock.recv(65536)
            except ConnectionError:
                data = b""
            arrived = time.time()
            if not data:
                figures["closed"] += 1
                forget(parked)
                continue
            parked.buffer += data
            while True:
                parsed = _parse_response(parked.buffer)
                if parsed is None:
                    break
                status, payload, parked.buffer = parsed
                if status == 200:
                    tasks = json.loads(payload)["tasks"]
                    for task in tasks:
                        figures["latencies"].append((arrived - task["data"]["t"]) * 1000.0)
                        figures["ids"].append(task["data"]["n"])
                    parked.delivered += len(tasks)
                    figures["delivered"] += len(tasks)
                elif status == 204:
                    figures["repolls"] += 1
                    parked.out = request
                    send(parked)
                else:
                    figures["other_statuses"][status] = figures["other_statuses"].get(status, 0) + 1
        if figures["delivered"] >= count and not reported:
            report()
            reported = True
    for key in list(selector.get_map().values()):
        if key.data is not None:
            key.data.sock.close()
    selector.close()


def connections_producer(port: int, first: int, last: int, batch: int, start_at: float) -> tuple:
    """Insert tasks first .. last - 1, `batch` to a request, as fast as one connection goes; each task's data is
    {"n": its number, "t": the wall time its request was sent}. Returns (how many, the wall time it finished)."""
    connection = _connect(port)
    while time.time() < start_at:
        time.sleep(0.001)
    for low in range(first, last, batch):
        now = time.time()
        tasks = [{"data": {"n": n, "t": now}} for n in range(low, min(last, low + batch))]
        status, payload = _post(connection, f"/v1/queue/{QUEUE}/tasks",
                                json.dumps({"tasks": tasks} if len(tasks) > 1 else tasks[0]).encode())
        if status != 201:
            raise SystemExit(f"insert answered {status}: {payload[:200]!r}")
    connection.close()
    return last - first, time.time()


# -- measurements ---------------------------------------------------------------------------------------------------

def run_clients(pool, function, argument_lists: list) -> tuple:
    """Start every client at the same instant; returns (sum of their results, wall seconds)."""
    start_at = time.time() + 0.3
    results = pool.starmap_async(function, [tuple(arguments) + (start_at,) for arguments in argument_lists])
    values = results.get(600)
    return sum(values), time.time() - start_at


def prefill(port: int, count: int, groups: int = 0, queue: str = QUEUE) -> None:
    """Insert `count` tasks, 1000 a request; with `groups`, task n in group n % groups."""
    connection = _connect(port)
    for first in range(0, count, 1000):
        tasks = [dict({"data": DATA}, **({"group": "g%d" % (n % groups)} if groups else {}))
                 for n in range(first, min(count, first + 1000))]
        status, _ = _post(connection, f"/v1/queue/{queue}/tasks", json.dumps({"tasks": tasks}).encode())
        if status != 201:
            raise SystemExit(f"prefill answered {status}")
    connection.close()


def purge(port: int) -> None:
    connection = _connect(port)
    status, _ = connection.request("DELETE", f"/v1/queue/{QUEUE}/tasks?status=queued")
    connection.close()
    if status != 200:
        raise SystemExit(f"purge answered {status}")


def measure(pool, server: Server, row: str, options: argparse.Namespace) -> tuple:
    """Tasks a second of one workload against one server, and the server's CPU microseconds per task."""
    seconds = options.seconds
    if row in ("W2", "W3") and server.kind != "baseline":
        purge(server.port)  # what the insert rows left behind: each drain starts from its own prefill alone
        prefill(server.port, options.tasks * (1 if row == "W2" else 10))
    cpu = server.cpu_seconds()
    if row == "W1":
        moved, wall = run_clients(pool, insert_client, [(server.port, 1, seconds)] * options.producers)
    elif row == "W1b":
        moved, wall = run_clients(pool, insert_client, [(server.port, 100, seconds)] * options.producers)
    else:
        per_request = 1 if row == "W2" else 100
        moved, wall = run_clients(pool, drain_client, [(server.port, per_request, 600 if server.kind != "baseline"
                                                         else seconds, 0)] * options.workers)
    return moved / wall, (server.cpu_seconds() - cpu) * 1e6 / moved


def waiting_workers(connection: RawConnection) -> int:
    status, payload = connection.request("GET", f"/v1/queue/{QUEUE}/stats")
    if status != 200:
        raise SystemExit(f"stats answered {status}: {payload[:200]!r}")
    return json.loads(payload)["waiting_workers"]


def measure_latency(pool, server: Server, count: int) -> tuple:
    """W4: before each insert the stats must show the worker parked (so each sample is insert -> receipt by a
    waiting long poll, never a poll that arrives after the task); returns p50, p99 (ms) and how many inserts had
    to wait for the worker to park again."""
    waiting = pool.apply_async(latency_client, (server.port, count, 0.0))
    connection, stats = _connect(server.port), _connect(server.port)
    late = 0
    for _ in range(count):
        deadline = time.monotonic() + 30
        first = True
        while waiting_workers(stats) < 1:
            if time.monotonic() > deadline or waiting.ready():
                waiting.get(1)  # the worker's own error, if it failed
                raise SystemExit("W4: the worker did not park within 30 s")
            late += first
            first = False
            time.sleep(0.001)
        _post(connection, f"/v1/queue/{QUEUE}/tasks", json.dumps({"data": time.time()}).encode())
        time.sleep(0.02)
    latencies = sorted(waiting.get(120))
    connection.close()
    stats.close()
    return statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], late


def measure_roundtrip(pool, server: Server, count: int) -> tuple:
    """The p50 round trip (ms) of one small request on one keep-alive connection: paced one every 20 ms like W4's
    inserts (the figure W4 is held to: on a machine woken from idle every 20 ms, as W4's processes are, a round trip
    takes about three times what it takes back to back), and back to back."""
    paced = pool.apply_async(roundtrip_client, (server.port, count, 0.02, 0.0)).get(120)
    hot = pool.apply_async(roundtrip_client, (server.port, count, 0.0, 0.0)).get(120)
    return statistics.median(paced), statistics.median(hot)


def table(options: argparse.Namespace) -> None:
    context = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp(prefix="katar-bench-")
    rows = []
    with context.Pool(max(options.producers, options.workers) + 1) as pool:
        # All three servers run side by side (an idle one costs nothing) and each row is measured against the
        # baseline, in memory and with the journal back to back: on a shared machine the load drifts over a
        # minute, and a ratio is only fair between measurements taken seconds apart.
        baseline, memory = Server("baseline"), Server("katar", program=options.server)
        durable = Server("katar", journal=os.path.join(directory, "bench.journal"), fsync=options.fsync,
                         program=options.server)
        for row in ("W1", "W1b", "W2", "W3"):
            base = measure(pool, baseline, row, options)
            rows.append((row, "memory") + measure(pool, memory, row, options) + (base, memory.rss_mib()))
            if row != "W1b":
                rows.append((row, "journal") + measure(pool, durable, row, options) + (base, durable.rss_mib()))
        base_trip, base_hot = measure_roundtrip(pool, baseline, options.latency_samples)
        p50, p99, late = measure_latency(pool, memory, options.latency_samples)
        for server in (baseline, memory, durable):
            server.stop()
    shutil.rmtree(directory, ignore_errors=True)
    rates = {(row, mode): rate for row, mode, rate, _, _, _ in rows}
    base_rates = {row: base_rate for row, _, _, _, (base_rate, _), _ in rows}
    print(f"\nkatar_http benchmark, {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
          f"{options.producers} producers, {options.workers} workers, {options.seconds:g} s per timed row, "
          f"journal with --fsync {options.fsync}")
    print(f"{'row':5} {'server':8} {'tasks/s':>9} {'baseline':>9} {'x baseline':>10} {'x memory':>8} "
          f"{'CPU us/task':>11} {'baseline':>8} {'x':>5} {'RSS MiB':>7}")
    for row, mode, (rate, cpu), (base_rate, base_cpu), rss in ((r[0], r[1], r[2:4], r[4], r[5]) for r in rows):
        versus_memory = f"{rate / rates[row, 'memory']:.2f}" if mode == "journal" else ""
        print(f"{row:5} {mode:8} {rate:9.0f} {base_rate:9.0f} {rate / base_rate:10.2f} {versus_memory:>8} "
              f"{cpu:11.1f} {base_cpu:8.1f} {cpu / base_cpu:5.2f} {rss:7.1f}")
    print("CPU us/task: the server process's own CPU time per task moved (x: against the baseline's); "
          "steadier than tasks/s on a shared machine")
    print(f"W4    memory   long-poll latency insert -> receipt: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({options.latency_samples} tasks, one every 20 ms, each to a parked worker"
          + (f"; {late} waited for it to park again)" if late else ")"))
    print(f"W4    baseline round trip of one small request on one keep-alive connection: p50 {base_trip:.2f} ms "
          f"({options.latency_samples} requests, one every 20 ms like W4's inserts; back to back {base_hot:.2f} ms)")
    print("baseline: ThreadingHTTPServer, HTTP/1.1 keep-alive, reads the JSON body, answers a small JSON 200")
    memory_rate = {row: rates[row, "memory"] for row in ("W1", "W2", "W3")}
    journal_rate = {row: rates[row, "journal"] for row in ("W1", "W2", "W3")}
    print_bars([
        ("W1 memory, x baseline", memory_rate["W1"] / base_rates["W1"], ">=", 2.0),
        ("W2 memory, x baseline", memory_rate["W2"] / base_rates["W2"], ">=", 2.0),
        ("W3 memory, x baseline", memory_rate["W3"] / base_rates["W3"], ">=", 0.6),
        ("W1 journal, x baseline", journal_rate["W1"] / base_rates["W1"], ">=", 1.5),
        ("W1 journal, x memory", journal_rate["W1"] / memory_rate["W1"], ">=", 0.75),
        ("W2 journal, x baseline", journal_rate["W2"] / base_rates["W2"], ">=", 1.5),
        ("W2 journal, x memory", journal_rate["W2"] / memory_rate["W2"], ">=", 0.75),
        ("W3 journal, x memory", journal_rate["W3"] / memory_rate["W3"], ">=", 0.85),
        ("W4 p50 ms, <= baseline round trip", p50, "<=", round(base_trip, 3)),
        ("W4 p99 ms", p99, "<=", 3.0),
    ])
    print("command: python3 " + " ".join([os.path.basename(__file__)] + sys.argv[1:]))


def print_bars(bars: list) -> None:
    """The bars the project set itself (issue 12's for the table and --connections, issue 5's for --scale), each
    with what this run measured."""
    print("bars:")
    for name, value, sense, bar in bars:
        holds = value >= bar if sense == ">=" else value <= bar
        print(f"  {name:34} {value:8.2f}  {sense} {bar:<6g} {'holds' if holds else 'MISSES'}")


def scale(options: argparse.Namespace) -> None:
    """Lease-and-ack cost with 1,000 against 1,000,000 queued, memory per queued task, replay time."""
    context = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp(prefix="katar-bench-")
    big = options.scale_tasks
    drained = options.tasks
    results = {}
    with context.Pool(options.workers + 1) as pool:
        for queued in (1000, big):
            server = Server("katar", program=options.server)
            before = server.rss_mib()
            prefill(server.port, queued + drained)
            grown = server.rss_mib()
            budget = drained // options.workers
            moved, wall = run_clients(pool, drain_client, [(server.port, 1, 600, budget)] * options.workers)
            results[queued] = (moved / wall, (grown - before) * 1024 * 1024 / (queued + drained))
            server.stop()
    journal = os.path.join(directory, "scale.journal")
    writer = Server("katar", journal=journal, program=options.server)
    prefill(writer.port, big)
    writer.stop()
    size = os.path.getsize(journal)
    replay = Server("katar", journal=journal, program=options.server)
    replay_seconds = replay.ready_after
    replay.stop()
    bare = Server("katar", program=options.server)
    startup = bare.ready_after
    bare.stop()
    shutil.rmtree(directory, ignore_errors=True)
    small_rate, _ = results[1000]
    big_rate, per_task = results[big]
    print(f"\nkatar_http --scale, {os.cpu_count()} cores, Python {sys.version.split()[0]}; {options.workers} workers")
    print(f"W2 with {1000:>9,} queued: {small_rate:8.0f} tasks/s")
    print(f"W2 with {big:>9,} queued: {big_rate:8.0f} tasks/s  ({big_rate / small_rate:.2f}x the small queue)")
    print(f"RSS per queued task ({len(DATA)}-byte data): {per_task:.0f} bytes")
    print(f"replay of a {big:,}-task journal ({size / 1e6:.0f} MB): {replay_seconds - startup:.1f} s "
          f"(start with it {replay_seconds:.1f} s, without {startup:.1f} s)")
    print_bars([
        (f"W2 {big:,} queued, x {1000:,} queued", big_rate / small_rate, ">=", 0.8),
        ("RSS bytes per queued task", per_task, "<=", 500),
        (f"replay s, {big:,} tasks", replay_seconds - startup, "<=", 10),
    ])
    print("command: python3 " + " ".join([os.path.basename(__file__)] + sys.argv[1:]))
    flow(options)  # and the rows of flow control at scale: 100,000 groups, a waiting rate-limited queue


def first_2xx(port: int, path: str, timeout: float = 300.0) -> float:
    """GET `path` again and again until it answers 2xx; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                if 200 <= response.status < 300:
                    return time.monotonic()
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.002)
    raise SystemExit(f"no 2xx from {path} within {timeout} s")


def takeover(options: argparse.Namespace) -> None:
    """The time from kill -9 of the active server to the first 2xx of its standby, journals of N tasks."""
    directory = tempfile.mkdtemp(prefix="katar-bench-")
    rows = []
    for count in options.takeover_tasks:
        journal = os.path.join(directory, f"takeover-{count}.journal")
        active = Server("katar", journal=journal, program=options.server)
        prefill(active.port, count)
        standby = Server("katar", journal=journal, program=options.server, extra=("--standby",))
        size = os.path.getsize(journal)
        killed = time.monotonic()
        active.process.kill()
        served = first_2xx(standby.port, f"/v1/queue/{QUEUE}/stats")
        rows.append((count, size, served - killed))
        active.process.wait()
        standby.stop()
        os.remove(journal)
    shutil.rmtree(directory, ignore_errors=True)
    print(f"\nkatar_http --takeover, {os.cpu_count()} cores, Python {sys.version.split()[0]}: kill -9 of the active "
          f"server to the first 2xx of its standby (GET /v1/queue/{QUEUE}/stats)")
    for count, size, seconds in rows:
        print(f"{count:>9,} tasks ({size / 1e6:6.1f} MB journal): {seconds * 1000:8.0f} ms")
    print_bars([(f"takeover s, {count:,} tasks", seconds, "<=", 2) for count, _, seconds in rows if count == 100000])
    print("command: python3 " + " ".join([os.path.basename(__file__)] + sys.argv[1:]))


def set_queue(port: int, queue: str, options: dict) -> None:
    connection = _connect(port)
    status, payload = connection.request("PUT", f"/v1/queue/{queue}", json.dumps(options).encode())
    connection.close()
    if status not in (200, 201):
        raise SystemExit(f"PUT /v1/queue/{queue} answered {status}: {payload!r}")


def flood_client(port: int, seconds: float, start_at: float) -> tuple:
    """Insert into the queue `flood` (full) as fast as the server answers; returns (answered 201, answered 503)."""
    connection = _connect(port)
    body = json.dumps({"data": DATA}).encode()
    while time.time() < start_at:
        time.sleep(0.001)
    accepted = refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, _ = _post(connection, "/v1/queue/flood/tasks", body)
        accepted, refused = accepted + (status == 201), refused + (status == 503)
    connection.close()
    return accepted, refused


def parked_poll(port: int, wait: int) -> int:
    """One long poll of `wait` ms (it waits for a token of the rate limit); returns its status."""
    connection = _connect(port)
    status, _ = _post(connection, f"/v1/queue/{QUEUE}", json.dumps({"max": 1, "wait": wait}).encode())
    connection.close()
    return status


def flow(options: argparse.Namespace) -> None:
    """--flow (issue 14): leasing with 100,000 groups against none; the CPU a rate-limited queue costs while
    long polls wait for its tokens; a queue flooded past its max_queued beside one served as usual."""
    context = multiprocessing.get_context("spawn")
    groups, drained, rows = options.flow_groups, options.flow_tasks, []
    with context.Pool(max(options.workers, options.producers) * 2 + 2) as pool:
        rates, cpu = {}, {}
        for count in (0, groups):
            server = Server("katar", program=options.server)
            prefill(server.port, groups + drained, groups=count)  # the same queue, grouped or not
            before = server.cpu_seconds()
            moved, wall = run_clients(pool, drain_client, [(server.port, 1, 600, drained // options.workers)]
                                      * options.workers)
            rates[count], cpu[count] = moved / wall, (server.cpu_seconds() - before) / max(moved, 1) * 1e6
            server.stop()
        rows.append((f"W2 with {groups:,} groups, x without groups", rates[groups] / rates[0], ">=", 0.8))
        print(f"W2 without groups {rates[0]:.0f} tasks/s ({cpu[0]:.0f} us of server CPU a task), with {groups:,} "
              f"groups {rates[groups]:.0f} tasks/s ({cpu[groups]:.0f} us a task: {cpu[0] / cpu[groups]:.2f}x "
              f"the rate the CPU allows)")
        # A rate-limited queue whose long polls wait for tokens, against the same server idle.
        server = Server("katar", program=options.server)
        idle_before = server.cpu_seconds()
        time.sleep(options.seconds)
        idle = (server.cpu_seconds() - idle_before) / options.seconds
        set_queue(server.port, QUEUE, {"rate": 0.01, "burst": 1})
        prefill(server.port, 100)
        parked = [pool.apply_async(parked_poll, (server.port, 30000)) for _ in range(4)]
        time.sleep(1.0)  # one task leased at once (the burst), then the polls wait for the next token, 100 s away
        before = server.cpu_seconds()
        time.sleep(options.seconds)
        waiting = (server.cpu_seconds() - before) / options.seconds
        server.stop()
        for result in parked:
            with contextlib.suppress(Exception):
                result.get(1)
        print(f"server CPU: idle {idle * 1000:.1f} ms/s; rate-limited queue with 4 long polls waiting for "
              f"tokens {waiting * 1000:.1f} ms/s")
        rows.append(("CPU ms/s while polls wait for tokens, idle + 5", waiting * 1000, "<=", idle * 1000 + 5))
        # A served queue alone, then beside a queue flooded past its max_queued.
        seen = {}
        for flooded in (False, True):
            server = Server("katar", program=options.server)
            set_queue(server.port, "flood", {"max_queued": 1000})
            start_at = time.time() + 0.3
            floods = [pool.apply_async(flood_client, (server.port, options.seconds, start_at))
                      for _ in range(options.producers if flooded else 0)]
            inserted, wall = run_clients(pool, insert_client, [(server.port, 1, options.seconds)] * options.producers)
            seen[flooded] = inserted / wall
            answered = [result.get(60) for result in floods]
            server.stop()
            if flooded:
                print(f"flood: {sum(a for a, _ in answered):,} inserts accepted and "
                      f"{sum(r for _, r in answered):,} refused (503) into a queue of max_queued 1000")
        print(f"inserts into the served queue: alone {seen[False]:.0f}/s, beside the flood {seen[True]:.0f}/s")
        # The server's one loop serves the flood's requests too: as many flood producers as served ones leave the
        # served queue half the loop at best. What must not happen is worse: the flood crowding it out.
        rows.append(("served queue's inserts beside a flood, x alone (fair share 0.5)", seen[True] / seen[False],
                     ">=", 0.4))
    print_bars(rows)
    print("command: python3 " + " ".join([os.path.basename(__file__)] + sys.argv[1:]))


def connections(options: argparse.Namespace) -> None:
    """--connections: `count` long polls parked on as many keep-alive connections; the server's RSS per parked
    connection; insert -> delivery when `count` tasks are inserted as fast as producers can; a new worker served."""
    count, wait, clients = options.connections_count, options.connections_wait, options.connections_clients
    complaint = raise_fd_limit(count + 256)  # the server inherits this limit: it holds every connection too
    if complaint:
        raise SystemExit("--connections: " + complaint)
    context = multiprocessing.get_context("spawn")
    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    with context.Pool(options.producers) as pool:
        server = Server("katar", program=options.server, max_connections=count + 1000,
                        extra=("--max-wait", str(max(wait, 30000))))
        processes, pipes = [], []
        try:
            control = _connect(server.port)  # stats and the extra insert, on one keep-alive connection
            # Warm up what the first requests allocate, so that the RSS before is the server's idle size.
            _post(control, f"/v1/queue/{QUEUE}/tasks", json.dumps({"data": DATA}).encode())
            _, leased = _post(control, f"/v1/queue/{QUEUE}", json.dumps({"max": 1}).encode())
            done = [{"_id": task["_id"], "status": "done"} for task in json.loads(leased)["tasks"]]
            _post(control, f"/v1/queue/{QUEUE}", json.dumps({"tasks": done, "max": 0}).encode())
            waiting_workers(control)
            pool.starmap(time.sleep, [(0.0,)] * options.producers)  # the producers' processes are up
            for share in shares:
                mine, theirs = context.Pipe()
                process = context.Process(target=park_client, args=(server.port, share, wait, theirs), daemon=True)
                process.start()
                processes.append(process)
                pipes.append(mine)
            for pipe in pipes:
                message = pipe.recv() if pipe.poll(60) else ("error", "a client did not start within 60 s")
                if message[0] != "ready":
                    raise SystemExit("--connections: " + message[1])
            time.sleep(0.5)
            rss_before = server.rss_mib()
            began = time.monotonic()
            for pipe in pipes:
                pipe.send("go")
            parked, deadline = 0, began + options.connections_timeout
            while True:
                parked = waiting_workers(control)
                if parked >= count:
                    break
                for pipe in pipes:
                    if pipe.poll() and pipe.recv()[0] == "error":
                        raise SystemExit("--connections: a client failed")
                if time.monotonic() > deadline or not all(process.is_alive() for process in processes):
                    seen = _collect(pipes, 10)
                    raise SystemExit(
                        f"--connections: only {parked} of {count} long polls were parked (stats' waiting_workers) "
                        f"after {time.monotonic() - began:.1f} s; the clients connected "
                        f"{sum(f['connected'] for f in seen)}, sent {sum(f['sent'] for f in seen)}, saw "
                        f"{sum(f['connect_errors'] for f in seen)} failed connects, "
                        f"{sum(f['closed'] for f in seen)} connections closed by the server and these other "
                        f"statuses: {_merge(f['other_statuses'] for f in seen) or 'none'}; the server's last words: "
                        f"{' | '.join(server.last_lines) or 'none'}")
                time.sleep(0.2)
            park_seconds = time.monotonic() - began
            time.sleep(0.5)
            rss_after = server.rss_mib()
            # The inserts: producers share the task numbers; the clients time each 200 as it arrives.
            step = -(-count // options.producers)
            ranges = [(server.port, low, min(count, low + step), options.connections_batch)
                      for low in range(0, count, step)]
            start_at = time.time() + 0.3
            finished = pool.starmap_async(connections_producer, [r + (start_at,) for r in ranges]).get(600)
            insert_seconds = max(end for _, end in finished) - start_at
            seen = _collect(pipes, options.connections_wait / 1000.0 + 10, wait_for_all=True)
            # A new worker, with every parked connection still open: one more task, then a poll with wait 0.
            still_waiting = waiting_workers(control)
            _post(control, f"/v1/queue/{QUEUE}/tasks", json.dumps({"data": {"n": "extra", "t": time.time()}}).encode())
            trip_began = time.perf_counter()
            try:
                newcomer = _connect(server.port)
                status, payload = _post(newcomer, f"/v1/queue/{QUEUE}", json.dumps({"max": 1, "wait": 0}).encode())
                newcomer.close()
            except OSError as exc:
                status, payload = 0, str(exc).encode()
            trip_ms = (time.perf_counter() - trip_began) * 1000.0
            got = [task["data"] for task in json.loads(payload)["tasks"]] if status == 200 else []
            served = len(got) == 1 and isinstance(got[0], dict) and got[0].get("n") == "extra"
            rss_end = server.rss_mib()
            control.close()
        finally:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("close")
            for process in processes:
                process.join(10)
                if process.is_alive():
                    process.kill()
            server.stop()
    latencies = sorted(latency for figures in seen for latency in figures["latencies"])
    ids = [n for figures in seen for n in figures["ids"]]
    delivered, duplicates = len(set(ids)), len(ids) - len(set(ids))
    per_connection_kb = (rss_after - rss_before) * 1024.0 / count
    p50 = statistics.median(latencies) if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
    worst = latencies[-1] if latencies else float("nan")
    repolls = sum(figures["repolls"] for figures in seen)
    others = _merge(figures["other_statuses"] for figures in seen)
    sent_after = max((f["all_sent_after"] for f in seen if f["all_sent_after"] is not None), default=float("nan"))
    print(f"\nkatar_http --connections, {os.cpu_count()} cores, Python {sys.version.split()[0]}; {count:,} keep-alive "
          f"connections from {clients} client process{'es' if clients > 1 else ''} (one selector each), each one long "
          f"poll with wait {wait} ms; {options.producers} producers, {options.connections_batch} task"
          f"{'s' if options.connections_batch > 1 else ''} a request")
    closed = sum(figures["closed"] for figures in seen)
    for label, text in (
            (f"parked all {count:,}", f"{park_seconds:.2f} s (every poll sent after {sent_after:.2f} s; the stats "
                                      f"polled every 0.2 s)"),
            ("server RSS", f"{rss_before:.1f} MiB idle, {rss_after:.1f} MiB with them parked: {per_connection_kb:.1f} "
                           f"KB a parked connection ({rss_end:.1f} MiB at the end)"),
            (f"inserted {count:,} tasks", f"in {insert_seconds:.2f} s ({count / insert_seconds:.0f} tasks/s)"),
            ("insert -> delivery", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms"),
            ("delivered", f"{delivered:,} of {count:,}" + (f", {duplicates} twice" if duplicates else "")
             + f"; {repolls} polls ran out and were sent again" + (f"; other statuses {others}" if others else "")
             + (f"; {closed} connections closed by the server" if closed else "")
             + (f"; {still_waiting} workers still waiting" if still_waiting else "")),
            ("a new worker is served", f"{'yes' if served else f'no ({status})'}, connect and poll {trip_ms:.2f} ms")):
        print(f"  {label + ':':28} {text}")
    print_bars([
        ("RSS KB per parked connection", per_connection_kb, "<=", 10),
        ("insert -> delivery p99 ms", p99, "<=", 1000),
        (f"tasks delivered of {count:,}", delivered, ">=", count),
        ("a new worker served (1 = yes)", 1.0 if served else 0.0, ">=", 1),
    ])
    print("command: python3 " + " ".join([os.path.basename(__file__)] + sys.argv[1:]))


def _collect(pipes: list, timeout: float, wait_for_all: bool = False) -> list:
    """Each client's figures: sent when it has all its tasks, or now that it is asked (after `timeout`, if
    `wait_for_all`)."""
    deadline = time.monotonic() + (timeout if wait_for_all else 0)
    figures = []
    for pipe in pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            pipe.send("report")
        message = ("error",)
        while message[0] != "results" and pipe.poll(timeout):
            message = pipe.recv()
        if message[0] != "results":
            raise SystemExit("--connections: a client did not report its figures")
        figures.append(message[1])
    return figures


def _merge(counters) -> dict:
    merged: dict = {}
    for counter in counters:
        for key, value in counter.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmarks for katar_http against a do-nothing http.server.")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of about twenty seconds (the table, then --connections with 500)")
    parser.add_argument("--scale", action="store_true", help="1,000 against 1,000,000 queued; memory; replay")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each timed row (default 4)")
    parser.add_argument("--producers", type=int, default=4, help="producer processes (default 4)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--tasks", type=int, default=20000, help="tasks W2 drains; W3 drains ten times as many")
    parser.add_argument("--fsync", choices=("always", "interval", "never"), default="always",
                        help="the journal rows' --fsync (default always, the server's default)")
    parser.add_argument("--latency-samples", type=int, default=250, help="tasks timed in W4 (default 250)")
    parser.add_argument("--scale-tasks", type=int, default=1000000, help="the large queue of --scale")
    parser.add_argument("--server", default=KATAR, metavar="FILE",
                        help="the katar_http.py to measure (default: the one beside this file)")
    parser.add_argument("--connections", action="store_true",
                        help="many parked long polls: RSS per connection, insert -> delivery, a new worker served")
    parser.add_argument("--connections-count", type=int, default=None, metavar="N",
                        help="connections of --connections (default 10000; 500 with --quick)")
    parser.add_argument("--connections-wait", type=int, default=30000, metavar="MS",
                        help="the wait of their long polls (default 30000)")
    parser.add_argument("--connections-clients", type=int, default=2, metavar="N",
                        help="client processes holding them (default 2)")
    parser.add_argument("--connections-batch", type=int, default=1, metavar="N",
                        help="tasks per insert request in --connections (default 1)")
    parser.add_argument("--connections-timeout", type=float, default=120.0, metavar="S",
                        help="how long parking them all may take before --connections gives up (default 120)")
    parser.add_argument("--flow", action="store_true",
                        help="flow control: 100,000 groups; a rate-limited queue's idle CPU; a flooded queue beside "
                             "a served one")
    parser.add_argument("--flow-groups", type=int, default=100000, metavar="N", help="groups of --flow")
    parser.add_argument("--flow-tasks", type=int, default=50000, metavar="N",
                        help="tasks the --flow drains time, grouped and not (default 50000)")
    parser.add_argument("--takeover", action="store_true",
                        help="kill -9 of an active server to its standby's first 2xx, for journals of N tasks")
    parser.add_argument("--takeover-tasks", type=lambda text: [int(n) for n in text.split(",")],
                        default=[1000, 100000, 1000000], metavar="N,N,...",
                        help="the journals of --takeover (default 1000,100000,1000000)")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.server = os.path.abspath(options.server)
    if options.connections_count is None:
        options.connections_count = 500 if options.quick else 10000
    if options.baseline_server:
        run_baseline_server()
    elif options.takeover:
        takeover(options)
    elif options.connections:
        connections(options)
    elif options.flow:
        flow(options)
    elif options.scale:
        if options.quick:
            options.scale_tasks, options.tasks = 100000, 5000
        scale(options)
    else:
        if options.quick:
            options.seconds, options.tasks, options.latency_samples = 1.0, 3000, 50
        table(options)
        if options.quick:  # the --connections path too, with a few hundred connections
            connections(options)


if __name__ == "__main__":
    main()
