#!/usr/bin/env python3
"""Benchmarks for katar_http, standard library only.

    python3 bench_katar_http.py            # the table, about a minute
    python3 bench_katar_http.py --quick    # a smoke run, about fifteen seconds
    python3 bench_katar_http.py --scale    # 1,000 against 1,000,000 queued tasks, memory per task, replay time
    python3 bench_katar_http.py --fsync interval   # the journal rows with another durability

It starts katar_http.py in a subprocess and, in the same run, a do-nothing baseline: a ThreadingHTTPServer whose
HTTP/1.1 handler reads the JSON body and answers a small JSON 200. Both are driven by separate client processes
over keep-alive connections, with the same request bodies, and every figure is printed with its ratio to the
baseline measured in this run (these machines are shared and noisy: absolute numbers travel badly, ratios less).

Workloads (P producers, C workers):
  W1   inserts, one task per request              W1b  inserts, 100 tasks per request
  W2   drain, one task per request, the report of the last task riding on the request for the next
  W3   drain, max 100 per request, the reports of the previous batch on the same request
  W4   long-poll latency: a worker waiting with `wait`, a task inserted every 20 ms; p50 and p99 insert -> receipt
and W1, W2, W3 again with --journal (fsync always, group commit). Each drain starts from its own prefill (what
the insert rows left is purged first). The run ends with the project's bars and whether this run met each.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
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

    def __init__(self, kind: str, journal: str = "", fsync: str = "always") -> None:
        self.kind = kind
        if kind == "baseline":
            command = [sys.executable, os.path.abspath(__file__), "--baseline-server"]
        else:
            command = [sys.executable, os.path.join(HERE, "katar_http.py"), "--port", "0", "--quiet",
                       "--queue", QUEUE, "--max-connections", "1024"]
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
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


# -- clients: each runs in its own process --------------------------------------------------------------------------

def _connect(port: int) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.connect()
    return connection


def _post(connection: http.client.HTTPConnection, path: str, body: bytes) -> tuple:
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


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


# -- measurements ---------------------------------------------------------------------------------------------------

def run_clients(pool, function, argument_lists: list) -> tuple:
    """Start every client at the same instant; returns (sum of their results, wall seconds)."""
    start_at = time.time() + 0.3
    results = pool.starmap_async(function, [tuple(arguments) + (start_at,) for arguments in argument_lists])
    values = results.get(600)
    return sum(values), time.time() - start_at


def prefill(port: int, count: int) -> None:
    connection = _connect(port)
    body = json.dumps({"tasks": [{"data": DATA}] * 1000}).encode()
    for _ in range(count // 1000):
        status, _ = _post(connection, f"/v1/queue/{QUEUE}/tasks", body)
        if status != 201:
            raise SystemExit(f"prefill answered {status}")
    rest = count % 1000
    if rest:
        _post(connection, f"/v1/queue/{QUEUE}/tasks", json.dumps({"tasks": [{"data": DATA}] * rest}).encode())
    connection.close()


def purge(port: int) -> None:
    connection = _connect(port)
    connection.request("DELETE", f"/v1/queue/{QUEUE}/tasks?status=queued")
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status != 200:
        raise SystemExit(f"purge answered {response.status}")


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


def measure_latency(pool, server: Server, count: int) -> tuple:
    waiting = pool.apply_async(latency_client, (server.port, count, 0.0))
    time.sleep(0.3)
    connection = _connect(server.port)
    for _ in range(count):
        _post(connection, f"/v1/queue/{QUEUE}/tasks", json.dumps({"data": time.time()}).encode())
        time.sleep(0.02)
    latencies = sorted(waiting.get(120))
    connection.close()
    return statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def table(options: argparse.Namespace) -> None:
    context = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp(prefix="katar-bench-")
    rows = []
    with context.Pool(max(options.producers, options.workers) + 1) as pool:
        # All three servers run side by side (an idle one costs nothing) and each row is measured against the
        # baseline, in memory and with the journal back to back: on a shared machine the load drifts over a
        # minute, and a ratio is only fair between measurements taken seconds apart.
        baseline, memory = Server("baseline"), Server("katar")
        durable = Server("katar", journal=os.path.join(directory, "bench.journal"), fsync=options.fsync)
        for row in ("W1", "W1b", "W2", "W3"):
            base = measure(pool, baseline, row, options)
            rows.append((row, "memory") + measure(pool, memory, row, options) + (base, memory.rss_mib()))
            if row != "W1b":
                rows.append((row, "journal") + measure(pool, durable, row, options) + (base, durable.rss_mib()))
        p50, p99 = measure_latency(pool, memory, options.latency_samples)
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
          f"({options.latency_samples} tasks, one every 20 ms)")
    print("baseline: ThreadingHTTPServer, HTTP/1.1 keep-alive, reads the JSON body, answers a small JSON 200")
    print_bars([
        ("W2 memory, x baseline", rates["W2", "memory"] / base_rates["W2"], ">=", 1.0),
        ("W3 memory, x baseline", rates["W3", "memory"] / base_rates["W3"], ">=", 0.5),
        ("W1 journal, x memory", rates["W1", "journal"] / rates["W1", "memory"], ">=", 0.7),
        ("W2 journal, x memory", rates["W2", "journal"] / rates["W2", "memory"], ">=", 0.7),
        ("W3 journal, x memory", rates["W3", "journal"] / rates["W3", "memory"], ">=", 0.8),
        ("W4 p50 ms", p50, "<=", 2.0),
        ("W4 p99 ms", p99, "<=", 10.0),
    ])
    print("command: python3 " + " ".join([os.path.basename(__file__)] + sys.argv[1:]))


def print_bars(bars: list) -> None:
    """The bars the project set itself (issue 5), each with what this run measured."""
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
            server = Server("katar")
            before = server.rss_mib()
            prefill(server.port, queued + drained)
            grown = server.rss_mib()
            budget = drained // options.workers
            moved, wall = run_clients(pool, drain_client, [(server.port, 1, 600, budget)] * options.workers)
            results[queued] = (moved / wall, (grown - before) * 1024 * 1024 / (queued + drained))
            server.stop()
    journal = os.path.join(directory, "scale.journal")
    writer = Server("katar", journal=journal)
    prefill(writer.port, big)
    writer.stop()
    size = os.path.getsize(journal)
    replay = Server("katar", journal=journal)
    replay_seconds = replay.ready_after
    replay.stop()
    bare = Server("katar")
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmarks for katar_http against a do-nothing http.server.")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about ten seconds")
    parser.add_argument("--scale", action="store_true", help="1,000 against 1,000,000 queued; memory; replay")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each timed row (default 4)")
    parser.add_argument("--producers", type=int, default=4, help="producer processes (default 4)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--tasks", type=int, default=20000, help="tasks W2 drains; W3 drains ten times as many")
    parser.add_argument("--fsync", choices=("always", "interval", "never"), default="always",
                        help="the journal rows' --fsync (default always, the server's default)")
    parser.add_argument("--latency-samples", type=int, default=250, help="tasks timed in W4 (default 250)")
    parser.add_argument("--scale-tasks", type=int, default=1000000, help="the large queue of --scale")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.baseline_server:
        run_baseline_server()
    elif options.scale:
        if options.quick:
            options.scale_tasks, options.tasks = 100000, 5000
        scale(options)
    else:
        if options.quick:
            options.seconds, options.tasks, options.latency_samples = 1.0, 3000, 50
        table(options)


if __name__ == "__main__":
    main()
