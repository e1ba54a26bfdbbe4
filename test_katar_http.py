"""Tests for katar_http: a real server on port 0, real HTTP through urllib and http.client, a fake clock where
time matters. Run: python3 -m unittest -v test_katar_http

Longer runs by hand: KATAR_SOAK_SECONDS (default 5) is the length of the compaction soak's load, KATAR_CRASH_ROUNDS
(default 8) the number of kill -9 rounds aimed at compactions, KATAR_KILL_ROUNDS (default 12) those of kill -9
under load at random moments, KATAR_FUZZ_REQUESTS (default 4000) the hostile requests of the fuzz test, e.g.
    KATAR_SOAK_SECONDS=600 python3 -m unittest -v test_katar_http.CompactionSoakTest"""

import atexit
import collections
import contextlib
import datetime
import errno
import http.client
import io
import json
import os
import random
import re
import resource
import select
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.request
from urllib.parse import quote, urlsplit
import warnings

import katar_http as K

HERE = os.path.dirname(os.path.abspath(__file__))

# The servers and tools the tests start as processes of their own (a hundred and more a run) load katar_http from a
# cache of its compiled code made for this run (python -m katar_http, PYTHONPYCACHEPREFIX), rather than compile its
# 7,000 lines again each time (0.1 to 0.25 s apiece); the program is the same. The README's own commands still run
# as written (`python3 katar_http.py ...`).
KATAR = [sys.executable, "-m", "katar_http"]
_COMPILED = tempfile.mkdtemp(prefix="katar-test-pyc-")
atexit.register(shutil.rmtree, _COMPILED, True)
os.environ["PYTHONPYCACHEPREFIX"] = _COMPILED  # (read by the children at their start: this process is unchanged)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))


class FakeClock:
    """A wall clock and a monotonic clock (what Broker reads, as of the time module) that move only when a test
    says so: advance() moves both, as time passing does; step() moves the wall clock alone, as NTP or an operator
    setting the date does."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.elapsed = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    def advance(self, ms: float) -> None:
        self.now += ms / 1000.0
        self.elapsed += ms / 1000.0

    def step(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(round(self.now * 1000))


class ServerTestCase(unittest.TestCase):
    """A broker (fake clock unless `real_clock`) served on a free port; a queue `jobs` exists."""

    real_clock = False
    queue_options: dict = {}
    server_options: dict = {}  # KatarServer keywords

    def setUp(self) -> None:
        self.clock = FakeClock()
        self.broker = K.Broker(clock=time if self.real_clock else self.clock, random_source=random.Random(7))
        self.jobs = self.broker.queue("jobs", **self.queue_options)
        self.server = K.serve(self.broker, port=0, limits=K.Limits(max_wait=5000), **self.server_options)
        self.addCleanup(self.server.close)
        self.url = self.server.url

    def set_limits(self, **limits):
        self.server.httpd.limits = self.server.httpd.limits._replace(**limits)

    # -- HTTP helpers -------------------------------------------------------------------------------------------

    def call(self, method, path, body=None, raw=None, headers=None, allow_503=False):
        """Send one request; return (status, parsed JSON or None, response headers). A 5xx fails the test, but a
        503 where `allow_503` (a full queue, a failing disk, the memory bound)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None and raw is None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, text, response_headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, text, response_headers = error.code, error.read(), error.headers
        payload = json.loads(text) if text else None
        if allow_503 and status == 503:
            self.assertIsInstance(payload, dict, f"{method} {path}: 503 without JSON")  # /healthz: no "error"
        elif status >= 400:
            self.assertIsInstance(payload, dict, f"{method} {path}: {status} without a JSON error")
            self.assertIn("error", payload)
            self.assertLess(status, 500, f"{method} {path} answered {status}: {payload}")
        return status, payload, response_headers

    def poll(self, body=None, queue="jobs", expect=None):
        status, payload, _ = self.call("POST", f"/v1/queue/{queue}", {} if body is None else body)
        if expect is not None:
            self.assertEqual(status, expect, payload)
        return status, (payload or {}).get("tasks", []) if status == 200 else payload

    def insert(self, *tasks, queue="jobs"):
        status, payload, _ = self.call("POST", f"/v1/queue/{queue}/tasks", {"tasks": list(tasks)})
        self.assertIn(status, (200, 201), payload)
        return [task["_id"] for task in payload["tasks"]]

    def task(self, task_id, queue="jobs"):
        status, payload, _ = self.call("GET", f"/v1/queue/{queue}/tasks/{task_id}")
        self.assertEqual(status, 200, payload)
        return payload

    def counts(self, queue="jobs"):
        return self.call("GET", f"/v1/queue/{queue}/stats")[1]["counts"]

    def lease_one(self, **body):
        status, tasks = self.poll(dict(body, max=1), expect=200)
        return tasks[0]


# ---------------------------------------------------------------------------------------------------------------
# The original katar HTTP worker server's own test cases
# ---------------------------------------------------------------------------------------------------------------

class OriginalProtocolTest(ServerTestCase):
    queue_options = {"persistent": False}

    def test_get_unknown_queue_is_404_queue_not_found(self):
        # The original's words exactly (its workers may compare them), then the queue asked for and those there are.
        status, payload, _ = self.call("GET", "/v1/queue/boom")
        self.assertEqual((status, payload), (404, {"error": "Queue not found", "queue": "boom", "queues": ["jobs"]}))

    def test_default_configuration_when_none_was_set(self):
        status, payload, _ = self.call("GET", "/v1/queue/jobs")
        self.assertEqual((status, payload), (200, {"configuration": {"interval": 30000}}))

    def test_configuration_set_by_queue_name(self):
        self.server.config("jobs", {"interval": 10000, "custom": "message"})
        self.assertEqual(self.call("GET", "/v1/queue/jobs")[1],
                         {"configuration": {"interval": 10000, "custom": "message"}})

    def test_configuration_set_by_queue_object(self):
        self.server.config(self.jobs, {"interval": 20000, "custom": "something"})
        self.assertEqual(self.call("GET", "/v1/queue/jobs")[1],
                         {"configuration": {"interval": 20000, "custom": "something"}})

    def test_configuration_without_interval_gets_the_default_and_dates_become_iso_strings(self):
        import datetime
        when = datetime.datetime(2026, 1, 2, 3, 4, 5)
        self.server.config("jobs", {"date": when, "some": {"more": "config"}})
        self.assertEqual(self.call("GET", "/v1/queue/jobs")[1]["configuration"],
                         {"interval": 30000, "date": "2026-01-02T03:04:05", "some": {"more": "config"}})

    def test_config_of_unknown_queue_raises(self):
        with self.assertRaises(K.NotFound):
            self.server.config("nope", {"interval": 1})

    def test_post_to_unknown_queue_is_404(self):
        status, payload, _ = self.call("POST", "/v1/queue/boom", {})
        self.assertEqual((status, payload["error"], payload["queue"]), (404, "Queue not found", "boom"))

    def test_empty_queue_is_204_without_body(self):
        status, payload, headers = self.call("POST", "/v1/queue/jobs", {})
        self.assertEqual((status, payload), (204, None))
        self.assertIsNone(headers.get("Content-Length"))

    def test_only_done_and_paused_tasks_is_204(self):
        self.broker.queue("keep", persistent=True)
        done_id, _ = self.insert({"data": "data1"}, {"data": "data2", "status": "paused"}, queue="keep")
        self.poll({"max": 1}, queue="keep", expect=200)
        self.poll({"tasks": [{"_id": done_id, "status": "done"}]}, queue="keep", expect=204)
        self.assertEqual(self.counts("keep")["done"], 1)
        self.poll(queue="keep", expect=204)

    def test_200_with_the_one_eligible_task(self):
        ids = self.insert({"data": "data1", "status": "paused"}, {"data": "data2"})
        status, tasks = self.poll(expect=200)
        self.assertEqual(tasks, [{"_id": ids[1], "data": "data2", "attempt": 1}])

    def test_an_empty_body_counts_as_an_empty_object(self):
        self.insert({"data": 1}, {"data": 2})
        connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=5)
        self.addCleanup(connection.close)
        for headers in ({}, {"Content-Type": "application/json"}):
            connection.request("POST", "/v1/queue/jobs", headers=headers)  # no body at all
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            self.assertEqual(len(json.loads(response.read())["tasks"]), 1)

    def test_report_naming_no_known_task_is_404(self):
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [{"_id": "123", "status": "done"}]})
        self.assertEqual(status, 404)
        self.assertEqual(payload["ids"], ["123"])

    def test_a_body_that_is_not_json_is_400(self):
        # The original's test posted an empty form: refused, as is any form that is not JSON.
        for raw, ctype in ((b"", "application/x-www-form-urlencoded"), (b"a=1&b=2", "application/x-www-form-urlencoded"),
                           (b"{not json", "application/json"), (b"{\"tasks\": [", "text/plain")):
            status, payload, _ = self.call("POST", "/v1/queue/jobs", raw=raw, headers={"Content-Type": ctype})
            self.assertEqual(status, 400, (raw, ctype, payload))

    def test_curl_style_form_label_on_a_json_body_is_accepted(self):
        self.insert({"data": 5})
        status, payload, _ = self.call("POST", "/v1/queue/jobs", raw=b"{}",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 200)

    def test_report_with_an_invalid_status_is_400(self):
        task = (self.insert({"data": 1}), self.lease_one())[1]
        for bad in ("bogus", ["done"], {"done": 1}, 5, None):  # a list or an object was a 500 (unhashable)
            status, payload, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [{"_id": task["_id"], "status": bad}]})
            self.assertEqual(status, 400, bad)
            self.assertIn("status must be", payload["error"])
        self.assertEqual(self.task(task["_id"])["status"], "in progress")

    def test_failed_without_an_error_string_is_400(self):
        task = (self.insert({"data": 1}), self.lease_one())[1]
        for report in ({"_id": task["_id"], "status": "failed"}, {"_id": task["_id"], "status": "failed", "error": 5}):
            status, payload, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [report]})
            self.assertEqual(status, 400, payload)
            self.assertIn("error", payload["error"])
        self.assertEqual(self.task(task["_id"])["status"], "in progress")

    def test_failed_report_with_no_other_pending_task_is_204(self):
        self.insert({"data": "data1", "status": "paused"}, {"data": "data2"}, {"data": "data3"})
        first, third = self.lease_one(), self.lease_one()
        self.poll({"tasks": [{"_id": third["_id"], "status": "done"}], "max": 0}, expect=204)
        self.poll({"tasks": [{"_id": first["_id"], "status": "failed", "error": "some error"}]}, expect=204)

    def test_failed_report_answered_with_the_next_eligible_task(self):
        ids = self.insert({"data": "data1", "status": "paused"}, {"data": "data2"}, {"data": "data3"})
        first = self.lease_one()
        status, tasks = self.poll({"tasks": [{"_id": first["_id"], "status": "failed", "error": "some error"}]},
                                  expect=200)
        self.assertEqual(tasks, [{"_id": ids[2], "data": "data3", "attempt": 1}])

    def test_done_report_answered_with_the_next_task_and_done_task_discarded(self):
        ids = self.insert({"data": 1}, {"data": 2})
        first = self.lease_one()
        status, tasks = self.poll({"tasks": [{"_id": first["_id"], "status": "done"}]}, expect=200)
        self.assertEqual(tasks[0]["_id"], ids[1])
        self.assertEqual(self.task(ids[0]), {"_id": ids[0], "queue": "jobs", "status": "done", "attempt": 1,
                                             "discarded": True})
        self.assertEqual(self.counts()["done"], 0)  # persistent: false discards done tasks, as katar does

    def test_python_api_of_the_original(self):
        broker = K.Broker()
        jobs = broker.queue("jobs", persistent=False)
        created = jobs.insert({"data": {"n": 1}})
        self.assertTrue(created["created"])
        server = K.serve(broker, port=0, host="127.0.0.1")
        self.addCleanup(server.close)
        server.config(jobs, {"interval": 1000, "custom": "config"})
        with urllib.request.urlopen(server.url + "/v1/queue/jobs", timeout=5) as response:
            self.assertEqual(json.load(response), {"configuration": {"interval": 1000, "custom": "config"}})
        self.assertEqual(server.config("jobs"), {"interval": 1000, "custom": "config"})


# ---------------------------------------------------------------------------------------------------------------
# Leasing, priorities, delays, leases, fencing, retries, dead letters
# ---------------------------------------------------------------------------------------------------------------

class LeaseTest(ServerTestCase):
    queue_options = {"lease": 10000, "max_attempts": 3, "backoff": 1000, "max_backoff": 8000}

    def test_higher_priority_first_and_first_in_first_out_within_a_priority(self):
        self.insert({"data": "n1"}, {"data": "low", "priority": "low"}, {"data": "h1", "priority": "high"},
                          {"data": "n2", "priority": "normal"}, {"data": "h2", "priority": 10}, {"data": "p5", "priority": 5})
        status, tasks = self.poll({"max": 10}, expect=200)
        self.assertEqual([task["data"] for task in tasks], ["h1", "h2", "p5", "n1", "n2", "low"])

    def test_max_leases_a_batch_and_zero_only_reports(self):
        self.insert(*({"data": i} for i in range(5)))
        status, tasks = self.poll({"max": 3}, expect=200)
        self.assertEqual([task["data"] for task in tasks], [0, 1, 2])
        reports = [{"_id": task["_id"], "status": "done"} for task in tasks]
        self.poll({"tasks": reports, "max": 0}, expect=204)
        self.assertEqual(self.counts()["queued"], 2)

    def test_max_and_wait_of_the_wrong_type_or_range_are_400_naming_the_field(self):
        self.insert({"data": 1})
        for body, field in (({"max": -1}, "max"), ({"max": K.MAX_LEASE_BATCH + 1}, "max"), ({"max": "2"}, "max"),
                            ({"max": True}, "max"), ({"wait": -5}, "wait"), ({"wait": "10"}, "wait"),
                            ({"worker": 7}, "worker"), ({"tasks": {"_id": "x"}}, "tasks"), ({"tasks": "x"}, "tasks")):
            status, payload = self.poll(body)
            self.assertEqual(status, 400, body)
            self.assertIn(field, payload["error"])
        self.assertEqual(self.counts()["queued"], 1)

    def test_worker_and_attempt_are_recorded_on_the_leased_task(self):
        task_id, = self.insert({"data": 1})
        leased = self.lease_one(worker="phone-7")
        self.assertEqual(leased["attempt"], 1)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["worker"], detail["attempt"]), ("in progress", "phone-7", 1))
        self.assertEqual(detail["lease_expires_at"], self.clock.ms + 10000)
        self.assertEqual(detail["history"][0]["worker"], "phone-7")

    def test_delayed_task_is_leased_only_when_due(self):
        self.insert({"data": "later", "delay": 5000}, {"data": "now"})
        status, tasks = self.poll({"max": 5}, expect=200)
        self.assertEqual([task["data"] for task in tasks], ["now"])
        self.clock.advance(4999)
        self.poll(expect=204)
        self.clock.advance(1)
        self.assertEqual(self.lease_one()["data"], "later")

    def test_lease_that_runs_out_requeues_the_task_and_spends_an_attempt(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(9999)
        self.poll(expect=204)
        self.clock.advance(1)
        again = self.lease_one()
        self.assertEqual((again["_id"], again["attempt"]), (task_id, 2))
        detail = self.task(task_id)
        self.assertEqual(detail["history"][0]["outcome"], "expired")
        self.assertEqual(detail["attempts_spent"], 1)

    def test_a_poison_task_whose_leases_keep_running_out_ends_failed(self):
        task_id, = self.insert({"data": "poison"})
        for attempt in (1, 2, 3):
            self.assertEqual(self.lease_one()["attempt"], attempt)
            self.clock.advance(10000)
        self.poll(expect=204)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["error"]), ("failed", "lease expired"))
        self.assertEqual([entry["outcome"] for entry in detail["history"]], ["expired"] * 3)

    def test_heartbeat_extends_the_lease(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        for _ in range(3):
            self.clock.advance(8000)
            self.poll({"tasks": [{"_id": task_id, "status": "in progress"}], "max": 0}, expect=204)
        self.assertEqual(self.task(task_id)["status"], "in progress")
        self.clock.advance(10000)
        self.assertEqual(self.task(task_id)["status"], "queued")

    def test_hand_back_requeues_without_spending_an_attempt(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "queued", "attempt": 1}], "max": 0}, expect=204)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["attempts_spent"]), ("queued", 0))
        again = self.lease_one()
        self.assertEqual(again["attempt"], 2)  # attempt numbers deliveries, so fencing still tells them apart
        # A repeat of the hand-back is acknowledged without effect; the stale delivery cannot report done.
        self.poll({"tasks": [{"_id": task_id, "status": "queued", "attempt": 1}], "max": 0}, expect=204)
        status, payload = self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 1}], "max": 0})
        self.assertEqual(status, 409)
        self.assertEqual(self.task(task_id)["status"], "in progress")

    def test_a_report_from_a_superseded_delivery_is_409_and_changes_nothing(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(10000)
        second = self.lease_one()
        self.assertEqual(second["attempt"], 2)
        status, payload = self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 1}], "max": 0})
        self.assertEqual(status, 409)
        self.assertEqual(payload["ids"], [task_id])
        self.assertIn("superseded", payload["error"])
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["attempt"]), ("in progress", 2))
        self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 2}], "max": 0}, expect=204)

    def test_a_report_for_a_delivery_that_never_happened_is_409(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        status, payload = self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 5}], "max": 0})
        self.assertEqual(status, 409)

    def test_a_report_without_attempt_applies_to_the_latest_delivery(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(10000)
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "done"}], "max": 0}, expect=204)
        self.assertEqual(self.counts()["done"], 0)
        self.assertEqual(self.task(task_id)["status"], "done")

    def test_a_slow_worker_may_finish_after_its_lease_ran_out_if_nobody_took_the_task(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(10001)
        self.assertEqual(self.task(task_id)["status"], "queued")
        self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 1}], "max": 0}, expect=204)
        self.assertEqual(self.task(task_id)["status"], "done")
        self.poll(expect=204)

    def test_a_heartbeat_after_the_lease_ran_out_revives_it_if_nobody_took_the_task(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(10001)
        self.poll({"tasks": [{"_id": task_id, "status": "in progress", "attempt": 1}], "max": 0}, expect=204)
        self.assertEqual(self.task(task_id)["status"], "in progress")
        self.poll(expect=204)

    def test_a_revived_lease_that_then_fails_spends_one_attempt_not_two(self):
        self.broker.queue("jobs", persistent=True)
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(10001)
        self.poll({"tasks": [{"_id": task_id, "status": "in progress"}], "max": 0}, expect=204)
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "x"}], "max": 0}, expect=204)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["attempts_spent"]), ("queued", 1))
        totals = self.call("GET", "/v1/queue/jobs/stats")[1]["totals"]
        self.assertEqual((totals["expired"], totals["retried"], totals["failed"]), (1, 2, 0))  # events, not tasks

    def test_a_late_failure_after_the_last_lease_expired_keeps_one_dead_letter(self):
        self.broker.queue("jobs", max_attempts=1)
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.clock.advance(10000)
        self.assertEqual(self.task(task_id)["status"], "failed")
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "it crashed"}], "max": 0}, expect=204)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["error"], detail["attempts_spent"]), ("failed", "it crashed", 1))
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats")[1]["totals"]["failed"], 1)

    def test_failed_report_retries_after_exponential_backoff_with_a_cap(self):
        self.broker.queue("jobs", max_attempts=10)
        task_id, = self.insert({"data": 1})
        delays = []
        for attempt in range(1, 7):
            leased = self.lease_one()
            self.assertEqual(leased["attempt"], attempt)
            self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": f"e{attempt}"}], "max": 0}, expect=204)
            detail = self.task(task_id)
            self.assertEqual((detail["status"], detail["error"]), ("queued", f"e{attempt}"))
            delays.append(detail["run_at"] - self.clock.ms)
            self.clock.advance(delays[-1] - 1)
            self.poll(expect=204)  # not a millisecond early
            self.clock.advance(1)
        for attempt, delay in enumerate(delays, 1):
            full = min(8000, 1000 * 2 ** (attempt - 1))
            self.assertGreaterEqual(delay, full // 2, delays)
            self.assertLessEqual(delay, full, delays)
        self.assertEqual(len(set(delays[3:])), len(delays[3:]), "capped delays still carry jitter")

    def test_retry_after_overrides_the_backoff(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "busy", "retry_after": 250}], "max": 0})
        self.assertEqual(self.task(task_id)["run_at"], self.clock.ms + 250)

    def test_retry_false_fails_for_good(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "bad input", "retry": False}], "max": 0})
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["error"], detail["attempts_spent"]), ("failed", "bad input", 1))

    def test_last_attempt_failing_makes_a_dead_letter_with_its_error_and_history(self):
        task_id, = self.insert({"data": 1})
        for attempt in (1, 2, 3):
            self.lease_one(worker=f"w{attempt}")
            self.clock.advance(3000)
            self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": f"boom {attempt}"}], "max": 0})
            self.clock.advance(60000)
        self.poll(expect=204)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["error"]), ("failed", "boom 3"))
        self.assertEqual([(e["attempt"], e["worker"], e["outcome"], e["error"], e["duration_ms"])
                          for e in detail["history"]],
                         [(1, "w1", "failed", "boom 1", 3000), (2, "w2", "failed", "boom 2", 3000),
                          (3, "w3", "failed", "boom 3", 3000)])

    def test_history_keeps_only_the_latest_attempts(self):
        task_id, = self.insert({"data": 1})
        for _ in range(K.HISTORY_LIMIT + 5):
            leased = self.lease_one()
            self.poll({"tasks": [{"_id": task_id, "status": "queued"}], "max": 0}, expect=204)
        history = self.task(task_id)["history"]
        self.assertEqual(len(history), K.HISTORY_LIMIT)
        self.assertEqual(history[-1]["attempt"], leased["attempt"])

    def test_dead_letters_are_kept_on_a_non_persistent_queue(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "x", "retry": False}], "max": 0})
        self.assertEqual(self.counts()["failed"], 1)
        status, payload, _ = self.call("GET", "/v1/queue/jobs/tasks?status=failed")
        self.assertEqual([task["_id"] for task in payload["tasks"]], [task_id])

    def test_a_persistent_queue_keeps_done_tasks_with_their_result(self):
        self.broker.queue("jobs", persistent=True)
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "done", "result": {"sum": 3}}], "max": 0}, expect=204)
        detail = self.task(task_id)
        self.assertEqual((detail["status"], detail["result"]), ("done", {"sum": 3}))


class IdempotencyAndAtomicityTest(ServerTestCase):
    queue_options = {"lease": 10000}

    def test_a_repeated_done_report_succeeds_without_effect_on_a_non_persistent_queue(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        for _ in range(3):
            self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 1}], "max": 0}, expect=204)
        self.poll({"tasks": [{"_id": task_id, "status": "done"}], "max": 0}, expect=204)
        totals = self.call("GET", "/v1/queue/jobs/stats")[1]["totals"]
        self.assertEqual(totals["done"], 1)

    def test_a_repeated_report_succeeds_without_effect_on_a_persistent_queue(self):
        self.broker.queue("jobs", persistent=True)
        done_id, failed_id = self.insert({"data": 1}, {"data": 2})
        self.poll({"max": 2}, expect=200)
        reports = [{"_id": done_id, "status": "done"}, {"_id": failed_id, "status": "failed", "error": "x"}]
        self.poll({"tasks": reports, "max": 0}, expect=204)
        before = self.task(failed_id)
        self.poll({"tasks": reports, "max": 0}, expect=204)
        self.assertEqual(self.task(failed_id), before)
        totals = self.call("GET", "/v1/queue/jobs/stats")[1]["totals"]
        self.assertEqual((totals["retried"], totals["failed"], totals["done"]), (1, 0, 1))

    def test_a_report_contradicting_what_was_applied_is_409(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "done"}], "max": 0}, expect=204)
        status, payload = self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "late"}], "max": 0})
        self.assertEqual((status, payload["ids"]), (409, [task_id]))

    def test_a_heartbeat_for_a_finished_or_forgotten_delivery_is_409(self):
        task_id, = self.insert({"data": 1})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "done"}], "max": 0}, expect=204)
        for report in ({"_id": task_id, "status": "in progress"}, {"_id": task_id, "status": "in progress", "attempt": 1}):
            self.assertEqual(self.poll({"tasks": [report], "max": 0})[0], 409, report)
        cancelled, = self.insert({"data": 2, "status": "paused"})
        self.call("DELETE", f"/v1/queue/jobs/tasks/{cancelled}")
        self.assertEqual(self.poll({"tasks": [{"_id": cancelled, "status": "in progress"}], "max": 0})[0], 409)

    def test_a_report_on_a_task_never_leased_is_409(self):
        task_id, = self.insert({"data": 1})
        status, payload = self.poll({"tasks": [{"_id": task_id, "status": "done"}], "max": 0})
        self.assertEqual((status, payload["ids"]), (409, [task_id]))
        self.assertEqual(self.task(task_id)["status"], "queued")

    def test_nothing_in_a_request_is_applied_when_one_report_is_refused(self):
        a, b, c = self.insert({"data": "a"}, {"data": "b"}, {"data": "c"})
        self.poll({"max": 2}, expect=200)
        for bad, code in (({"_id": "nope-1", "status": "done"}, 404), ({"_id": c, "status": "done"}, 409),
                          ({"_id": b, "status": "failed"}, 400), ({"_id": b, "status": "exploded"}, 400)):
            body = {"tasks": [{"_id": a, "status": "done"}, bad]}
            status, payload = self.poll(body)
            self.assertEqual(status, code, (bad, payload))
            self.assertEqual(self.task(a)["status"], "in progress")
            self.assertEqual(self.counts(), {"paused": 0, "queued": 1, "in progress": 2, "done": 0, "failed": 0,
                                             "cancelled": 0})

    def test_every_missing_id_is_named(self):
        a, = self.insert({"data": "a"})
        self.lease_one()
        status, payload = self.poll({"tasks": [{"_id": "x-1", "status": "done"}, {"_id": a, "status": "done"},
                                               {"_id": "x-2", "status": "done"}]})
        self.assertEqual((status, payload["ids"]), (404, ["x-1", "x-2"]))

    def test_the_same_id_twice_in_one_request_is_400(self):
        a, = self.insert({"data": "a"})
        self.lease_one()
        status, payload = self.poll({"tasks": [{"_id": a, "status": "done"}, {"_id": a, "status": "done"}]})
        self.assertEqual((status, payload["ids"]), (400, [a]))

    def test_an_insert_key_returns_the_first_task_while_it_is_live_and_remembered(self):
        status, first, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": 1, "key": "order-7"})
        self.assertEqual(status, 201)
        first_id = first["tasks"][0]["_id"]
        status, again, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": 2, "key": "order-7"})
        self.assertEqual((status, again["tasks"][0]["_id"], again["tasks"][0]["created"]), (200, first_id, False))
        self.lease_one()
        self.poll({"tasks": [{"_id": first_id, "status": "done"}], "max": 0}, expect=204)
        status, after_done, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": 3, "key": "order-7"})
        self.assertEqual((status, after_done["tasks"][0]["status"]), (200, "done"))
        self.assertEqual(self.counts()["queued"], 0)

    def test_a_key_is_free_again_once_its_task_is_purged_or_forgotten(self):
        self.broker.queue("jobs", persistent=True)
        self.insert({"data": 1, "key": "k"})
        self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": 2, "key": "k"})
        self.assertEqual(status, 201)

    def test_keys_repeated_within_one_batch_make_one_task(self):
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks",
                                       {"tasks": [{"data": 1, "key": "x"}, {"data": 2, "key": "x"}, {"data": 3}]})
        self.assertEqual(status, 201)
        ids = [task["_id"] for task in payload["tasks"]]
        self.assertEqual(ids[0], ids[1])
        self.assertEqual([task["created"] for task in payload["tasks"]], [True, False, True])
        self.assertEqual(self.counts()["queued"], 2)

    def test_forgotten_ids_of_a_non_persistent_queue_are_bounded(self):
        original = K.FINISHED_MEMORY
        K.FINISHED_MEMORY = 3
        self.addCleanup(setattr, K, "FINISHED_MEMORY", original)
        ids = self.insert(*({"data": i, "key": f"k{i}"} for i in range(5)))
        self.poll({"max": 5}, expect=200)
        self.poll({"tasks": [{"_id": i, "status": "done"} for i in ids], "max": 0}, expect=204)
        self.assertEqual(self.call("GET", f"/v1/queue/jobs/tasks/{ids[0]}")[0], 404)
        self.assertEqual(self.task(ids[4])["status"], "done")
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": 0, "key": "k0"})[0], 201)
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": 4, "key": "k4"})[0], 200)


# ---------------------------------------------------------------------------------------------------------------
# Long polling and waiting for results (real clock)
# ---------------------------------------------------------------------------------------------------------------

class LongPollTest(ServerTestCase):
    real_clock = True

    def start_poll(self, body, results, name):
        def run():
            results[name] = (time.monotonic(), self.poll(body))
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def wait_for_waiters(self, count, queue=None):
        queue = queue or self.jobs
        deadline = time.monotonic() + 5
        while queue.stats()["waiting_workers"] < count:
            self.assertLess(time.monotonic(), deadline, "the long polls never started waiting")
            time.sleep(0.002)

    def test_a_waiting_worker_gets_an_inserted_task_within_milliseconds(self):
        results = {}
        thread = self.start_poll({"wait": 5000}, results, "w")
        self.wait_for_waiters(1)
        inserted = time.monotonic()
        task_id, = self.insert({"data": "wake"})
        thread.join(5)
        received, (status, tasks) = results["w"]
        self.assertEqual((status, tasks[0]["_id"]), (200, task_id))
        self.assertLess(received - inserted, 0.5)

    def test_a_parked_poll_is_answered_by_an_insert_through_the_python_api_from_another_thread(self):
        # An application that embeds the server inserts from its own threads (a web app's request handler): the
        # worker parked in a long poll must have the task at once, not at its next poll.
        results, inserted = {}, {}
        thread = self.start_poll({"wait": 5000}, results, "w")
        self.wait_for_waiters(1)

        def application():
            inserted["at"] = time.monotonic()
            inserted["id"] = self.jobs.insert({"data": "from the app"})["_id"]
        producer = threading.Thread(target=application)
        producer.start()
        producer.join(5)
        thread.join(5)
        received, (status, tasks) = results["w"]
        self.assertEqual((status, tasks[0]["_id"], tasks[0]["data"]), (200, inserted["id"], "from the app"))
        self.assertLess(received - inserted["at"], 0.5)
        # And a result wait over HTTP is answered by a report made through the Python API.
        task_id = self.jobs.insert({"data": 2})["_id"]
        self.assertEqual(self.jobs.lease()[0]["_id"], task_id)
        waited = {}

        def wait_for_result():
            waited["from"] = time.monotonic()
            waited["task"] = self.call("GET", f"/v1/queue/jobs/tasks/{task_id}?wait=5000")[1]
            waited["to"] = time.monotonic()
        waiter = threading.Thread(target=wait_for_result)
        waiter.start()
        time.sleep(0.2)  # no stat counts result waits: give the request time to park
        reported = time.monotonic()
        self.jobs.report([{"_id": task_id, "status": "done", "result": {"ok": True}}])
        waiter.join(5)
        self.assertEqual((waited["task"]["status"], waited["task"]["result"]), ("done", {"ok": True}))
        self.assertLess(waited["from"], reported)  # it was waiting before the report
        self.assertLess(waited["to"] - reported, 0.5)

    def test_a_long_poll_with_nothing_to_do_answers_204_after_its_wait(self):
        started = time.monotonic()
        self.poll({"wait": 150}, expect=204)
        self.assertGreaterEqual(time.monotonic() - started, 0.14)
        self.assertEqual(self.jobs.stats()["waiting_workers"], 0)

    def test_waiters_are_served_first_come_first_served(self):
        results, threads = {}, []
        for name in ("first", "second", "third"):
            threads.append(self.start_poll({"wait": 5000, "worker": name}, results, name))
            self.wait_for_waiters(len(threads))
        for data in ("a", "b", "c"):
            self.insert({"data": data})
        for thread in threads:
            thread.join(5)
        self.assertEqual([results[name][1][1][0]["data"] for name in ("first", "second", "third")], ["a", "b", "c"])

    def test_no_wake_up_is_lost_when_many_tasks_arrive_for_many_waiters(self):
        results, threads = {}, []
        for index in range(6):
            threads.append(self.start_poll({"wait": 5000}, results, index))
        self.wait_for_waiters(6)
        self.insert(*({"data": i} for i in range(6)))
        for thread in threads:
            thread.join(5)
        self.assertEqual(sorted(results[i][1][1][0]["data"] for i in range(6)), list(range(6)))

    def test_a_waiting_worker_gets_a_task_whose_lease_ran_out(self):
        self.broker.queue("jobs", lease=100)
        task_id, = self.insert({"data": 1})
        self.lease_one()
        started = time.monotonic()
        status, tasks = self.poll({"wait": 3000}, expect=200)
        self.assertEqual((tasks[0]["_id"], tasks[0]["attempt"]), (task_id, 2))
        self.assertLess(time.monotonic() - started, 1.5)

    def test_a_waiting_worker_gets_a_delayed_task_when_it_comes_due(self):
        self.insert({"data": "later", "delay": 120})
        started = time.monotonic()
        status, tasks = self.poll({"wait": 3000}, expect=200)
        self.assertGreaterEqual(time.monotonic() - started, 0.1)
        self.assertEqual(tasks[0]["data"], "later")

    def test_wait_beyond_the_server_limit_is_cut_to_it(self):
        self.set_limits(max_wait=100)
        started = time.monotonic()
        self.poll({"wait": 60000}, expect=204)
        self.assertLess(time.monotonic() - started, 2)

    def test_a_producer_can_wait_for_the_result(self):
        self.broker.queue("jobs", persistent=False)
        task_id, = self.insert({"data": 2})
        results = {}

        def wait_for_result():
            results["task"] = self.call("GET", f"/v1/queue/jobs/tasks/{task_id}?wait=5000")[1]
        thread = threading.Thread(target=wait_for_result)
        thread.start()
        deadline = time.monotonic() + 5
        while not self.jobs._result_waiters:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.002)
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "done", "result": 4}], "max": 0}, expect=204)
        thread.join(5)
        self.assertEqual((results["task"]["status"], results["task"]["result"]), ("done", 4))

    def test_waiting_for_a_result_that_does_not_come_answers_the_current_state(self):
        task_id, = self.insert({"data": 2})
        status, payload, _ = self.call("GET", f"/v1/queue/jobs/tasks/{task_id}?wait=100")
        self.assertEqual((status, payload["status"]), (200, "queued"))

    def test_closing_the_server_answers_waiting_long_polls(self):
        results = {}
        thread = self.start_poll({"wait": 5000}, results, "w")
        self.wait_for_waiters(1)
        started = time.monotonic()
        self.server.close()
        thread.join(5)
        self.assertEqual(results["w"][1][0], 204)
        self.assertLess(results["w"][0] - started, 2)


# ---------------------------------------------------------------------------------------------------------------
# Producer and operator routes
# ---------------------------------------------------------------------------------------------------------------

class OperatorRoutesTest(ServerTestCase):
    queue_options = {"persistent": True}

    def test_insert_one_task_or_a_batch_answers_201_with_the_ids(self):
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": {"x": 1}, "priority": "high"})
        self.assertEqual(status, 201)
        self.assertEqual(payload["tasks"][0]["status"], "queued")
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 1}, {"data": 2}]})
        self.assertEqual((status, len(payload["tasks"])), (201, 2))
        self.assertEqual(len({task["_id"] for task in payload["tasks"]}), 2)
        self.assertEqual(self.counts()["queued"], 3)

    def test_insert_into_an_unknown_queue_is_404(self):
        self.assertEqual(self.call("POST", "/v1/queue/nope/tasks", {"data": 1})[0], 404)

    def test_bad_inserts_are_400_naming_the_field_and_insert_nothing(self):
        cases = [({"data": 1, "priority": "urgent"}, "priority"), ({"data": 1, "priority": 1.5}, "priority"),
                 ({"data": 1, "delay": -1}, "delay"), ({"data": 1, "delay": "soon"}, "delay"),
                 ({"data": 1, "key": 5}, "key"), ({"data": 1, "status": "done"}, "status"),
                 ({"tasks": [{"data": 1}, "oops"]}, "tasks[1]"), ({"tasks": []}, "tasks"),
                 ({"tasks": {"data": 1}}, "tasks"), ({"tasks": [{"data": 1}], "data": 2}, "'data'"),
                 ({"tasks": [{"data": 1}] * (K.MAX_INSERT_BATCH + 1)}, "at most")]
        for body, field in cases:
            status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", body)
            self.assertEqual(status, 400, body)
            self.assertIn(field, payload["error"])
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats")[1]["total"], 0)

    def test_list_newest_first_pages_backwards_with_the_same_cursor(self):
        ids = self.insert(*({"data": i} for i in range(5)))
        for status in ("", "&status=queued"):
            status_page = self.call("GET", f"/v1/queue/jobs/tasks?order=newest&limit=2{status}")[1]
            self.assertEqual([t["_id"] for t in status_page["tasks"]], [ids[4], ids[3]])
            rest = self.call("GET", f"/v1/queue/jobs/tasks?order=newest&limit=3&after={status_page['next']}{status}")
            self.assertEqual(([t["_id"] for t in rest[1]["tasks"]], rest[1]["next"]), ([ids[2], ids[1], ids[0]], None))
        self.assertEqual(self.call("GET", "/v1/queue/jobs/tasks?order=latest")[0], 400)

    def test_list_tasks_pages_with_a_cursor_and_filters_by_status(self):
        ids = self.insert(*({"data": i} for i in range(7)))
        self.poll({"max": 2}, expect=200)
        seen, cursor = [], None
        while True:
            status, page, _ = self.call("GET", "/v1/queue/jobs/tasks?limit=3" + (f"&after={cursor}" if cursor else ""))
            seen += [task["_id"] for task in page["tasks"]]
            cursor = page["next"]
            if cursor is None:
                break
        self.assertEqual(seen, ids)
        status, page, _ = self.call("GET", "/v1/queue/jobs/tasks?status=in%20progress")
        self.assertEqual([task["_id"] for task in page["tasks"]], ids[:2])
        for query in ("status=bogus", "limit=0", "limit=x", "after=zzz", "limit=1&limit=2"):
            self.assertEqual(self.call("GET", "/v1/queue/jobs/tasks?" + query)[0], 400, query)

    def test_get_task_shows_status_attempts_history_error_result_and_times(self):
        task_id, = self.insert({"data": {"n": 1}, "key": "abc"})
        self.lease_one(worker="w1")
        self.clock.advance(1500)
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "nope"}], "max": 0})
        detail = self.task(task_id)
        for field in ("status", "data", "priority", "key", "attempt", "attempts_spent", "history", "error", "result",
                      "created_at", "updated_at", "run_at", "worker"):
            self.assertIn(field, detail)
        self.assertEqual((detail["data"], detail["key"], detail["error"]), ({"n": 1}, "abc", "nope"))
        self.assertEqual(detail["history"][0]["duration_ms"], 1500)
        self.assertEqual(self.call("GET", "/v1/queue/jobs/tasks/nope-9")[0], 404)

    def test_cancel_a_queued_paused_or_running_task_but_not_a_done_one(self):
        a, b, c, d = self.insert({"data": 1}, {"data": 2, "status": "paused"}, {"data": 3}, {"data": 4})
        leased = self.lease_one()
        self.assertEqual(leased["_id"], a)
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{a}")[1]["status"], "cancelled")
        done = self.lease_one()
        self.assertEqual(done["_id"], c)
        self.poll({"tasks": [{"_id": c, "status": "done"}], "max": 0}, expect=204)
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{c}")[0], 409)
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{d}")[1]["status"], "cancelled")
        status, payload, _ = self.call("DELETE", f"/v1/queue/jobs/tasks/{b}")
        self.assertEqual((status, payload["status"]), (200, "cancelled"))
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{b}")[0], 200)  # cancelling twice is harmless
        self.poll(expect=204)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks/nope-1")[0], 404)

    def test_patch_pauses_resumes_and_retries_a_dead_letter(self):
        task_id, = self.insert({"data": 1})
        self.assertEqual(self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "paused"})[1]["status"],
                         "paused")
        self.poll(expect=204)
        self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "queued"})
        self.lease_one()
        self.poll({"tasks": [{"_id": task_id, "status": "failed", "error": "x", "retry": False}], "max": 0})
        self.assertEqual(self.task(task_id)["status"], "failed")
        status, payload, _ = self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "queued"})
        self.assertEqual((status, payload["status"], payload["attempts_spent"]), (200, "queued", 0))
        self.assertEqual(self.lease_one()["attempt"], 2)
        for body, code in (({"status": "done"}, 400), ({"status": "paused"}, 409), ({}, 400), ({"status": 3}, 400)):
            self.assertEqual(self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", body)[0], code, body)

    def test_put_creates_then_reconfigures_a_queue(self):
        body = {"configuration": {"interval": 500, "model": "x"}, "lease": 2000, "max_attempts": 2,
                "persistent": True, "max_in_flight": 3}
        status, payload, _ = self.call("PUT", "/v1/queue/images", dict(body, future_option=1))
        self.assertEqual((status, payload["field"]), (400, "future_option"))  # a misspelling is not dropped unseen
        self.assertNotIn("images", self.server.broker)
        status, payload, _ = self.call("PUT", "/v1/queue/images", body)
        self.assertEqual((status, payload["lease"], payload["max_attempts"]), (201, 2000, 2))
        self.assertEqual(self.call("GET", "/v1/queue/images")[1], {"configuration": {"interval": 500, "model": "x"}})
        status, payload, _ = self.call("PUT", "/v1/queue/images", {"lease": 3000})
        self.assertEqual((status, payload["lease"], payload["max_attempts"]), (200, 3000, 2))
        for bad in ({"lease": 0}, {"lease": "1s"}, {"persistent": "yes"}, {"configuration": []},
                    {"configuration": {"interval": "fast"}}, {"max_attempts": 0}):
            self.assertEqual(self.call("PUT", "/v1/queue/images", bad)[0], 400, bad)
        self.assertEqual(self.call("PUT", "/v1/queue/bad%20name", {})[0], 400)
        self.assertEqual(self.call("PUT", "/v1/queue/" + "x" * 129, {})[0], 400)

    def test_a_paused_queue_leases_nothing_until_resumed(self):
        self.insert({"data": 1})
        self.call("PUT", "/v1/queue/jobs", {"paused": True})
        self.poll(expect=204)
        self.call("PUT", "/v1/queue/jobs", {"paused": False})
        self.poll(expect=200)

    def test_max_in_flight_caps_the_tasks_in_progress(self):
        self.call("PUT", "/v1/queue/jobs", {"max_in_flight": 2})
        self.insert(*({"data": i} for i in range(5)))
        status, tasks = self.poll({"max": 5}, expect=200)
        self.assertEqual(len(tasks), 2)
        self.poll(expect=204)
        status, more = self.poll({"tasks": [{"_id": tasks[0]["_id"], "status": "done"}], "max": 5}, expect=200)
        self.assertEqual(len(more), 1)

    def test_purge_deletes_the_tasks_of_one_status(self):
        ids = self.insert({"data": 1}, {"data": 2}, {"data": 3})
        self.poll({"max": 1}, expect=200)
        self.poll({"tasks": [{"_id": ids[0], "status": "done"}], "max": 0})
        status, payload, _ = self.call("DELETE", "/v1/queue/jobs/tasks?status=done")
        self.assertEqual((status, payload), (200, {"purged": 1}))
        self.assertEqual(self.call("GET", f"/v1/queue/jobs/tasks/{ids[0]}")[0], 404)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks")[0], 400)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=nope")[0], 400)
        self.lease_one()
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=in%20progress")[0], 409)
        self.assertEqual(self.counts(), {"paused": 0, "queued": 1, "in progress": 1, "done": 0, "failed": 0,
                                         "cancelled": 0})

    def test_stats_count_statuses_age_totals_and_waiting_workers(self):
        self.insert({"data": 1}, {"data": 2}, {"data": 3, "status": "paused"})
        self.clock.advance(2500)
        self.lease_one()
        stats = self.call("GET", "/v1/queue/jobs/stats")[1]
        self.assertEqual(stats["counts"]["queued"], 1)
        self.assertEqual(stats["counts"]["paused"], 1)
        self.assertEqual(stats["counts"]["in progress"], 1)
        self.assertEqual(stats["oldest_queued_age_ms"], 2500)
        self.assertEqual(stats["oldest_queued"], self.jobs.tasks(status="queued")["tasks"][0]["_id"])
        self.assertEqual(stats["totals"]["inserted"], 3)
        self.assertEqual(stats["totals"]["leased"], 1)
        self.assertEqual(stats["waiting_workers"], 0)

    def test_queues_listing_and_healthz(self):
        self.broker.queue("mail")
        status, payload, _ = self.call("GET", "/v1/queues")
        self.assertEqual(sorted(queue["queue"] for queue in payload["queues"]), ["jobs", "mail"])
        self.assertEqual(self.call("GET", "/healthz")[1]["status"], "ok")


# ---------------------------------------------------------------------------------------------------------------
# Hostile input: every route answers a 4xx JSON error and loses nothing
# ---------------------------------------------------------------------------------------------------------------

def raw_exchange(host, port, data, timeout=5.0):
    """Send raw bytes, half-close, and return everything the server answers."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(data)
        return read_to_end(connection)


def read_to_end(connection):
    """Half-close a connection and read what the server sends until it closes."""
    connection.shutdown(socket.SHUT_WR)
    chunks = []
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class FirstHourTest(ServerTestCase):
    """The traps a newcomer fell into, and the messages that must say what to do."""

    def test_a_heartbeat_alone_leases_nothing_unless_it_asks_with_max(self):
        first, second = self.insert({"data": 1}, {"data": 2})
        leased = self.lease_one()
        heartbeat = {"tasks": [{"_id": leased["_id"], "status": "in progress"}]}  # as the statuses table shows
        self.poll(heartbeat, expect=204)
        self.assertEqual(self.counts()["queued"], 1)  # the other task was not leased behind the worker's back
        status, tasks = self.poll(dict(heartbeat, max=1), expect=200)  # asked for: leased
        self.assertEqual([task["_id"] for task in tasks], [second])
        # Handing a task back does not take it (or another) straight back either.
        self.poll({"tasks": [{"_id": second, "status": "queued"}]}, expect=204)
        self.poll({"tasks": [{"_id": leased["_id"], "status": "in progress"}, {"_id": self.lease_one()["_id"],
                                                                             "status": "queued"}]}, expect=204)
        self.assertEqual(self.counts()["queued"], 1)
        second = self.lease_one()["_id"]
        self.poll({"tasks": [{"_id": first, "status": "done"}]}, expect=204)  # a done report still asks for one
        self.insert({"data": 3})
        self.assertEqual(self.poll({"tasks": [{"_id": second, "status": "done"}]}, expect=200)[1][0]["data"], 3)

    def park_a_poll(self):
        """Send a long poll on a raw connection and wait until the stats say it is parked; returns the connection."""
        body = b'{"wait": 5000}'
        connection = socket.create_connection((self.server.host, self.server.port))
        self.addCleanup(connection.close)
        connection.sendall(b"POST /v1/queue/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while self.jobs.stats()["waiting_workers"] < 1:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        return connection

    def park_a_poll_and_vanish(self, then=b""):
        """Park a long poll, send `then`, and close the connection; the server must end the parked wait at once
        (no thread, no task kept for nobody)."""
        connection = self.park_a_poll()
        connection.sendall(then)
        connection.close()
        deadline = time.monotonic() + 10
        while self.jobs.stats()["waiting_workers"]:
            self.assertLess(time.monotonic(), deadline, "the vanished worker's poll still waits")
            time.sleep(0.01)

    def test_a_long_poll_whose_worker_hung_up_ends_at_once_and_takes_no_task(self):
        self.park_a_poll_and_vanish()  # the worker (curl killed, a phone gone to sleep) is gone; its poll ends
        task_id = self.insert({"data": 1})[0]
        task = self.jobs.task(task_id)
        self.assertEqual((task["status"], task["history"]), ("queued", []))  # not leased to nobody
        leased = self.lease_one()
        self.assertEqual((leased["_id"], leased["attempt"]), (task_id, 1))
        self.poll({"tasks": [{"_id": task_id, "status": "done"}], "max": 0}, expect=204)
        # A client that sent another request behind its poll and then closed (bytes unread before its close, as a
        # TLS close_notify is) is gone too.
        self.park_a_poll_and_vanish(then=b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        task_id = self.insert({"data": 2})[0]
        self.assertEqual(self.jobs.task(task_id)["history"], [])

    def test_a_task_leased_to_a_poll_whose_worker_hung_up_at_that_moment_is_handed_back_unspent(self):
        # The race the test above cannot time: the task is handed to the parked poll in the same pass as the
        # worker's hang-up is read. The poll is parked through HTTP, the insert that serves it comes from another
        # thread, and the hang-up is sent first, so both are waiting when the loop resumes the poll.
        broker = self.server.broker
        connection = self.park_a_poll()
        deadline = time.monotonic() + 10
        with broker._lock:  # the loop cannot end the wait while the lock is held: hang up, then insert
            connection.close()
            time.sleep(0.05)
            inserted = threading.Thread(target=self.jobs.insert, args=({"data": "raced"},))
            inserted.start()
        inserted.join(10)
        while True:
            tasks = self.jobs.tasks()["tasks"]
            history = tasks[0]["history"] if tasks else []
            if tasks and tasks[0]["status"] == "queued" and (not history or history[-1]["outcome"]):
                break
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        task = self.jobs.task(tasks[0]["_id"])
        self.assertEqual(task["attempts_spent"], 0)  # handed back (or never handed out), never spent
        self.assertIn([entry["outcome"] for entry in task["history"]], ([], ["queued"]))

    def test_an_insert_without_a_body_or_without_data_is_400(self):
        for raw in (b"", b"{}", b"  "):
            status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", raw=raw,
                                           headers={"Content-Type": "application/json"})
            self.assertEqual(status, 400, raw)
            self.assertIn('"data"', payload["error"])
        for body in ({"priority": 1}, {"tasks": [{"data": 1}, {"priority": 1}]}):
            status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", body)
            self.assertEqual(status, 400, body)
            self.assertIn("data is missing", payload["error"])
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": None})[0], 201)  # null, when meant
        self.assertEqual(self.counts()["queued"], 1)

    def test_unknown_top_level_fields_are_400_naming_the_field_and_the_known_ones(self):
        task_id = self.insert({"data": 1})[0]
        cases = [("POST", "/v1/queue/jobs", {"task": [{"_id": task_id, "status": "done"}]}, "task",
                  "tasks, max, wait, worker"),
                 ("POST", "/v1/queue/jobs/tasks", {"data": 2, "priorty": 5}, "priorty", "priority"),
                 ("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 2}], "delay": 5}, "delay", "tasks"),
                 ("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 2, "dely": 5}]}, "dely", "delay"),
                 ("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "paused", "why": "x"}, "why", "status"),
                 ("PUT", "/v1/queue/jobs", {"leese": 5000}, "leese", "lease")]
        for method, path, body, field, known in cases:
            status, payload, _ = self.call(method, path, body)
            self.assertEqual(status, 400, body)
            self.assertIn(f"unknown field '{field}'", payload["error"])
            self.assertIn(known, payload["error"])
        self.assertEqual(self.task(task_id)["status"], "queued")  # nothing changed
        self.assertEqual(self.counts()["queued"], 1)
        self.assertEqual(self.jobs.describe()["lease"], K.QUEUE_DEFAULTS["lease"])
        # A report may carry more than the server reads: original workers send what they like there.
        leased = self.lease_one()
        self.poll({"tasks": [{"_id": leased["_id"], "status": "done", "took": 5}]}, expect=204)

    def test_null_where_a_value_is_expected_is_400(self):
        for method, path, body in (("POST", "/v1/queue/jobs", {"tasks": None}),
                                   ("POST", "/v1/queue/jobs", {"max": None}),
                                   ("POST", "/v1/queue/jobs", {"worker": None}),
                                   ("POST", "/v1/queue/jobs/tasks", {"data": 1, "key": None}),
                                   ("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 1, "key": None}]}),
                                   ("POST", "/v1/queue/jobs/tasks", {"tasks": None}),
                                   ("PUT", "/v1/queue/jobs", {"lease": None})):
            status, payload, _ = self.call(method, path, body)
            self.assertEqual(status, 400, body)
        self.assertEqual(self.counts()["queued"], 0)

    def test_report_fields_are_checked_whatever_the_status_and_echoes_are_bounded(self):
        task_id = self.insert({"data": 1})[0]
        leased = self.lease_one()
        for extra in ({"error": 5}, {"retry": "x"}, {"retry_after": "y"}, {"error": ["x"]}):
            for status in ("done", "in progress"):
                body = {"tasks": [dict({"_id": leased["_id"], "status": status}, **extra)], "max": 0}
                self.assertEqual(self.poll(body)[0], 400, body)
        self.assertEqual(self.task(task_id)["status"], "in progress")
        self.poll({"tasks": [{"_id": leased["_id"], "status": "done", "error": None, "retry": None}], "max": 0},
                  expect=204)  # null stands for absent
        # What an error message quotes of a value is cut short: a megabyte sent is not a megabyte answered.
        for method, path, body in (("POST", "/v1/queue/jobs/tasks", {"data": 1, "status": "s" * 500000}),
                                   ("POST", "/v1/queue/jobs/tasks", {"data": 1, "priority": "p" * 500000}),
                                   ("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "s" * 500000}),
                                   ("POST", "/v1/queue/jobs", {"tasks": [{"_id": "i" * 500000, "status": "done"}]}),
                                   ("POST", "/v1/queue/jobs", {"tasks": [{"_id": "x-1", "status": "d" * 500000}]})):
            status, payload, _ = self.call(method, path, body)
            self.assertEqual(status, 400, path)
            self.assertLess(len(json.dumps(payload)), 1000, path)

    def test_query_numbers_are_ascii_decimals(self):
        self.insert({"data": 1}, {"data": 2})
        for value, code in (("1", 200), ("1.0", 200), ("2e0", 200), ("%EF%BC%91", 400), ("1_0", 400), ("+2", 400),
                            ("%C2%A02", 400), ("%D9%A3", 400), ("0x2", 400), ("inf", 400), ("nan", 400)):
            self.assertEqual(self.call("GET", f"/v1/queue/jobs/tasks?limit={value}")[0], code, value)
        self.assertEqual(self.call("GET", "/v1/queue/jobs/tasks/none-1?wait=1e309")[0], 400)

    def test_a_refused_request_is_counted_under_its_route(self):
        self.call("POST", "/v1/queue/jobs/tasks", {})
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        self.assertIn('katar_http_requests_total{route="insert",code="400"} 1', text)

    def test_queue_not_found_names_the_queue_and_those_a_token_may_know_of(self):
        self.broker.queue("mail")
        status, payload, _ = self.call("GET", "/v1/queue/jbos")
        self.assertEqual((status, payload), (404, {"error": "Queue not found", "queue": "jbos",
                                                   "queues": ["jobs", "mail"]}))
        self.server.httpd.access = K.Access([ADMIN], {WORKER: ["zzz", "gone"]})
        for index in range(150):  # more queues than a 404 lists: the worker's own is still among them
            self.broker.queue(f"a{index:03}")
        self.broker.queue("zzz")
        status, payload, _ = self.call("GET", "/v1/queue/gone", headers={"Authorization": "Bearer " + WORKER})
        self.assertEqual((status, payload["queue"], payload["queues"]), (404, "gone", ["zzz"]))  # not mail
        status, payload, _ = self.call("GET", "/v1/queue/gone", headers={"Authorization": "Bearer " + ADMIN})
        self.assertEqual((len(payload["queues"]), payload["queues"][0]), (100, "a000"))

    def test_a_path_no_route_has_names_the_closest_route(self):
        for path, closest in (("/v1/queues/jobs/tasks", "/v1/queue/jobs/tasks"), ("/queue/jobs", "/v1/queue/jobs"),
                              ("/v1/queue/jobs/task", "/v1/queue/jobs/tasks"), ("/health", "/healthz")):
            status, payload, _ = self.call("GET", path)
            self.assertEqual((status, payload["closest"]), (404, closest))
            self.assertIn(f"did you mean {closest}?", payload["error"])
            self.assertIn("/v1/openapi.json", payload["error"])
        for path, closest in (("/v1/queues/", "/v1/queues"), ("/v1/Queue/jobs", "/v1/queue/jobs"),
                              ("/v2/queue/jobs/stat", "/v1/queue/jobs/stats"), ("/v1/openapi", "/v1/openapi.json")):
            self.assertEqual(self.call("GET", path)[1]["closest"], closest)
        status, payload, _ = self.call("GET", "/favicon.ico")
        self.assertEqual(status, 404)
        self.assertNotIn("closest", payload)
        self.assertIn("/v1/openapi.json", payload["error"])

    def test_cancelling_twice_is_harmless_on_every_queue(self):
        for persistent in (False, True):
            self.broker.queue("jobs", persistent=persistent)
            task_id = self.insert({"data": 1})[0]
            first = self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")
            second = self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")
            self.assertEqual((first[0], second[0]), (200, 200), persistent)
            self.assertEqual((first[1]["status"], second[1]["status"]), ("cancelled", "cancelled"))
            self.assertEqual(self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "cancelled"})[0], 200)
            self.assertEqual(self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "queued"})[0], 409)
        # A task a non-persistent queue dropped when it was done cannot be cancelled: 409, not 404.
        self.broker.queue("jobs", persistent=False)
        task_id = self.insert({"data": 1})[0]
        self.poll({"tasks": [{"_id": self.lease_one()["_id"], "status": "done"}]}, expect=204)
        status, payload, _ = self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")
        self.assertEqual((status, payload["ids"]), (409, [task_id]))
        self.assertIn("is done", payload["error"])


class GuardedStateTestCase(ServerTestCase):
    """A queue holding one queued and one leased task, and a check that hostile requests changed neither."""

    queue_options = {"persistent": True}

    def setUp(self):
        super().setUp()
        self.ids = self.insert({"data": "keep-1"}, {"data": "keep-2"})
        self.leased = self.lease_one()

    def assert_nothing_lost(self):
        self.assertEqual(self.counts(), {"paused": 0, "queued": 1, "in progress": 1, "done": 0, "failed": 0,
                                         "cancelled": 0})
        self.assertEqual(self.task(self.leased["_id"])["attempt"], 1)

    def raw(self, data, timeout=5.0):
        return raw_exchange(self.server.host, self.server.port, data, timeout)


class HostileInputTest(GuardedStateTestCase):

    def test_malformed_and_wrongly_typed_bodies_on_every_body_route(self):
        malformed = [b"{", b"[]", b"null", b"42", b'"text"', b"\xff\xfe\x00", b'{"tasks": NaN}', b'{"max": Infinity}',
                     b"[" * 100000 + b"]" * 100000, b'{"a": ' * 50000 + b"1" + b"}" * 50000, b"{}" * 3]
        wrongly_typed = {
            ("POST", "/v1/queue/jobs"): [b'{"tasks": [null]}', b'{"tasks": [{"_id": 5, "status": "done"}]}',
                                         b'{"tasks": [{"_id": "", "status": "done"}]}', b'{"tasks": [[1]]}',
                                         b'{"max": "1"}', b'{"wait": null}', b'{"tasks": [{"status": "done"}]}',
                                         b'{"tasks": [{"_id": "x", "status": "done", "attempt": "1"}]}'],
            ("POST", "/v1/queue/jobs/tasks"): [b'{"data": 1, "priority": null}', b'{"tasks": [null]}',
                                               b'{"data": 1, "delay": []}', b'{"tasks": "x"}', b'{"data": 1, "key": {}}'],
            ("PUT", "/v1/queue/jobs"): [b'{"lease": null}', b'{"configuration": "x"}', b'{"paused": 1}',
                                        b'{"max_in_flight": -1}', b'{"configuration": {"interval": -1}}'],
            ("PATCH", f"/v1/queue/jobs/tasks/{self.ids[1]}"): [b'{"status": ["queued"]}', b"{}",
                                                                b'{"status": "in progress"}'],
        }
        for (method, path), bodies in wrongly_typed.items():
            for raw in malformed + bodies:
                status, payload, _ = self.call(method, path, raw=raw, headers={"Content-Type": "application/json"})
                self.assertEqual(status // 100, 4, (method, path, raw[:40], payload))
        self.assert_nothing_lost()
        self.assertEqual(self.call("GET", "/v1/queue/jobs")[1], {"configuration": {"interval": 30000}})

    def test_an_oversized_body_is_413_and_the_server_keeps_serving(self):
        self.set_limits(max_body=1000)
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "x" * 2000})
        self.assertEqual(status, 413)
        self.assert_nothing_lost()

    def test_chunked_bodies_are_read_other_codings_are_501_and_a_non_json_type_is_415(self):
        host, port = self.server.host, self.server.port
        head = b"POST /v1/queue/jobs HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        for request, code in ((head + b"2;ext=1\r\n{}\r\n0\r\n\r\n", b"204"),  # a bare lease: nothing is queued now
                              (head + b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n", b"204"),
                              (head + b"3\r\n{}\r\n0\r\n\r\n", b"400"), (head + b"zz\r\n{}\r\n0\r\n\r\n", b"400"),
                              (head + b"2\r\n{}\r\n", b"400"), (head.replace(b"chunked", b"gzip") + b"{}", b"501"),
                              (head.replace(b"HTTP/1.1", b"HTTP/1.0") + b"2\r\n{}\r\n0\r\n\r\n", b"501"),
                              (head.replace(b"\r\n\r\n", b"\r\nContent-Length: 7\r\n\r\n") + b"2\r\n{}\r\n0\r\n\r\n",
                               b"400"),
                              (head.replace(b"chunked", b"chunked\xa0") + b"2\r\n{}\r\n0\r\n\r\n", b"501"),  # disguised
                              (head + b" 2\r\n{}\r\n0\r\n\r\n", b"400"), (head + b"2;a\x00\r\n{}\r\n0\r\n\r\n", b"400"),
                              (head + b"2 ;a=b\r\n{}\r\n0\r\n\r\n", b"204"),
                              # a request after the last chunk is not taken for trailer lines
                              (head + b"2\r\n{}\r\n0\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
                              (head + b"1\r\n{\r\n" * 4097 + b"0\r\n\r\n", b"400")):
            self.jobs.set_status(next(i for i in self.ids if i != self.leased["_id"]), "paused")  # nothing to lease
            answer = raw_exchange(host, port, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + code), (request, answer))
            self.jobs.set_status(next(i for i in self.ids if i != self.leased["_id"]), "queued")
        # A chunked insert (http.client with an iterable body, as here; curl -T -; fetch with a stream) is an insert.
        connection = http.client.HTTPConnection(host, port, timeout=5)
        self.addCleanup(connection.close)
        connection.request("POST", "/v1/queue/jobs/tasks", body=iter([b'{"data": ', b'"chunked"}']),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        inserted = json.loads(response.read())["tasks"][0]["_id"]
        self.assertEqual((response.status, self.jobs.task(inserted)["data"]), (201, "chunked"))
        self.jobs.cancel(inserted)
        self.jobs.purge("cancelled")
        self.set_limits(max_body=100)
        connection.request("POST", "/v1/queue/jobs/tasks", body=iter([b'{"data": "', b"x" * 60, b"x" * 60, b'"}']),
                           headers={"Content-Type": "application/json"})
        self.assertEqual(connection.getresponse().status, 413)
        connection.close()  # 90 bytes of data in 45 chunks: over 100 bytes on the wire, as a Content-Length counts
        connection.request("POST", "/v1/queue/jobs/tasks", body=iter([b'{"data":1}'] + [b" "] * 40),
                           headers={"Content-Type": "application/json"})
        self.assertEqual(connection.getresponse().status, 413)
        status, payload, _ = self.call("POST", "/v1/queue/jobs", raw=b"<xml/>", headers={"Content-Type": "application/xml"})
        self.assertEqual(status, 415)
        self.assert_nothing_lost()

    def test_a_bad_content_length_or_a_short_body_is_400(self):
        host, port = self.server.host, self.server.port
        for head in (b"Content-Length: -5\r\n", b"Content-Length: ten\r\n", b"Content-Length: 50\r\n"):
            answer = raw_exchange(host, port, b"POST /v1/queue/jobs HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n{}")
            self.assertTrue(answer.startswith(b"HTTP/1.1 400"), (head, answer))
            self.assertIn(b'{"error":', answer)
        self.assert_nothing_lost()

    def test_a_client_that_stalls_mid_body_is_cut_off_with_408(self):
        self.set_limits(request_timeout=0.2)
        with socket.create_connection((self.server.host, self.server.port), timeout=5) as connection:
            connection.sendall(b"POST /v1/queue/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
            answer = connection.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer)
        self.assert_nothing_lost()

    def test_garbage_request_lines_and_headers_get_json_errors(self):
        host, port = self.server.host, self.server.port
        named = b" HTTP/1.1\r\nHost: localhost\r\n"
        for request in (b"HELLO\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /x" + named + b"X: y\r\n" * 200 + b"\r\n",
                        b"GET /" + b"a" * 70000 + named + b"\r\n", b"\x00\x01\x02\r\n\r\n",
                        b"GET //[/x" + named + b"\r\n", b"GET http://[::1/v1/queues" + named + b"\r\n",
                        b"GET *" + named + b"\r\n", b"GET http://host" + named + b"\r\n",
                        b"GET /healthz" + named + b"Bad Name: x\r\n\r\n", b"GET /healthz" + named + b"Host : x\r\n\r\n",
                        b"GET /healthz" + named + b"X\xe9: x\r\n\r\n", b"GET /healthz" + named + b"X(y): x\r\n\r\n"):
            answer = raw_exchange(host, port, request)
            self.assertRegex(answer[:12], rb"HTTP/1\.[01] (4\d\d|505)", request[:30])
            self.assertIn(b"application/json", answer)
        self.assertEqual(self.server.httpd.internal_errors, 0)
        self.assert_nothing_lost()

    def test_an_error_answered_before_the_request_is_read_reaches_the_client(self):
        # The server closes after a 414 with most of the request unread (here a megabyte more of it); a plain close
        # resets the connection, and the reset destroys the answer before the client reads it. A lingering close
        # reads the rest first.
        request = b"GET /" + b"a" * 1000000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        answers = collections.Counter()
        for _ in range(100):
            try:
                answers[raw_exchange(self.server.host, self.server.port, request)[:12]] += 1
            except OSError as exc:
                answers[type(exc).__name__] += 1
        self.assertEqual(answers, {b"HTTP/1.1 414": 100})
        self.assert_nothing_lost()

    def test_unknown_paths_are_404_and_unknown_methods_405_with_allow(self):
        for method, path in (("GET", "/index.html"), ("GET", "/v1/queue/jobs/"), ("GET", "/v1/queue/jobs/tasks/a/b"),
                             ("POST", "/v2/queue/jobs"), ("GET", "/v1/queue/%ff%fe")):
            self.assertEqual(self.call(method, path)[0], 404, (method, path))
        for method, path, allow in (("DELETE", "/v1/queue/jobs", "GET, HEAD, POST, PUT"),
                                    ("OPTIONS", "/v1/queue/jobs/tasks", "DELETE, GET, HEAD, POST"),
                                    ("POST", "/healthz", "GET, HEAD"),
                                    ("PUT", f"/v1/queue/jobs/tasks/{self.ids[0]}", "DELETE, GET, HEAD, PATCH")):
            answer = raw_exchange(self.server.host, self.server.port,
                                  f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            self.assertTrue(answer.startswith(b"HTTP/1.1 405"), (method, answer))
            self.assertIn(f"Allow: {allow}".encode(), answer)
        self.assert_nothing_lost()

    def test_a_keep_alive_connection_survives_errors_and_stays_in_sync(self):
        connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=5)
        self.addCleanup(connection.close)
        for body, expected in ((b"{bad", 400), (b"{}", 200), (b'{"tasks": [{"_id": "n-1", "status": "done"}]}', 404)):
            connection.request("POST", "/v1/queue/jobs", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            self.assertEqual(response.status, expected)
        connection.request("GET", "/v1/queue/jobs")
        self.assertEqual(json.loads(connection.getresponse().read())["configuration"]["interval"], 30000)


# ---------------------------------------------------------------------------------------------------------------
# The core without HTTP
# ---------------------------------------------------------------------------------------------------------------

class CoreTest(unittest.TestCase):
    def test_every_state_change_goes_through_apply_and_replaying_the_records_rebuilds_the_state(self):
        clock = FakeClock()
        records = []
        broker = K.Broker(clock=clock, random_source=random.Random(1))
        original_apply = broker._apply
        broker._apply = lambda record: (records.append(json.loads(json.dumps(record))), original_apply(record))
        jobs = broker.queue("jobs", persistent=True, lease=1000, max_attempts=2)
        jobs.insert([{"data": i, "priority": i % 3, "key": f"k{i}"} for i in range(20)])
        leased = jobs.lease(max=8, worker="w")
        jobs.report([{"_id": t["_id"], "status": "done", "result": t["data"]} for t in leased[:3]]
                    + [{"_id": t["_id"], "status": "failed", "error": "e"} for t in leased[3:5]]
                    + [{"_id": leased[5]["_id"], "status": "queued"}])
        clock.advance(1000)
        jobs.lease(max=2)
        jobs.cancel(jobs.tasks(status="queued")["tasks"][0]["_id"])
        jobs.purge("done")
        replayed = K.Broker(clock=clock)
        for record in records:
            replayed._apply(record)
        self.assertEqual(replayed.get("jobs").tasks(limit=1000), jobs.tasks(limit=1000))
        self.assertEqual(replayed.get("jobs").stats(), jobs.stats())
        self.assertEqual(replayed.get("jobs").lease(max=50), jobs.lease(max=50))

    def test_insert_of_values_json_cannot_hold_is_refused(self):
        jobs = K.Broker().queue("jobs")
        for data in (float("nan"), {"x": object()}, {1: {2: set()}}):
            with self.assertRaises(K.BadRequest):
                jobs.insert({"data": data})
        self.assertEqual(jobs.stats()["total"], 0)

    def test_unknown_queue_options_are_refused_with_the_valid_names(self):
        with self.assertRaisesRegex(K.BadRequest, "max_attempts"):
            K.Broker().queue("jobs", max_attemps=3)

    def test_stale_heap_entries_are_dropped_so_memory_stays_bounded(self):
        jobs = K.Broker().queue("jobs")
        task = jobs.insert({"data": 1})
        jobs.set_status(task["_id"], "paused")
        for _ in range(3000):
            jobs.set_status(task["_id"], "queued")
            jobs.set_status(task["_id"], "paused")
        self.assertLess(len(jobs._ready) + len(jobs._delayed), 1100)

    def test_a_task_paused_and_resumed_again_and_again_is_leased_once(self):
        jobs = K.Broker().queue("jobs")
        task_id = jobs.insert({"data": 1})["_id"]
        for _ in range(5):  # each resume indexes the task again; the older entries must not lease it twice
            jobs.set_status(task_id, "paused")
            jobs.set_status(task_id, "queued")
        leased = jobs.lease(max=10)
        self.assertEqual([(task["_id"], task["attempt"]) for task in leased], [(task_id, 1)])
        self.assertEqual(len(jobs.task(task_id)["history"]), 1)
        self.assertEqual(jobs.lease(max=10), [])

    def test_ids_sort_in_the_order_tasks_were_inserted(self):
        jobs = K.Broker().queue("jobs")
        ids = [task["_id"] for task in jobs.insert([{"data": i} for i in range(12)])]
        self.assertEqual(sorted(ids), ids)

    def test_ids_differ_between_brokers_so_a_restart_cannot_reuse_one(self):
        first = K.Broker().queue("jobs").insert({"data": 1})["_id"]
        second = K.Broker().queue("jobs").insert({"data": 1})["_id"]
        self.assertNotEqual(first, second)


# ---------------------------------------------------------------------------------------------------------------
# Many workers at once
# ---------------------------------------------------------------------------------------------------------------

class ConcurrencyTest(unittest.TestCase):
    def test_eight_workers_drain_thousands_of_tasks_each_done_exactly_once(self):
        broker = K.Broker()
        jobs = broker.queue("jobs", persistent=True, lease=60000)
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        count = 3000
        for start in range(0, count, K.MAX_INSERT_BATCH):
            jobs.insert([{"data": i} for i in range(start, min(count, start + K.MAX_INSERT_BATCH))])
        delivered, errors, lock = [], [], threading.Lock()

        def worker(name):
            connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
            reports = []
            try:
                while True:
                    body = json.dumps({"tasks": reports, "max": 3 if name % 2 else 1, "worker": str(name)})
                    connection.request("POST", "/v1/queue/jobs", body=body,
                                       headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                    if response.status == 204:
                        return
                    if response.status != 200:
                        errors.append((response.status, payload))
                        return
                    tasks = json.loads(payload)["tasks"]
                    with lock:
                        delivered.extend(task["_id"] for task in tasks)
                    reports = [{"_id": task["_id"], "status": "done", "attempt": task["attempt"],
                                "result": task["data"] * 2} for task in tasks]
            finally:
                connection.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(delivered), count)
        self.assertEqual(len(set(delivered)), count)
        stats = jobs.stats()
        self.assertEqual(stats["counts"]["done"], count)
        self.assertEqual(stats["totals"]["done"], count)
        self.assertEqual(stats["totals"]["leased"], count)
        sample = jobs.tasks(status="done", limit=5)["tasks"]
        self.assertEqual([task["result"] for task in sample], [task["data"] * 2 for task in sample])


# ---------------------------------------------------------------------------------------------------------------
# The command line, as a user runs it
# ---------------------------------------------------------------------------------------------------------------

def wait_until_listening(test, process):
    """Read the server's stderr up to its "listening on URL" line; return the URL (earlier lines are warnings)."""
    seen = []
    for _ in range(20):
        line = process.stderr.readline()
        seen.append(line)
        if "listening on" in line:
            return line.split("listening on ")[1].strip()
        if not line:
            break
    test.fail(f"the server did not start: {''.join(seen)}")


def stop_process(process, group=False):
    """Kill a test's subprocess (and its children, with group) if it still runs, and reap it."""
    if process.poll() is None:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    process.wait(10)


class ServerProcessTestCase(unittest.TestCase):
    """Tests that start katar_http.py as a process of its own (no tests here: subclasses share `start`)."""

    def start(self, *args):
        process = subprocess.Popen([*KATAR, "--port", "0", *args],
                                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(stop_process, process)
        return process, wait_until_listening(self, process)

    def get(self, url):
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)


class CommandLineTest(ServerProcessTestCase):

    def test_queue_flag_sets_the_interval_and_sigterm_answers_long_polls_then_exits_0(self):
        process, url = self.start("--queue", "jobs:1000", "--queue", "mail", "--quiet")
        self.assertEqual(self.get(url + "/v1/queue/jobs"), {"configuration": {"interval": 1000}})
        self.assertEqual(self.get(url + "/v1/queue/mail"), {"configuration": {"interval": 30000}})
        result = {}

        def long_poll():
            request = urllib.request.Request(url + "/v1/queue/jobs", data=b'{"wait": 20000}', method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                result["status"] = response.status
        thread = threading.Thread(target=long_poll)
        thread.start()
        deadline = time.monotonic() + 5
        while self.get(url + "/v1/queue/jobs/stats")["waiting_workers"] < 1:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        thread.join(10)
        self.assertEqual(result.get("status"), 204)
        self.assertEqual(process.wait(10), 0)
        self.assertLess(time.monotonic() - started, 8)

    def test_config_file_sets_queues_and_options(self):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump({"queues": {"images": {"configuration": {"interval": 250, "size": "large"}, "lease": 5000,
                                             "persistent": True}}}, handle)
        self.addCleanup(os.unlink, handle.name)
        process, url = self.start("--config", handle.name, "--quiet")
        self.assertEqual(self.get(url + "/v1/queue/images"), {"configuration": {"interval": 250, "size": "large"}})
        process.send_signal(signal.SIGINT)
        self.assertEqual(process.wait(10), 0)

    def test_config_wins_over_the_journal_for_the_options_it_names_and_only_those(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        config, journal = os.path.join(directory, "queues.json"), os.path.join(directory, "tasks.journal")
        with open(config, "w") as handle:
            json.dump({"queues": {"jobs": {"lease": 5000}}}, handle)
        process, url = self.start("--config", config, "--journal", journal, "--quiet")
        for path, options in (("/v1/queue/jobs", {"lease": 7000, "max_attempts": 9}), ("/v1/queue/mail", {})):
            request = urllib.request.Request(url + path, data=json.dumps(options).encode(), method="PUT")
            urllib.request.urlopen(request, timeout=5).close()
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(10), 0)
        process, url = self.start("--config", config, "--journal", journal, "--quiet")
        queues = {s["queue"] for s in self.get(url + "/v1/queues")["queues"]}
        self.assertEqual(queues, {"jobs", "mail"})  # a queue made with PUT stays
        client = K.Client(url)
        self.addCleanup(client.close)
        described = client.request("PUT", "/v1/queue/jobs", {})[1]
        self.assertEqual((described["lease"], described["max_attempts"]), (5000, 9))

    def test_a_config_file_with_an_unknown_key_or_option_is_refused_naming_it(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        for document, needle in (({"queues": {"jobs": {"leese": 5}}}, "queue jobs: unknown queue option 'leese'"),
                                 ({"queue": {"jobs": {}}}, '{"queues":'), ({"queues": {}, "extra": 1}, "nothing else"),
                                 ({"queues": {"jobs": {"lease": 0}}}, "queue jobs: lease must be between")):
            config = os.path.join(directory, "queues.json")
            with open(config, "w") as handle:
                json.dump(document, handle)
            result = subprocess.run([*KATAR, "--port", "0",
                                     "--config", config], capture_output=True, text=True, timeout=20)
            self.assertEqual(result.returncode, 2, document)
            self.assertIn(needle, result.stderr)

    def test_bad_arguments_are_refused_with_a_message(self):
        for args, needle in ((["--queue", "jobs:fast"], "milliseconds"), (["--queue", "bad name"], "queue name"),
                             (["--config", "/nonexistent.json"], "No such file"),
                             (["--port", "99999"], "a port is a number from 0 to 65535"),
                             (["--max-memory", "lots"], "like 512M")):
            result = subprocess.run([*KATAR, "--port", "0", *args],
                                    capture_output=True, text=True, timeout=20)
            self.assertEqual(result.returncode, 2, args)
            self.assertIn(needle, result.stderr)

    def test_a_journal_in_a_missing_folder_or_a_folder_is_refused_naming_the_fix(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        missing = os.path.join(directory, "no", "such")
        with open(os.path.join(directory, "afile"), "w"):
            pass
        for journal, needles in ((os.path.join(missing, "x.journal"), (f"the folder {missing} ", "does not exist",
                                                                      f"mkdir -p {missing}")),
                                 (os.path.join(directory, "afile", "x.journal"), ("is a file, not a folder",)),
                                 (directory, ("is a folder", os.path.join(directory, "tasks.journal")))):
            result = subprocess.run([*KATAR, "--port", "0",
                                     "--journal", journal], capture_output=True, text=True, timeout=20)
            self.assertEqual(result.returncode, 1, journal)
            for needle in needles:
                self.assertIn(needle, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(os.listdir(directory), ["afile"])  # nothing made: no folder, no lock file

    def test_log_level_info_logs_each_request_and_warning_does_not(self):
        for level, expected in (("info", True), ("warning", False)):
            process, url = self.start("--queue", "jobs", "--log-level", level)
            self.get(url + "/v1/queue/jobs")
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(10), 0)
            self.assertEqual('"GET /v1/queue/jobs" 200' in process.stderr.read(), expected, level)

    def test_a_second_server_on_the_same_journal_refuses_to_start(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        journal = os.path.join(directory, "tasks.journal")
        first, url = self.start("--journal", journal, "--queue", "jobs", "--quiet")
        second = subprocess.run([*KATAR, "--port", "0",
                                 "--journal", journal], capture_output=True, text=True, timeout=20)
        self.assertEqual(second.returncode, 1)
        self.assertIn(f"in use by another katar_http server (pid {first.pid})", second.stderr)
        self.assertEqual(self.get(url + "/v1/queue/jobs"), {"configuration": {"interval": 30000}})

    def test_a_corrupt_journal_refuses_to_start_until_repair_journal_is_asked_for(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        journal = os.path.join(directory, "tasks.journal")
        broker = K.Broker(journal=journal)
        kept = broker.queue("jobs", persistent=True).insert([{"data": 1}, {"data": 2}])
        broker.get("jobs").insert({"data": 3})
        broker.close()
        lines = read_file(journal).splitlines(True)
        lines[2] = lines[2][:20] + "#" + lines[2][21:]
        with open(journal, "w") as handle:
            handle.writelines(lines)
        command = [*KATAR, "--port", "0", "--journal", journal]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=20)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("line 3", refused.stderr)
        self.assertIn("--repair-journal", refused.stderr)
        process, url = self.start("--journal", journal, "--repair-journal", "--quiet")
        self.assertEqual(self.get(url + "/v1/queue/jobs/stats")["total"], 0)  # the inserts came after line 3
        self.assertTrue(any(".corrupt-" in name for name in os.listdir(directory)))
        self.assertEqual(len(kept), 2)

    def test_help_describes_every_flag(self):
        result = subprocess.run([*KATAR, "--help"],
                                capture_output=True, text=True, timeout=20)
        self.assertEqual(result.returncode, 0)
        for flag in ("--host", "--port", "--queue", "--config", "--max-wait", "--max-body", "--idle-timeout",
                     "--quiet", "--log-level", "--journal", "--fsync", "--fsync-interval", "--repair-journal",
                     "--token", "--token-file", "--worker-token", "--worker-token-file", "--tls-cert", "--tls-key",
                     "--insecure", "--max-tasks", "--max-data", "--max-depth", "--max-headers", "--max-head-bytes",
                     "--request-timeout", "--max-connections", "examples:", "work", "put", "stats"):
            self.assertIn(flag, result.stdout)


# ---------------------------------------------------------------------------------------------------------------
# The journal: restarts, torn tails, corruption, compaction, disk failures, one writer, group commit
# ---------------------------------------------------------------------------------------------------------------

class SimulatedCrash(Exception):
    """Raised by a compaction hook: the process "dies" between two steps, leaving the files as they are."""


def run_for(seconds, stop, threads, timeout=20):
    """Start `threads`, let them run for `seconds`, set `stop`, and wait for them to end."""
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout)


def read_file(path, mode="r"):
    with open(path, mode) as handle:
        return handle.read()


def broker_state(broker):
    """Everything a client can see of a broker, for comparing before and after a restart."""
    return {queue.name: (queue.describe(), queue.tasks(limit=1000), queue.stats()) for queue in broker.queues()}


class JournalTestCase(unittest.TestCase):
    """A journal file in a temporary folder, and brokers opened on it with a fake clock."""

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "tasks.journal")
        self.clock = FakeClock()

    def open(self, **options):
        broker = K.Broker(clock=self.clock, random_source=random.Random(3), journal=K.Journal(self.path, **options))
        self.addCleanup(broker.close)
        return broker

    def crash(self, broker):
        """Abandon a broker as a killed process would: no flush, just the lock released (as the kernel does)."""
        journal = broker._journal
        os.close(journal._fd)
        journal._fd, journal._closed = None, True

    def churn(self, broker):
        """A bit of everything the core journals."""
        jobs = broker.queue("jobs", lease=1000, max_attempts=2, persistent=False)
        keep = broker.queue("keep", persistent=True, configuration={"interval": 500, "when": "now"})
        ids = [t["_id"] for t in jobs.insert([{"data": i, "priority": i % 3, "key": f"k{i}"} for i in range(12)])]
        keep.insert([{"data": "paused", "status": "paused"}, {"data": "later", "delay": 5000}, {"data": "x"}])
        leased = jobs.lease(max=6, worker="w1")
        jobs.report([{"_id": leased[0]["_id"], "status": "done", "result": {"r": 1}},
                     {"_id": leased[1]["_id"], "status": "failed", "error": "e1"},
                     {"_id": leased[2]["_id"], "status": "failed", "error": "fatal", "retry": False},
                     {"_id": leased[3]["_id"], "status": "queued"},
                     {"_id": leased[4]["_id"], "status": "in progress"}])
        self.clock.advance(1000)  # leased[5] and leased[4] expire
        jobs.stats()
        jobs.cancel(ids[11])
        jobs.set_status(ids[10], "paused")
        done = keep.lease()
        keep.report([{"_id": done[0]["_id"], "status": "done", "result": "ok"}])
        keep.purge("done")
        broker.queue("jobs", max_in_flight=4)
        return ids


class JournalTest(JournalTestCase):
    def test_a_restart_replays_the_journal_to_the_same_state(self):
        broker = self.open()
        ids = self.churn(broker)
        before = broker_state(broker)
        broker.close()
        again = self.open()
        self.assertEqual(broker_state(again), before)
        jobs = again.get("jobs")
        self.assertFalse(jobs.insert({"data": 0, "key": "k0"})["created"])  # a remembered discarded task's key
        fresh = jobs.insert({"data": "new"})["_id"]
        self.assertEqual(fresh.split("-")[0], ids[0].split("-")[0])
        self.assertGreater(int(fresh.split("-")[1]), max(int(i.split("-")[1]) for i in ids))

    def test_a_lease_survives_a_restart_and_the_report_after_it_is_accepted(self):
        broker = self.open()
        jobs = broker.queue("jobs", lease=10000)
        task_id = jobs.insert({"data": 1})["_id"]
        leased = jobs.lease(worker="phone")
        self.crash(broker)
        again = self.open()
        jobs = again.get("jobs")
        self.clock.advance(9000)
        self.assertEqual(jobs.lease(), [])
        jobs.report([{"_id": task_id, "status": "done", "attempt": leased[0]["attempt"]}])
        self.clock.advance(5000)
        self.assertEqual(jobs.lease(), [])
        self.assertEqual(jobs.task(task_id)["status"], "done")

    def test_a_torn_last_line_is_cut_off_with_a_warning_naming_its_offset(self):
        broker = self.open()
        self.churn(broker)
        before = broker_state(broker)
        broker.close()
        size = os.path.getsize(self.path)
        with open(self.path, "ab") as handle:
            handle.write(b'{"op":"insert","q":"jobs","id":"torn-99","da')
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            again = self.open()
        self.assertIn(f"cut off a torn last line (line 20, 44 bytes from byte {size}", stderr.getvalue())
        self.assertEqual(broker_state(again), before)
        self.assertEqual(os.path.getsize(self.path), size)
        saved = [name for name in os.listdir(os.path.dirname(self.path)) if ".torn-" in name]
        self.assertEqual(read_file(os.path.join(os.path.dirname(self.path), saved[0]), "rb"),
                         b'{"op":"insert","q":"jobs","id":"torn-99","da')  # cut off, not thrown away

    def test_a_damaged_last_line_is_refused_not_cut_and_a_long_zero_filled_tail_is_read_in_one_pass(self):
        broker = self.open()
        jobs = broker.queue("jobs")
        ids = [jobs.insert({"data": n})["_id"] for n in range(3)]
        broker.close()
        whole = read_file(self.path, "rb")
        flipped = whole[:-3] + bytes([whole[-3] ^ 1]) + whole[-2:]  # a bit of the last record, its newline kept
        with open(self.path, "wb") as handle:
            handle.write(flipped)
        with self.assertRaisesRegex(K.JournalError, "line 5 .*damaged"):
            K.Broker(journal=self.path)  # an acknowledged record: not silently cut as a torn write would be
        self.assertEqual(read_file(self.path, "rb"), flipped)
        original = K.LINE_LIMIT
        K.LINE_LIMIT = 1 << 20
        self.addCleanup(setattr, K, "LINE_LIMIT", original)
        with open(self.path, "wb") as handle:
            handle.write(whole + b"\0" * (8 << 20))  # a tail of zeros eight times the longest line
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            again = self.open()
        self.assertEqual([t["_id"] for t in again.get("jobs").tasks()["tasks"]], ids)
        self.assertIn("cut off a torn last line", stderr.getvalue())
        self.assertEqual(os.path.getsize(self.path), len(whole))

    def test_a_corrupt_middle_line_refuses_to_start_naming_it_and_repair_keeps_what_precedes_it(self):
        broker = self.open()
        jobs = broker.queue("jobs", persistent=True)
        ids = [jobs.insert({"data": i})["_id"] for i in range(5)]
        broker.close()
        with open(self.path, "rb") as handle:
            lines = handle.read().split(b"\n")
        lines[4] = b'{"op":"insert", garbage'
        with open(self.path, "wb") as handle:
            handle.write(b"\n".join(lines))
        untouched = read_file(self.path, "rb")
        with self.assertRaisesRegex(K.JournalError, r"line 5 \(byte \d+\).*--repair-journal"):
            K.Broker(journal=self.path)
        self.assertEqual(read_file(self.path, "rb"), untouched)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            repaired = self.open(repair=True)
        self.assertEqual([t["_id"] for t in repaired.get("jobs").tasks()["tasks"]], ids[:2])
        saved = [name for name in os.listdir(os.path.dirname(self.path)) if ".corrupt-" in name]
        self.assertEqual(len(saved), 1)
        self.assertIn("garbage", read_file(os.path.join(os.path.dirname(self.path), saved[0])))

    def test_a_record_that_cannot_be_applied_refuses_to_start(self):
        broker = self.open()
        broker.queue("jobs")
        broker.close()
        with open(self.path, "ab") as handle:
            handle.write(K.journal_line({"op": "done", "q": "jobs", "ids": ["nope-1"], "results": [None], "at": 1}) +
                         K.journal_line({"op": "queue", "q": "other", "options": {}}))
        with self.assertRaisesRegex(K.JournalError, "line 3 cannot be applied.*--repair-journal"):
            K.Broker(journal=self.path)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            repaired = self.open(repair=True)
        self.assertEqual([queue.name for queue in repaired.queues()], ["jobs"])
        self.assertIn("line 3", stderr.getvalue())
        self.assertEqual(read_file(self.path).count("\n"), 2)

    def test_compaction_keeps_the_state_shrinks_the_file_and_serving_goes_on(self):
        broker = self.open()
        self.churn(broker)
        jobs = broker.get("jobs")
        for _ in range(30):
            leased = jobs.lease(max=4)
            jobs.report([{"_id": t["_id"], "status": "queued"} for t in leased])
        lines_before = read_file(self.path).count("\n")
        during = []
        # While the snapshot is on disk but not yet in place, the server keeps taking changes.
        broker._journal.compaction_hook = lambda step: step == "snapshot written" and during.append(
            jobs.insert({"data": "during compaction"})["_id"])
        broker.compact()
        self.assertEqual(len(during), 1)
        self.assertLess(read_file(self.path).count("\n"), lines_before / 2)
        before = broker_state(broker)
        jobs.insert({"data": "after compaction"})
        after_insert = broker_state(broker)
        broker.close()
        self.assertEqual(broker_state(self.open()), after_insert)
        self.assertNotEqual(before, after_insert)

    def test_compaction_starts_by_itself_when_the_journal_outgrows_the_state(self):
        original = K.COMPACT_MIN_RECORDS
        K.COMPACT_MIN_RECORDS = 200
        self.addCleanup(setattr, K, "COMPACT_MIN_RECORDS", original)
        broker = self.open()
        jobs = broker.queue("jobs")
        for _ in range(150):
            task = jobs.insert({"data": 1})
            jobs.report([{"_id": jobs.lease()[0]["_id"], "status": "done"}])
        broker._durability.join_compaction(10)
        # 150 rounds of insert, lease and done wrote 450 records; compactions keep only what is live plus a tail.
        self.assertLess(read_file(self.path).count("\n"), 300)
        before = broker_state(broker)
        broker.close()
        self.assertEqual(broker_state(self.open()), before)
        self.assertEqual(int(task["_id"].rsplit("-", 1)[1]), 150)

    def test_a_crash_between_any_two_steps_of_compaction_leaves_a_journal_that_loads(self):
        for step in ("snapshot written", "tail written", "renamed"):
            with self.subTest(step=step):
                if os.path.exists(self.path):
                    os.unlink(self.path)
                broker = self.open()
                self.churn(broker)
                before = broker_state(broker)

                def crash_at(current, step=step):
                    if current == step:
                        raise SimulatedCrash(step)
                broker._journal.compaction_hook = crash_at
                with self.assertRaises(SimulatedCrash):
                    broker.compact()
                self.crash(broker)
                reopened = self.open()
                self.assertEqual(broker_state(reopened), before)
                reopened.close()
                for name in os.listdir(os.path.dirname(self.path)):
                    if name.endswith(".compact"):
                        os.unlink(os.path.join(os.path.dirname(self.path), name))

    def test_a_second_broker_on_the_same_journal_refuses(self):
        self.open()
        with self.assertRaisesRegex(K.JournalError, "in use by another katar_http server"):
            K.Broker(journal=self.path)

    def test_the_weaker_fsync_modes_keep_what_was_written(self):
        for mode in ("interval", "never"):
            with self.subTest(mode=mode):
                if os.path.exists(self.path):
                    os.unlink(self.path)
                broker = self.open(fsync=mode, fsync_interval=0.01)
                synced = threading.Event()
                journal = broker._journal
                journal._fsync = lambda fd: (os.fsync(fd), synced.set())
                ids = [t["_id"] for t in broker.queue("jobs").insert([{"data": i} for i in range(3)])]
                if mode == "interval":
                    self.assertTrue(synced.wait(5), "the interval fsync never ran")
                else:
                    self.assertFalse(synced.is_set())
                self.crash(broker)  # the writes are in the file: a crash of the process loses nothing
                reopened = self.open()
                self.assertEqual([t["_id"] for t in reopened.get("jobs").tasks()["tasks"]], ids)
                reopened.close()


class JournalOverHttpTestCase(ServerTestCase):
    """A server whose broker has a journal: durability as a client sees it."""

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "tasks.journal")
        self.clock = FakeClock()
        self.broker = K.Broker(clock=self.clock, journal=self.path)
        self.jobs = self.broker.queue("jobs", persistent=True)
        self.server = K.serve(self.broker, port=0)
        self.addCleanup(self.server.close)
        self.url = self.server.url
        self.journal = self.broker._journal

    def reopened_state(self):
        self.server.close()
        again = K.Broker(clock=self.clock, journal=self.path)
        self.addCleanup(again.close)
        return broker_state(again)

    def check_reopened(self, check):
        """Run `check(broker)` on the journal replayed, then compacted, then read back compacted (the server and
        its broker closed first)."""
        self.server.close()
        for compact in (False, True, False):
            again = K.Broker(clock=self.clock, journal=self.path)
            check(again)
            if compact:
                again.compact()
            again.close()

    def reopen(self):
        """The journal opened again, closed when the test ends."""
        again = K.Broker(clock=self.clock, journal=self.path)
        self.addCleanup(again.close)
        return again


class JournalOverHttpTest(JournalOverHttpTestCase):
    def test_a_change_is_acknowledged_only_after_its_fsync(self):
        in_fsync, release, responded, seen = threading.Event(), threading.Event(), threading.Event(), []

        def slow_fsync(fd):
            seen.append((responded.is_set(), read_file(self.path).count("durable")))
            in_fsync.set()
            release.wait(10)
            os.fsync(fd)
        self.journal._fsync = slow_fsync
        thread = threading.Thread(target=lambda: (self.insert({"data": "durable"}), responded.set()))
        thread.start()
        self.assertTrue(in_fsync.wait(5))
        self.assertFalse(responded.is_set())
        release.set()
        thread.join(5)
        self.assertTrue(responded.is_set())
        self.assertEqual(seen[0], (False, 1))  # written before the fsync, answered after it

    def test_concurrent_requests_share_fsyncs(self):
        fsyncs = []

        def counted_fsync(fd):
            fsyncs.append(1)
            time.sleep(0.003)  # a disk's fsync takes milliseconds; tmpfs would hide the grouping
            os.fsync(fd)
        self.journal._fsync = counted_fsync
        errors = []

        def producer():
            connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=10)
            for _ in range(25):
                connection.request("POST", "/v1/queue/jobs/tasks", body=b'{"data": 1}',
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 201:
                    errors.append(response.status)
            connection.close()
        threads = [threading.Thread(target=producer) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(self.jobs.stats()["total"], 200)
        self.assertLess(len(fsyncs), 100, "200 requests from 8 clients should share fsyncs")

    def test_a_failing_disk_answers_503_keeps_memory_as_the_disk_has_it_and_recovers(self):
        kept = self.insert({"data": "before"}, {"data": "queued"})
        leased = self.lease_one()

        def full_disk(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.journal._fsync = full_disk
        for method, path, body in (("POST", "/v1/queue/jobs/tasks", {"data": "lost"}),
                                   ("POST", "/v1/queue/jobs", {"tasks": [{"_id": leased["_id"], "status": "done"}]}),
                                   ("PUT", "/v1/queue/jobs", {"lease": 5}),
                                   ("DELETE", f"/v1/queue/jobs/tasks/{kept[1]}", None)):
            status, payload, headers = self.call(method, path, body, allow_503=True)
            self.assertEqual(status, 503, (method, path, payload))
            self.assertIn("No space left", payload["error"])
            self.assertEqual(headers["Retry-After"], "1")
        # Reads keep working and show what the disk holds: nothing of the refused changes.
        self.assertEqual(self.counts(), {"paused": 0, "queued": 1, "in progress": 1, "done": 0, "failed": 0,
                                         "cancelled": 0})
        self.assertEqual(self.task(leased["_id"])["status"], "in progress")
        self.assertEqual(self.call("GET", "/v1/queue/jobs")[0], 200)
        self.journal._fsync = os.fsync  # the disk recovers, and so does the server
        self.poll({"tasks": [{"_id": leased["_id"], "status": "done"}], "max": 0}, expect=204)
        added = self.insert({"data": "after"})
        expected = broker_state(self.broker)
        self.assertEqual(self.reopened_state(), expected)
        self.assertEqual(expected["jobs"][2]["total"], 3)
        self.assertEqual([t["data"] for t in expected["jobs"][1]["tasks"]], ["before", "queued", "after"])
        self.assertTrue(added)

    def test_a_failing_disk_refuses_steering_and_flow_changes_and_tells_no_worker(self):
        running, = self.insert({"data": "running"})
        leased = self.lease_one(worker="w1")
        options = self.jobs.describe()

        def full_disk(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.journal._fsync = full_disk
        for method, path, body in (
                ("DELETE", f"/v1/queue/jobs/tasks/{running}", None),
                ("POST", "/v1/queue/jobs", {"tasks": [{"_id": running, "status": "in progress", "attempt": 1,
                                                       "progress": {"step": 9}, "lease": 90000}], "worker": "w1"}),
                ("POST", "/v1/queue/jobs", {"max": 0, "throttle": 60000}),
                ("POST", "/v1/queue/jobs/tasks", {"data": "grouped", "group": "g"}),
                ("PUT", "/v1/queue/jobs", {"group_limit": 1, "rate": 5, "max_queued": 3, "expire_after": 1000})):
            status, payload, _ = self.call(method, path, body, allow_503=True)
            self.assertEqual(status, 503, (method, path, payload))
        self.journal._fsync = os.fsync  # the disk recovers: nothing of the refused changes is there
        task = self.task(running)
        self.assertEqual((task["status"], task["progress"], task["lease_expires_at"]),
                         ("in progress", None, self.clock.ms + 60000))
        stats = self.call("GET", "/v1/queue/jobs/stats")[1]
        self.assertEqual((stats["throttled_for_ms"], stats["total"]), (0, 1))
        self.assertEqual(self.jobs.describe(), options)
        self.assertEqual(self.poll({"worker": "w1", "max": 0})[0], 204)  # told of no cancel that did not happen
        self.poll({"tasks": [{"_id": leased["_id"], "status": "done", "attempt": 1}], "max": 0}, expect=204)

    def test_a_producer_waiting_for_a_result_is_never_told_done_before_the_disk_has_it(self):
        task_id, = self.insert({"data": "work"})
        leased = self.lease_one()
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(
            self.call("GET", f"/v1/queue/jobs/tasks/{task_id}?wait=10000", allow_503=True)))
        waiter.start()
        deadline = time.monotonic() + 10
        while not self.jobs.stats()["total"] or not self.broker.get("jobs")._result_waiters:
            self.assertLess(time.monotonic(), deadline, "the producer never started waiting")
            time.sleep(0.01)
        self.journal._fsync = lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error"))
        with contextlib.redirect_stderr(io.StringIO()):
            status, _, _ = self.call("POST", "/v1/queue/jobs", {
                "tasks": [{"_id": leased["_id"], "status": "done", "result": 42}], "max": 0}, allow_503=True)
            waiter.join(15)
        self.assertEqual(status, 503)
        answer_status, answer, _ = answers[0]
        self.assertTrue(answer_status == 503 or answer["status"] == "in progress", (answer_status, answer))
        self.journal._fsync = os.fsync
        self.assertEqual(self.task(task_id)["status"], "in progress")

    def test_a_write_that_fails_halfway_leaves_no_half_record(self):
        self.insert({"data": "before"})
        real_write, calls = os.write, []

        def half_then_fail(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.EIO, "Input/output error")
        self.journal._write = half_then_fail
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "lost"}, allow_503=True)
        self.assertEqual(status, 503)
        self.journal._write = real_write
        self.insert({"data": "after"})
        self.assertEqual([t["data"] for t in self.reopened_state()["jobs"][1]["tasks"]], ["before", "after"])

    def test_after_a_failure_nothing_is_acknowledged_until_the_journal_is_reset(self):
        self.insert({"data": "before"})
        real_fsync, fail = os.fsync, [True]

        def flaky_fsync(fd):
            if fail[0]:
                fail[0] = False  # fails once, then works: the next flush must still not land after the failure
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)
        self.journal._fsync = flaky_fsync
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": "refused"}, allow_503=True)[0], 503)
        self.insert({"data": "after"})
        expected = broker_state(self.broker)
        self.assertEqual([t["data"] for t in expected["jobs"][1]["tasks"]], ["before", "after"])
        self.assertEqual(self.reopened_state(), expected)

    def test_a_compaction_does_not_outlive_a_disk_failure(self):
        self.insert({"data": "before"})
        journal = self.journal

        def fail_then_continue(step):
            if step == "snapshot written":
                journal._fsync = lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
                status = self.call("POST", "/v1/queue/jobs/tasks", {"data": "refused"}, allow_503=True)[0]
                self.assertEqual(status, 503)
                journal._fsync = os.fsync
        journal.compaction_hook = fail_then_continue
        with self.assertRaises(OSError):
            self.broker.compact()
        self.insert({"data": "after"})
        self.assertEqual([t["data"] for t in self.reopened_state()["jobs"][1]["tasks"]], ["before", "after"])


# ---------------------------------------------------------------------------------------------------------------
# Acknowledged writes: compaction, all-or-nothing commits, time, memory, the journal's file
# ---------------------------------------------------------------------------------------------------------------

class CompactionRaceTest(JournalTestCase):
    def test_records_appended_while_compaction_pauses_at_each_step_survive_a_restart(self):
        for step in ("snapshot written", "tail written", "renamed"):
            with self.subTest(step=step):
                if os.path.exists(self.path):
                    os.unlink(self.path)
                broker = self.open()
                jobs = broker.queue("jobs", persistent=True)
                first = [t["_id"] for t in jobs.insert([{"data": i} for i in range(5)])]
                acknowledged, threads = [], []

                def insert_while_paused(current, step=step):
                    if current != step:
                        return
                    for n in range(3):  # each writer waits for durability in its own thread, as a request does
                        before = broker._journal.ticket
                        thread = threading.Thread(target=lambda n=n: acknowledged.append(
                            jobs.insert({"data": f"{step} {n}"})["_id"]))
                        thread.start()
                        threads.append(thread)
                        deadline = time.monotonic() + 10
                        while broker._journal.ticket == before and time.monotonic() < deadline:
                            time.sleep(0.001)  # until its record is appended
                broker._journal.compaction_hook = insert_while_paused
                broker.compact()
                for thread in threads:
                    thread.join(10)
                self.assertEqual(len(acknowledged), 3)
                before = broker_state(broker)
                broker.close()
                reopened = self.open()
                self.assertEqual(broker_state(reopened), before)
                self.assertEqual([t["_id"] for t in reopened.get("jobs").tasks()["tasks"]],
                                 first + sorted(acknowledged))
                reopened.close()

    def test_a_failed_compaction_removes_its_file_and_waits_before_the_next(self):
        original = K.COMPACT_MIN_RECORDS
        K.COMPACT_MIN_RECORDS = 50
        self.addCleanup(setattr, K, "COMPACT_MIN_RECORDS", original)
        broker = self.open()
        jobs = broker.queue("jobs")
        attempts = []

        def full_disk(step):
            attempts.append(step)
            raise OSError(errno.ENOSPC, "No space left on device")
        broker._journal.compaction_hook = full_disk
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            for _ in range(200):
                jobs.insert({"data": 1})
                jobs.report([{"_id": jobs.lease()[0]["_id"], "status": "done"}])
                broker._durability.join_compaction(10)
        self.assertEqual(len(attempts), 1, "a failed compaction was retried at once")
        self.assertIn("No space left", stderr.getvalue())
        self.assertFalse(os.path.exists(self.path + ".compact"))
        before = broker_state(broker)
        broker.close()
        self.assertEqual(broker_state(self.open()), before)

    def test_acknowledged_writes_survive_a_flaky_disk_and_compactions_and_refused_ones_stay_out(self):
        broker = self.open()
        journal, queues = broker._journal, [broker.queue(name, persistent=True) for name in ("a", "b")]
        chance, stop, lock = random.Random(11), threading.Event(), threading.Lock()
        acknowledged, refused = set(), set()

        def flaky(fd):  # a disk that fails one fsync in thirty
            with lock:
                fails = chance.random() < 1 / 30
            if fails:
                raise OSError(errno.EIO, "Input/output error")
            os.fsync(fd)
        journal._fsync = flaky

        def write(queue, number):
            for n in range(10 ** 6):
                if stop.is_set():
                    return
                data = f"{number}-{n}"
                try:
                    queue.insert({"data": data})
                    with lock:
                        acknowledged.add(data)
                except K.Unavailable:
                    with lock:
                        refused.add(data)

        def compact():
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    broker.compact()
        threads = [threading.Thread(target=write, args=(queues[n % 2], n)) for n in range(4)]
        threads.append(threading.Thread(target=compact))
        with contextlib.redirect_stderr(io.StringIO()):
            run_for(2, stop, threads, timeout=30)
            journal._fsync = os.fsync
            broker.close()
        self.assertGreater(len(refused), 10, "the disk never failed")
        self.assertGreater(len(acknowledged), 200)
        reopened, kept = self.open(), set()
        for queue in reopened.queues():
            page = queue.tasks(limit=1000)
            kept.update(task["data"] for task in page["tasks"])
            while page["next"]:
                page = queue.tasks(limit=1000, after=page["next"])
                kept.update(task["data"] for task in page["tasks"])
        self.assertEqual(acknowledged - kept, set(), "acknowledged inserts were lost")
        self.assertEqual(refused & kept, set(), "refused inserts came back")

    def test_after_a_compaction_a_failed_fsync_does_not_stop_the_journal_for_good(self):
        broker = self.open()
        jobs = broker.queue("jobs")
        jobs.insert({"data": "before"})
        broker.compact()
        journal = broker._journal
        journal._fsync = lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error"))
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(K.Unavailable):
                jobs.insert({"data": "refused"})
        journal._fsync = os.fsync
        jobs.insert({"data": "after"})  # the compacted file appends at its end, even after the reset's truncate
        self.assertIsNone(broker.health())
        before = broker_state(broker)
        self.assertEqual([t["data"] for t in before["jobs"][1]["tasks"]], ["before", "after"])
        broker.close()
        self.assertEqual(broker_state(self.open()), before)

    def test_a_folder_fsync_that_fails_after_the_rename_is_owed_before_the_next_acknowledgement(self):
        broker = self.open()
        jobs = broker.queue("jobs")
        jobs.insert({"data": "before"})
        original, calls = K._fsync_folder, []

        def folder(path):
            calls.append(len(calls) == 0)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
            original(path)
        K._fsync_folder = folder
        self.addCleanup(setattr, K, "_fsync_folder", original)
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(OSError):
                broker.compact()
            jobs.insert({"data": "after"})
        self.assertEqual(len(calls), 2, "the next change was acknowledged without the folder's fsync")
        before = broker_state(broker)
        broker.close()
        self.assertEqual(broker_state(self.open()), before)

    def test_a_rebuild_at_a_tick_leaves_every_lease_able_to_run_out(self):
        broker = self.open(fsync="interval", fsync_interval=0.05)
        journal = broker._journal
        jobs = broker.queue("jobs", lease=1000, backoff=1, max_backoff=1)
        task_id = jobs.insert({"data": 1})["_id"]
        jobs.lease()
        synced = threading.Event()
        journal._fsync = lambda fd: (os.fsync(fd), synced.set())
        self.assertTrue(synced.wait(5))
        journal._fsync = lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error"))
        jobs.report([{"_id": task_id, "status": "failed", "error": "x", "retry_after": 0}])
        self.clock.advance(10)
        jobs.lease()  # attempt 2, written, never synced: the interval fsync fails
        deadline = time.monotonic() + 5
        while journal.failed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        journal._fsync = os.fsync
        self.clock.advance(5000)
        with contextlib.redirect_stderr(io.StringIO()):
            jobs.stats()  # the tick rebuilds memory (attempt 1, in progress), then expires its lease
        self.assertEqual(jobs.task(task_id)["status"], "queued")
        self.assertEqual(jobs.lease()[0]["_id"], task_id)

    def test_a_commit_does_not_walk_the_queues(self):
        broker = self.open()
        for n in range(50):
            broker.queue(f"q{n}")

        class CountingDict(dict):
            walks = 0

            def values(self):
                CountingDict.walks += 1
                return super().values()
        broker._queues = CountingDict(broker._queues)
        jobs = broker.get("q0")
        for _ in range(20):
            jobs.insert({"data": 1})
        self.assertEqual(CountingDict.walks, 0)


class AllOrNothingTest(unittest.TestCase):
    """A change that fails halfway is undone: memory (and the journal) are as before, and the caller is told."""

    def brokers(self):
        """A broker in memory only, and one with a journal (reopened at the end of each check)."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        yield "memory", K.Broker(clock=FakeClock(), random_source=random.Random(5)), None
        path = os.path.join(directory, "tasks.journal")
        yield "journal", K.Broker(clock=FakeClock(), random_source=random.Random(5), journal=path), path

    def fail_on_call(self, owner, name, call):
        """Make owner.name raise MemoryError on its `call`-th call (from now on)."""
        real, calls = getattr(owner, name), [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                raise MemoryError("injected")
            return real(*args, **kwargs)
        setattr(owner, name, failing)
        return lambda: setattr(owner, name, real)

    def check_undone(self, broker, path, change, owner, name, call):
        before, memory = broker_state(broker), broker.memory()
        journal_bytes = read_file(path, "rb") if path else None
        restore = self.fail_on_call(owner, name, call)
        try:
            with contextlib.redirect_stderr(io.StringIO()) as stderr:
                with self.assertRaises(K.Unavailable):
                    change()
        finally:
            restore()
        self.assertIn("undone", stderr.getvalue())
        self.assertEqual(broker_state(broker), before)
        self.assertEqual(broker.memory(), memory)
        if path:
            self.assertEqual(read_file(path, "rb"), journal_bytes)

    def test_a_memory_error_halfway_through_a_batch_changes_nothing(self):
        for mode, broker, path in self.brokers():
            with self.subTest(mode=mode):
                jobs = broker.queue("jobs", persistent=True, max_attempts=3)
                ids = [t["_id"] for t in jobs.insert([{"data": i, "key": f"k{i}"} for i in range(30)])]
                # An insert of 1,000 that fails at the 101st task, a lease of ten at the fourth, a report of ten
                # at the fifth, a purge at the second task.
                self.check_undone(broker, path, lambda: jobs.insert([{"data": i} for i in range(1000)]),
                                  K.Queue, "_place", 101)
                self.check_undone(broker, path, lambda: jobs.lease(max=10, worker="w"), K.Queue, "_move", 4)
                leased = jobs.lease(max=10, worker="w")
                reports = [{"_id": t["_id"], "status": "done", "result": {"n": t["data"]}} for t in leased[:5]] + [
                    {"_id": t["_id"], "status": "failed", "error": "boom", "retry_after": 0} for t in leased[5:]]
                self.check_undone(broker, path, lambda: jobs.report(reports), K.Queue, "_end_delivery", 5)
                jobs.report(reports)  # the same reports, applied once the failure is gone
                self.check_undone(broker, path, lambda: jobs.purge("done"), K.Queue, "_touch", 2)
                self.assertEqual(jobs.purge("done"), 5)
                self.assertEqual(len(jobs.lease(max=100)), 25)  # every other task is still leasable, once
                self.assertEqual(jobs.insert({"data": "again", "key": "k7"})["_id"], ids[7])
                if path:
                    expected = broker_state(broker)
                    broker.close()
                    reopened = K.Broker(clock=FakeClock(), journal=path)
                    self.addCleanup(reopened.close)
                    self.assertEqual(broker_state(reopened), expected)
                else:
                    broker.close()

    def test_a_failing_encoder_changes_nothing(self):
        for mode, broker, path in self.brokers():
            if not path:
                continue
            jobs = broker.queue("jobs")
            jobs.insert({"data": 1})
            before, journal_bytes = broker_state(broker), read_file(path, "rb")
            original = K.journal_line
            K.journal_line = lambda record: (_ for _ in ()).throw(ValueError("cannot encode"))
            try:
                with self.assertRaisesRegex(K.Unavailable, "nothing was changed"):
                    jobs.insert({"data": 2})
            finally:
                K.journal_line = original
            self.assertEqual(broker_state(broker), before)
            self.assertEqual(read_file(path, "rb"), journal_bytes)
            broker.close()

    def test_a_memory_error_is_a_503_over_http_and_changes_nothing(self):
        broker = K.Broker(clock=FakeClock())
        broker.queue("jobs")
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        restore = self.fail_on_call(K.Queue, "_place", 3)
        self.addCleanup(restore)
        request = urllib.request.Request(server.url + "/v1/queue/jobs/tasks", method="POST",
                                         data=json.dumps({"tasks": [{"data": n} for n in range(5)]}).encode())
        with contextlib.redirect_stderr(io.StringIO()):
            with self.assertRaises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=10)
        self.assertEqual(caught.exception.code, 503)
        self.assertEqual(caught.exception.headers["Retry-After"], "1")
        self.assertIn("nothing was changed", json.loads(caught.exception.read())["error"])
        self.assertEqual(broker.get("jobs").stats()["total"], 0)


class ClockTest(unittest.TestCase):
    def test_a_step_of_the_wall_clock_neither_expires_nor_stretches_a_lease(self):
        for step in (3600, -3600):
            with self.subTest(step=step):
                clock = FakeClock()
                broker = K.Broker(clock=clock)
                jobs = broker.queue("jobs", lease=10000, max_attempts=1)
                jobs.insert({"data": 1})
                task_id = jobs.lease()[0]["_id"]
                clock.step(step)
                clock.advance(9999)
                self.assertEqual(jobs.task(task_id)["status"], "in progress")
                self.assertEqual(jobs.stats()["totals"]["expired"], 0)
                clock.advance(1)
                self.assertEqual(jobs.task(task_id)["status"], "failed")  # its one attempt ran out, on time

    def test_delays_and_backoffs_run_on_the_monotonic_clock(self):
        clock = FakeClock()
        broker = K.Broker(clock=clock)
        jobs = broker.queue("jobs")
        jobs.insert({"data": "later", "delay": 5000})
        clock.step(86400)  # a day of wall time: the delay has not passed
        self.assertEqual(jobs.lease(), [])
        clock.advance(5000)
        self.assertEqual(jobs.lease()[0]["data"], "later")

    def test_after_a_restart_time_never_runs_back_behind_the_journal(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path, clock = os.path.join(directory, "tasks.journal"), FakeClock()
        broker = K.Broker(clock=clock, journal=path)
        jobs = broker.queue("jobs", lease=10000)
        jobs.insert([{"data": 1}, {"data": 2}])
        task_id = jobs.lease()[0]["_id"]
        leased_until = jobs.task(task_id)["lease_expires_at"]
        broker.close()
        clock.step(-3600)  # the machine comes back with its clock an hour behind
        again = K.Broker(clock=clock, journal=path)
        self.addCleanup(again.close)
        jobs = again.get("jobs")
        self.assertGreaterEqual(jobs.insert({"data": 3}) and jobs.tasks()["tasks"][-1]["created_at"],
                                leased_until - 10000)
        clock.advance(9999)
        self.assertEqual(jobs.task(task_id)["status"], "in progress")  # not stretched by the hour either
        clock.advance(1)
        self.assertEqual(jobs.task(task_id)["status"], "queued")


class MemoryBoundTest(ServerTestCase):
    queue_options = {"persistent": True}

    def setUp(self):
        super().setUp()
        self.empty = self.broker.memory()[0]
        self.broker.max_memory = self.empty + 200 * (K.TASK_BYTES + 2000)

    def test_inserts_past_the_bound_are_503_while_leases_reports_and_purges_go_on(self):
        accepted, refused = [], None
        for _ in range(100):
            status, payload, headers = self.call(
                "POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": "x" * 900} for _ in range(10)]}, allow_503=True)
            if status == 503:
                refused = (payload, headers)
                break
            accepted += [task["_id"] for task in payload["tasks"]]
        self.assertIsNotNone(refused, "the bound never refused an insert")
        self.assertIn("--max-memory", refused[0]["error"])
        self.assertEqual(refused[1]["Retry-After"], "1")
        self.assertGreater(len(accepted), 50)
        self.assertEqual(self.counts()["queued"], len(accepted))  # nothing of the refused insert
        status, leased = self.poll({"max": 20}, expect=200)
        self.poll({"tasks": [{"_id": t["_id"], "status": "failed", "error": "e" * 500, "retry": False}
                             for t in leased[:10]] + [{"_id": t["_id"], "status": "done"} for t in leased[10:]],
                   "max": 0}, expect=204)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")[1]["purged"], len(accepted) - 20)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=done")[1]["purged"], 10)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=failed")[1]["purged"], 10)
        self.insert({"data": "room again"})
        self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")
        self.assertEqual(self.broker.memory()[0], self.empty)  # the estimate comes back to an empty queue's

    def test_past_the_bound_failures_keep_the_start_of_their_errors_and_queues_stay_in_bounds(self):
        ids = self.insert(*({"data": "x" * 1800} for _ in range(195)))
        leased = self.poll({"max": 20}, expect=200)[1]
        self.assertLess(self.broker.memory()[0], self.broker.max_memory)
        self.poll({"tasks": [{"_id": t["_id"], "status": "failed", "error": "e" * 60000} for t in leased[:10]],
                   "max": 0}, expect=204)  # accepted whole: the bound was not yet reached
        self.assertGreater(self.broker.memory()[0], self.broker.max_memory)
        self.poll({"tasks": [{"_id": t["_id"], "status": "failed", "error": "f" * 60000} for t in leased[10:]],
                   "max": 0}, expect=204)  # past it, reports still work, their errors cut
        self.assertEqual(self.task(leased[0]["_id"])["error"], "e" * 60000)
        self.assertEqual(self.task(leased[10]["_id"])["error"], "f" * K.HISTORY_ERROR_LIMIT)
        status, payload, _ = self.call("PUT", "/v1/queue/jobs", {"configuration": {"big": "c" * 50000}}, allow_503=True)
        self.assertEqual(status, 503, payload)  # a configuration is memory too
        status, payload, _ = self.call("PUT", "/v1/queue/more", {}, allow_503=True)
        self.assertEqual(status, 503, payload)  # and so is a queue
        self.assertEqual(self.call("PUT", "/v1/queue/jobs", {"paused": True})[0], 200)  # what adds nothing works
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")[1]["purged"], len(ids))  # retried
        self.assertEqual(self.call("PUT", "/v1/queue/jobs", {"configuration": {"big": "c" * 50000}})[0], 200)

    def test_errors_are_bounded_by_max_data_and_history_keeps_their_start(self):
        self.set_limits(max_data=4096)
        task = self.lease_one()
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [
            {"_id": task["_id"], "status": "failed", "error": "e" * 5000}], "max": 0})
        self.assertEqual(status, 400, payload)
        self.assertIn("tasks[0].error is longer than 4096 characters", payload["error"])
        self.assertEqual(self.task(task["_id"])["status"], "in progress")
        self.poll({"tasks": [{"_id": task["_id"], "status": "failed", "error": "\u00e9" * 4096}], "max": 0}, expect=204)
        detail = self.task(task["_id"])
        self.assertEqual(detail["error"], "\u00e9" * 4096)  # characters, however many bytes they take
        self.assertEqual(detail["history"][0]["error"], "\u00e9" * K.HISTORY_ERROR_LIMIT)

    def lease_one(self, **body):
        self.insert({"data": "one"})
        return super().lease_one(**body)


class JournalFileTest(JournalTestCase):
    def test_a_second_broker_through_a_symbolic_or_hard_link_is_refused(self):
        self.open().queue("jobs")
        for make in (os.symlink, os.link):
            with self.subTest(link=make.__name__):
                alias = os.path.join(os.path.dirname(self.path), "alias-" + make.__name__)
                make(self.path, alias)
                with self.assertRaisesRegex(K.JournalError, "in use by another katar_http server"):
                    K.Broker(journal=alias)

    def test_a_journal_opened_through_a_symbolic_link_is_compacted_where_the_link_points(self):
        link = os.path.join(os.path.dirname(self.path), "link.journal")
        os.symlink(self.path, link)
        broker = K.Broker(clock=self.clock, journal=link)
        jobs = broker.queue("jobs")
        jobs.insert([{"data": n} for n in range(3)])
        broker.compact()
        before = broker_state(broker)
        broker.close()
        self.assertTrue(os.path.islink(link))
        again = K.Broker(clock=self.clock, journal=link)
        self.addCleanup(again.close)
        self.assertEqual(broker_state(again), before)

    def test_a_journal_deleted_replaced_or_truncated_under_the_server_is_refused_loudly(self):
        for how in ("deleted", "replaced", "truncated"):
            with self.subTest(how=how):
                if os.path.exists(self.path):
                    os.unlink(self.path)
                broker = self.open()
                jobs = broker.queue("jobs")
                jobs.insert({"data": "before"})
                if how == "deleted":
                    os.unlink(self.path)
                elif how == "replaced":
                    other = self.path + ".other"
                    with open(other, "w") as handle:
                        handle.write("")
                    os.replace(other, self.path)
                else:
                    os.truncate(self.path, 0)  # as a log rotation's copytruncate does
                if how != "truncated":  # noticed before any change is tried
                    self.assertIn("deleted, replaced or truncated", broker.health())
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr):
                    with self.assertRaisesRegex(K.Unavailable, "deleted, replaced or truncated"):
                        jobs.insert({"data": "lost"})
                    with self.assertRaises(K.Unavailable):
                        jobs.insert({"data": "lost again"})
                self.assertIn("deleted, replaced or truncated", stderr.getvalue())
                self.assertIn("deleted, replaced or truncated", broker.health())
                if how != "truncated":  # (truncated, the file lost what memory would be rebuilt from)
                    self.assertEqual([t["data"] for t in jobs.tasks()["tasks"]], ["before"])
                if how == "deleted":  # the advice works: the open file holds what was acknowledged
                    copy_from = re.search(r"copy (/proc/\d+/fd/\d+) over", stderr.getvalue()).group(1)
                    shutil.copyfile(copy_from, self.path)
                    broker.close()
                    again = self.open()
                    self.assertEqual([t["data"] for t in again.get("jobs").tasks()["tasks"]], ["before"])
                    again.close()
                else:
                    broker.close()

    def test_a_damaged_record_is_told_from_a_torn_write_and_repair_says_what_it_dropped(self):
        broker = self.open()
        jobs = broker.queue("jobs", persistent=True)
        ids = [jobs.insert({"data": n})["_id"] for n in range(4)]
        broker.close()
        lines = read_file(self.path, "rb").split(b"\n")
        # A flipped digit in a task id keeps the line valid JSON: only its checksum tells.
        damaged = lines[3].replace(ids[1][-1:].encode() + b'"', b'9"', 1)
        self.assertNotEqual(damaged, lines[3])
        json.loads(damaged.split(b" ", 1)[1])
        lines[3] = damaged
        with open(self.path, "wb") as handle:
            handle.write(b"\n".join(lines))
        with self.assertRaisesRegex(K.JournalError, "line 4 .*damaged.*checksum"):
            K.Broker(journal=self.path)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            repaired = self.open(repair=True)
        self.assertEqual([t["_id"] for t in repaired.get("jobs").tasks()["tasks"]], ids[:1])
        self.assertRegex(stderr.getvalue(), r"set aside the 3 lines from it on .*1 unreadable.*2 insert")

    def test_a_file_that_is_not_a_journal_is_refused_and_left_as_it_is_even_with_repair(self):
        for content in (b'{"queues": {}}\n', b'{"a": 1}', b"name,count\n1,2\n", b"\x00" * 100):
            with self.subTest(content=content[:20]):
                with open(self.path, "wb") as handle:
                    handle.write(content)
                for repair in (False, True):
                    with self.assertRaisesRegex(K.JournalError, "is not a katar_http journal"):
                        K.Broker(journal=K.Journal(self.path, repair=repair))
                self.assertEqual(read_file(self.path, "rb"), content)
                self.assertEqual(os.listdir(os.path.dirname(self.path)), ["tasks.journal"])

    def test_two_repairs_in_one_second_keep_both_set_aside_files(self):
        broker = self.open()
        jobs = broker.queue("jobs")
        for n in range(3):
            jobs.insert({"data": n})
        broker.close()
        folder = os.path.dirname(self.path)
        for _ in range(2):
            with open(self.path, "ab") as handle:
                handle.write(b"garbage\n" + K.journal_line({"op": "queue", "q": "x", "options": {}}))
            with contextlib.redirect_stderr(io.StringIO()):
                self.open(repair=True).close()
        saved = sorted(name for name in os.listdir(folder) if ".corrupt-" in name)
        self.assertEqual(len(saved), 2, saved)
        for name in saved:
            self.assertIn("garbage", read_file(os.path.join(folder, name)))

    def test_a_version_1_journal_still_loads_and_is_written_on_in_version_2(self):
        lines = [{"op": "journal", "version": 1, "epoch": "0badcafe", "seq": 0},
                 {"op": "queue", "q": "jobs", "options": {"persistent": True}},
                 {"op": "insert", "q": "jobs", "at": 1_700_000_000_000,
                  "tasks": [["0badcafe-000000000001", {"n": 1}, 0, "queued", "k1", 0]]}]
        with open(self.path, "w") as handle:
            handle.write("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))  # as v1 wrote
        broker = self.open()
        jobs = broker.get("jobs")
        self.assertEqual(jobs.insert({"data": 2, "key": "k1"})["_id"], "0badcafe-000000000001")
        second = jobs.insert({"data": 2})["_id"]
        before = broker_state(broker)
        broker.close()
        self.assertEqual(broker_state(self.open()), before)
        self.assertEqual(second, "0badcafe-000000000002")
        self.assertTrue(read_file(self.path, "rb").split(b"\n")[3][:8].isalnum())  # a checksummed line


class MemoryEstimateTest(JournalTestCase):
    def test_the_estimate_is_the_same_after_a_restart_and_after_a_compaction(self):
        broker = self.open()
        self.churn(broker)
        keep = broker.get("keep")
        keep.insert([{"data": {"nested": ["x" * 100] * 3}, "key": "k" * 200}])
        task = keep.lease()[0]
        keep.report([{"_id": task["_id"], "status": "done", "result": {"big": "r" * 5000}}])
        estimate = broker.memory()[0]
        self.assertGreater(estimate, 5000)
        broker.close()
        reopened = self.open()
        self.assertEqual(reopened.memory()[0], estimate)
        reopened.compact()
        reopened.close()
        self.assertEqual(self.open().memory()[0], estimate)


class HealthTest(JournalOverHttpTestCase):
    def test_healthz_is_degraded_while_a_journal_write_hangs_and_ok_after(self):
        original = K.STALL_SECONDS
        K.STALL_SECONDS = 0.2
        self.addCleanup(setattr, K, "STALL_SECONDS", original)
        entered, release = threading.Event(), threading.Event()

        def frozen_fsync(fd):
            entered.set()
            release.wait(20)
            os.fsync(fd)
        self.journal._fsync = frozen_fsync
        writer = threading.Thread(target=lambda: self.insert({"data": "slow"}))
        writer.start()
        self.assertTrue(entered.wait(10))
        deadline = time.monotonic() + 10
        while self.broker.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        status, payload, _ = self.call("GET", "/healthz", allow_503=True)
        self.assertEqual(status, 503)
        self.assertEqual(payload["status"], "degraded")
        self.assertIn("pending", payload["reason"])
        release.set()
        writer.join(10)
        self.assertEqual(self.call("GET", "/healthz")[0], 200)


# The server under test, run as `python -c COMPACTING_SERVER HERE JOURNAL QUEUES_JSON`: katar_http from HERE (the
# folder of this file) on JOURNAL, the queues of QUEUES_JSON, and a thread that compacts the journal over and over,
# as fast as it can. It prints "listening on URL" on stderr as the command line does; on SIGTERM it stops compacting,
# closes the server and prints {"compactions": N, "failures": M} on stdout (N counts compactions that replaced the
# file: the journal's inode changed).
COMPACTING_SERVER = r"""
import json, os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import katar_http as K

path, queues = sys.argv[2], json.loads(sys.argv[3])
try:
    broker = K.Broker(journal=K.Journal(path))
except (K.JournalError, OSError) as exc:  # as the command line words it
    print("katar_http: %s" % (exc,), file=sys.stderr, flush=True)
    sys.exit(1)
for name, options in queues.items():
    broker.queue(name, **options)
server = K.serve(broker, port=0)
stop = threading.Event()
figures = {"compactions": 0, "failures": 0}

def compact_forever():
    while not stop.is_set():
        before = os.stat(path).st_ino
        try:
            broker.compact()
        except Exception as exc:
            figures["failures"] += 1
            if figures["failures"] <= 5:
                print("compaction failed: %r" % (exc,), file=sys.stderr, flush=True)
            stop.wait(0.01)
            continue
        if os.stat(path).st_ino != before:
            figures["compactions"] += 1

signal.signal(signal.SIGTERM, lambda *_: stop.set())
compactor = threading.Thread(target=compact_forever, name="compact forever", daemon=True)
compactor.start()
print("katar_http %s listening on %s" % (K.__version__, server.url), file=sys.stderr, flush=True)
stop.wait()
compactor.join()
server.close()
print(json.dumps(figures), flush=True)
"""

# Two persistent queues (done tasks stay listed; c with a short lease, so that forgotten tasks come back soon) and
# one that discards done tasks. Attempts are plentiful: no task becomes a dead letter by chance.
COMPACTION_QUEUES = {
    "a": {"persistent": True, "lease": 1000, "max_attempts": 1000},
    "b": {"persistent": False, "lease": 1000, "max_attempts": 1000},
    "c": {"persistent": True, "lease": 250, "max_attempts": 1000},
}
BACKLOG = 300  # producers wait while a queue holds this many tasks not yet acknowledged done


class CompactingServer:
    """COMPACTING_SERVER as a subprocess on `journal`. What it prints after its "listening on" line is read by
    threads (into `output` and `errors`), so that a full pipe never stalls it."""

    def __init__(self, test, journal):
        self.process = subprocess.Popen(
            [sys.executable, "-c", COMPACTING_SERVER, HERE, journal, json.dumps(COMPACTION_QUEUES)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        test.addCleanup(self.stop)
        host_port = wait_until_listening(test, self.process).split("http://")[1]
        self.host, self.port = host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])
        self.output, self.errors = [], []
        self.readers = [threading.Thread(target=lambda stream=stream, lines=lines: lines.extend(stream), daemon=True)
                        for stream, lines in ((self.process.stdout, self.output), (self.process.stderr, self.errors))]
        for reader in self.readers:
            reader.start()

    def kill(self):
        self.process.kill()
        self.process.wait(30)

    def terminate(self):
        """SIGTERM; return the exit status and the figures the server printed (None if it printed none)."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(60)
        for reader in self.readers:
            reader.join(10)
        figures = [json.loads(line) for line in self.output if line.startswith("{")]
        return status, (figures[-1] if figures else None)

    def stop(self):
        stop_process(self.process)
        for reader in self.readers if hasattr(self, "readers") else ():
            reader.join(10)
        self.process.stdout.close()
        self.process.stderr.close()


def json_exchange(connection, method, path, body=None):
    """One request on a keep-alive connection: (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    response = connection.getresponse()
    payload = response.read()
    return response.status, (json.loads(payload) if payload else None)


class AcknowledgedLoad:
    """Producers and workers on every queue of COMPACTION_QUEUES, each on its own keep-alive connection, recording
    what the server acknowledged: every id of an insert answered 201, every done report answered 2xx (with a logical
    time), and every delivery of a task in answer to a request sent after its done was acknowledged (a violation).
    One load goes on across restarts: start() it against each new server.

    Workers lease 3 to 5 tasks at a time and report them on their next poll with the attempt they answer: most
    done, some failed (retried at once), some forgotten (their lease runs out and they are delivered again)."""

    def __init__(self, seed, persistent_rate=None):
        self.lock = threading.Lock()
        self.clock = 0            # logical time, counted under the lock
        self.seeds = random.Random(seed)
        self.persistent_rate = persistent_rate  # tasks per second per persistent queue, to bound long soaks
        self.inserted = {}        # id -> queue
        self.done_sent = set()    # ids a done report was sent for, answered or not
        self.done_acked = {}      # id -> (queue, logical time of the answer)
        self.violations = []      # (id, queue, attempt)
        self.unexpected = []      # answers a server that is up should not give
        self.broken = []          # connections that failed while the server was up
        self.stopping = False     # set before the server is stopped or killed: from then on both are expected
        self.open = collections.Counter()  # per queue: inserted and not acknowledged done, to pace the producers

    def start(self, server, stop):
        self.stopping, started = False, time.monotonic()
        threads = []
        for queue in COMPACTION_QUEUES:
            for role in (self.produce, self.work, self.work):
                thread = threading.Thread(target=role, args=(server, queue, stop, random.Random(self.seeds.random()),
                                                             started), daemon=True)
                thread.start()
                threads.append(thread)
        return threads

    def produce(self, server, queue, stop, rng, started):
        connection, made = http.client.HTTPConnection(server.host, server.port, timeout=60), 0
        rate = self.persistent_rate if COMPACTION_QUEUES[queue]["persistent"] else None
        try:
            while not stop.is_set():
                with self.lock:
                    busy = self.open[queue] >= BACKLOG
                if busy or (rate is not None and made >= 100 + rate * (time.monotonic() - started)):
                    stop.wait(0.005)
                    continue
                batch = [{"data": {"n": rng.randrange(10 ** 6)}} for _ in range(rng.randint(1, 8))]
                status, payload = json_exchange(connection, "POST", f"/v1/queue/{queue}/tasks", {"tasks": batch})
                with self.lock:
                    if status == 201:
                        made += len(batch)
                        self.open[queue] += len(batch)
                        self.inserted.update((task["_id"], queue) for task in payload["tasks"])
                    elif not self.stopping:
                        self.unexpected.append(f"insert into {queue}: {status} {payload}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if not self.stopping:
                self.broken.append(f"producer of {queue}: {exc!r}")
        finally:
            connection.close()

    def work(self, server, queue, stop, rng, started):
        connection, reports = http.client.HTTPConnection(server.host, server.port, timeout=60), []
        name = f"soak-{queue}-{rng.randrange(10 ** 6)}"
        try:
            while not stop.is_set():
                with self.lock:
                    self.clock += 1
                    sent_at = self.clock
                    self.done_sent.update(report["_id"] for report in reports if report["status"] == K.DONE)
                status, payload = json_exchange(connection, "POST", f"/v1/queue/{queue}", {
                    "tasks": reports, "max": rng.randint(3, 5), "wait": 100, "worker": name})
                if status // 100 != 2:
                    if status != 409 and not self.stopping:  # 409: a report on a delivery that went elsewhere
                        with self.lock:
                            self.unexpected.append(f"poll of {queue}: {status} {payload}")
                    reports = []  # refused as a whole: those tasks are delivered again once their leases run out
                    continue
                tasks = payload["tasks"] if status == 200 else []
                with self.lock:
                    self.clock += 1
                    acked_at = self.clock
                    for report in reports:
                        if report["status"] == K.DONE and report["_id"] not in self.done_acked:
                            self.done_acked[report["_id"]] = (queue, acked_at)
                            self.open[queue] -= 1
                    for task in tasks:
                        acked = self.done_acked.get(task["_id"])
                        if acked is not None and acked[1] < sent_at:
                            self.violations.append((task["_id"], queue, task["attempt"]))
                reports = []
                for task in tasks:
                    roll = rng.random()
                    if roll < 0.04:
                        continue  # forgotten: its lease runs out and it is delivered again
                    if roll < 0.08:
                        reports.append({"_id": task["_id"], "status": K.FAILED, "error": "soak", "retry_after": 0,
                                        "attempt": task["attempt"]})
                    else:
                        reports.append({"_id": task["_id"], "status": K.DONE, "result": task["data"],
                                        "attempt": task["attempt"]})
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if not self.stopping:
                self.broken.append(f"worker of {queue}: {exc!r}")
        finally:
            connection.close()


class CompactionLoadTestCase(unittest.TestCase):
    """What the compaction tests share: a journal in a fresh folder, the server, and the check after a restart."""

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        self.journal = os.path.join(directory, "tasks.journal")

    def start_server(self):
        """Start COMPACTING_SERVER on the journal; fails the test (with the server's words) if it refuses."""
        return CompactingServer(self, self.journal)

    def stop_load(self, stop, threads):
        stop.set()
        for thread in threads:
            thread.join(60)
            self.assertFalse(thread.is_alive(), "a client thread hangs")

    def listed_tasks(self, connection, queue):
        """Every task of `queue`, paging through GET /v1/queue/<queue>/tasks: a list of (id, status)."""
        tasks, after = [], ""
        for _ in range(100000):
            status, page = json_exchange(connection, "GET",
                                         f"/v1/queue/{queue}/tasks?limit={K.MAX_LIST_LIMIT}{after}")
            self.assertEqual(status, 200, page)
            tasks.extend((task["_id"], task["status"]) for task in page["tasks"])
            if page["next"] is None:
                return tasks
            after = "&after=" + page["next"]
        self.fail(f"the listing of {queue} never ends")

    def all_stats(self, connection):
        stats = {}
        for queue in COMPACTION_QUEUES:
            status, stats[queue] = json_exchange(connection, "GET", f"/v1/queue/{queue}/stats")
            self.assertEqual(status, 200, stats[queue])
        return stats

    def assert_nothing_acknowledged_lost(self, server, load, when):
        """Every acknowledged insert is listed (or, in a queue that discards done tasks, was reported done), every
        task acknowledged done is done (or discarded) and was never delivered again, ids are unique across the
        listings, and each queue's stats agree with its listing."""
        connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
        self.addCleanup(connection.close)
        # Leases from before the restart may run out while we list: take a listing that two identical stats
        # surround (with no client running, statuses only change by such expiries).
        for _ in range(20):
            before = self.all_stats(connection)
            listings = {queue: self.listed_tasks(connection, queue) for queue in COMPACTION_QUEUES}
            stats = self.all_stats(connection)
            if all(before[queue]["counts"] == stats[queue]["counts"] for queue in COMPACTION_QUEUES):
                break
        else:
            self.fail(f"{when}: the statuses kept changing while the tasks were listed")
        problems = []

        def problem(what, ids):
            if ids:
                ids = sorted(ids)
                problems.append(f"{when}: {len(ids)} {what}, e.g. {ids[:5]}")

        listed, every_id = {}, []
        for queue, tasks in listings.items():
            every_id.extend(task_id for task_id, _ in tasks)
            listed.update((task_id, (queue, status)) for task_id, status in tasks)
            counts = collections.Counter(status for _, status in tasks)
            if stats[queue]["total"] != len(tasks) or sum(stats[queue]["counts"].values()) != len(tasks):
                problems.append(f"{when}: queue {queue} lists {len(tasks)} tasks, its stats say "
                                f"{stats[queue]['total']} ({stats[queue]['counts']})")
            for status in K.STATUSES:
                if stats[queue]["counts"].get(status, 0) != counts.get(status, 0):
                    problems.append(f"{when}: queue {queue} lists {counts.get(status, 0)} tasks {status}, its stats "
                                    f"say {stats[queue]['counts'].get(status, 0)}")
        problem("ids listed more than once", {task_id for task_id, n in collections.Counter(every_id).items() if n > 1})
        with load.lock:
            inserted, done_sent, done_acked = dict(load.inserted), set(load.done_sent), dict(load.done_acked)
            violations = list(load.violations)
        problem("acknowledged inserts are missing", {
            task_id for task_id, queue in inserted.items() if task_id not in listed
            and (COMPACTION_QUEUES[queue]["persistent"] or task_id not in done_sent)})
        problem("tasks are listed in another queue than the one they were inserted into", {
            task_id for task_id, queue in inserted.items() if task_id in listed and listed[task_id][0] != queue})
        # A persistent queue keeps a done task, listed as done; the other one discards it: listed, it came back.
        problem("tasks acknowledged done are not done", {
            task_id for task_id, (queue, _) in done_acked.items()
            if (listed.get(task_id, (None, None))[1] != K.DONE if COMPACTION_QUEUES[queue]["persistent"]
                else task_id in listed)})
        problem("tasks acknowledged done were delivered again", {task_id for task_id, _, _ in violations})
        if problems:
            self.fail("\n".join(problems) + "\nserver stderr: " + "".join(server.errors[-20:]))
        # The producers pace on the tasks not done; tasks whose done report a kill left unanswered would count as
        # open for ever: start again from what the server holds.
        with load.lock:
            load.open = collections.Counter(queue for queue, tasks in listings.items()
                                            for _, status in tasks if status not in (K.DONE, K.FAILED, K.CANCELLED))

    def assert_the_load_got_going(self, load):
        self.assertGreater(len(load.inserted), 300, "the load never got going")
        self.assertGreater(len(load.done_acked), 150, "the workers never got going")
        self.assertGreater(len({queue for queue, _ in load.done_acked.values()}), 2, "a queue saw no work")
        self.assertEqual(load.unexpected[:10], [], "answers no server should give")


class CompactionSoakTest(CompactionLoadTestCase):
    """Writers on several queues while the journal is compacted over and over: nothing acknowledged is lost across a
    clean restart, nor across a kill -9 after more of the same."""

    seconds = float(os.environ.get("KATAR_SOAK_SECONDS", "5"))
    persistent_tasks = 20000  # per persistent queue over the whole soak: a long soak inserts into them more slowly

    def run_load(self, server, load, seconds, until=lambda: True):
        """Run the load for `seconds` (and then until `until()`, for at most 30 s more); the server must stay up."""
        stop = threading.Event()
        threads = load.start(server, stop)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or not until():
            self.assertIsNone(server.process.poll(), "the server died: " + "".join(server.errors[-20:]))
            self.assertLess(time.monotonic(), deadline + 30, "the load ran on without its condition")
            stop.wait(0.05)
        return stop, threads

    def test_writers_on_several_queues_while_compaction_runs_lose_nothing_across_restarts(self):
        load = AcknowledgedLoad(2026, persistent_rate=self.persistent_tasks / max(self.seconds, 1))
        server = self.start_server()
        stop, threads = self.run_load(server, load, self.seconds)
        self.assertEqual(load.broken[:10], [], "the server is up: no connection may fail")
        self.assertEqual(load.unexpected[:10], [], "answers no server should give")
        # SIGTERM under load, so that the last compaction has writers racing it (stopped first, the writers would
        # leave the compactions time to rewrite a journal that a racing one left short). What the server
        # acknowledges until it closes must be kept; refusals (503) and broken connections are expected now.
        load.stopping = True
        status, figures = server.terminate()
        self.stop_load(stop, threads)
        self.assertEqual(status, 0, "".join(server.errors[-20:]))
        self.assertIsNotNone(figures, "the server printed no figures")
        self.assertGreater(figures["compactions"], 20, "compaction hardly ran")
        self.assertEqual(figures["failures"], 0, "".join(server.errors[-20:]))
        self.assert_the_load_got_going(load)
        if "KATAR_SOAK_SECONDS" in os.environ:  # a run by hand: its figures
            print(f"\nsoak: {self.seconds:g} s of load, {figures['compactions']} compactions, "
                  f"{len(load.inserted)} inserts and {len(load.done_acked)} done reports acknowledged",
                  file=sys.stderr)

        server = self.start_server()  # the restart must not be refused
        self.assert_nothing_acknowledged_lost(server, load, "after a clean restart")

        inode = os.stat(self.journal).st_ino  # load on until a compaction replaced the journal, then kill -9
        stop, threads = self.run_load(server, load, min(2.0, max(1.0, self.seconds / 4)),
                                      until=lambda: os.stat(self.journal).st_ino != inode)
        load.stopping = True
        server.kill()
        self.stop_load(stop, threads)
        server = self.start_server()
        self.assert_nothing_acknowledged_lost(server, load, "after kill -9")
        status, figures = server.terminate()
        self.assertEqual(status, 0, "".join(server.errors[-20:]))


class CompactionCrashTest(CompactionLoadTestCase):
    """kill -9 in the middle of a compaction (mostly) or at any moment, under load, round after round: every restart
    loads the journal and nothing acknowledged is lost or comes back."""

    rounds = int(os.environ.get("KATAR_CRASH_ROUNDS", "8"))

    def kill_inside_compaction(self, server, chance):
        """Watch the temporary file of a compaction (JOURNAL.compact; a stale one left by an earlier kill is waited
        out) and kill -9 at a random share of the time the latest whole compaction took, counted from the appearance
        of the next one (if that one ends sooner, the next is aimed at instead). Returns whether the kill landed
        inside a compaction: the temporary file is still there once the server is dead."""
        compacting = self.journal + ".compact"
        share = chance.uniform(0, 0.9)
        gone, appeared, took = False, None, None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            exists, now = os.path.exists(compacting), time.perf_counter()
            if not exists:
                if appeared is not None:
                    took = now - appeared  # a whole compaction, seen from its start to its end
                gone, appeared = True, None
            elif gone:
                if appeared is None:
                    appeared = now
                elif took is not None and now >= appeared + share * took:
                    server.kill()
                    return os.path.exists(compacting)
        server.kill()
        return False

    def test_kill_9_inside_compaction_loses_nothing(self):
        load, chance = AcknowledgedLoad(1966), random.Random(1966)
        inside = 0
        for number in range(self.rounds):
            server = self.start_server()  # a restart must never be refused
            if number:
                self.assert_nothing_acknowledged_lost(server, load, f"after kill -9 number {number}")
            stop = threading.Event()
            threads = load.start(server, stop)
            stop.wait(chance.uniform(0.05, 0.4))  # stop is not set: the load runs for this long
            load.stopping = True
            if number % 4 != 3:
                inside += self.kill_inside_compaction(server, chance)
            else:
                server.kill()  # and one round in four at whatever moment the load is at
            self.stop_load(stop, threads)
        server = self.start_server()
        self.assert_nothing_acknowledged_lost(server, load, f"after kill -9 number {self.rounds}")
        status, _ = server.terminate()
        self.assertEqual(status, 0, "".join(server.errors[-20:]))
        self.assert_the_load_got_going(load)
        self.assertGreaterEqual(inside, self.rounds / 2, "too few kills landed inside a compaction")
        if "KATAR_CRASH_ROUNDS" in os.environ:  # a run by hand: its figures
            print(f"\ncrash: {self.rounds} kill -9 rounds, {inside} inside a compaction, {len(load.inserted)} "
                  f"inserts and {len(load.done_acked)} done reports acknowledged", file=sys.stderr)


def start_journalled_server(test, directory):
    """katar_http.py in a process of its own, journalled and configured in `directory` (tasks.journal,
    queues.json), stopped when the test ends: (the process, its URL)."""
    process = subprocess.Popen(
        [*KATAR, "--port", "0", "--quiet",
         "--journal", os.path.join(directory, "tasks.journal"), "--config", os.path.join(directory, "queues.json")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    test.addCleanup(stop_process, process)
    test.addCleanup(process.stderr.close)
    return process, wait_until_listening(test, process)


class CrashTest(unittest.TestCase):
    """kill -9 under load, again and again: nothing acknowledged is lost, nothing acknowledged done comes back."""

    rounds = int(os.environ.get("KATAR_KILL_ROUNDS", "12"))

    def start_server(self, directory):
        process, url = start_journalled_server(self, directory)
        host_port = url.split("http://")[1]
        return process, host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])

    def test_kill_9_under_load_loses_no_acknowledged_insert_and_redelivers_no_acknowledged_done(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "queues.json"), "w") as handle:
            json.dump({"queues": {"jobs": {"persistent": True, "lease": 400, "max_attempts": 1000}}}, handle)
        lock, clock = threading.Lock(), iter(range(10 ** 9))
        inserted, done_acked, violations, deliveries = set(), {}, [], [0]
        chance = random.Random(2026)

        def producer(host, port, stop):
            connection = http.client.HTTPConnection(host, port, timeout=5)
            try:
                while not stop.is_set():
                    connection.request("POST", "/v1/queue/jobs/tasks", body=json.dumps(
                        {"tasks": [{"data": n} for n in range(5)]}), headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                    if response.status == 201:
                        with lock:
                            inserted.update(task["_id"] for task in json.loads(payload)["tasks"])
            except (OSError, http.client.HTTPException):
                pass  # the server was killed
            finally:
                connection.close()

        def worker(host, port, stop):
            connection, reports = http.client.HTTPConnection(host, port, timeout=5), []
            try:
                while not stop.is_set():
                    with lock:
                        sent_at = next(clock)
                    connection.request("POST", "/v1/queue/jobs", body=json.dumps({"tasks": reports, "max": 3}),
                                       headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                    if response.status // 100 != 2:
                        reports = []  # e.g. 409: a report for a delivery that expired and went elsewhere
                        continue
                    tasks = json.loads(payload)["tasks"] if response.status == 200 else []
                    with lock:
                        acked_at = next(clock)
                        for report in reports:
                            done_acked.setdefault(report["_id"], acked_at)
                        for task in tasks:
                            deliveries[0] += 1
                            if done_acked.get(task["_id"], sent_at) < sent_at:
                                violations.append(task["_id"])
                    reports = [{"_id": task["_id"], "status": "done", "attempt": task["attempt"]} for task in tasks]
            except (OSError, http.client.HTTPException):
                pass
            finally:
                connection.close()

        for _ in range(self.rounds):
            process, host, port = self.start_server(directory)
            stop = threading.Event()
            threads = [threading.Thread(target=target, args=(host, port, stop))
                       for target in (producer, producer, worker, worker)]
            for thread in threads:
                thread.start()
            time.sleep(chance.uniform(0.05, 0.3))  # the kill lands at a random moment of the load
            process.kill()
            process.wait(10)
            stop.set()
            for thread in threads:
                thread.join(10)

        process, host, port = self.start_server(directory)
        # Let the leases of the last round (400 ms) run out first: an expiry between the listing and the stats
        # would move a task from one count to another.
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(f"http://{host}:{port}/v1/queue/jobs/stats", timeout=10) as r:
                if json.load(r)["counts"]["in progress"] == 0:
                    break
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        listed, after = {}, ""
        while True:
            with urllib.request.urlopen(f"http://{host}:{port}/v1/queue/jobs/tasks?limit=1000{after}", timeout=10) as r:
                page = json.load(r)
            listed.update((task["_id"], task["status"]) for task in page["tasks"])
            if page["next"] is None:
                break
            after = "&after=" + page["next"]
        with urllib.request.urlopen(f"http://{host}:{port}/v1/queue/jobs/stats", timeout=10) as r:
            stats = json.load(r)
        self.assertGreater(len(inserted), 100, "the load never got going")
        self.assertGreater(len(done_acked), 50)
        self.assertEqual(inserted - set(listed), set(), "acknowledged inserts were lost")
        self.assertEqual(violations, [], "tasks acknowledged done were delivered again")
        self.assertEqual({task_id for task_id in done_acked if listed.get(task_id) != "done"}, set())
        self.assertEqual(stats["total"], len(listed))
        self.assertEqual(sum(stats["counts"].values()), len(listed))
        for status, count in stats["counts"].items():
            self.assertEqual(count, sum(1 for value in listed.values() if value == status), status)


# ---------------------------------------------------------------------------------------------------------------
# Tokens, TLS, safe defaults and limits
# ---------------------------------------------------------------------------------------------------------------

ADMIN, WORKER, ANY_QUEUE = "admin-7f3a9c1e", "worker-jobs-5b2d", "worker-any-91c4"
# Every route, with a body that is valid for it; {id} is a real task of queue jobs.
ROUTE_CALLS = [("GET", "/v1/queues", None), ("GET", "/v1/queue/jobs", None), ("POST", "/v1/queue/jobs", {"max": 0}),
               ("PUT", "/v1/queue/jobs", {}), ("GET", "/v1/queue/jobs/stats", None),
               ("GET", "/v1/queue/jobs/tasks", None), ("POST", "/v1/queue/jobs/tasks", {"data": 1}),
               ("DELETE", "/v1/queue/jobs/tasks?status=done", None), ("GET", "/v1/queue/jobs/tasks/{id}", None),
               ("PATCH", "/v1/queue/jobs/tasks/{id}", {"status": "paused"}),
               ("DELETE", "/v1/queue/jobs/tasks/{id}", None), ("POST", "/v1/poll", {"queues": ["jobs"], "max": 0}),
               ("PUT", "/v1/batches/b1", {"callback": {"queue": "jobs"}}), ("GET", "/v1/batches/b1", None),
               ("GET", "/v1/batches", None)]


class TokenTest(ServerTestCase):
    def setUp(self):
        super().setUp()
        self.server.httpd.access = K.Access([ADMIN], {WORKER: ["jobs"], ANY_QUEUE: ["*"]})
        self.broker.queue("mail")
        self.task_id = self.jobs.insert({"data": "x"})["_id"]

    def as_(self, token, method, path, body=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.call(method, path.format(id=self.task_id), body, headers=headers)

    def test_every_route_but_healthz_needs_a_valid_token(self):
        for method, path, body in ROUTE_CALLS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"},
                            {"Authorization": "Bearer"}, {"Authorization": ADMIN}, {"Authorization": "Bearer " + ADMIN[:-1]}):
                status, payload, response_headers = self.call(method, path.format(id=self.task_id), body, headers=headers)
                self.assertEqual(status, 401, (method, path, headers))
                self.assertEqual(response_headers["WWW-Authenticate"], 'Bearer realm="katar_http"')
        self.assertEqual(self.call("GET", "/healthz")[0], 200)
        self.assertEqual(self.call("GET", "/no/such/route")[0], 401)  # the route table is not shown either
        self.assertEqual(self.jobs.stats()["counts"]["queued"], 1)

    def test_the_admin_token_may_use_every_route(self):
        for method, path, body in ROUTE_CALLS:
            status = self.as_(ADMIN, method, path, body)[0]
            self.assertNotIn(status, (401, 403), (method, path))

    def test_a_worker_token_may_only_read_configuration_lease_and_report_on_its_queues(self):
        self.assertEqual(self.as_(WORKER, "GET", "/v1/queue/jobs")[0], 200)
        status, payload, _ = self.as_(WORKER, "POST", "/v1/queue/jobs", {})
        self.assertEqual((status, payload["tasks"][0]["_id"]), (200, self.task_id))
        self.assertEqual(self.as_(WORKER, "POST", "/v1/queue/jobs", {"tasks": [{"_id": self.task_id,
                                                                                 "status": "done"}]})[0], 204)
        for method, path, body in ROUTE_CALLS:
            if path in ("/v1/queue/jobs", "/v1/poll") and method in ("GET", "POST"):
                continue
            self.assertEqual(self.as_(WORKER, method, path, body)[0], 403, (method, path))
        self.assertEqual(self.as_(WORKER, "POST", "/v1/poll", {"queues": ["jobs"]})[0], 204)
        self.assertEqual(self.as_(WORKER, "POST", "/v1/poll", {"queues": ["jobs", "mail"]})[0], 403)
        for path in ("/v1/queue/mail", "/v1/queue/nope"):  # another queue, existing or not: the same answer
            self.assertEqual(self.as_(WORKER, "GET", path)[0], 403)
            self.assertEqual(self.as_(WORKER, "POST", path, {})[0], 403)
        self.assertEqual(self.as_(ANY_QUEUE, "POST", "/v1/queue/mail", {})[0], 204)
        self.assertEqual(self.as_(ANY_QUEUE, "POST", "/v1/queue/mail/tasks", {"data": 1})[0], 403)
        self.assertEqual(self.jobs.stats()["total"], 0)  # the one task was done; nothing else changed

    def test_tokens_never_appear_in_the_access_log(self):
        self.server.httpd.quiet = False
        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            self.as_(ADMIN, "GET", "/v1/queue/jobs/stats")
            self.as_(WORKER, "POST", "/v1/queue/jobs", {"worker": "w"})
            self.as_("not-a-token-" + ADMIN, "GET", "/v1/queues")
            self.call("GET", f"/v1/queue/jobs?token={ADMIN}", headers={"Authorization": "Bearer " + ADMIN})
        self.assertIn('"GET /v1/queue/jobs/stats" 200', log.getvalue())
        for secret in (ADMIN, WORKER, "not-a-token"):
            self.assertNotIn(secret, log.getvalue())

    def test_load_access_reads_flags_environment_and_files(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "admin"), "w") as handle:
            handle.write("from-file\n")
        with open(os.path.join(directory, "workers"), "w") as handle:
            handle.write("# workers\njobs,mail=w-file\n\n*=w-any\n")
        args = K.build_parser().parse_args(["--token", "from-flag", "--token-file", os.path.join(directory, "admin"),
                                            "--worker-token", "jobs=w-flag",
                                            "--worker-token-file", os.path.join(directory, "workers")])
        access = K.load_access(args, {"KATAR_TOKEN": "from-env"})
        for token in ("from-flag", "from-file", "from-env"):
            self.assertIs(access.scope("Bearer " + token), K.Access.ADMIN)
        self.assertEqual(access.scope("Bearer w-file"), frozenset({"jobs", "mail"}))
        self.assertEqual(access.scope("Bearer w-any"), frozenset({"*"}))
        with self.assertRaises(K.Unauthorized):
            access.scope("Bearer from-nowhere")
        bad = K.build_parser().parse_args(["--worker-token", "s3cret-without-queues"])
        with self.assertRaisesRegex(ValueError, "QUEUES=TOKEN") as raised:
            K.load_access(bad, {})
        self.assertNotIn("s3cret", str(raised.exception))


TEST_CERTIFICATE = """\
-----BEGIN CERTIFICATE-----
MIIDJzCCAg+gAwIBAgIUVHFNU06Jy+IgtKaq+6IsiLbuC/EwDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyODE1NDY0OFoYDzIxMjYx
MTA0MTU0NjQ4WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQC7pNBIAFIt9Jpuyx8Sme8Oc0Fwd7leOX2rY3P1oBQh
KyY/PYaG3A5S/DecyW15owLZ9ZlH+Ot9UHF0pGz7Zt0v39z9155VDzPqqVlcXNSx
BnTdPsZ3+MjnGIdQZ3Ev3CyGa4IGTNNndF0yzZ3bpfBc8EtdcDlGpGYSno4IJ6NU
JLtLU1ZOzj0hR1vYVt4p0gixQRPle00zVvKXzXidhEomnpLGPyQtTPlQyr9zzAj4
cqs6CXMl6ZRh8D/FoiYFwwrosH/+3tgtaBAxs76uZR/RhTVFuN9X5+dgvgyo9q6q
2ozvR4Wf56btH5ewcYRdweuV7zFwXn0oPje0e281HGhPAgMBAAGjbzBtMB0GA1Ud
DgQWBBRnSXEUazBSE592fvDFZ/yu637R9TAfBgNVHSMEGDAWgBRnSXEUazBSE592
fvDFZ/yu637R9TAPBgNVHRMBAf8EBTADAQH/MBoGA1UdEQQTMBGCCWxvY2FsaG9z
dIcEfwAAATANBgkqhkiG9w0BAQsFAAOCAQEAqnfd2eN9NkSpZQ25pP3YG5E8Ra0Q
4lRLhlyxQCIWAcYQcvOa+5g3smErfpMV6YJ/84UwhPoZWjNBp99GaCMbB2AWZfZ1
wUgC3FSYE1XLOy8lMdgSnQdaYcXxrMX7LML3yT+GVyOizA4VE5GMSdLcRrfzQY67
zRoLZYpqHiVm6pv4ih3QPD/ATBkG0W9BpJUgg+98ZFmO7QGCIq68ML6iBSEenWdu
glC+iQZpU1Vmkmc4IiWjlMVGE0udznBs8uscpROwVCWbtpHSlaaSgH29F9sTan30
JLVPhEBeTOakN6JyYcWlljGEOZQktJbNYWmtibXjG4F1981/8nfB+1cS9Q==
-----END CERTIFICATE-----
-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQC7pNBIAFIt9Jpu
yx8Sme8Oc0Fwd7leOX2rY3P1oBQhKyY/PYaG3A5S/DecyW15owLZ9ZlH+Ot9UHF0
pGz7Zt0v39z9155VDzPqqVlcXNSxBnTdPsZ3+MjnGIdQZ3Ev3CyGa4IGTNNndF0y
zZ3bpfBc8EtdcDlGpGYSno4IJ6NUJLtLU1ZOzj0hR1vYVt4p0gixQRPle00zVvKX
zXidhEomnpLGPyQtTPlQyr9zzAj4cqs6CXMl6ZRh8D/FoiYFwwrosH/+3tgtaBAx
s76uZR/RhTVFuN9X5+dgvgyo9q6q2ozvR4Wf56btH5ewcYRdweuV7zFwXn0oPje0
e281HGhPAgMBAAECggEAPKxrKIzqBbAM63xEXNhnYw3DgCFGUABY8T0kNqz/NUZl
hJdZU2v+ObkSJmE/Q9CA0IdIe+wyAQAs32F3V8cICD3jkDTTHn/e8qa1nVbq8x66
VPvCYvKPy6GzxzzbbXVM9F342h6nUNFgfVfdDjPWx8ZvKBRsgLoRwz1/gYWHm2IC
7YjtEouh+IZsorAVu3GRFxL0pFbEQl9WfR9Xbp+H6O68L0uyioDi+s6uUft5XAZq
dipw5H2wsCRRqrnvEpkNC7SXy+ubNfZFaussLledEAhxE+u3tBmot7DMlsXWN/fm
SFkYZmSC3I/jIf2aY5isD5wT0r+NTS/HHpLxoLtloQKBgQDuTDm1pR0tNzxpUW1p
et/G/uXDmXM0/NyOdiLSGW6oWcDTjXrC4ETS8w0JsA92s/lXRP/GAjignYBS2LTN
sesivH9pVi5nNwpE4JGrYkihq5miqz02Rd/XWQWWVJJw9aTbBglUbvBKYSNgW5tF
TrHWIt3GHpg/yPB6Zzzy9liSUQKBgQDJlUmzd3bNo13Rf032GLI/Rdki9HdsExxn
3vWm9p8BlOzbvmFF1tqvSpjvZKP+yyaz7jajvdUn1jUq8l5Dy9B4NmqS8zWnBzy2
gwfrb+uxv6bedAJBQ5gEap5Biuf654xVgOwhtcskuLLUhpBX5/5RPruzvqb8kzmi
Nnis1lcInwKBgQCjSu6cz5lvu5MVJGxSRJYFufPelk+A9ul4YfG4gR74FBDzptaB
pcbjuxOrGM9v6yIosCqJGEqPnX4qxz8WWR4kvoCcwSapKelKi4ymoYHd70YnVypp
/3XFDsaqXie/akTepYNNLXxRq8DfLcb3tlZcw6WvNpXj16Eab5Yvc6n8EQKBgQCM
xfOFIA1YSBjxf2yrSs3Xv+iGL6DiWWpB44M7iQi7qwvJ3WbCxetL9NVegLLB8Y7i
op2Htb8QpdfVWRKZV9EK0j2Ux8GVFknAzzqNoUhAhi17NhqJBzI3C1nfPakJIABx
iandVL47s7w3DI3qxblldWDRgnfM9OePr2iQktKO0wKBgQCNJ8kGPmxhaxb7Ce0J
itPZ1fR5eqCAGwDx/tyJOtygNKx8z4iln0/oVNvuqp7dQV08t4pG7mSBuKOGvcUw
zDEm9U+/N+jTSofRVn1WDJbz9toDzZPwCBuccB4HQugzDAi5mK7N2Fjuk6yEs6w7
eak9vuUasw3u6cqoMLORVWfzBQ==
-----END PRIVATE KEY-----
"""


class TlsTestCase(unittest.TestCase):
    """Tests that serve over TLS (no tests here: subclasses share `certificate`)."""

    def certificate(self):
        """A certificate for localhost and 127.0.0.1: made now with openssl where it exists, else the fixture."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        pem = os.path.join(directory, "server.pem")
        if shutil.which("openssl"):
            made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                                   "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                                   "-keyout", os.path.join(directory, "key.pem"), "-out", os.path.join(directory, "cert.pem")],
                                  capture_output=True, timeout=60)
            if made.returncode == 0:
                with open(pem, "w") as out:
                    out.write(read_file(os.path.join(directory, "cert.pem")) + read_file(os.path.join(directory, "key.pem")))
                return pem
        with open(pem, "w") as out:
            out.write(TEST_CERTIFICATE)
        return pem


class TlsTest(TlsTestCase):

    def test_an_https_round_trip_with_tls_1_2_or_newer(self):
        pem = self.certificate()
        broker = K.Broker()
        broker.queue("jobs").insert({"data": "secret work"})
        server = K.serve(broker, port=0, tls=K.tls_context(pem), access=K.Access([ADMIN]))
        self.addCleanup(server.close)
        self.assertTrue(server.url.startswith("https://"))
        client = ssl.create_default_context(cafile=pem)
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=client, timeout=10)
        self.addCleanup(connection.close)
        # A long poll (its client is asked, through TLS, whether it is still there) answered with the task.
        connection.request("POST", "/v1/queue/jobs", body=b'{"wait": 2000}', headers={"Authorization": "Bearer " + ADMIN})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read())["tasks"][0]["data"], "secret work")
        self.assertGreaterEqual(connection.sock.version(), "TLSv1.2")
        connection.request("GET", "/v1/queue/jobs", headers={"Authorization": "Bearer " + ADMIN})  # keep-alive
        self.assertEqual(connection.getresponse().status, 200)
        with urllib.request.urlopen(server.url + "/healthz", context=client, timeout=10) as response:
            self.assertEqual(json.load(response)["status"], "ok")
        # Plain HTTP to the HTTPS port gets nothing useful, and the server goes on serving.
        answer = raw_exchange("127.0.0.1", server.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertFalse(answer.startswith(b"HTTP/1.1 200"))
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(pem)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
            try:
                old.maximum_version = ssl.TLSVersion.TLSv1_1
            except (ValueError, AttributeError):
                pass
        with self.assertRaises((ssl.SSLError, OSError)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                with old.wrap_socket(raw, server_hostname="localhost"):
                    pass
        with urllib.request.urlopen(server.url + "/healthz", context=client, timeout=10) as response:
            self.assertEqual(response.status, 200)


class SafeDefaultsTest(unittest.TestCase):
    def run_cli(self, *args, env=None):
        return subprocess.run([*KATAR, "--port", "0", *args],
                              capture_output=True, text=True, timeout=20, env=env)

    def test_listening_beyond_loopback_without_a_token_is_refused_unless_insecure(self):
        refused = self.run_cli("--host", "0.0.0.0")
        self.assertEqual(refused.returncode, 2)
        self.assertIn("refusing to listen on 0.0.0.0 without a token", refused.stderr)
        self.assertIn("--insecure", refused.stderr)
        for extra, env in ((["--insecure"], None), (["--token", ADMIN], None),
                           ([], dict(os.environ, KATAR_TOKEN=ADMIN))):
            process = subprocess.Popen([*KATAR, "--port", "0",
                                        "--host", "0.0.0.0", "--quiet", *extra], env=env,
                                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            self.addCleanup(process.stderr.close)
            self.addCleanup(stop_process, process)
            url = wait_until_listening(self, process)
            with urllib.request.urlopen(url.replace("0.0.0.0", "127.0.0.1") + "/healthz", timeout=5) as response:
                self.assertEqual(response.status, 200)
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(10), 0)

    def test_loopback_is_told_from_other_addresses(self):
        for host in ("127.0.0.1", "127.5.5.5", "::1", "localhost"):
            self.assertTrue(K.is_loopback(host), host)
        for host in ("0.0.0.0", "", "::", "192.0.2.10", "10.1.2.3", "no-such-host.invalid"):
            self.assertFalse(K.is_loopback(host), host)


class LimitsTest(GuardedStateTestCase):

    def test_a_connection_without_an_authorised_request_is_cut_after_the_first_deadline(self):
        self.server.httpd.access = K.Access([ADMIN])
        self.set_limits(first_request_timeout=0.5)
        address = (self.server.host, self.server.port)
        idle, health, refused, worker = (socket.create_connection(address, timeout=10) for _ in range(4))
        for connection in (idle, health, refused, worker):
            self.addCleanup(connection.close)
        started = time.monotonic()
        health.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # open, but not authorised
        refused.sendall(b"GET /v1/queues HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n\r\n")
        authorised = b"GET /v1/queue/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n\r\n" % ADMIN.encode()
        worker.sendall(authorised)
        self.assertTrue(worker.recv(65536).startswith(b"HTTP/1.1 200"))
        def until_closed(connection):  # read without closing our side: the server must be the one to close
            answer = b""
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    return answer
                answer += chunk
        for connection, first in ((idle, b""), (health, b"HTTP/1.1 200"), (refused, b"HTTP/1.1 401")):
            answer = until_closed(connection)
            self.assertTrue(answer.startswith(first), answer[:60])
            self.assertLess(time.monotonic() - started, 5)
        self.assertGreaterEqual(time.monotonic() - started, 0.4)
        time.sleep(0.3)  # past the first deadline: the authorised connection keeps its slot
        worker.sendall(authorised)
        self.assertTrue(worker.recv(65536).startswith(b"HTTP/1.1 200"))
        # A stranger that trickles a request in is cut off at the same deadline, not the request timeout's.
        with socket.create_connection(address, timeout=10) as trickler:
            started = time.monotonic()
            try:
                for byte in b"GET /v1/queues HTTP/1.1\r\nHost: localhost\r\n":
                    trickler.sendall(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass
            until_closed(trickler)
            self.assertLess(time.monotonic() - started, 2.5)
        self.server.httpd.access = K.Access()
        self.assert_nothing_lost()

    def test_too_many_tasks_in_one_request(self):
        self.set_limits(max_tasks=5)
        cases = [("/v1/queue/jobs/tasks", {"tasks": [{"data": i} for i in range(6)]}),
                 ("/v1/queue/jobs", {"tasks": [{"_id": f"x-{i}", "status": "done"} for i in range(6)]}),
                 ("/v1/queue/jobs", {"max": 6}), ("/v1/queue/jobs", {"max": 6.0}), ("/v1/queue/jobs", {"max": 1e4})]
        for path, body in cases:
            status, payload, _ = self.call("POST", path, body)
            self.assertEqual(status, 400, body)
            self.assertRegex(payload["error"], "at most 5|between 0 and 5")
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": i} for i in range(5)]})[0], 201)
        self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")
        self.insert({"data": "keep-2"})
        self.assert_nothing_lost()

    def test_task_data_and_results_larger_than_the_limit_are_413(self):
        self.set_limits(max_data=100)
        for path, body in (("/v1/queue/jobs/tasks", {"data": "x" * 200}),
                           ("/v1/queue/jobs/tasks", {"tasks": [{"data": 1}, {"data": ["y" * 200]}]}),
                           ("/v1/queue/jobs", {"tasks": [{"_id": self.leased["_id"], "status": "done",
                                                          "result": "z" * 200}]})):
            status, payload, _ = self.call("POST", path, body)
            self.assertEqual(status, 413, body)
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": "x" * 50, "key": "k" * 90})[0], 201)
        self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")
        self.insert({"data": "keep-2"})
        self.assert_nothing_lost()

    def test_json_nested_deeper_than_the_limit_is_400(self):
        self.set_limits(max_depth=8)
        deep = [[[[[[[[[["too deep"]]]]]]]]]]
        for path, body in (("/v1/queue/jobs/tasks", {"data": deep}), ("/v1/queue/jobs/tasks", {"tasks": [{"data": deep}]}),
                           ("/v1/queue/jobs", {"tasks": [{"_id": self.leased["_id"], "status": "done", "result": deep}]}),
                           ("/v1/queue/jobs", {"configuration": {"deep": deep}})):
            status, payload, _ = self.call("PUT" if "configuration" in body else "POST", path, body)
            self.assertEqual(status, 400, body)
            self.assertIn("deeper than 8", payload["error"])
        self.assertEqual(self.call("POST", "/v1/queue/jobs", {"tasks": [], "max": 0, "worker": "w" * 30})[0], 204)
        self.assert_nothing_lost()

    def test_too_many_or_too_large_headers_are_431_and_a_long_request_line_414(self):
        self.set_limits(max_headers=10, max_head_bytes=2048)
        many = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(11)) + b"\r\n"
        large = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"y" * 3000 + b"\r\n\r\n"
        long_line = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
        for request, code in ((many, b"431"), (large, b"431"), (long_line, b"414")):
            answer = self.raw(request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + code), answer[:80])
            self.assertIn(b'{"error":', answer)
        ok = self.raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(9))
                      + b"\r\n")  # ten header lines, Host among them
        self.assertTrue(ok.startswith(b"HTTP/1.1 200"))
        self.assert_nothing_lost()

    def test_conflicting_content_lengths_are_400(self):
        answer = self.raw(b"POST /v1/queue/jobs/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        self.assert_nothing_lost()

    def test_an_idle_connection_is_closed_after_the_idle_timeout(self):
        self.set_limits(idle_timeout=0.2)
        with socket.create_connection((self.server.host, self.server.port), timeout=5) as connection:
            started = time.monotonic()
            self.assertEqual(connection.recv(100), b"")
            self.assertLess(time.monotonic() - started, 3)
        self.assert_nothing_lost()

    def test_a_client_that_trickles_its_request_is_cut_off_at_the_request_timeout(self):
        self.set_limits(request_timeout=0.3, idle_timeout=5)
        request = b"POST /v1/queue/jobs/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
        request += b'{"data": 99}\n'
        with socket.create_connection((self.server.host, self.server.port), timeout=5) as connection:
            started, cut = time.monotonic(), False
            for index in range(len(request)):
                try:
                    connection.sendall(request[index:index + 1])
                except OSError:
                    cut = True
                    break
                ready = select.select([connection], [], [], 0.05)[0]
                if ready:
                    cut = True
                    break
            self.assertTrue(cut, "the trickling client was never cut off")
            self.assertLess(time.monotonic() - started, 2)
        self.assert_nothing_lost()

    def test_connections_beyond_the_limit_get_a_quick_503(self):
        self.set_limits(max_connections=3)
        deadline = time.monotonic() + 5
        while self.server.httpd.active:  # the connections of setUp end in their own time
            self.assertLess(time.monotonic() - deadline, 0)
            time.sleep(0.005)
        held = [socket.create_connection((self.server.host, self.server.port), timeout=5) for _ in range(3)]
        for connection in held:
            self.addCleanup(connection.close)
        while self.server.httpd.active < 3:
            self.assertLess(time.monotonic() - deadline, 0)
            time.sleep(0.005)
        started = time.monotonic()
        answer = self.raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        self.assertIn(b"Retry-After: 1", answer)
        self.assertIn(b"connection limit", answer)
        self.assertLess(time.monotonic() - started, 1)
        held.pop().close()
        while self.server.httpd.active >= 3:
            self.assertLess(time.monotonic() - deadline, 0)
            time.sleep(0.005)
        self.assertTrue(self.raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 200"))  # a place again
        for connection in held:
            connection.close()
        while self.server.httpd.active:
            self.assertLess(time.monotonic() - deadline, 0)
            time.sleep(0.005)
        self.assert_nothing_lost()

    def test_expect_100_continue_is_answered_before_the_body(self):
        with socket.create_connection((self.server.host, self.server.port), timeout=5) as connection:
            connection.sendall(b"POST /v1/queue/jobs/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 11\r\nExpect: 100-continue\r\n\r\n")
            self.assertEqual(connection.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            connection.sendall(b'{"data": 3}')
            self.assertTrue(connection.recv(1000).startswith(b"HTTP/1.1 201"))


# ---------------------------------------------------------------------------------------------------------------
# One framing, browsers kept out, names checked, a backlog for a fleet
# ---------------------------------------------------------------------------------------------------------------

EVIL = "https://evil.example"
DASH = "https://dash.example"


def exchange(host, port, data, trickle=False, timeout=1.0):
    """Send `data` at once, or trickled (a byte per send, TCP_NODELAY, a millisecond apart, until the server
    answers), without half-closing; read until the server closes. Returns (answer, closed): closed is False when
    the server still held the connection open `timeout` seconds after the last byte."""
    with socket.create_connection((host, port), timeout=5) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if trickle:
            for index in range(len(data)):
                try:
                    connection.sendall(data[index:index + 1])
                except OSError:
                    break
                # The first pause lets the server's first read see one byte, not the whole head.
                if select.select([connection], [], [], 0.01 if index == 0 else 0.001)[0]:
                    break  # answered: the rest would not be read
        else:
            connection.sendall(data)
        connection.settimeout(timeout)
        chunks = []
        try:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
        except socket.timeout:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True


class FramingTest(GuardedStateTestCase):
    """A request head is lines ended by CRLF and nothing else: the one framing every server on the way agrees on."""

    def setUp(self):
        super().setUp()
        self.host = b"127.0.0.1:%d" % self.server.port
        self.next_request = b"GET /healthz HTTP/1.1\r\nHost: " + self.host + b"\r\n\r\n"  # must never be answered

    def assert_one_400_then_closed(self, request):
        for trickle in (False, True):
            answer, closed = exchange(self.server.host, self.server.port, request + self.next_request, trickle)
            how = (request, "trickled" if trickle else "at once", answer[:300])
            head, _, rest = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), how)
            found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            self.assertIsNotNone(found, how)
            length = int(found.group(1))
            self.assertIn("error", json.loads(rest[:length]), how)
            self.assertEqual(rest[length:], b"", how)  # one answer: nothing after the bad head was read as a request
            self.assertTrue(closed, how)

    def test_a_bare_lf_anywhere_in_the_head_is_400_and_closes_the_connection(self):
        host = self.host
        for request in (b"GET /healthz HTTP/1.1\nHost: " + host + b"\n\n",
                        b"GET /healthz HTTP/1.1\nHost: " + host + b"\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\nX-A: b\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\nc\r\n\r\n"):
            self.assert_one_400_then_closed(request)
        self.assert_nothing_lost()

    def test_a_bare_cr_anywhere_in_the_head_is_400_and_closes_the_connection(self):
        host = self.host
        for request in (b"GET /healthz\r HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\rX-A: b\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\rc\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\r\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-A\r: b\r\n\r\n"):
            self.assert_one_400_then_closed(request)
        self.assert_nothing_lost()

    def test_a_nul_byte_anywhere_in_the_head_is_400_and_closes_the_connection(self):
        host = self.host
        for request in (b"GET /healthz?a=\x00 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                        b"GET /healthz HTTP/1.1\x00\r\nHost: " + host + b"\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\x00c\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\x00\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-\x00A: b\r\n\r\n",
                        b"G\x00T /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"):
            self.assert_one_400_then_closed(request)
        self.assert_nothing_lost()

    def test_a_request_smuggled_behind_a_bare_lf_header_is_never_run(self):
        # One reader ends "Host: x\nContent-Length: N" at the LF and takes the body as a body; another reads one
        # header "Host" and takes the body for the next request. Neither may happen: one 400, then the connection ends.
        inner = b"DELETE /v1/queue/jobs/tasks?status=queued HTTP/1.1\r\nHost: " + self.host + b"\r\n\r\n"
        for body in (inner, b'{"data": "smuggled"}'):
            request = (b"POST /v1/queue/jobs/tasks HTTP/1.1\r\nHost: " + self.host + b"\nContent-Length: %d\r\n"
                       b"\r\n" % len(body)) + body
            self.assert_one_400_then_closed(request)
            self.assert_nothing_lost()
        self.assertEqual(self.call("GET", "/v1/queue/jobs/tasks")[1]["tasks"][1]["data"], "keep-2")

    def test_a_request_line_is_split_on_single_spaces_and_values_lose_only_spaces_and_tabs(self):
        host = self.host
        for request in (b"GET\t/healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                        b"GET  /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                        b"G\xc9T /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                        b"GET /healthz\x0bHTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
                        b"POST /v1/queue/jobs/tasks HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 2\xa0\r\n"
                        b"\r\n{}"):
            self.assert_one_400_then_closed(request)
        self.assert_nothing_lost()

    def test_leading_empty_lines_are_tolerated_but_let_no_bare_lf_through(self):
        # RFC 9112 2.2: a server should ignore at least one empty line (CRLF) received before the request line.
        good = b"GET /v1/queue/jobs/stats HTTP/1.1\r\nHost: " + self.host + b"\r\nConnection: close\r\n\r\n"
        for trickle in (False, True):
            for leading in (b"\r\n", b"\r\n\r\n\r\n"):
                answer, closed = exchange(self.server.host, self.server.port, leading + good, trickle)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (leading, trickle, answer[:200]))
                self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["counts"]["queued"], 1)
                self.assertTrue(closed)
        self.assert_one_400_then_closed(b"\r\n\r\nGET /healthz HTTP/1.1\nHost: " + self.host + b"\n\n")
        self.assert_nothing_lost()


class OriginTest(GuardedStateTestCase):
    """A page in a browser may send requests anywhere; only the server's own page (and allowed origins) may use it."""

    def setUp(self):
        super().setUp()
        self.own = "http://127.0.0.1:%d" % self.server.port  # urllib sends Host: 127.0.0.1:PORT
        self.queued = next(task_id for task_id in self.ids if task_id != self.leased["_id"])

    def data_calls(self):
        """Every route that holds data or changes it, with a body that is valid for it."""
        return [("GET", "/v1/queues", None), ("GET", "/metrics", None), ("GET", "/v1/queue/jobs", None),
                ("POST", "/v1/queue/jobs", {"max": 1}), ("PUT", "/v1/queue/jobs", {"paused": True}),
                ("PUT", "/v1/queue/made-by-evil", {}), ("GET", "/v1/queue/jobs/stats", None),
                ("GET", "/v1/queue/jobs/tasks", None), ("POST", "/v1/queue/jobs/tasks", {"data": "evil"}),
                ("DELETE", "/v1/queue/jobs/tasks?status=queued", None),
                ("GET", f"/v1/queue/jobs/tasks/{self.queued}", None),
                ("PATCH", f"/v1/queue/jobs/tasks/{self.queued}", {"status": "paused"}),
                ("DELETE", f"/v1/queue/jobs/tasks/{self.queued}", None),
                ("POST", "/v1/queue/jobs", {"tasks": [{"_id": self.leased["_id"], "status": "done"}]})]

    def assert_untouched(self):
        self.assert_nothing_lost()
        self.assertEqual([queue.name for queue in self.broker.queues()], ["jobs"])
        self.assertFalse(self.call("GET", "/v1/queue/jobs/stats")[1]["paused"])

    def test_a_foreign_origin_is_403_on_every_data_route_and_changes_nothing(self):
        for method, path, body in self.data_calls():
            status, payload, _ = self.call(method, path, body, headers={"Origin": EVIL})
            self.assertEqual(status, 403, (method, path, payload))
        for path in ("/healthz", "/v1/openapi.json", "/", "/ui"):  # they hold no data
            request = urllib.request.Request(self.url + path, headers={"Origin": EVIL})
            with urllib.request.urlopen(request, timeout=5) as response:  # raises HTTPError unless 2xx
                self.assertEqual(response.status, 200, path)
        self.assert_untouched()

    def test_a_text_plain_simple_post_from_a_foreign_page_is_403_and_changes_nothing(self):
        # A form or fetch(..., {mode: "no-cors"}) sends these without a preflight: the browser asks nobody first.
        for path, raw in (("/v1/queue/jobs/tasks", b'{"data": "csrf"}'), ("/v1/queue/jobs", b'{"max": 1000}')):
            for headers in ({"Origin": EVIL}, {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}):
                status, payload, _ = self.call("POST", path, raw=raw,
                                               headers=dict(headers, **{"Content-Type": "text/plain"}))
                self.assertEqual(status, 403, (path, headers, payload))
        self.assert_untouched()

    def test_origin_null_and_near_misses_of_the_own_origin_are_403(self):
        port = self.server.port
        for origin in ("null", "http://127.0.0.1", "http://127.0.0.1:1",
                       "http://127.0.0.1:%d.evil.example" % port, "http://evil.example:%d" % port):
            status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "x"}, headers={"Origin": origin})
            self.assertEqual(status, 403, (origin, payload))
            self.assertEqual(self.call("GET", "/v1/queue/jobs/stats", headers={"Origin": origin})[0], 403, origin)
        self.assert_untouched()

    def test_the_servers_own_origin_is_served_compared_without_regard_to_case(self):
        port = self.server.port
        for headers in ({"Origin": self.own}, {"Origin": "HTTP://127.0.0.1:%d" % port},
                        {"Host": "LocalHost:%d" % port, "Origin": "http://localhost:%d" % port},
                        {"Host": "localhost:%d" % port, "Origin": "http://LOCALHOST:%d" % port}):
            self.assertEqual(self.call("GET", "/v1/queue/jobs/stats", headers=headers)[0], 200, headers)
            self.assertEqual(self.call("POST", "/v1/queue/jobs", {"max": 0}, headers=headers)[0], 204, headers)
        # Behind a proxy that ends TLS, the page is https://HOST while this server speaks plain HTTP to the proxy.
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats", headers={"Origin": "https://127.0.0.1:%d" % port})[0],
                         200)
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "mine"}, headers={"Origin": self.own})
        self.assertEqual(status, 201, payload)
        self.assertEqual(self.counts()["queued"], 2)
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": "not mine"},
                                   headers={"Origin": EVIL})[0], 403)  # the own origin proves nothing for another
        self.assertEqual(self.counts()["queued"], 2)

    def test_sec_fetch_site_cross_site_is_403_while_same_origin_none_and_curl_are_served(self):
        for method, path, body in self.data_calls():
            status, payload, _ = self.call(method, path, body, headers={"Sec-Fetch-Site": "cross-site"})
            self.assertEqual(status, 403, (method, path, payload))
        for value in ("same-site", "cross-site, same-origin", "same-origin, CROSS-SITE"):
            self.assertEqual(self.call("GET", "/v1/queue/jobs/stats", headers={"Sec-Fetch-Site": value})[0], 403)
        self.assert_untouched()
        for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {},
                        {"Sec-Fetch-Site": "same-origin", "Origin": self.own}):
            self.assertEqual(self.call("GET", "/v1/queue/jobs/stats", headers=headers)[0], 200, headers)
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "typed"},
                                       headers={"Sec-Fetch-Site": "none"})
        self.assertEqual(status, 201, payload)
        self.assertEqual(self.counts()["queued"], 2)


class AllowedOriginTest(GuardedStateTestCase):
    server_options = {"allow_origins": [DASH]}

    def test_an_allowed_origin_is_served_with_cors_headers_and_others_stay_403(self):
        for headers in ({"Origin": DASH}, {"Origin": DASH, "Sec-Fetch-Site": "cross-site"}):
            status, payload, response_headers = self.call("GET", "/v1/queue/jobs/stats", headers=headers)
            self.assertEqual(status, 200, (headers, payload))
            self.assertEqual(response_headers["Access-Control-Allow-Origin"], DASH)
            self.assertIn("origin", [name.strip().lower() for name in response_headers.get("Vary", "").split(",")])
        status, payload, response_headers = self.call("POST", "/v1/queue/jobs/tasks", {"data": "from the dash"},
                                                      headers={"Origin": DASH})
        self.assertEqual(status, 201, payload)
        self.assertEqual(response_headers["Access-Control-Allow-Origin"], DASH)
        self.call("DELETE", f"/v1/queue/jobs/tasks/{payload['tasks'][0]['_id']}")
        for origin in (EVIL, "http://dash.example", "https://dash.example.evil.example", "https://evil.dash.example",
                       "null"):
            status, payload, response_headers = self.call("POST", "/v1/queue/jobs/tasks", {"data": "x"},
                                                          headers={"Origin": origin})
            self.assertEqual(status, 403, (origin, payload))
            self.assertNotIn(response_headers["Access-Control-Allow-Origin"], ("*", origin))
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats",
                                   headers={"Origin": "http://127.0.0.1:%d" % self.server.port})[0], 200)
        self.assertEqual(self.counts()["cancelled"], 1)
        self.call("DELETE", "/v1/queue/jobs/tasks?status=cancelled")
        self.assert_nothing_lost()


class RfcTest(GuardedStateTestCase):
    """RFC 9110/9112 cases the server once missed, sent as a client would."""

    def exchange(self, request):
        return raw_exchange(self.server.host, self.server.port, request)

    def test_head_answers_every_get_route_with_its_headers_and_no_body(self):
        self.broker.put_batch("b1", {"queue": "jobs"})
        for template, methods in K.ROUTE_TABLE:
            if "GET" not in methods:
                continue
            path = template.format(queue="jobs", id=self.ids[0], batch="b1")
            get = self.exchange(b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % path.encode())
            head = self.exchange(b"HEAD %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % path.encode())
            get_head, _, get_body = get.partition(b"\r\n\r\n")
            head_head, _, head_body = head.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200"), (path, head[:100]))
            self.assertEqual(head_body, b"", path)
            length = re.search(rb"Content-Length: (\d+)", head_head)
            if path != "/metrics":  # (whose request counts move between the two)
                self.assertEqual(int(length.group(1)), len(get_body), path)
        if shutil.which("curl"):
            result = subprocess.run(["curl", "-sI", self.url + "/healthz"], capture_output=True, timeout=20)
            self.assertTrue(result.stdout.startswith(b"HTTP/1.1 200"), result.stdout)
        self.assert_nothing_lost()

    def test_an_http_1_0_client_that_asks_for_keep_alive_is_told_and_kept(self):
        with socket.create_connection((self.server.host, self.server.port), timeout=5) as connection:
            for _ in range(2):
                connection.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                answer = b""
                while b"}" not in answer:
                    answer += connection.recv(65536)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
                self.assertIn(b"\r\nConnection: keep-alive\r\n", answer)
        answer = self.exchange(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")  # close wins
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        answer = self.exchange(b"GET /healthz HTTP/1.0\r\n\r\n")  # without it: answered, then closed
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertIn(b"\r\nConnection: close\r\n", answer)

    def test_versions_methods_and_header_values_are_read_as_rfc_9110_says(self):
        for request, code in (
                (b"GET /healthz HTTP/2.0\r\nHost: localhost\r\n\r\n", b"505"),
                (b"GET /healthz HTTP/3.0\r\nHost: localhost\r\n\r\n", b"505"),
                (b"GET /healthz HTTP/1.2\r\nHost: localhost\r\n\r\n", b"200"),  # a later 1.x is 1.1
                (b"GET /healthz HTTP/1\r\nHost: localhost\r\n\r\n", b"400"),
                (b"GET /healthz http/1.1\r\nHost: localhost\r\n\r\n", b"400"),
                (b"BREW /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", b"501"),
                (b"TRACE /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n", b"501"),
                (b"CONNECT localhost:1 HTTP/1.1\r\nHost: localhost\r\n\r\n", b"501"),
                (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\x01b\r\n\r\n", b"400"),
                (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\x7fb\r\n\r\n", b"400"),
                (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\tb \xe9\r\n\r\n", b"200"),  # tab, obs-text
                (b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n", b"400"),
                (b"GET /healthz HTTP/1.1\r\nHost: a/b\r\n\r\n", b"400"),
                (b"GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n", b"400"),
                (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:x\r\n\r\n", b"400"),
                (b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n", b"200"),  # empty: allowed (RFC 9112 3.2)
                (b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", b"200")):
            answer = self.exchange(request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + code), (request, answer[:120]))
            if not code.startswith(b"2"):
                self.assertIn(b'{"error":', answer)
        self.assert_nothing_lost()


class HostTest(GuardedStateTestCase):
    """Without a token, a name that is not this machine's is a page whose DNS was rebound to 127.0.0.1."""

    FOREIGN = ("rebind.evil.example:{port}", "rebind.evil.example", "localhost.evil.example:{port}",
               "127.0.0.1.nip.io:{port}", "localhostx:{port}", "EVIL.EXAMPLE")
    OWN = ("127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LOCALHOST", "LocalHost:{port}", "[::1]:{port}",
           "[::1]", "192.0.2.10:{port}")

    def every_route(self):
        queued = next(task_id for task_id in self.ids if task_id != self.leased["_id"])
        return [("GET", "/healthz", None), ("GET", "/v1/openapi.json", None), ("GET", "/", None), ("GET", "/ui", None),
                ("GET", "/metrics", None), ("GET", "/v1/queues", None), ("GET", "/v1/queue/jobs", None),
                ("POST", "/v1/queue/jobs", {"max": 1}), ("PUT", "/v1/queue/jobs", {"paused": True}),
                ("GET", "/v1/queue/jobs/stats", None), ("GET", "/v1/queue/jobs/tasks", None),
                ("POST", "/v1/queue/jobs/tasks", {"data": "rebound"}),
                ("DELETE", "/v1/queue/jobs/tasks?status=queued", None), ("GET", f"/v1/queue/jobs/tasks/{queued}", None),
                ("PATCH", f"/v1/queue/jobs/tasks/{queued}", {"status": "paused"}),
                ("DELETE", f"/v1/queue/jobs/tasks/{queued}", None)]

    def test_a_host_other_than_an_ip_literal_or_localhost_is_421_on_every_route(self):
        port = self.server.port
        for method, path, body in self.every_route():
            status, payload, _ = self.call(method, path, body, headers={"Host": "rebind.evil.example:%d" % port})
            self.assertEqual(status, 421, (method, path, payload))
        for host in self.FOREIGN:
            self.assertEqual(self.call("GET", "/healthz", headers={"Host": host.format(port=port)})[0], 421, host)
        for host in self.OWN:
            self.assertEqual(self.call("GET", "/v1/queue/jobs/stats", headers={"Host": host.format(port=port)})[0],
                             200, host)
        self.assert_nothing_lost()
        self.assertFalse(self.call("GET", "/v1/queue/jobs/stats")[1]["paused"])

    def test_the_authority_of_an_absolute_target_is_the_one_checked_and_odd_hosts_are_read_strictly(self):
        port = self.server.port
        for request, code in (
                (b"GET http://rebind.evil.example/v1/queues HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"421"),
                (b"GET http://127.0.0.1:%d/v1/queues HTTP/1.1\r\nHost: rebind.evil.example\r\n\r\n" % port,
                 b"200"),
                (b"GET //rebind.evil.example/v1/queues HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"404"),
                (b"GET /v1/queues HTTP/1.1\r\nHost: [::1]evil.example\r\n\r\n", b"400"),  # no host: RFC 9112 3.2
                (b"GET /v1/queues HTTP/1.1\r\nHost: localhost:evil\r\n\r\n", b"400"),
                (b"GET /v1/queues HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n", b"400"),
                (b"GET /v1/queues HTTP/1.1\r\nHost: 127.1:%d\r\n\r\n" % port, b"200"),
                (b"GET /v1/queues HTTP/1.1\r\nHost: 2130706433\r\n\r\n", b"200")):
            answer = self.raw(request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + code), (request, answer[:200]))
        self.assert_nothing_lost()

    def test_with_a_token_any_host_is_served(self):
        port = self.server.port
        self.assertEqual(self.call("GET", "/v1/queues", headers={"Host": "queue.example.com:%d" % port})[0], 421)
        self.server.httpd.access = K.Access(["admin-token"])
        for host in self.FOREIGN + self.OWN:
            status, payload, _ = self.call("GET", "/v1/queue/jobs/stats", headers={
                "Host": host.format(port=port), "Authorization": "Bearer admin-token"})
            self.assertEqual(status, 200, (host, payload))
        self.assertEqual(self.call("GET", "/healthz", headers={"Host": "queue.example.com"})[0], 200)

    def test_an_http_1_1_request_without_a_host_is_400(self):
        for request in (b"GET /healthz HTTP/1.1\r\n\r\n", b"GET /v1/queue/jobs/stats HTTP/1.1\r\n\r\n",
                        b"POST /v1/queue/jobs/tasks HTTP/1.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 15\r\n\r\n{\"data\": \"nh\"}\n",
                        b"DELETE /v1/queue/jobs/tasks?status=queued HTTP/1.1\r\n\r\n"):
            answer = self.raw(request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (request, answer[:200]))
            self.assertIn(b'{"error":', answer)
        self.assert_nothing_lost()


class AllowedHostTest(GuardedStateTestCase):
    server_options = {"allow_hosts": ["queue.internal"]}

    def test_a_name_given_in_allow_hosts_is_served_and_other_names_stay_421(self):
        port = self.server.port
        for host in ("queue.internal:%d" % port, "queue.internal", "127.0.0.1:%d" % port, "localhost"):
            status, payload, _ = self.call("POST", "/v1/queue/jobs", {"max": 0}, headers={"Host": host})
            self.assertEqual(status, 204, (host, payload))
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "internal"},
                                       headers={"Host": "queue.internal:%d" % port})
        self.assertEqual(status, 201, payload)
        self.call("DELETE", f"/v1/queue/jobs/tasks/{payload['tasks'][0]['_id']}")
        for host in ("other.internal:%d" % port, "queue.internal.evil.example:%d" % port, "xqueue.internal",
                     "internal:%d" % port):
            status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"data": "x"}, headers={"Host": host})
            self.assertEqual(status, 421, (host, payload))
        self.call("DELETE", "/v1/queue/jobs/tasks?status=cancelled")
        self.assert_nothing_lost()


class HardeningCommandLineTest(unittest.TestCase):

    def test_allow_origin_and_allow_host_flags_repeat(self):
        process = subprocess.Popen([*KATAR, "--port", "0", "--quiet",
                                    "--queue", "jobs", "--allow-origin", DASH, "--allow-origin", "https://ops.example",
                                    "--allow-host", "queue.internal", "--allow-host", "q2.internal"],
                                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(stop_process, process)
        port = int(wait_until_listening(self, process).rpartition(":")[2])

        def get(headers):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/v1/queue/jobs/stats", headers=headers)
                response = connection.getresponse()
                return response.status, response.getheader("Access-Control-Allow-Origin"), response.read()
            finally:
                connection.close()

        for origin in (DASH, "https://ops.example"):
            status, allowed, body = get({"Host": "queue.internal:%d" % port, "Origin": origin})
            self.assertEqual((status, allowed), (200, origin), body)
        self.assertEqual(get({"Host": "q2.internal:%d" % port})[0], 200)
        self.assertEqual(get({"Host": "other.internal:%d" % port})[0], 421)
        self.assertEqual(get({"Host": "queue.internal:%d" % port, "Origin": EVIL})[0], 403)


class BacklogTest(unittest.TestCase):

    def test_a_burst_of_connections_completes_its_handshakes_before_any_is_accepted(self):
        # A listen backlog of 5 (socketserver's default) drops the SYNs of a burst of workers starting together;
        # each dropped one waits a second or more for its retry. The backlog is capped by net.core.somaxconn.
        try:
            with open("/proc/sys/net/core/somaxconn") as handle:
                cap = int(handle.read())
        except (OSError, ValueError):
            cap = 128
        count = min(300, cap, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
        server = K.KatarServer(K.Broker(), "127.0.0.1", 0)  # listening, but nobody accepts: not started
        self.addCleanup(server.close)
        clients = []

        def close_clients():
            for client in clients:
                client.close()
        self.addCleanup(close_clients)
        selector = selectors.DefaultSelector()
        self.addCleanup(selector.close)
        for _ in range(count):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(client)
            client.setblocking(False)
            self.assertIn(client.connect_ex((server.host, server.port)), (0, errno.EINPROGRESS))
            selector.register(client, selectors.EVENT_WRITE)
        connected, failed = 0, 0
        deadline = time.monotonic() + 3  # a loopback handshake takes microseconds; a dropped SYN, a second or more
        while connected + failed < count and time.monotonic() < deadline:
            for key, _ in selector.select(deadline - time.monotonic()):
                selector.unregister(key.fileobj)
                if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
                else:
                    failed += 1
        self.assertEqual(connected, count, f"{connected} of {count} connections completed, {failed} were refused")


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: thousands of generated hostile requests against one server
# ---------------------------------------------------------------------------------------------------------------

FUZZ_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "POST", "POST", "GET", "HEAD", "OPTIONS", "TRACE", "BREW",
                "get", "G\x00T", "", "CONNECT"]
FUZZ_QUEUES = ["jobs", "jobs", "mail", "nope", "..%2fetc", "j%20obs", "%ff", "", "a" * 300, "jobs%00"]
FUZZ_STATUSES = ["done", "failed", "in progress", "queued", "paused", "cancelled", "bogus", "", None, 5, ["done"]]


def fuzz_body(rng, ids, route):
    """A body that is valid, or nearly, for the route; mutated afterwards by the caller."""
    pick = lambda: rng.choice(ids + ["x-1", "", 7, None, "a" * 100])  # noqa: E731
    if route == "poll":
        reports = [{"_id": pick(), "status": rng.choice(FUZZ_STATUSES), "error": rng.choice(["e", None, 3]),
                    "attempt": rng.choice([None, 1, 2, 0, -1, "1", 2 ** 70]), "retry": rng.choice([True, False, "no"]),
                    "retry_after": rng.choice([None, 0, 10, -5, 1e400]), "result": rng.choice([None, {"r": [1]}, "x"])}
                   for _ in range(rng.randrange(4))]
        body = {"tasks": reports, "max": rng.choice([0, 1, 3, 25, -1, "2", True, None, 1.5]),
                "wait": rng.choice([0, 0, 10, 60, -1, "5", None, 1e400]), "worker": rng.choice(["w", 5, None, "w" * 300])}
    elif route == "insert":
        task = lambda: {"data": rng.choice([1, "s", None, {"a": [1, {"b": None}]}, [], "x" * 500, 1e300]),  # noqa: E731
                        "priority": rng.choice([0, "high", "low", "urgent", 10 ** 12, None, 2.5]),
                        "delay": rng.choice([0, 0, 5, -1, "1", 10 ** 15]), "key": rng.choice([None, "k1", "k" + str(rng.random()), 5]),
                        "status": rng.choice(["queued", "paused", "done", None])}
        body = {"tasks": [task() for _ in range(rng.randrange(1, 4))]} if rng.random() < 0.5 else task()
    elif route == "put":
        body = {rng.choice(["lease", "max_attempts", "persistent", "paused", "max_in_flight", "backoff",
                            "configuration", "unknown"]): rng.choice([0, 1, 50, True, False, "x", None, {"interval": 5},
                                                                     {"interval": "x"}, []])
                for _ in range(rng.randrange(3))}
    elif route == "patch":
        body = {"status": rng.choice(FUZZ_STATUSES)}
    else:
        body = rng.choice([{}, None, [], {"x": 1}])
    return json.dumps(body).encode()


def mutate(rng, data):
    choice = rng.random()
    if choice < 0.55 or not data:
        return data
    if choice < 0.65:
        return data[:rng.randrange(len(data))]
    if choice < 0.75:
        position = rng.randrange(len(data))
        return data[:position] + bytes([rng.randrange(256)]) + data[position + 1:]
    if choice < 0.82:
        position = rng.randrange(len(data))
        return data[:position] + rng.choice([b"{", b"]", b'"', b"\\", b"\x00", b"\xff", b"NaN", b"1e999"]) + data[position:]
    if choice < 0.9:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if choice < 0.95:
        depth = rng.choice([40, 1000, 3000])
        return b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"
    return b'{"data": "' + b"x" * rng.choice([5000, 70000]) + b'"}'


# Requests whose answer no timing can change, mixed in now and then: random bodies rarely make a valid request, so
# without them whether the fuzzer ever saw a 204 or a 409 depended on how the threads happened to interleave, and
# a 201, 501 or 413 on a handful of lucky draws.
def fuzz_certain(rng, held_id):
    def post(path, body):
        return f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    late_report = json.dumps({"tasks": [{"_id": held_id, "status": "done", "attempt": 99}], "max": 0})
    return rng.choice([
        post("/v1/queue/mail", '{"max": 0}'),              # nothing to report, nothing wanted: 204
        post("/v1/queue/held", late_report),               # a delivery the held task never had: 409
        post("/v1/queue/mail/tasks", '{"data": 1}'),       # 201
        post("/v1/queue/mail/tasks", '{"data": "' + "x" * 9000 + '"}'),  # over max_body: 413
        b"POST /v1/queue/mail/tasks HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",  # 501
    ])


def fuzz_request(rng, ids, held_id):
    """One raw request, and how to send it."""
    if rng.random() < 0.02:
        return fuzz_certain(rng, held_id), "normal"
    queue, task_id = rng.choice(FUZZ_QUEUES), rng.choice(ids + ["x-1", "%00", "1" * 100, ""])
    path, route = rng.choice([
        (f"/v1/queue/{queue}", "poll"), (f"/v1/queue/{queue}", "poll"), (f"/v1/queue/{queue}", "put"),
        (f"/v1/queue/{queue}/tasks", "insert"), (f"/v1/queue/{queue}/tasks", "insert"),
        (f"/v1/queue/{queue}/tasks/{task_id}", "patch"), (f"/v1/queue/{queue}/stats", None), ("/v1/queues", None),
        ("/healthz", None), ("/", None), ("*", None), ("http://example/v1/queues", None),
        (f"/v1/queue/{queue}/tasks?status={rng.choice(['queued', 'done', 'x', 'in%20progress'])}"
         f"&limit={rng.choice(['5', '0', 'x', '99999'])}&after={task_id}", None),
        (f"/v1/queue/{queue}/tasks/{task_id}?wait={rng.choice(['0', '20', '-1', 'x', '1e400'])}", None),
        ("//[::1/v1/queues", None), ("http://[x/v1/queues", None),
        ("/" + "".join(rng.choice("abc%/?&=.\x7f[]:@#") for _ in range(rng.randrange(1, 40))), None)])
    method = rng.choice(FUZZ_METHODS)
    body = mutate(rng, fuzz_body(rng, ids, route)) if rng.random() < 0.8 else b""
    version = rng.choice(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2", "HTTP/1.1x", ""])
    headers = ["Host: localhost"]
    headers.append("Content-Type: " + rng.choice(["application/json"] * 6 + ["text/plain", "application/xml",
                                                  "application/x-www-form-urlencoded", "", "multipart/form-data; b=1",
                                                  "application/vnd.x+json"]))
    length = rng.choice([len(body)] * 8 + [len(body) + 7, max(0, len(body) - 3), "abc", "-1", "1e3", "", "99999999999"])
    headers.append(f"Content-Length: {length}")
    extra = rng.random()
    if extra < 0.05:
        headers.append("Transfer-Encoding: chunked")
    elif extra < 0.1:
        headers.append(f"Content-Length: {len(body) + 1}")
    elif extra < 0.15:
        headers += [f"X-Filler-{i}: {'y' * rng.randrange(200)}" for i in range(rng.randrange(10, 40))]
    elif extra < 0.2:
        headers.append(rng.choice(["NoColon", " Leading: space", "Bad Name: x", "X: " + "y" * 5000, ": empty"]))
    elif extra < 0.25:
        headers.append("Expect: 100-continue")
    if rng.random() < 0.3:
        headers.append("Connection: " + rng.choice(["close", "keep-alive", "upgrade, close"]))
    data = f"{method} {path} {version}\r\n".encode("latin-1", "replace") + "\r\n".join(headers).encode() + b"\r\n\r\n" + body
    behaviour = rng.choices(["normal", "pipelined", "truncated", "abrupt", "slow"], [70, 8, 10, 10, 2])[0]
    return data, behaviour


def response_statuses(answer):
    """Every status code in the responses a connection received."""
    return [int(code) for code in re.findall(rb"(?:^|\r\n\r\n|\})HTTP/1\.1 (\d{3}) ", answer)]


class FuzzTest(unittest.TestCase):
    requests = int(os.environ.get("KATAR_FUZZ_REQUESTS", "4000"))

    def test_thousands_of_hostile_requests_cause_no_5xx_no_hang_and_no_corruption(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "fuzz.journal")  # journalled (no fsync: speed), replayed at the end
        broker = K.Broker(journal=K.Journal(path, fsync="never"))
        jobs = broker.queue("jobs", persistent=True, lease=200)
        broker.queue("mail")
        ids = [task["_id"] for task in jobs.insert([{"data": i, "key": f"k{i}"} for i in range(60)])]
        held = broker.queue("held", lease=600000)  # not in FUZZ_QUEUES: its one task stays leased throughout
        held_id = held.insert({"data": "held"})["_id"]
        self.assertEqual([task["_id"] for task in held.lease()], [held_id])
        limits = K.Limits(max_body=8192, max_tasks=20, max_data=2048, max_wait=30, max_headers=30,
                          max_head_bytes=4096, idle_timeout=0.5, request_timeout=0.5, max_connections=64)
        server = K.serve(broker, port=0, limits=limits)
        self.addCleanup(server.close)
        seen, bad, lock = collections.Counter(), [], threading.Lock()

        def client(seed, count):
            rng = random.Random(seed)
            for _ in range(count):
                data, behaviour = fuzz_request(rng, ids, held_id)
                if behaviour == "pipelined":
                    data += fuzz_request(rng, ids, held_id)[0]
                try:
                    answer = self.exchange(server, data, behaviour, rng)
                except OSError:
                    continue  # the server cut a hostile client off: allowed
                codes = response_statuses(answer)
                with lock:
                    seen.update(codes)
                    # 501 (a method or transfer coding not implemented) and 505 (HTTP/2) answer the request, as RFC
                    # 9110 says; any other 5xx but a 503 is a bug.
                    bad.extend((code, data[:120]) for code in codes if code >= 500 and code not in (501, 503, 505))
                    if b"Traceback" in answer or b"<!DOCTYPE HTML" in answer:  # http.server's own error page
                        bad.append(("not JSON", answer[:200]))

        threads = [threading.Thread(target=client, args=(seed, self.requests // 8)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(bad, [])
        # internal_errors counts the 500s answered and every exception the event loop caught.
        self.assertEqual(server.httpd.internal_errors, 0, "a 500 was answered, if only to a client already gone")
        self.assertGreater(sum(seen.values()), self.requests // 2)
        for code in (200, 201, 204, 400, 404, 405, 409, 413, 415, 431, 501):
            self.assertIn(code, seen, f"the fuzzer never provoked a {code}: {dict(seen)}")
        # No handler thread is left hanging: the limits close every connection.
        deadline = time.monotonic() + 5
        while server.httpd.active:
            self.assertLess(time.monotonic(), deadline, f"{server.httpd.active} connections still open")
            time.sleep(0.01)
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
            self.assertEqual(response.status, 200)
        for queue in broker.queues():
            self.assert_invariants(queue)
        held_tasks = {queue.name: [task["_id"] for task in queue.tasks(limit=1000)["tasks"]] for queue in
                      broker.queues()}
        server.close()
        replayed = K.Broker(journal=path)
        self.addCleanup(replayed.close)
        self.assertEqual({queue.name: [task["_id"] for task in queue.tasks(limit=1000)["tasks"]] for queue in
                          replayed.queues()}, held_tasks)

    def exchange(self, server, data, behaviour, rng):
        with socket.create_connection((server.host, server.port), timeout=5) as connection:
            if behaviour == "truncated":
                connection.sendall(data[:rng.randrange(1, max(2, len(data)))])
                return b""
            if behaviour == "abrupt":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
                connection.sendall(data)
                return b""
            if behaviour == "slow":
                for part in (data[:len(data) // 3], data[len(data) // 3:2 * len(data) // 3], data[2 * len(data) // 3:]):
                    connection.sendall(part)
                    time.sleep(0.02)
            else:
                connection.sendall(data)
            return read_to_end(connection)

    def assert_invariants(self, queue):
        """Every task in exactly one status; counts, listings and indexes agree."""
        with queue._broker._lock:
            tasks = dict(queue._tasks)
            by_status = {status: dict(members) for status, members in queue._by_status.items()}
            keys = dict(queue._keys)
        for task_id, task in tasks.items():
            self.assertEqual([status for status, members in by_status.items() if task_id in members], [task.status])
        self.assertEqual(sum(len(members) for members in by_status.values()), len(tasks))
        for key, task_id in keys.items():
            self.assertTrue(task_id in tasks or task_id in queue._finished, key)
        stats = queue.stats()
        listed = queue.tasks(limit=1000)["tasks"]
        self.assertEqual(stats["total"], len(listed))
        for status, count in stats["counts"].items():
            self.assertEqual(count, sum(1 for task in listed if task["status"] == status))


# ---------------------------------------------------------------------------------------------------------------
# The client side: Client, put, stats, work; and /metrics
# ---------------------------------------------------------------------------------------------------------------

class ClientTest(ServerTestCase):
    real_clock = True
    queue_options = {"persistent": True, "lease": 5000}

    def test_the_client_covers_every_worker_and_producer_route(self):
        client = K.Client(self.url)
        self.addCleanup(client.close)
        self.server.config("jobs", {"interval": 750, "model": "m1"})
        self.assertEqual(client.configuration("jobs"), {"interval": 750, "model": "m1"})
        created = client.insert("jobs", [{"data": {"n": 1}}, {"data": 2, "priority": "high", "key": "k"}])
        self.assertEqual([task["created"] for task in created], [True, True])
        leased = client.lease("jobs", max=5, wait=100, worker="w1")
        self.assertEqual([task["data"] for task in leased], [2, {"n": 1}])
        client.heartbeat("jobs", leased[0]["_id"], leased[0]["attempt"])
        client.report("jobs", [{"_id": leased[0]["_id"], "status": "done", "result": "r"}])
        self.assertEqual(client.task("jobs", leased[0]["_id"])["result"], "r")
        self.assertEqual(client.lease("jobs", wait=50), [])
        stats = client.stats("jobs")
        self.assertEqual((stats[0]["counts"]["done"], stats[0]["counts"]["in progress"]), (1, 1))
        self.assertEqual([queue["queue"] for queue in client.stats()], ["jobs"])
        for call, error in ((lambda: client.configuration("nope"), K.NotFound),
                            (lambda: client.report("jobs", [{"_id": leased[0]["_id"], "status": "failed", "error": "x"}]),
                             K.Conflict),
                            (lambda: client.insert("jobs", [{"data": 1, "priority": "urgent"}]), K.BadRequest)):
            with self.assertRaises(error) as raised:
                call()
            self.assertEqual(raised.exception.status, error.status)
        # The routes without a method of their own go through request(), which every method uses.
        other = leased[1]["_id"]
        client.report("jobs", [{"_id": other, "status": "failed", "error": "x", "retry": False}])
        answers = {
            ("PUT", "/v1/queue/mail"): {"lease": 5000}, ("GET", "/v1/queue/jobs/tasks?status=failed"): None,
            ("PATCH", f"/v1/queue/jobs/tasks/{other}"): {"status": "queued"},
            ("DELETE", f"/v1/queue/jobs/tasks/{other}"): None, ("DELETE", "/v1/queue/jobs/tasks?status=done"): None,
            ("GET", "/healthz"): None, ("GET", "/v1/openapi.json"): None, ("GET", "/metrics"): None, ("GET", "/"): None}
        results = {route: client.request(route[0], route[1], body) for route, body in answers.items()}
        self.assertEqual(results[("PUT", "/v1/queue/mail")][0], 201)
        self.assertEqual([task["_id"] for task in results[("GET", "/v1/queue/jobs/tasks?status=failed")][1]["tasks"]],
                         [other])
        self.assertEqual(results[("PATCH", f"/v1/queue/jobs/tasks/{other}")][1]["status"], "queued")
        self.assertEqual(results[("DELETE", f"/v1/queue/jobs/tasks/{other}")][1]["status"], "cancelled")
        self.assertEqual(results[("DELETE", "/v1/queue/jobs/tasks?status=done")][1], {"purged": 1})
        self.assertIn("katar_tasks", results[("GET", "/metrics")][1])
        self.assertIn("<!doctype html>", results[("GET", "/")][1])
        unreachable = K.Client("http://127.0.0.1:1", timeout=2)
        with self.assertRaises(K.CONNECTION_ERRORS):
            unreachable.configuration("jobs")

    def test_the_client_sends_its_token(self):
        self.server.httpd.access = K.Access([ADMIN], {WORKER: ["jobs"]})
        anonymous, worker = K.Client(self.url), K.Client(self.url, token=WORKER)
        self.addCleanup(anonymous.close)
        self.addCleanup(worker.close)
        with self.assertRaises(K.Unauthorized):
            anonymous.configuration("jobs")
        self.assertEqual(worker.configuration("jobs")["interval"], 30000)
        with self.assertRaises(K.Forbidden):
            worker.insert("jobs", [{"data": 1}])


class MetricsTest(ServerTestCase):
    real_clock = True

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            self.assertTrue(response.headers["Content-Type"].startswith("text/plain; version=0.0.4"))
            text = response.read().decode()
        samples, declared = {}, set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                declared.add(line.split()[2])
                continue
            if line.startswith("#") or not line:
                continue
            match = re.fullmatch(r'([a-z_]+)\{([^}]*)\} (-?[0-9.e+]+)', line)
            self.assertIsNotNone(match, f"not Prometheus text: {line!r}")
            family = match.group(1) if match.group(1) in declared else re.sub(r"_(sum|count)$", "", match.group(1))
            self.assertIn(family, declared, "a sample before its TYPE line")
            samples[(match.group(1), match.group(2))] = float(match.group(3))
        return samples

    def test_metrics_parse_as_prometheus_text_and_move_with_the_tasks(self):
        before = self.metrics()
        self.assertEqual(before[("katar_tasks", 'queue="jobs",status="queued"')], 0)
        self.insert({"data": 1}, {"data": 2})
        task = self.lease_one()
        self.poll({"tasks": [{"_id": task["_id"], "status": "done"}], "max": 0}, expect=204)
        after = self.metrics()
        self.assertEqual(after[("katar_tasks", 'queue="jobs",status="queued"')], 1)
        self.assertEqual(after[("katar_task_events_total", 'queue="jobs",event="inserted"')], 2)
        self.assertEqual(after[("katar_task_events_total", 'queue="jobs",event="done"')], 1)
        self.assertGreaterEqual(after[("katar_http_requests_total", 'route="insert",code="201"')], 1)
        self.assertGreater(after[("katar_http_requests_total", 'route="metrics",code="200"')],
                           before.get(("katar_http_requests_total", 'route="metrics",code="200"'), 0))
        self.assertIn(("katar_oldest_queued_age_seconds", 'queue="jobs"'), after)
        self.assertEqual(after[("katar_lease_wait_seconds_count", 'queue="jobs"')], 1)
        self.assertGreaterEqual(after[("katar_lease_wait_seconds_sum", 'queue="jobs"')], 0)
        self.server.httpd.access = K.Access([ADMIN], {WORKER: ["jobs"]})
        self.assertEqual(self.call("GET", "/metrics")[0], 401)


def schema_errors(value, schema, where="body", root=None):
    """The ways `value` breaks `schema`: the JSON Schema subset the OpenAPI document uses, $ref resolved in `root`
    (the document), so that a test needs nothing installed."""
    root = root if root is not None else {}
    if "$ref" in schema:
        return schema_errors(value, resolve(root, schema), where, root)
    for combinator, fits in (("oneOf", lambda n: n == 1), ("anyOf", lambda n: n >= 1)):
        if combinator in schema:
            matches = sum(1 for option in schema[combinator] if not schema_errors(value, option, where, root))
            if not fits(matches):
                return [f"{where} does not fit {combinator}"]
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float), "integer": int,
             "null": type(None)}
    kind = schema.get("type")
    if kind is not None:
        allowed = kind if isinstance(kind, list) else [kind]
        if not any(isinstance(value, kinds[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                   for k in allowed):
            return [f"{where} is none of {allowed}"]
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where} is above {schema['maximum']}")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{where} has a length out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where} does not match {schema['pattern']}")
    if isinstance(value, dict):
        errors += [f"{where}.{name} is missing" for name in schema.get("required", ()) if name not in value]
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], f"{where}.{name}", root)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}.{name} is not allowed")
        if "if" in schema and not schema_errors(value, schema["if"], where, root):
            errors += schema_errors(value, schema["then"], where, root)
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{where} has a number of items out of bounds")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{index}]", root)
    return errors


def resolve(document, schema):
    """The schema a {"$ref": "#/components/schemas/Name"} names (any other schema as it is)."""
    while "$ref" in schema:
        node = document
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


class DescriptionTest(ServerTestCase):
    def document(self):
        status, document, headers = self.call("GET", "/v1/openapi.json")
        self.assertEqual((status, document["openapi"]), (200, "3.1.0"))
        return document

    def test_the_openapi_document_lists_every_served_route_and_its_examples_validate(self):
        document = self.document()
        served = {(template, method.lower()) for template, methods in K.ROUTE_TABLE for method in methods}
        described = {(path, method) for path, item in document["paths"].items() for method in item}
        self.assertEqual(served, described)
        checked = 0
        for path, item in document["paths"].items():
            for method, operation in item.items():
                self.assertIn("default", operation["responses"])
                content = operation.get("requestBody", {}).get("content", {}).get("application/json")
                if content:
                    # A bare POST (the original's workers) and a bare PUT (a queue with the defaults) are fine.
                    # (and a bare PUT of a batch that exists changes nothing; of a new one, it lacks the callback)
                    self.assertEqual(operation["requestBody"]["required"], method in ("post", "patch") and
                                     path != "/v1/queue/{queue}", (path, method))
                    self.assertEqual(self.call(method.upper(), path.format(queue="jobs", id="none-1",
                                                                           batch="none"))[0] == 400,
                                     operation["requestBody"]["required"] or "{batch}" in path, (path, method))
                    self.assertEqual(schema_errors(content["example"], content["schema"], root=document), [],
                                     (path, method))
                    checked += 1
        self.assertEqual(checked, 6)
        poll = {"$ref": "#/components/schemas/PollRequest"}
        for bad in ({"tasks": "x"}, {"max": "1"}, {"task": []}, {"tasks": [{"_id": "a", "status": "failed"}]},
                    {"wait": -1}, {"tasks": None}):
            self.assertNotEqual(schema_errors(bad, poll, root=document), [], bad)
        # Real responses fit the schemas the document gives them.
        def fits(method, path, template, code, body=None):
            status, payload, _ = self.call(method, path, body)
            self.assertEqual(status, code, (path, payload))
            schema = document["paths"][template][method.lower()]["responses"][str(code)]["content"][
                "application/json"]["schema"]
            self.assertEqual(schema_errors(payload, schema, root=document), [], (method, path))
            return payload
        inserted = fits("POST", "/v1/queue/jobs/tasks", "/v1/queue/{queue}/tasks", 201, {"data": 5, "key": "kk"})
        fits("POST", "/v1/queue/jobs/tasks", "/v1/queue/{queue}/tasks", 200, {"data": 5, "key": "kk"})
        first = inserted["tasks"][0]["_id"]
        fits("GET", f"/v1/queue/jobs/tasks/{first}", "/v1/queue/{queue}/tasks/{id}", 200)
        fits("PATCH", f"/v1/queue/jobs/tasks/{first}", "/v1/queue/{queue}/tasks/{id}", 200, {"status": "paused"})
        fits("GET", "/v1/queue/jobs/tasks", "/v1/queue/{queue}/tasks", 200)
        fits("GET", "/v1/queue/jobs/stats", "/v1/queue/{queue}/stats", 200)
        fits("GET", "/v1/queues", "/v1/queues", 200)
        fits("PUT", "/v1/queue/jobs", "/v1/queue/{queue}", 200, {"lease": 9000})
        fits("GET", "/v1/queue/jobs", "/v1/queue/{queue}", 200)
        fits("GET", "/healthz", "/healthz", 200)
        fits("DELETE", f"/v1/queue/jobs/tasks/{first}", "/v1/queue/{queue}/tasks/{id}", 200)
        fits("DELETE", "/v1/queue/jobs/tasks?status=cancelled", "/v1/queue/{queue}/tasks", 200)
        self.jobs.insert({"data": {"n": 1}})
        leased = fits("POST", "/v1/queue/jobs", "/v1/queue/{queue}", 200, {"max": 1})
        fits("POST", "/v1/queue/jobs/tasks", "/v1/queue/{queue}/tasks", 201, {"tasks": [{"data": None}]})
        errors = {"$ref": "#/components/schemas/Error"}
        for path in ("/v1/queue/nope", "/v1/queues/jobs"):
            self.assertEqual(schema_errors(self.call("GET", path)[1], errors, root=document), [])
        # The examples are real requests: sent to the server, they are accepted.
        self.assertIn(self.call("POST", "/v1/queue/jobs", {"tasks": [{"_id": leased["tasks"][0]["_id"],
                                                                      "status": "done"}], "max": 1, "wait": 0})[0],
                      (200, 204))
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks",
                                   document["paths"]["/v1/queue/{queue}/tasks"]["post"]["requestBody"]["content"]
                                   ["application/json"]["example"])[0], 201)

    def test_every_path_parameter_is_declared_and_every_operation_is_named(self):
        # Without tokens every route is open, and the document says so: nothing asks a generated client for one.
        self.assertNotIn("security", json.dumps(self.document()))
        self.server.httpd.access = K.Access([ADMIN])
        document = self.document()
        names = set()
        for path, item in document["paths"].items():
            in_template = set(re.findall(r"\{(\w+)\}", path))
            for method, operation in item.items():
                declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
                self.assertEqual(declared, in_template, (path, method))
                self.assertTrue(all(p["required"] for p in operation.get("parameters", []) if p["in"] == "path"))
                self.assertRegex(operation["operationId"], r"^[a-z][A-Za-z]+$")
                names.add(operation["operationId"])
                # The routes a server with tokens answers without one say so; the others inherit the bearer.
                self.assertEqual(operation.get("security") == [], path in K.OPEN_PATHS, path)
        self.assertEqual(len(names), sum(len(item) for item in document["paths"].values()))
        self.assertEqual(document["security"], [{"bearer": []}])
        # Every $ref resolves; every shared schema is used.
        text = json.dumps(document)
        refs = set(re.findall(r'"#/components/schemas/(\w+)"', text))
        self.assertEqual(refs, set(document["components"]["schemas"]))
        # The configuration a worker reads has a typed interval and room for the operator's own keys.
        configuration = document["components"]["schemas"]["Configuration"]
        self.assertEqual((configuration["required"], configuration["properties"]["interval"]["type"]),
                         (["interval"], "integer"))
        self.assertNotEqual(configuration.get("additionalProperties"), False)
        # Text routes declare what they send, so generated clients do not parse them as JSON.
        for path, media in (("/metrics", "text/plain"), ("/", "text/html"), ("/ui", "text/html")):
            content = document["paths"][path]["get"]["responses"]["200"]["content"]
            self.assertEqual(list(content), [media])
            request = urllib.request.Request(self.url + path, headers={"Authorization": "Bearer " + ADMIN})
            with urllib.request.urlopen(request, timeout=5) as response:
                self.assertTrue(response.headers["Content-Type"].startswith(media))

    def test_every_bound_the_server_enforces_is_in_the_document(self):
        """Each bound is probed on the server, just inside and just outside, and looked up in the document."""
        self.set_limits(max_data=300000, max_tasks=50)
        document = self.document()
        schemas = document["components"]["schemas"]
        self.broker.queue("scratch")

        def query_schema(template, method, name):
            return next(p for p in document["paths"][template][method]["parameters"] if p["name"] == name)["schema"]

        def body(method, path, make):
            return lambda value: self.call(method, path, make(value))[0]

        def query(path):
            return lambda value: self.call("GET" if "wait" in path or "limit" in path else "DELETE",
                                           path.format(value=value))[0]
        unknown_report = lambda **fields: {"tasks": [dict({"_id": "none-1", "status": "in progress"}, **fields)]}
        failed_report = lambda **fields: {"tasks": [dict({"_id": "none-1", "status": "failed", "error": "x"},
                                                         **fields)]}
        limits = self.server.httpd.limits
        # (the field's schema in the document, lowest, highest, probe: value -> status, the statuses of success)
        bounds = [
            (schemas["PollRequest"]["properties"]["max"], 0, limits.max_tasks,
             body("POST", "/v1/queue/scratch", lambda v: {"max": v}), (204,)),
            (schemas["PollRequest"]["properties"]["wait"], 0, K.MAX_WAIT_MS,
             body("POST", "/v1/queue/scratch", lambda v: {"max": 0, "wait": v}), (204,)),
            (schemas["PollRequest"]["properties"]["tasks"], 0, limits.max_tasks,
             body("POST", "/v1/queue/scratch", lambda v: {"tasks": [{"_id": f"none-{i}", "status": "done"}
                                                                     for i in range(v)], "max": 0}), (204, 404)),
            (schemas["PollRequest"]["properties"]["worker"], 0, K.MAX_WORKER,
             body("POST", "/v1/queue/scratch", lambda v: {"max": 0, "worker": "w" * v}), (204,)),
            (schemas["Report"]["properties"]["attempt"], 1, K.MAX_ATTEMPT,
             body("POST", "/v1/queue/scratch", lambda v: unknown_report(attempt=v)), (404,)),
            (schemas["Report"]["properties"]["retry_after"], 0, K.MAX_DELAY_MS,
             body("POST", "/v1/queue/scratch", lambda v: failed_report(retry_after=v)), (404,)),
            (schemas["Report"]["properties"]["error"], 0, K.MAX_TEXT,
             body("POST", "/v1/queue/scratch", lambda v: failed_report(error="e" * v)), (404,)),
            (schemas["TaskInput"]["properties"]["priority"]["oneOf"][0], -K.MAX_PRIORITY, K.MAX_PRIORITY,
             body("POST", "/v1/queue/scratch/tasks", lambda v: {"data": 1, "priority": v}), (201,)),
            (schemas["TaskInput"]["properties"]["delay"], 0, K.MAX_DELAY_MS,
             body("POST", "/v1/queue/scratch/tasks", lambda v: {"data": 1, "delay": v}), (201,)),
            (schemas["TaskInput"]["properties"]["key"], 0, K.MAX_KEY,
             body("POST", "/v1/queue/scratch/tasks", lambda v: {"data": 1, "key": "k" * v}), (200, 201)),
            (schemas["TaskList"]["properties"]["tasks"], 1, limits.max_tasks,
             body("POST", "/v1/queue/scratch/tasks", lambda v: {"tasks": [{"data": i} for i in range(v)]}),
             (201,)),
            (schemas["ConfigurationInput"]["properties"]["interval"], 0, K.MAX_INTERVAL_MS,
             body("PUT", "/v1/queue/scratch", lambda v: {"configuration": {"interval": v}}), (200,)),
            (query_schema("/v1/queue/{queue}/tasks", "get", "limit"), 1, K.MAX_LIST_LIMIT,
             query("/v1/queue/scratch/tasks?limit={value}"), (200,)),
            (query_schema("/v1/queue/{queue}/tasks/{id}", "get", "wait"), 0, K.MAX_WAIT_MS,
             query("/v1/queue/scratch/tasks/none-1?wait={value}"), (404,)),
        ] + [(schemas["QueueOptions"]["properties"][name], low, high,
              body("PUT", "/v1/queue/scratch", lambda v, name=name: {name: v, "paused": True}), (200,))
             for name, (low, high) in K.QUEUE_BOUNDS.items()]
        for schema, low, high, probe, ok in bounds:
            lowest = next((schema[key] for key in ("minimum", "minLength", "minItems") if key in schema), 0)
            highest = next((schema[key] for key in ("maximum", "maxLength", "maxItems") if key in schema), None)
            self.assertEqual((lowest, highest), (low, high), schema)
            below = [(low - 1, (400,))] if "minimum" in schema or low > 0 else []  # no string is shorter than ""
            for value, expected in [(low, ok), (high, ok), (high + 1, (400,))] + below:
                self.assertIn(probe(value), expected, (schema, value))
        # Enumerations: the values the document lists are taken, one more is refused.
        purge = query_schema("/v1/queue/{queue}/tasks", "delete", "status")
        for status in purge["enum"]:
            self.assertEqual(self.call("DELETE", f"/v1/queue/scratch/tasks?status={quote(status)}")[0], 200)
        self.assertEqual(self.call("DELETE", "/v1/queue/scratch/tasks?status=in%20progress")[0], 409)
        self.assertEqual(self.call("DELETE", "/v1/queue/scratch/tasks")[0], 400)
        self.assertEqual(query_schema("/v1/queue/{queue}/tasks", "get", "status")["enum"], list(K.STATUSES))
        self.assertEqual(self.call("GET", "/v1/queue/scratch/tasks?status=finished")[0], 400)
        after = query_schema("/v1/queue/{queue}/tasks", "get", "after")["pattern"]
        for cursor, code in (("abc-12", 200), ("abc", 400), ("abc-1x", 400), ("abc-+1", 400)):
            self.assertEqual(bool(re.search(after, cursor)), code == 200, cursor)
            self.assertEqual(self.call("GET", f"/v1/queue/scratch/tasks?after={quote(cursor)}")[0], code, cursor)
        pattern = K.PATH_PARAMETERS["queue"]["schema"]["pattern"]
        for name, code in (("q" * 128, 201), ("q" * 129, 400), ("-q", 400), ("a.b_c-1", 201)):
            self.assertEqual(bool(re.search(pattern, name)), code == 201, name)
            self.assertEqual(self.call("PUT", f"/v1/queue/{name}", {})[0], code, name)

    def test_the_page_is_served_self_contained_and_acts_through_the_json_routes(self):
        self.server.httpd.access = K.Access([ADMIN])
        for path in ("/", "/ui"):
            with urllib.request.urlopen(self.url + path, timeout=5) as response:  # no token: it holds no data
                self.assertTrue(response.headers["Content-Type"].startswith("text/html"))
                page = response.read().decode()
        self.assertIn('<link rel="icon" href="data:,">', page)  # no request for /favicon.ico
        self.assertNotRegex(page.replace('href="data:,"', ""), r"(src|href)=|https?://|@import|url\(")
        self.assertNotIn("innerHTML", page)
        if shutil.which("node"):  # where node exists, the page's script must at least parse
            script = os.path.join(tempfile.mkdtemp(), "page.js")
            self.addCleanup(shutil.rmtree, os.path.dirname(script))
            with open(script, "w") as handle:
                handle.write(re.search(r"<script>(.*)</script>", page, re.S).group(1))
            checked = subprocess.run(["node", "--check", script], capture_output=True, text=True, timeout=60)
            self.assertEqual(checked.returncode, 0, checked.stderr)
        for route in ('"/v1/queues"', '"/v1/workers"', '"PATCH"', '"DELETE"', '"PUT"', "status=failed&order=newest",
                      "status=in%20progress", "Authorization", "confirm("):
            self.assertIn(route, page)
        # What its buttons send: retry and cancel a dead letter, pause and resume the queue.
        headers = {"Authorization": "Bearer " + ADMIN}
        dead, other = [t["_id"] for t in self.jobs.insert([{"data": 1}, {"data": 2}])]
        self.jobs.set_status(other, "paused")
        leased = self.jobs.lease()
        self.jobs.report([{"_id": leased[0]["_id"], "status": "failed", "error": "<b>x</b>", "retry": False}])
        self.assertEqual(self.call("PATCH", f"/v1/queue/jobs/tasks/{dead}", {"status": "queued"}, headers=headers)[1]
                         ["status"], "queued")
        leased = self.jobs.lease()
        self.jobs.report([{"_id": leased[0]["_id"], "status": "failed", "error": "again", "retry": False}])
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{dead}", headers=headers)[1]["status"], "cancelled")
        self.assertTrue(self.call("PUT", "/v1/queue/jobs", {"paused": True}, headers=headers)[1]["paused"])
        self.assertFalse(self.call("PUT", "/v1/queue/jobs", {"paused": False}, headers=headers)[1]["paused"])

    @unittest.skipUnless(shutil.which("chromium"), "chromium is not installed: the page cannot be run in a browser")
    def test_the_page_in_a_browser_shows_the_fleet_and_the_running_tasks_with_their_progress(self):
        running, _ = [t["_id"] for t in self.jobs.insert([{"data": 1}, {"data": 2}])]
        status, leased = self.poll({"worker": "render-<1>", "max": 1}, expect=200)
        self.poll({"tasks": [{"_id": running, "status": "in progress", "progress": {"frame": "<b>7</b>"}}],
                   "worker": "render-<1>"}, expect=204)
        self.poll({"max": 0})  # an anonymous poller
        dead = self.jobs.lease()[0]["_id"]  # the other one
        self.jobs.report([{"_id": dead, "status": "failed", "error": "<i>broke</i>", "retry": False}])
        self.broker.queue("reports", schedules=[{"name": "nightly", "cron": "0 3 * * *"}])
        self.broker.put_batch("album-7", {"queue": "reports"})
        self.jobs.insert([{"data": 3}], batch={"id": "album-7"})
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                              "--dump-dom", self.url + "/"], capture_output=True, text=True, timeout=60).stdout
        workers = re.search(r'<table id="workers">(.*?)</table>', dom, re.S).group(1)
        self.assertIn("render-&lt;1&gt;", workers)  # as text: a worker's name is the client's to choose
        self.assertIn(running + " (lease ", workers)
        self.assertIn("anonymous at 127.0.0.1", workers)
        box = re.search(r'<div id="running-jobs">(.*?)</div>', dom, re.S).group(1)
        self.assertIn("Running in jobs: the oldest 1 of 1", box)
        self.assertIn('progress: {"frame":"&lt;b&gt;7&lt;/b&gt;"}', box)
        self.assertIn("attempt 1 by render-&lt;1&gt;", box)
        self.assertIn("Cancel", box)
        letters = re.search(r'<div id="letters-jobs">(.*?)</div>', dom, re.S).group(1)
        self.assertIn("Dead letters of jobs: the newest 1 of 1", letters)
        self.assertIn("&lt;i&gt;broke&lt;/i&gt;", letters)
        self.assertIn("Retry", letters)
        batches = re.search(r'<table id="batches">(.*?)</table>', dom, re.S).group(1)
        self.assertEqual(re.findall(r"<td[^>]*>([^<]*)</td>", batches),
                         ["album-7", "yes", "0", "0", "0", "1", "reports"])
        nightly = K.slot_name(K.next_fire(K.parse_cron("0 3 * * *"), self.clock.ms))  # (the fake clock)
        self.assertIn(f"reports (schedule nightly: next {nightly})", dom)


class WorkTestCase(unittest.TestCase):
    """A real server (real clock) with a queue `jobs`, and a scratch folder, for the tools run as a user runs them."""

    queue_options = {"persistent": True, "lease": 1000, "max_attempts": 1}

    def setUp(self):
        self.broker = K.Broker()
        self.jobs = self.broker.queue("jobs", **self.queue_options)
        self.server = K.serve(self.broker, port=0)
        self.addCleanup(self.server.close)
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)

    def start_worker(self, *args):
        """`katar_http.py work URL jobs --wait 200 ARGS...`, stopped when the test ends; its stderr is a pipe."""
        process = subprocess.Popen([*KATAR, "work", self.server.url,
                                    "jobs", "--wait", "200", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(stop_process, process)
        return process


class ToolsTest(WorkTestCase):
    """put, stats and work, run as a user runs them, against a real server."""

    def tool(self, *args, stdin=None):
        return subprocess.run([*KATAR, *args], input=stdin,
                              capture_output=True, text=True, timeout=60)


    def test_put_and_stats_round_trip(self):
        result = self.tool("put", self.server.url, "jobs", '{"n": 1}', "--priority", "high", "--key", "once")
        self.assertEqual(result.returncode, 0, result.stderr)
        first = result.stdout.strip()
        self.assertEqual(self.tool("put", self.server.url, "jobs", '{"n": 9}', "--key", "once").stdout.strip(), first)
        result = self.tool("put", self.server.url, "jobs", stdin='{"n": 2}\n"three"\n\n[4]\n')
        self.assertEqual(len(result.stdout.split()), 3)
        detail = self.jobs.task(first)
        self.assertEqual((detail["data"], detail["priority"]), ({"n": 1}, 10))
        self.assertEqual(self.tool("put", self.server.url, "jobs", "{not json").returncode, 2)
        self.assertEqual(self.tool("put", self.server.url, "nope", "1").returncode, 1)
        stats = self.tool("stats", self.server.url)
        self.assertEqual(stats.returncode, 0)
        header, row = stats.stdout.splitlines()
        self.assertEqual(header.split()[:3], ["queue", "queued", "in"])
        self.assertEqual(row.split()[:2], ["jobs", "4"])

    def test_work_reports_success_with_its_result_and_failure_with_stderr(self):
        ok, bad = [task["_id"] for task in self.jobs.insert([{"data": {"n": 20}}, {"data": "fail"}])]
        self.start_worker("--", sys.executable, "-c",
                          "import json, os, sys; data = json.load(sys.stdin)\n"
                          "if data == 'fail': sys.stderr.write('it broke\\n'); sys.exit(3)\n"
                          "print(json.dumps({'double': data['n'] * 2, 'id': os.environ['KATAR_TASK_ID'],"
                          " 'attempt': os.environ['KATAR_ATTEMPT'], 'queue': os.environ['KATAR_QUEUE']}))")
        done, failed = self.jobs.task(ok, wait=20000), self.jobs.task(bad, wait=20000)
        self.assertEqual(done["status"], "done")
        self.assertEqual(done["result"], {"double": 40, "id": ok, "attempt": "1", "queue": "jobs"})
        self.assertEqual((failed["status"], failed["error"]), ("failed", "exit 3: it broke"))

    def test_work_logs_one_line_per_task_and_quiet_silences_it(self):
        script = "import sys; data = sys.stdin.read()\nif 'fail' in data: sys.stderr.write('it broke\\n'); sys.exit(3)"
        for quiet in ((), ("--quiet",)):
            ok, bad = [task["_id"] for task in self.jobs.insert([{"data": 1}, {"data": "fail"}])]
            worker = self.start_worker(*quiet, "--", sys.executable, "-c", script)
            self.assertEqual([self.jobs.task(i, wait=20000)["status"] for i in (ok, bad)], ["done", "failed"])
            worker.send_signal(signal.SIGTERM)
            self.assertEqual(worker.wait(20), 0)
            lines = worker.stderr.read().splitlines()
            if quiet:
                self.assertEqual(lines, [])
                continue
            self.assertRegex(lines[0], r"^katar_http work: working on jobs at http://127\.0\.0\.1:\d+, 1 at a time")
            self.assertRegex(lines[1], rf"^katar_http work: {ok} attempt 1 done in \d+ ms$")
            self.assertRegex(lines[2], rf"^katar_http work: {bad} attempt 1 failed \(exit 3: it broke\) in \d+ ms$")
            self.assertEqual(lines[3:], ["katar_http work: stopped"])

    def test_work_fails_a_task_that_outlives_its_timeout(self):
        task_id = self.jobs.insert({"data": 1})["_id"]
        self.start_worker("--timeout", "0.3", "--", "sleep", "30")
        task = self.jobs.task(task_id, wait=20000)
        self.assertEqual(task["status"], "failed")
        self.assertIn("timed out after 0.3 s", task["error"])

    def test_heartbeats_keep_a_task_that_outlives_its_lease(self):
        task_id = self.jobs.insert({"data": 1})["_id"]
        self.start_worker("--heartbeat", "0.2", "--", "sh", "-c", "sleep 2.5; echo finished")
        task = self.jobs.task(task_id, wait=20000)
        self.assertEqual((task["status"], task["result"], task["attempt"]), ("done", "finished", 1))

    def test_work_runs_n_tasks_at_once_with_c(self):
        ids = [task["_id"] for task in self.jobs.insert([{"data": i} for i in range(4)])]
        started = time.monotonic()
        self.start_worker("-c", "4", "--heartbeat", "0.2", "--", "sleep", "1")
        for task_id in ids:
            self.assertEqual(self.jobs.task(task_id, wait=20000)["status"], "done")
        self.assertLess(time.monotonic() - started, 3.5, "four one-second tasks did not run side by side")

    def test_sigterm_mid_task_lets_it_finish_reports_it_and_exits_0(self):
        task_id = self.jobs.insert({"data": 1})["_id"]
        started = os.path.join(tempfile.mkdtemp(), "started")
        self.addCleanup(shutil.rmtree, os.path.dirname(started))
        worker = self.start_worker("--", "sh", "-c", f"touch {started}; sleep 1; echo finished")
        deadline = time.monotonic() + 10
        # The command itself says it runs: a task leased but not yet started is handed back on SIGTERM, rightly.
        while not os.path.exists(started):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(20), 0)
        self.assertEqual(self.jobs.task(task_id)["status"], "done")
        later = self.jobs.insert({"data": 2})["_id"]
        self.assertEqual(self.jobs.task(later)["status"], "queued")  # a stopped worker takes nothing new

    def test_a_worker_survives_a_server_restart_and_reports_after_it(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        journal = os.path.join(directory, "jobs.journal")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        def start_server():
            process = subprocess.Popen([*KATAR, "--port", str(port),
                                        "--journal", journal, "--queue", "jobs", "--quiet"],
                                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            self.addCleanup(process.stderr.close)
            self.addCleanup(stop_process, process)
            wait_until_listening(self, process)
            return process
        server = start_server()
        url = f"http://127.0.0.1:{port}"
        client = K.Client(url)
        self.addCleanup(client.close)
        task_id = client.insert("jobs", [{"data": 1}])[0]["_id"]
        worker_log = open(os.path.join(directory, "worker.log"), "w+")  # shown if the test fails
        self.addCleanup(worker_log.close)
        worker = subprocess.Popen([*KATAR, "work", url, "jobs",
                                   "--wait", "200", "--", "sh", "-c", "sleep 1.5; echo survived"],
                                  stdout=subprocess.DEVNULL, stderr=worker_log)
        self.addCleanup(stop_process, worker)
        deadline = time.monotonic() + 10
        while client.task("jobs", task_id)["status"] != "in progress":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        server.kill()  # kill -9 while the task runs: its report meets a closed port, and is retried
        server.wait(10)
        time.sleep(1)
        start_server()
        client.close()  # its connection went with the old server
        # The worker's retries back off to 10 s apart: on a loaded machine the one that lands can come after a
        # single 20 s wait has ended.
        deadline = time.monotonic() + 60
        task = client.task("jobs", task_id, wait=20000)
        while task["status"] == "in progress" and time.monotonic() < deadline:
            task = client.task("jobs", task_id, wait=20000)
        worker_log.seek(0)
        self.assertEqual((task["status"], task["attempt"]), ("done", 1), (task, worker_log.read()[-3000:]))
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(20), 0)


# ---------------------------------------------------------------------------------------------------------------
# The README's examples
# ---------------------------------------------------------------------------------------------------------------

README = os.path.join(HERE, "README.md")
PROGRAM = os.path.join(HERE, "katar_http.py")
TASK_ID = re.compile(r"\b[0-9a-f]{8}-([0-9]{12})\b")  # an id's prefix is random; its sequence number is not
EXPECTED = re.compile(r"^# ([1-5][0-9][0-9])(?: (.*))?$")  # "# 201 {...}" under the command it describes


def readme_text():
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def blocks(marker):
    """The fenced blocks that follow each `<!-- marker` comment, in order, with the README line of their first line."""
    text = readme_text()
    found = []
    for match in re.finditer(r"<!-- " + re.escape(marker) + r"\b", text):
        fence = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M).search(text, match.end())
        first_line = text.count("\n", 0, fence.start(1)) + 1
        found.append((fence.group(1), first_line))
    return found


def block_after(marker):
    """The first block that follows `<!-- marker`, and the first plain (output) block after that one."""
    text = readme_text()
    start = text.index("<!-- " + marker)
    fences = [fence for fence in re.finditer(r"^```([a-z]*)\n(.*?)^```", text[start:], re.S | re.M)]
    command = fences[0].group(2)
    output = next(fence.group(2) for fence in fences[1:] if fence.group(1) == "")
    return command, output


def as_run_here(text, port):
    """A README command as the tests run it: on `port` instead of 3000, with this Python and this katar_http.py."""
    text = re.sub(r"(?<![0-9])3000(?![0-9])", str(port), text)
    text = re.sub(r"\bpython3 katar_http\.py\b", shlex.quote(sys.executable) + " " + shlex.quote(PROGRAM), text)
    return text


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def normalised(text, port=None):
    """Ids with their random prefix replaced, and (for output) the test's port put back to the README's 3000."""
    text = TASK_ID.sub(r"<id>-\1", text)
    if port is not None:
        text = text.replace(":%d" % port, ":3000")
    return text


def group_gone(pgid, timeout=5.0):
    """Whether every process of the group `pgid` has ended within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def children_of(pid):
    """The pids of the children of `pid` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def command_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")[0].decode()
    except OSError:
        return ""


def until(test, condition, what, timeout=10.0):
    """Wait (briefly polling) until condition() is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            test.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Lines:
    """Reads a pipe's lines in a thread, so a test can wait for one without blocking on the pipe."""

    def __init__(self, stream):
        self.lines, self.changed = [], threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # the end
            self.changed.notify_all()

    def wait_for(self, pattern, timeout=15.0):
        """The first line matching `pattern`, waiting for it; None if the stream ends or the time is up first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if line is None:
                        return None
                    if re.search(pattern, line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    def text(self):
        with self.changed:
            return [line for line in self.lines if line is not None]


class ReadmeExamplesTest(unittest.TestCase):
    """The README as a newcomer uses it: its set-up block, quick start, tour and worker recipes, run as they stand."""

    # -- helpers ---------------------------------------------------------------------------------------------------

    def start_server_as_the_readme_says(self):
        """Run the set-up block's first line (the server) on a free port; return (process, port, stderr lines)."""
        setup, _ = blocks("set-up")[0]
        line = setup.splitlines()[0].split("#")[0].strip()
        self.assertTrue(line.startswith("python3 katar_http.py"), line)
        port = free_port()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        server = subprocess.Popen(shlex.split(as_run_here(line, port)), cwd=directory, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(server.stderr.close)
        self.addCleanup(stop_process, server)
        seen = [server.stderr.readline().rstrip("\n") for _ in range(2)]  # "listening on URL", then its queue
        self.assertIn(f"listening on http://127.0.0.1:{port}", seen[0], seen)
        self.banner = seen
        return server, port, Lines(server.stderr)

    def run_shell(self, script, timeout=30):
        result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        return result

    # -- the set-up block, the quick start, the tour and the marked examples --------------------------------------

    def test_the_set_up_block_has_the_server_and_the_test_command(self):
        text = readme_text()
        setup, first_line = blocks("set-up")[0]
        self.assertLess(first_line, 15, "the set-up block opens the README")
        self.assertIn("python3 -m unittest -v test_katar_http", setup)
        self.assertLess(text.index("<!-- set-up"), text.index("## "), "before any section")

    @unittest.skipUnless(shutil.which("sh"), "the quick start runs in sh")
    def test_the_quick_start_runs_as_shown(self):
        server, port, _ = self.start_server_as_the_readme_says()
        text = readme_text()
        # What the server prints when it starts, as the quick start shows it (the version may move on).
        shown = re.search(r"^\$ python3 katar_http\.py --port 3000 --queue jobs:1000\n(.*?)^```", text, re.S | re.M)
        self.assertIsNotNone(shown, "the quick start shows the server starting")
        banner = [re.sub(r"\d+\.\d+\.\d+", "V", line) for line in shown.group(1).splitlines()]
        block, output = block_after("quick-start")
        script = as_run_here(block, port)
        quick = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(quick.stderr.close)
        self.addCleanup(quick.stdout.close)
        self.addCleanup(stop_process, quick, True)
        out, err = Lines(quick.stdout), Lines(quick.stderr)
        # The cat is done, the dog fails and is retried after its backoff (about a second): then Ctrl-C.
        self.assertIsNotNone(err.wait_for(r"-000000000002 attempt 2 failed"), err.text())
        os.killpg(quick.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        self.assertIsNotNone(err.wait_for(r"^katar_http work: stopped$", 15), err.text())
        quick.wait(15)
        self.assertTrue(group_gone(quick.pid), "the worker and its tasks ended")
        expected = [normalised(line) for line in output.splitlines()]
        ids = out.text()
        self.assertEqual([normalised(line) for line in ids], expected[:2])
        logged = [normalised(line, port) for line in err.text() if line != "katar_http work: stopped"]
        for line in logged:
            self.assertRegex(line, r"^katar_http work: ", logged)

        def general(line):  # what differs from run to run: the host and pid, the milliseconds
            line = re.sub(r" as [^ ]+:[0-9]+: ", " as HOST:PID: ", line)
            return re.sub(r" in [0-9]+ ms$", " in N ms", line)

        self.assertGreaterEqual(len(logged), 4, logged)
        self.assertEqual([general(line) for line in logged], [general(line) for line in expected[2:2 + len(logged)]])
        self.assertEqual(len(expected), 2 + 1 + 1 + 5, "two ids, the start, the cat, five attempts of the dog")
        # The stats table as shown: the same header, and a row for jobs.
        stats_shown = re.search(r"^\$ (python3 katar_http\.py stats http://127\.0\.0\.1:3000)\n(.*?)^```", text,
                                re.S | re.M)
        result = subprocess.run(shlex.split(as_run_here(stats_shown.group(1), port)), capture_output=True, text=True,
                                timeout=20)
        self.assertEqual(result.returncode, 0, result.stderr)
        shown_lines, got = stats_shown.group(2).splitlines(), result.stdout.splitlines()
        self.assertEqual(got[0], shown_lines[0])
        self.assertEqual(got[1].split()[:1], ["jobs"])
        self.assertEqual(len(got[1]), len(shown_lines[1]), "the columns line up as shown")
        # And what the server printed when it started.
        def figures(line):  # the version, and the connection figures, which depend on the machine's limits
            return re.sub(r"\d+ connections at once; open files \d+", "N connections at once; open files N",
                          re.sub(r"\d+\.\d+\.\d+", "V", line))
        self.assertEqual([figures(line) for line in banner],
                         [figures(normalised(line, port)) for line in self.banner])

    @unittest.skipUnless(shutil.which("curl") and shutil.which("sh"), "the tour needs curl and sh")
    def test_the_tour_and_every_marked_example_run_in_order_and_answer_as_shown(self):
        server, port, _ = self.start_server_as_the_readme_says()
        calls = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, calls, True)
        # Every curl command of the marked blocks records its exit code, status and body in `calls`, by README line.
        script = ["__curl() { __n=$1; shift; command curl -sS -o \"%s/body.$__n\" -w '%%{http_code}' \"$@\" "
                  "> \"%s/status.$__n\" 2> \"%s/stderr.$__n\"; echo $? > \"%s/exit.$__n\"; }"
                  % (calls, calls, calls, calls)]
        expected = {}  # README line of a curl command -> (status, body or None)
        commands = {}  # README line -> the command as written
        last_curl = None
        assignment = None
        for block, first in blocks("tour"):
            lines = block.splitlines()
            for offset, line in enumerate(lines):
                number = first + offset
                found = EXPECTED.match(line)
                if found:
                    self.assertIsNotNone(last_curl, f"README line {number}: an answer shown under no curl command")
                    self.assertNotIn(last_curl, expected, f"README line {number}: two answers for one command")
                    expected[last_curl] = (int(found.group(1)), found.group(2))
                    continue
                if line.startswith("curl "):
                    last_curl = number
                    commands[number] = line
                    line = "__curl %d " % number + line[len("curl "):]
                variable = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=\$\(", line)
                if variable:
                    assignment = variable.group(1)
                script.append(as_run_here(line, port))
                if assignment and not line.endswith(("\\", "|")):  # the command goes on
                    script.append('[ -n "$%s" ] || echo "README line %d: $%s is empty" >&2'
                                  % (assignment, number, assignment))
                    assignment = None
        script.append("wait")
        result = self.run_shell("\n".join(script))
        self.assertEqual(result.stderr, "", "the commands ran without complaint")
        self.assertGreaterEqual(len(commands), 40)
        self.assertGreaterEqual(len(expected), 20)
        answers = {}
        for number, command in commands.items():
            def read(kind):
                with open(os.path.join(calls, f"{kind}.{number}"), encoding="utf-8") as handle:
                    return handle.read()
            where = f"README line {number}: {command}"
            with self.subTest(line=number):
                self.assertEqual(read("exit"), "0\n", f"{where}: curl failed: {read('stderr')}")
                status, body = int(read("status")), read("body")
                answers[number] = (status, body)
                if number not in expected:
                    self.assertTrue(200 <= status < 300, f"{where}: answered {status} {body}")
                    continue
                want_status, want_body = expected[number]
                self.assertEqual(status, want_status, f"{where}: answered {body}")
                if want_body and want_body.startswith("{"):
                    self.assertEqual(json.loads(normalised(body)), json.loads(normalised(want_body)),
                                     f"{where}: answered {body}")
                elif status == 204:
                    self.assertEqual(body, "", where)
        # Every route has an example that ran (the page's second address, /ui, is the same page as /).
        covered = set()
        for command in commands.values():
            method = re.search(r" -X ([A-Z]+)", command)
            method = method.group(1) if method else ("POST" if " -d " in command else "GET")
            path = urlsplit("http://" + re.search(r"localhost:3000(/[^ '\"]*)", command).group(0)).path
            for template, methods in K.ROUTE_TABLE:
                if K._route_pattern(template).fullmatch(path) and method in methods:
                    covered.add((method, template))
        every = {(method, template) for template, methods in K.ROUTE_TABLE for method in methods}
        self.assertEqual(every - covered, {("GET", "/ui")}, "every route has an example")
        # What the prose says the examples did.
        waited = next(number for number, command in commands.items() if "?wait=" in command)
        task = json.loads(answers[waited][1])
        self.assertEqual((task["status"], task["result"]), ("done", {"width": 640}), "the producer got the result")
        client = K.Client(f"http://127.0.0.1:{port}")
        self.addCleanup(client.close)
        images = {task["data"]["image"]: task for task in client.request("GET", "/v1/queue/images/tasks")[1]["tasks"]}
        self.assertEqual(sorted(images), ["eel.png", "fox.png"], "the gnu was cancelled, then purged")
        self.assertEqual((images["eel.png"]["status"], images["eel.png"]["attempts_spent"]), ("queued", 0))
        self.assertEqual(images["fox.png"]["status"], "done")
        jobs = {json.dumps(task["data"]): task for task in client.request("GET", "/v1/queue/jobs/tasks")[1]["tasks"]}
        self.assertEqual(jobs['{"image": "dog.png"}']["status"], "queued", "the dog was handed back")
        self.assertEqual(jobs['{"image": "dog.png"}']["attempts_spent"], 1)
        self.assertEqual(jobs["3"]["status"], "paused")

    def test_no_command_in_the_readme_names_a_fixed_task_id(self):
        """Ids in shown answers are fine (they are said to differ); a command must use one it captured."""
        text = readme_text()
        for fence in re.finditer(r"^```(sh|bash)\n(.*?)^```", text, re.S | re.M):
            for line in fence.group(2).splitlines():
                if line.startswith("#"):
                    continue
                self.assertIsNone(TASK_ID.search(line.split(" #")[0]), line)

    # -- the shell worker: how it stops ---------------------------------------------------------------------------

    def start_shell_worker(self, url, command):
        script = blocks("worker.sh")[0][0]
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "worker.sh")
        with open(path, "w") as handle:
            handle.write(script)
        temporary = os.path.join(directory, "tmp")
        os.mkdir(temporary)
        worker = subprocess.Popen(["sh", path, url, "jobs"] + command, env=dict(os.environ, TMPDIR=temporary),
                                  start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        self.addCleanup(worker.stderr.close)
        self.addCleanup(stop_process, worker, True)
        return worker, temporary, directory

    def assert_stopped_cleanly(self, worker, temporary, before):
        """`kill PID` (TERM) ends the worker with 0 and leaves no child, no process in its group, no file."""
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(10), 0)
        self.assertEqual(worker.stderr.read(), "")
        for child in before:
            until(self, lambda: not os.path.exists(f"/proc/{child}") or _zombie_reaped(child),
                  f"child {child} to end", 5)
        self.assertTrue(group_gone(worker.pid), "no process of the worker's group is left")
        self.assertEqual(os.listdir(temporary), [], "its temporary files are removed")

    @unittest.skipUnless(shutil.which("curl") and shutil.which("sh"), "the shell worker needs curl and sh")
    def test_the_shell_worker_stopped_in_a_long_poll_leaves_no_curl_no_file_and_sends_its_report(self):
        broker = K.Broker()
        jobs = broker.queue("jobs", persistent=True, configuration={"interval": 1000})
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        worker, temporary, _ = self.start_shell_worker(server.url, ["sh", "-c", "cat > /dev/null"])
        task_id = jobs.insert({"data": {"n": 1}})["_id"]
        self.assertEqual(jobs.task(task_id, wait=15000)["status"], "done")  # reported on the next long poll
        until(self, lambda: jobs.stats()["waiting_workers"] == 1, "the worker's long poll")
        children = children_of(worker.pid)
        self.assertEqual([command_of(child) for child in children], ["curl"])
        self.assert_stopped_cleanly(worker, temporary, children)
        stats = jobs.stats()
        self.assertEqual(stats["counts"]["in progress"], 0)
        self.assertEqual(stats["totals"]["done"], 1)
        self.assertEqual(jobs.task(task_id)["history"][0]["outcome"], "done")

    @unittest.skipUnless(shutil.which("curl") and shutil.which("sh"), "the shell worker needs curl and sh")
    def test_the_shell_worker_stopped_while_a_task_runs_kills_it_and_hands_the_task_back(self):
        broker = K.Broker()
        jobs = broker.queue("jobs", persistent=True, configuration={"interval": 1000})
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        started = os.path.join(directory, "started")
        os.mkfifo(started)
        reader = os.open(started, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        # The task says when it runs (its pid, through a FIFO: an event, not a timer), then runs for a minute.
        command = ["sh", "-c", f"cat > /dev/null; echo $$ > {started}; exec sleep 60"]
        worker, temporary, _ = self.start_shell_worker(server.url, command)
        task_id = jobs.insert({"data": "slow"})["_id"]
        ready, _, _ = select.select([reader], [], [], 15)
        self.assertTrue(ready, "the task started")
        task_pid = int(os.read(reader, 100).decode().strip())
        until(self, lambda: command_of(task_pid) == "sleep", "the task's exec")
        self.assertEqual(children_of(worker.pid), [task_pid])
        self.assertEqual(jobs.task(task_id)["status"], "in progress")
        self.assert_stopped_cleanly(worker, temporary, [task_pid])
        task = jobs.task(task_id)
        self.assertEqual((task["status"], task["attempts_spent"]), ("queued", 0), "handed back, no attempt spent")
        self.assertEqual(task["history"][-1]["outcome"], "queued")
        self.assertEqual(jobs.stats()["counts"]["in progress"], 0)
        self.assertEqual(jobs.lease(max=1)[0]["_id"], task_id, "and leased again at once")

    # -- the JavaScript worker ------------------------------------------------------------------------------------

    def start_node_worker(self, url, heartbeat_ms=None, slow=True):
        """Run the README's worker.mjs with node; `slow` lets a task ask for a delay ({"slow": ms}) before work()."""
        source = blocks("worker.mjs")[0][0]
        self.assertLessEqual(len(source.strip().splitlines()), 50, "about 40 lines")
        if heartbeat_ms is not None:
            self.assertIn("HEARTBEAT = 10000", source)
            source = source.replace("HEARTBEAT = 10000", f"HEARTBEAT = {heartbeat_ms}")
        if slow:
            head = "async function work(data) {"
            self.assertIn(head, source)
            source = source.replace(head, head + " if (data?.slow) await sleep(data.slow);", 1)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "worker.mjs")
        with open(path, "w") as handle:
            handle.write(source)
        node = subprocess.Popen(["node", path, url, "jobs"], start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(node.stderr.close)
        self.addCleanup(node.stdout.close)
        self.addCleanup(stop_process, node, True)
        return node, Lines(node.stderr)

    @unittest.skipUnless(shutil.which("node"), "node is not installed: the JavaScript worker cannot be run")
    def test_the_javascript_worker_reports_done_and_failed_and_keeps_long_tasks_leased(self):
        broker = K.Broker()
        jobs = broker.queue("jobs", persistent=True, lease=1000, max_attempts=1, configuration={"interval": 200})
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        ids = [task["_id"] for task in jobs.insert([{"data": {"text": "a b  c"}}, {"data": {"n": 1}},
                                                    {"data": {"text": "a long one", "slow": 2500}}])]
        node, errors = self.start_node_worker(server.url, heartbeat_ms=250)
        finished = [jobs.task(task_id, wait=15000) for task_id in ids]
        self.assertEqual([task["status"] for task in finished], ["done", "failed", "done"], errors.text())
        self.assertEqual(finished[0]["result"], {"words": 3})
        self.assertEqual(finished[1]["error"], 'expected {"text": "..."}')
        self.assertEqual(finished[2]["result"], {"words": 3})
        # 2.5 s of work on a lease of 1 s: only the heartbeats kept it.
        self.assertEqual([entry["outcome"] for entry in finished[2]["history"]], ["done"])
        self.assertEqual(jobs.stats()["totals"]["expired"], 0)
        # More tasks arrive on its long poll.
        late = jobs.insert({"data": {"text": "late"}})["_id"]
        self.assertEqual(jobs.task(late, wait=15000)["result"], {"words": 1})
        self.assertEqual(errors.text(), [])
        self.assertIsNone(node.poll())

    @unittest.skipUnless(shutil.which("node"), "node is not installed: the JavaScript worker cannot be run")
    def test_the_javascript_worker_drops_the_reports_a_409_names_and_sends_the_rest_again(self):
        clock = FakeClock()
        broker = K.Broker(clock=clock)
        jobs = broker.queue("jobs", persistent=True, configuration={"interval": 200})
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        slow, quick = [task["_id"] for task in jobs.insert([{"data": {"text": "slow", "slow": 1500}},
                                                            {"data": {"text": "quick"}}])]
        node, errors = self.start_node_worker(server.url)
        until(self, lambda: jobs.stats()["counts"]["in progress"] == 2, "the worker to lease both")
        # Both leases run out (the clock says so); another worker takes the slow task, as attempt 2.
        clock.advance(61000)
        jobs.stats()
        clock.advance(2000)  # past the retry's backoff
        taken = jobs.lease(max=1, worker="thief")
        self.assertEqual([(task["_id"], task["attempt"]) for task in taken], [(slow, 2)])
        # The worker reports both, attempt 1: refused (409, naming the slow one); it sends the quick one alone.
        self.assertEqual(jobs.task(quick, wait=15000)["status"], "done", errors.text())
        self.assertEqual(jobs.task(quick)["result"], {"words": 1})
        self.assertIsNotNone(errors.wait_for(f"katar: delivery 1 of task {slow} was superseded by 2", 5))
        task = jobs.task(slow)
        self.assertEqual((task["status"], task["attempt"], task["worker"]), ("in progress", 2, "thief"))
        self.assertIsNone(node.poll())

    @unittest.skipUnless(shutil.which("node"), "node is not installed: the JavaScript worker cannot be run")
    def test_the_javascript_worker_waits_for_a_server_that_is_not_there_yet(self):
        port = free_port()
        node, errors = self.start_node_worker(f"http://127.0.0.1:{port}", slow=False)
        time.sleep(1.0)  # refused connections meanwhile: retried with backoff (nothing to wait on but time here)
        self.assertIsNone(node.poll(), errors.text())
        broker = K.Broker()
        jobs = broker.queue("jobs", configuration={"interval": 200}, persistent=True)
        server = K.serve(broker, port=port)
        self.addCleanup(server.close)
        task_id = jobs.insert({"data": {"text": "at last"}})["_id"]
        self.assertEqual(jobs.task(task_id, wait=15000)["result"], {"words": 2}, errors.text())


def _zombie_reaped(pid):
    """A child reparented to init may linger a moment as a zombie before it is reaped: that counts as ended."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class ReadmeTest(unittest.TestCase):
    @unittest.skipUnless(shutil.which("curl") and shutil.which("sh"), "the shell worker needs curl and sh")
    def test_the_readme_shell_worker_runs_each_task_and_reports_it(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        script = readme.split("<!-- worker.sh")[1].split("```sh\n", 1)[1].split("```", 1)[0]
        self.assertLessEqual(len(script.strip().splitlines()), 25)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "worker.sh"), "w") as handle:
            handle.write(script)
        broker = K.Broker()
        jobs = broker.queue("jobs", persistent=True, max_attempts=1, configuration={"interval": 1000})
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        ids = [task["_id"] for task in jobs.insert([
            {"data": "ok-1"}, {"data": {"note": "a \"quoted\" fail, \"attempt\":3}"}}, {"data": [1, {"b": None}]}])]
        # The command fails exactly for data that mentions "fail", and records what it was given.
        seen = os.path.join(directory, "seen")
        command = f"tee -a {seen} | grep -q fail && exit 1; echo >> {seen}; exit 0"
        worker = subprocess.Popen(["sh", os.path.join(directory, "worker.sh"), server.url, "jobs", "sh", "-c", command],
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(stop_process, worker, group=True)
        finished = [jobs.task(task_id, wait=15000) for task_id in ids]  # waits on the tasks, not on a timer
        self.assertEqual([task["status"] for task in finished], ["done", "failed", "done"])
        self.assertEqual(finished[1]["error"], "exit 1")
        self.assertEqual(finished[0]["history"][0]["outcome"], "done")
        with open(seen) as handle:
            given = handle.read()
        self.assertIn('"ok-1"', given)
        self.assertIn('[1,{"b":null}]', given)
        self.assertIn('{"note":"a \\"quoted\\" fail, \\"attempt\\":3}"}', given)

    def test_a_port_already_in_use_exits_1_with_a_message(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = subprocess.run([*KATAR, "--port", str(port)],
                                    capture_output=True, text=True, timeout=20)
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot listen", result.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The event loop: one thread serves every connection; waits are parked, not threads
# ---------------------------------------------------------------------------------------------------------------

def read_answers(connection, count, timeout=10.0):
    """Read `count` whole HTTP/1.1 answers (Content-Length framed, or 204) from a keep-alive connection."""
    connection.settimeout(timeout)
    data, answers = b"", []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].decode("latin-1")
            found = re.search(r"(?im)^content-length: *(\d+)", head)
            length = int(found.group(1)) if found else 0
            if len(data) >= end + 4 + length:
                answers.append((int(head.split(" ")[1]), data[end + 4:end + 4 + length]))
                data = data[end + 4 + length:]
                continue
        chunk = connection.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed after {len(answers)} of {count} answers")
        data += chunk
    return answers


class EventLoopTest(ServerTestCase):
    real_clock = True

    def request(self, method, path, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        return (b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (method.encode(), path.encode(), len(data), data))

    def test_requests_pipelined_in_one_packet_are_answered_in_order(self):
        packet = (self.request("POST", "/v1/queue/jobs/tasks", {"data": 1}) +
                  self.request("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 2}, {"data": 3}]}) +
                  self.request("GET", "/v1/queue/jobs/stats") +
                  self.request("POST", "/v1/queue/jobs", {"max": 2}) +
                  self.request("GET", "/nowhere") +
                  self.request("POST", "/v1/queue/jobs", {"max": 5}))
        with socket.create_connection((self.server.host, self.server.port)) as connection:
            connection.sendall(packet)  # one write: the server finds six requests in one read
            answers = read_answers(connection, 6)
        self.assertEqual([status for status, _ in answers], [201, 201, 200, 200, 404, 200])
        self.assertEqual(json.loads(answers[2][1])["counts"]["queued"], 3)  # it saw both inserts before it
        self.assertEqual([task["data"] for task in json.loads(answers[3][1])["tasks"]], [1, 2])
        self.assertEqual([task["data"] for task in json.loads(answers[5][1])["tasks"]], [3])

    def test_a_long_poll_parked_in_a_pipeline_holds_back_the_requests_behind_it(self):
        packet = (self.request("POST", "/v1/queue/jobs", {"wait": 5000}) + self.request("GET", "/v1/queue/jobs/stats"))
        with socket.create_connection((self.server.host, self.server.port)) as connection:
            connection.sendall(packet)
            deadline = time.monotonic() + 10
            while self.jobs.stats()["waiting_workers"] < 1:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.005)
            inserted = self.jobs.insert({"data": "late"})["_id"]
            (first, body), (second, stats) = read_answers(connection, 2)
        self.assertEqual((first, json.loads(body)["tasks"][0]["_id"]), (200, inserted))
        self.assertEqual((second, json.loads(stats)["counts"]["in progress"]), (200, 1))  # answered after, in order

    def test_a_thousand_parked_long_polls_each_get_one_task_once(self):
        count = 1000
        try:
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < 3 * count:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * count), hard))
        except (ImportError, ValueError, OSError):
            pass
        self.set_limits(max_connections=count + 50)
        address, poll = (self.server.host, self.server.port), self.request("POST", "/v1/queue/jobs", {"wait": 5000})
        connections = []
        for _ in range(count):
            connection = socket.create_connection(address)
            self.addCleanup(connection.close)
            connection.sendall(poll)
            connections.append(connection)
        deadline = time.monotonic() + 30
        while self.jobs.stats()["waiting_workers"] < count:
            self.assertLess(time.monotonic(), deadline, self.jobs.stats()["waiting_workers"])
            time.sleep(0.01)
        self.assertEqual(threading.active_count(), self.threads_before)  # parked waits hold no thread
        inserted = [task["_id"] for task in self.jobs.insert([{"data": n} for n in range(count)])]
        delivered = []
        for connection in connections:
            [(status, body)] = read_answers(connection, 1)
            self.assertEqual(status, 200)
            delivered.extend(task["_id"] for task in json.loads(body)["tasks"])
        self.assertEqual(sorted(delivered), sorted(inserted))  # every task to one worker, none twice
        # The one who came first was served first.
        self.assertEqual(self.jobs.stats()["counts"]["in progress"], count)
        late = socket.create_connection(address)  # a worker arriving now is still served
        self.addCleanup(late.close)
        late.sendall(self.request("GET", "/v1/queue/jobs"))
        self.assertEqual(read_answers(late, 1)[0][0], 200)

    def setUp(self):
        self.threads_before = threading.active_count()
        super().setUp()
        self.threads_before = threading.active_count()

    def test_a_parked_poll_first_in_line_is_served_first(self):
        address = (self.server.host, self.server.port)
        first, second = socket.create_connection(address), socket.create_connection(address)
        for connection in (first, second):
            self.addCleanup(connection.close)
        first.sendall(self.request("POST", "/v1/queue/jobs", {"wait": 5000}))
        deadline = time.monotonic() + 10
        while self.jobs.stats()["waiting_workers"] < 1:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.005)
        second.sendall(self.request("POST", "/v1/queue/jobs", {"wait": 5000}))
        while self.jobs.stats()["waiting_workers"] < 2:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.005)
        task_id = self.jobs.insert({"data": "one"})["_id"]
        [(status, body)] = read_answers(first, 1)
        self.assertEqual((status, json.loads(body)["tasks"][0]["_id"]), (200, task_id))
        self.assertEqual(self.jobs.stats()["waiting_workers"], 1)

    def test_a_delayed_task_reaches_a_parked_poll_when_its_delay_ends(self):
        with socket.create_connection((self.server.host, self.server.port)) as connection:
            connection.sendall(self.request("POST", "/v1/queue/jobs", {"wait": 5000}))
            deadline = time.monotonic() + 10
            while self.jobs.stats()["waiting_workers"] < 1:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.005)
            started = time.monotonic()
            task_id = self.jobs.insert({"data": 1, "delay": 300})["_id"]
            [(status, body)] = read_answers(connection, 1)
        # The loop's clock timer, not a thread or a later request, handed it over once its delay ended.
        self.assertEqual((status, json.loads(body)["tasks"][0]["_id"]), (200, task_id))
        self.assertGreaterEqual(time.monotonic() - started, 0.29)
        self.assertLess(time.monotonic() - started, 3)

    def test_a_client_that_does_not_read_its_answers_is_read_no_further(self):
        self.set_limits(idle_timeout=1.0)
        with socket.create_connection((self.server.host, self.server.port)) as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            connection.settimeout(0.5)
            # The page (a large answer) asked for again and again, each request padded to a kilobyte.
            request, sent = self.request("GET", "/").replace(b"Host:", b"X-Pad: %s\r\nHost:" % (b"p" * 1000)), 0
            try:
                for _ in range(20000):
                    connection.sendall(request)
                    sent += 1
            except OSError:
                pass  # the server stopped reading: our sends filled the socket's buffers and stalled
            self.assertLess(sent, 20000, "the server kept reading requests whose answers nobody read")
        with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:  # others are served meanwhile
            self.assertEqual(response.status, 200)

    def test_a_half_closed_client_gets_every_answer_it_pipelined(self):
        with socket.create_connection((self.server.host, self.server.port)) as connection:
            connection.sendall(self.request("GET", "/v1/queue/jobs/stats") * 100 +
                               self.request("POST", "/v1/queue/jobs", {"wait": 2000}) +
                               self.request("GET", "/v1/queue/jobs"))
            connection.shutdown(socket.SHUT_WR)  # (more than one pass's worth, behind a long poll)
            started = time.monotonic()
            answers = read_answers(connection, 102)
            self.assertEqual(connection.recv(100), b"")  # then it closes
        self.assertEqual([status for status, _ in answers], [200] * 100 + [204, 200])
        self.assertLess(time.monotonic() - started, 1.5, "the poll of a client that hung up waited")

    def test_a_task_whose_answer_waits_for_the_disk_when_its_worker_hangs_up_is_handed_back(self):
        for hang_up in ("reset", "close"):  # a reset (RST), and a plain close (FIN), as a client's timeout does
            with self.subTest(hang_up=hang_up):
                self.hang_up_while_the_disk_holds_the_answer(hang_up)

    def hang_up_while_the_disk_holds_the_answer(self, hang_up):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        broker = K.Broker(journal=K.Journal(os.path.join(directory, "tasks.journal")))
        jobs = broker.queue("jobs")
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        journal, syncing = broker._journal, threading.Event()

        def slow_fsync(fd):  # the disk takes its time: the answer with the task is held meanwhile
            syncing.set()
            time.sleep(0.3)
            os.fsync(fd)
        with socket.create_connection((server.host, server.port)) as connection:
            connection.sendall(self.request("POST", "/v1/queue/jobs", {"wait": 5000}))
            deadline = time.monotonic() + 10
            while jobs.stats()["waiting_workers"] < 1:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.005)
            journal._fsync = slow_fsync
            inserter = threading.Thread(target=jobs.insert, args=({"data": "held"},))
            inserter.start()
            self.assertTrue(syncing.wait(5))
            if hang_up == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        inserter.join(10)
        journal._fsync = os.fsync
        while True:
            [task] = jobs.tasks()["tasks"]
            if task["status"] == "queued":
                break
            self.assertLess(time.monotonic(), deadline, task)
            time.sleep(0.01)
        self.assertEqual((task["attempts_spent"], jobs.stats()["totals"]["released"]), (0, 1))


class TlsHandshakeTest(TlsTestCase):

    def test_a_tls_client_that_stops_mid_handshake_is_cut_off_and_others_are_served(self):
        pem = self.certificate()
        broker = K.Broker()
        broker.queue("jobs")
        limits = K.Limits(first_request_timeout=0.5, request_timeout=0.5)
        server = K.serve(broker, port=0, tls=K.tls_context(pem), access=K.Access([ADMIN]), limits=limits)
        self.addCleanup(server.close)
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(stalled.close)
        stalled.sendall(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")  # the start of a ClientHello, no more
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # says nothing at all
        self.addCleanup(silent.close)
        started = time.monotonic()
        client = ssl.create_default_context(cafile=pem)
        with urllib.request.urlopen(server.url + "/healthz", context=client, timeout=5) as response:
            self.assertEqual(response.status, 200)  # served while the other two stall
        for connection in (stalled, silent):
            self.assertEqual(connection.recv(65536), b"")  # closed by the server, with nothing sent
        self.assertLess(time.monotonic() - started, 5)
        self.assertGreaterEqual(time.monotonic() - started, 0.4)


class StopTest(ServerProcessTestCase):

    def test_sigterm_answers_parked_polls_finishes_writes_in_flight_and_loses_no_acknowledged_insert(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        journal = os.path.join(directory, "tasks.journal")
        process, url = self.start("--journal", journal, "--queue", "jobs", "--queue", "idle", "--quiet")
        address = urlsplit(url)
        address = (address.hostname, address.port)
        polls = [socket.create_connection(address) for _ in range(20)]
        for connection in polls:
            self.addCleanup(connection.close)
            connection.sendall(b'POST /v1/queue/idle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 15\r\n\r\n{"wait": 20000}')
        deadline = time.monotonic() + 10
        while self.get(url + "/v1/queue/idle/stats")["waiting_workers"] < len(polls):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        # Inserts pipelined on a few connections, fsync always: when SIGTERM lands, some are written and fsync'd,
        # some are being fsync'd, some not yet read. Each 201 must survive; the rest may be refused or cut off.
        writers = [socket.create_connection(address) for _ in range(4)]
        for index, connection in enumerate(writers):
            self.addCleanup(connection.close)
            connection.sendall(b"".join(
                b'POST /v1/queue/jobs/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Length: 15\r\n\r\n{"data": %5d}' %
                (index * 1000 + n) for n in range(200)))
        time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        acknowledged = []
        for connection in writers:
            connection.settimeout(10)
            data = b""
            while True:
                try:
                    chunk = connection.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            for found in re.finditer(rb'HTTP/1\.1 201 Created\r\n.*?\r\n\r\n(\{.*?\}\]\})', data, re.S):
                acknowledged.extend(task["_id"] for task in json.loads(found.group(1))["tasks"])
        for connection in polls:
            [(status, body)] = read_answers(connection, 1)
            self.assertEqual(status, 204, body)  # answered, not dropped
        self.assertEqual(process.wait(10), 0)
        self.assertTrue(acknowledged, "no insert was answered before the stop")
        restarted, url = self.start("--journal", journal, "--quiet")
        held = set()
        after = None
        while True:
            page = self.get(url + "/v1/queue/jobs/tasks?limit=1000" + (f"&after={after}" if after else ""))
            held.update(task["_id"] for task in page["tasks"])
            after = page["next"]
            if after is None:
                break
        self.assertEqual(set(acknowledged) - held, set())  # every 201 is on disk
        restarted.send_signal(signal.SIGTERM)
        self.assertEqual(restarted.wait(10), 0)


# ---------------------------------------------------------------------------------------------------------------
# Steering running work: cancel, lost leases, progress, chosen leases, snooze, max_run, the fleet
# ---------------------------------------------------------------------------------------------------------------

class SteeringTest(ServerTestCase):
    """Through HTTP, with the fake clock: what a worker is told, and what the queue keeps."""

    queue_options = {"persistent": True, "lease": 10000, "max_attempts": 3, "backoff": 1000, "max_backoff": 1000}

    def heartbeat(self, task, worker="w1", expect=None, **more):
        report = dict(more, _id=task["_id"], status="in progress", attempt=task["attempt"])
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [report], "worker": worker})
        if expect is not None:
            self.assertEqual(status, expect, payload)
        return status, payload

    def start_long_poll(self, body):
        """A long poll on its own thread; returns (its thread, where its (status, payload) lands)."""
        answers = []
        thread = threading.Thread(target=lambda: answers.append(self.call("POST", "/v1/queue/jobs", body)[:2]))
        thread.start()
        deadline = time.monotonic() + 10
        while self.jobs.stats()["waiting_workers"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertEqual(self.jobs.stats()["waiting_workers"], 1, "the long poll did not park")
        return thread, answers

    def test_cancel_of_a_running_task_reaches_its_long_polling_worker_and_refuses_its_late_done(self):
        task_id, = self.insert({"data": "long job"})
        task = self.lease_one(worker="w1")
        thread, answers = self.start_long_poll({"worker": "w1", "wait": 5000})
        began = time.monotonic()
        status, cancelled, _ = self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")
        self.assertEqual((status, cancelled["status"]), (200, "cancelled"))
        thread.join(10)
        self.assertLess(time.monotonic() - began, 3, "the cancel should answer the parked poll at once")
        self.assertEqual(answers, [(200, {"tasks": [], "cancel": [task_id]})])
        before = self.task(task_id)
        self.assertEqual(before["history"][-1]["outcome"], "cancelled")
        status, refused, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [
            {"_id": task_id, "status": "done", "attempt": 1, "result": "too late"}], "max": 0})
        self.assertEqual(status, 409)
        self.assertEqual(refused["cancel"], [task_id])
        self.assertIn("cancelled", refused["error"])
        self.assertEqual(self.task(task_id), before)  # the late done changed nothing
        self.assertEqual(self.heartbeat(task, expect=409)[1]["cancel"], [task_id])
        self.assertEqual(self.poll({"worker": "w1"}, expect=204)[0], 204)  # told once

    def test_a_409_that_says_cancel_uses_the_notice_up(self):
        task_id, = self.insert({"data": 1})
        task = self.lease_one(worker="w1")
        self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")
        self.assertEqual(self.heartbeat(task, expect=409)[1]["cancel"], [task_id])
        self.assertEqual(self.poll({"worker": "w1", "max": 0})[0], 204)  # not told twice

    def test_a_worker_handed_a_newer_delivery_is_not_told_to_cancel_it(self):
        task_id, = self.insert({"data": 1})
        self.lease_one(worker="w1", lease=1000)
        self.clock.advance(1000)
        self.assertEqual(self.lease_one(worker="w2", lease=1000)["attempt"], 2)  # w1's lease was lost: noted
        self.clock.advance(1000)  # and w2's runs out too; the task comes back to w1
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"worker": "w1", "max": 1})
        self.assertEqual((status, [t["attempt"] for t in payload["tasks"]], payload.get("cancel")), (200, [3], None))
        self.assertEqual(self.poll({"worker": "w1", "max": 0})[0], 204)

    def test_a_purge_of_a_task_whose_lease_ran_out_tells_its_worker(self):
        task_id, = self.insert({"data": 1})
        self.lease_one(worker="w1", lease=1000)
        self.clock.advance(1000)
        self.poll({"worker": "w2", "max": 0})  # the clock runs: the lease ran out, the task is queued again
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")[1], {"purged": 1})
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"worker": "w1", "max": 0})
        self.assertEqual((status, payload), (200, {"tasks": [], "cancel": [task_id]}))

    def test_a_delivery_whose_lease_ran_out_past_max_run_is_not_revived(self):
        self.broker.queue("jobs", max_run=3000, lease=1000)
        task_id, = self.insert({"data": 1})
        task = self.lease_one(worker="w1")
        self.clock.advance(3500)  # its lease ran out at 1 s, its run time at 3 s
        status, payload = self.heartbeat(task, expect=409)
        self.assertEqual(payload["cancel"], [task_id])
        self.assertIn("max_run", payload["error"])

    def test_an_original_worker_sees_only_the_409_it_already_handles(self):
        task_id, = self.insert({"data": 1})
        self.poll(expect=200)  # no worker id, no attempt: the original protocol
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")[0], 200)
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"tasks": [{"_id": task_id, "status": "done"}]})
        self.assertEqual((status, payload["ids"]), (409, [task_id]))

    def test_a_cancelled_task_whose_worker_never_comes_back_is_never_delivered_again(self):
        task_id, = self.insert({"data": 1})
        self.lease_one(worker="gone")
        self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")
        self.clock.advance(60000)  # far past its lease
        self.assertEqual(self.poll({"worker": "w2"})[0], 204)
        self.assertEqual(self.task(task_id)["status"], "cancelled")
        self.assertEqual(self.counts()["in progress"], 0)

    def test_a_cancel_on_a_queue_that_discards_its_tasks_is_remembered_and_told(self):
        self.broker.queue("mail", lease=10000)  # not persistent: the cancelled task is dropped, its end remembered
        task_id, = self.insert({"data": 1}, queue="mail")
        status, payload, _ = self.call("POST", "/v1/queue/mail", {"worker": "w1"})
        self.assertEqual(status, 200)
        self.assertEqual(self.call("DELETE", f"/v1/queue/mail/tasks/{task_id}")[0], 200)
        status, payload, _ = self.call("POST", "/v1/queue/mail", {"worker": "w1"})
        self.assertEqual((status, payload), (200, {"tasks": [], "cancel": [task_id]}))
        status, payload, _ = self.call("POST", "/v1/queue/mail", {"tasks": [
            {"_id": task_id, "status": "done", "attempt": 1}], "max": 0})
        self.assertEqual((status, payload["cancel"]), (409, [task_id]))

    def test_a_lost_lease_is_told_to_the_old_worker_while_the_new_one_finishes(self):
        task_id, = self.insert({"data": 1})
        first = self.lease_one(worker="w1")
        self.clock.advance(11000)  # its lease runs out; nobody has it yet: w1 may still report
        self.assertEqual(self.poll({"worker": "w1", "max": 0}, expect=204)[0], 204)
        second = self.lease_one(worker="w2")
        self.assertEqual(second["attempt"], 2)
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"worker": "w1", "max": 0})  # its next contact
        self.assertEqual((status, payload), (200, {"tasks": [], "cancel": [task_id]}))
        status, payload = self.heartbeat(first, expect=409)  # and its late heartbeat
        self.assertEqual(payload["cancel"], [task_id])
        self.assertIn("superseded", payload["error"])
        self.assertEqual(self.poll({"worker": "w1", "max": 0})[0], 204)  # told once in an answer
        self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 2}], "max": 0, "worker": "w2"}, expect=204)
        self.assertEqual(self.task(task_id)["status"], "done")

    def test_progress_is_kept_and_wakes_a_producer_waiting_for_the_task(self):
        task_id, = self.insert({"data": 1})
        task = self.lease_one(worker="w1")
        self.assertIsNone(self.task(task_id)["progress"])
        answers = []
        follower = threading.Thread(target=lambda: answers.append(
            self.call("GET", f"/v1/queue/jobs/tasks/{task_id}?wait=5000")[:2]))
        follower.start()
        deadline = time.monotonic() + 5
        while not self.jobs._result_waiters and time.monotonic() < deadline:
            time.sleep(0.005)
        began = time.monotonic()
        self.heartbeat(task, progress={"done": 3, "of": 10}, expect=204)
        follower.join(10)
        self.assertLess(time.monotonic() - began, 3)
        status, seen = answers[0]
        self.assertEqual((status, seen["status"], seen["progress"]), (200, "in progress", {"done": 3, "of": 10}))
        self.heartbeat(task, progress="almost", expect=204)
        self.assertEqual(self.task(task_id)["progress"], "almost")
        self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 1}], "max": 0}, expect=204)
        self.assertEqual(self.task(task_id)["progress"], "almost")  # the last word of the delivery stays

    def test_a_lease_the_worker_chooses_is_honoured_and_capped_by_max_lease(self):
        self.broker.queue("jobs", max_lease=20000)
        task_id, other = self.insert({"data": 1}, {"data": 2})
        task = self.lease_one(worker="w1", lease=15000)
        self.assertEqual(self.task(task_id)["lease_expires_at"], self.clock.ms + 15000)
        status, payload, _ = self.call("POST", "/v1/queue/jobs", {"lease": 20001})
        self.assertEqual(status, 400)
        self.assertIn("max_lease", payload["error"])
        self.assertEqual(self.task(other)["status"], "queued")  # the refused poll took nothing
        self.clock.advance(1000)
        self.heartbeat(task, lease=19000, expect=204)
        self.assertEqual(self.task(task_id)["lease_expires_at"], self.clock.ms + 19000)
        status, payload = self.heartbeat(task, lease=25000, expect=400)
        self.assertIn("max_lease", payload["error"])
        self.assertEqual(self.task(task_id)["lease_expires_at"], self.clock.ms + 19000)
        self.clock.advance(18000)  # the chosen lease, not the queue's 10 s, holds it
        self.assertEqual(self.task(task_id)["status"], "in progress")
        self.clock.advance(2000)  # now it ran out: the task is leased again, before the younger one
        again = self.poll({"worker": "w2", "max": 1}, expect=200)[1][0]
        self.assertEqual((again["_id"], again["attempt"]), (task_id, 2))

    def test_a_parked_poll_gets_no_longer_a_lease_than_the_cap_in_force_when_it_is_served(self):
        thread, answers = self.start_long_poll({"worker": "w9", "wait": 5000, "lease": 15000})
        self.broker.queue("jobs", max_lease=1000)
        task_id, = self.insert({"data": 1})
        thread.join(10)
        self.assertEqual(answers[0][0], 200)
        self.assertEqual(self.task(task_id)["lease_expires_at"], self.clock.ms + 1000)

    def test_snooze_hands_a_task_back_for_later_without_spending_an_attempt(self):
        task_id, = self.insert({"data": 1})
        task = self.lease_one(worker="w1")
        self.poll({"tasks": [{"_id": task_id, "status": "queued", "attempt": 1, "retry_after": 5000}]}, expect=204)
        snoozed = self.task(task_id)
        self.assertEqual((snoozed["status"], snoozed["attempts_spent"], snoozed["run_at"]),
                         ("queued", 0, self.clock.ms + 5000))
        self.assertEqual(self.poll({"worker": "w1"})[0], 204)
        self.clock.advance(5000)
        again = self.lease_one(worker="w1")
        self.assertEqual((again["_id"], again["attempt"]), (task_id, 2))
        self.assertEqual(self.task(task_id)["attempts_spent"], 0)
        self.assertEqual(task["attempt"], 1)

    def test_max_run_ends_a_delivery_that_keeps_heartbeating(self):
        self.broker.queue("jobs", max_run=3000, lease=1000)
        task_id, = self.insert({"data": 1})
        task = self.lease_one(worker="w1")
        for _ in range(3):
            self.clock.advance(800)
            self.heartbeat(task, expect=204)
        self.assertEqual(self.task(task_id)["lease_expires_at"], self.clock.ms - 2400 + 3000)  # capped at the run
        self.clock.advance(700)
        status, payload = self.heartbeat(task, expect=409)
        self.assertEqual(payload["cancel"], [task_id])
        ended = self.task(task_id)
        self.assertEqual((ended["status"], ended["attempts_spent"]), ("queued", 1))
        self.assertEqual((ended["history"][-1]["outcome"], ended["history"][-1]["error"]),
                         ("failed", K.RUN_TIME_EXCEEDED))
        self.assertGreater(ended["run_at"], self.clock.ms)  # retried after a backoff, as a failure is

    def test_workers_are_seen_coming_waiting_holding_and_leaving(self):
        task_id, = self.insert({"data": 1})
        self.lease_one(worker="w1", lease=20000)
        self.poll({"max": 0})  # an anonymous poller
        thread, answers = self.start_long_poll({"worker": "w2", "wait": 5000})
        workers = {w["worker"]: w for w in self.call("GET", "/v1/workers")[1]["workers"]}
        self.assertEqual(set(workers), {"w1", "w2", None})
        self.assertEqual(workers["w1"]["tasks"], [{"_id": task_id, "queue": "jobs", "attempt": 1,
                                                   "lease_expires_at": self.clock.ms + 20000}])
        self.assertEqual((workers["w2"]["waiting"], workers["w1"]["waiting"]), (True, False))
        self.assertEqual(workers[None]["address"], "127.0.0.1")
        self.assertEqual(workers["w1"]["queues"], ["jobs"])
        self.insert({"data": 2})
        thread.join(10)
        self.assertEqual(answers[0][0], 200)
        self.clock.advance(500)
        self.poll({"tasks": [{"_id": task_id, "status": "in progress", "attempt": 1}], "max": 0, "worker": "w1"})
        w1 = next(w for w in self.call("GET", "/v1/workers?queue=jobs")[1]["workers"] if w["worker"] == "w1")
        self.assertEqual(w1["last_heartbeat"], self.clock.ms)
        self.poll({"tasks": [{"_id": task_id, "status": "done", "attempt": 1}], "max": 0, "worker": "w1"})
        w1 = next(w for w in self.call("GET", "/v1/workers")[1]["workers"] if w["worker"] == "w1")
        self.assertEqual(w1["tasks"], [])
        self.assertEqual(self.call("GET", "/v1/workers?queue=jobs")[0], 200)
        self.assertEqual(self.call("GET", "/v1/workers?queue=nope")[0], 404)
        short, = self.insert({"data": 3})
        self.lease_one(worker="w4", lease=1000)
        self.assertEqual(self.call("GET", "/v1/workers")[1]["workers"][0]["tasks"][0]["_id"], short)
        self.clock.advance(2000)  # its lease ran out: no longer held, though nothing has run the clock yet
        self.assertEqual(self.call("GET", "/v1/workers")[1]["workers"][0]["tasks"], [])
        self.clock.advance(K.WORKER_IDLE_MS + 1000)
        self.assertEqual(self.call("GET", "/v1/workers")[1]["workers"], [])  # forgotten, though nobody came since
        self.poll({"worker": "w3", "max": 0})
        self.assertEqual([w["worker"] for w in self.call("GET", "/v1/workers")[1]["workers"]], ["w3"])

    def test_the_fleet_is_bounded(self):
        original = K.MAX_WORKERS_SEEN
        K.MAX_WORKERS_SEEN = 5
        self.addCleanup(setattr, K, "MAX_WORKERS_SEEN", original)
        for n in range(8):
            self.poll({"worker": f"w{n}", "max": 0})
        self.assertEqual([w["worker"] for w in self.call("GET", "/v1/workers")[1]["workers"]],
                         ["w7", "w6", "w5", "w4", "w3"])
        self.addCleanup(setattr, K, "WORKER_TASKS_SHOWN", K.WORKER_TASKS_SHOWN)
        K.WORKER_TASKS_SHOWN = 2
        self.insert({"data": 1}, {"data": 2}, {"data": 3})
        self.poll({"worker": "w7", "max": 3}, expect=200)
        w7 = self.call("GET", "/v1/workers")[1]["workers"][0]
        self.assertEqual((len(w7["tasks"]), w7["tasks_held"]), (2, 3))

    def test_bad_steering_input_is_refused_and_changes_nothing(self):
        task_id, = self.insert({"data": 1})
        self.lease_one(worker="w1")
        before = self.task(task_id)
        self.set_limits(max_data=1000)
        deep = 1
        for _ in range(200):
            deep = [deep]
        cases = [
            ({"lease": "1000"}, 400), ({"lease": 0}, 400), ({"lease": -5}, 400), ({"lease": True}, 400),
            ({"lease": 10 ** 20}, 400), ({"lease": 1.5}, 400), ({"lease": None}, 400),
            ({"tasks": [{"_id": task_id, "status": "in progress", "lease": "x"}]}, 400),
            ({"tasks": [{"_id": task_id, "status": "in progress", "lease": 0}]}, 400),
            ({"tasks": [{"_id": task_id, "status": "done", "lease": "long"}]}, 400),  # checked whatever the status
            ({"tasks": [{"_id": task_id, "status": "done", "progress": float("nan")}]}, 400),
            ({"tasks": [{"_id": task_id, "status": "failed", "error": "x", "retry_after": -5}]}, 400),
            ({"tasks": [{"_id": task_id, "status": "queued", "retry_after": -1}]}, 400),
            ({"tasks": [{"_id": task_id, "status": "queued", "retry_after": "soon"}]}, 400),
            ({"tasks": [{"_id": task_id, "status": "in progress", "progress": "x" * 5000}]}, 413),
            ({"tasks": [{"_id": task_id, "status": "in progress", "progress": deep}]}, 400),
            ({"tasks": [{"_id": "nope-1", "status": "in progress", "progress": 1}]}, 404),
        ]
        for body, expected in cases:
            with self.subTest(body=str(body)[:80]):
                status, payload, _ = self.call("POST", "/v1/queue/jobs", dict(body, worker="w1"))
                self.assertEqual(status, expected, payload)
        self.assertEqual(self.task(task_id), before)
        too_big = b'{"worker": "w1", "tasks": [{"_id": "%s", "status": "in progress", "progress": 1e999, "x": "%s"}]}'
        status, payload, _ = self.call("POST", "/v1/queue/jobs", raw=too_big % (task_id.encode(), b"x" * 2000))
        self.assertEqual(status, 400, payload)  # a float JSON cannot write back, in a body past --max-data
        for path, expected in [("/v1/queue/jobs/tasks/nope-1", 404), ("/v1/queue/nope/tasks/" + task_id, 404)]:
            self.assertEqual(self.call("DELETE", path)[0], expected)
        bad_options = [{"max_lease": 0}, {"max_lease": "1"}, {"max_run": -1}, {"max_run": True},
                       {"max_run": 10 ** 20}]
        for options in bad_options:
            with self.subTest(options=options):
                self.assertEqual(self.call("PUT", "/v1/queue/jobs", options)[0], 400)
        self.assertEqual(self.jobs.describe()["max_run"], 0)
        self.assertEqual(self.call("GET", "/v1/workers?queue=" + "x" * 300)[0], 404)
        self.assertEqual(self.call("GET", "/v1/workers?queue=a&queue=b")[0], 400)
        self.assertEqual(self.task(task_id), before)

    def test_a_cancel_racing_a_done_report_lets_exactly_one_win(self):
        for _ in range(25):
            task_id, = self.insert({"data": 1})
            self.lease_one(worker="w1")
            results = {}
            go = threading.Barrier(2)

            def cancel():
                go.wait()
                results["cancel"] = self.call("DELETE", f"/v1/queue/jobs/tasks/{task_id}")[0]

            def done():
                go.wait()
                results["done"] = self.call("POST", "/v1/queue/jobs", {"tasks": [
                    {"_id": task_id, "status": "done", "attempt": 1}], "max": 0})[0]

            threads = [threading.Thread(target=cancel), threading.Thread(target=done)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            final = self.task(task_id)["status"]
            if final == "done":
                self.assertEqual((results["done"], results["cancel"]), (204, 409))
            else:
                self.assertEqual((final, results["cancel"], results["done"]), ("cancelled", 200, 409))

    def test_a_worker_token_may_not_see_the_fleet(self):
        self.server.httpd.access = K.Access([ADMIN], {WORKER: ["jobs"]})
        status, _, _ = self.call("GET", "/v1/workers", headers={"Authorization": "Bearer " + WORKER})
        self.assertEqual(status, 403)
        status, payload, _ = self.call("GET", "/v1/workers", headers={"Authorization": "Bearer " + ADMIN})
        self.assertEqual(status, 200)


class UnattendedMetricTest(ServerTestCase):
    queue_options = {"lease": 10000}

    def unattended(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        found = re.search(r'^katar_queue_unattended_seconds\{queue="jobs"\} (\S+)$', text, re.M)
        workers = re.search(r'^katar_queue_workers\{queue="jobs"\} (\S+)$', text, re.M)
        return float(found.group(1)), int(workers.group(1))

    def test_unattended_rises_while_nobody_polls_and_falls_when_a_worker_comes(self):
        self.clock.advance(60000)  # an idle hour before anything is due does not count
        self.assertEqual(self.unattended(), (0.0, 0))
        self.insert({"data": 1}, {"data": 2})
        self.clock.advance(10000)
        self.assertEqual(self.unattended(), (10.0, 0))
        self.lease_one(worker="w1")  # one is left due, but a worker was just here
        self.assertEqual(self.unattended(), (0.0, 1))
        self.clock.advance(5000)
        self.assertEqual(self.unattended(), (5.0, 1))
        self.lease_one(worker="w2")
        self.clock.advance(5000)
        self.assertEqual(self.unattended(), (0.0, 2))  # nothing due: nobody is missed
        self.broker.queue("jobs", paused=True)
        self.insert({"data": 3})
        self.clock.advance(5000)
        self.assertEqual(self.unattended()[0], 0.0)  # a paused queue is nobody's backlog
        self.broker.queue("jobs", paused=False)
        self.lease_one(worker="w3")
        self.insert({"data": 4, "group": "g"})  # a task of a group is a backlog too
        self.clock.advance(5000)
        self.assertEqual(self.unattended()[0], 5.0)


class SteeringJournalTest(JournalOverHttpTestCase):
    def test_a_cancel_a_chosen_lease_and_progress_survive_a_restart(self):
        cancelled, chosen = self.insert({"data": 1}, {"data": 2})
        status, leased = self.poll({"max": 2, "worker": "w1", "lease": 45000}, expect=200)
        self.assertEqual([t["_id"] for t in leased], [cancelled, chosen])
        self.poll({"tasks": [{"_id": chosen, "status": "in progress", "attempt": 1, "progress": {"step": 2},
                              "lease": 50000}], "max": 0}, expect=204)
        self.assertEqual(self.call("DELETE", f"/v1/queue/jobs/tasks/{cancelled}")[0], 200)
        before = {task_id: self.task(task_id) for task_id in (cancelled, chosen)}
        self.server.close()  # (and its broker)
        again = K.Broker(clock=self.clock, journal=self.path)
        self.addCleanup(again.close)
        jobs = again.get("jobs")
        after = {task_id: jobs.task(task_id) for task_id in (cancelled, chosen)}
        self.assertEqual(after, before)
        self.assertEqual(after[chosen]["progress"], {"step": 2})
        self.assertEqual(after[chosen]["lease_expires_at"], self.clock.ms + 50000)
        self.assertEqual(after[cancelled]["status"], "cancelled")
        with self.assertRaises(K.Conflict) as refused:
            jobs.report([{"_id": cancelled, "status": "done", "attempt": 1}])
        self.assertEqual(refused.exception.fields["cancel"], [cancelled])
        again.compact()
        again.close()
        third = K.Broker(clock=self.clock, journal=self.path)  # and from a compacted journal
        self.addCleanup(third.close)
        self.assertEqual({task_id: third.get("jobs").task(task_id) for task_id in (cancelled, chosen)}, before)


class WorkSteeringTest(WorkTestCase):
    """`work`, run as a user runs it, obeys the server: a cancel or a lost lease stops the running command."""

    queue_options = {"persistent": True, "lease": 30000, "max_attempts": 3}


    def command(self):
        """Writes its pid to a file named after its task, then sleeps a minute if its data is "slow"."""
        return ["sh", "-c", 'read data; echo $$ > "%s/$KATAR_TASK_ID"; '
                            'if [ "$data" = \'"slow"\' ]; then exec sleep 60; fi; echo quick' % self.directory]

    def running_pid(self, task_id):
        path = os.path.join(self.directory, task_id)
        until(self, lambda: os.path.exists(path) and read_file(path).strip(), "the command to start")
        return int(read_file(path))

    def wait_gone(self, pid, timeout):
        def gone():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False
        until(self, gone, f"process {pid} to end", timeout)

    def test_a_cancel_stops_the_running_command_within_the_heartbeat_and_work_moves_on(self):
        slow = self.jobs.insert({"data": "slow"})["_id"]
        worker = self.start_worker("--heartbeat", "0.5", "--", *self.command())
        pid = self.running_pid(slow)
        self.assertEqual(self.jobs.task(slow)["status"], "in progress")
        began = time.monotonic()
        self.jobs.cancel(slow)
        self.wait_gone(pid, 10)
        stopped_in = time.monotonic() - began
        self.assertLess(stopped_in, 3.0, "a cancel reaches the command within --heartbeat and a round trip")
        quick = self.jobs.insert({"data": "quick"})["_id"]  # the worker takes the next task
        self.assertEqual(self.jobs.task(quick, wait=20000)["status"], "done")
        task = self.jobs.task(slow)
        self.assertEqual((task["status"], [entry["outcome"] for entry in task["history"]]),
                         ("cancelled", ["cancelled"]))
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(20), 0)
        log = worker.stderr.read()
        self.assertIn(f"{slow} attempt 1 stopped after", log)
        self.assertIn("was cancelled", log)
        self.assertNotIn(f"{slow} attempt 1 failed", log)  # nothing reported for it

    def test_a_lost_lease_stops_the_old_command_while_the_new_delivery_goes_on(self):
        self.broker.queue("jobs", lease=500)
        slow = self.jobs.insert({"data": "slow"})["_id"]
        worker = self.start_worker("--heartbeat", "1.0", "--", *self.command())
        pid = self.running_pid(slow)
        until(self, lambda: self.jobs.stats()["counts"]["in progress"] == 0, "the lease to run out", 5)
        self.broker.queue("jobs", lease=30000)
        taken = self.jobs.lease(worker="thief")
        self.assertEqual([(t["_id"], t["attempt"]) for t in taken], [(slow, 2)])
        began = time.monotonic()
        self.wait_gone(pid, 10)
        self.assertLess(time.monotonic() - began, 5.0, "within --heartbeat (1 s) and a round trip")
        self.jobs.report([{"_id": slow, "status": "done", "attempt": 2}])
        task = self.jobs.task(slow)
        self.assertEqual((task["status"], task["worker"], task["history"][-1]["outcome"]), ("done", "thief", "done"))
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(20), 0)
        self.assertIn(f"{slow} attempt 1 stopped after", worker.stderr.read())

    def runner(self, command, client=None, **options):
        """A Runner (what `work` runs) in this process, with its log lines kept; stopped at the end."""
        lines = []
        runner = K.Runner(client or K.Client(self.server.url), "jobs", command, worker="wk", wait=500,
                          log=lines.append, **options)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 20)
        self.addCleanup(runner.stop)
        return lines

    def test_a_task_that_comes_back_to_the_same_worker_stops_its_earlier_run(self):
        # Heartbeats fail for a while (a network blip): each lease runs out, and the worker's other slot, long
        # polling, gets the task again. Each earlier run must stop; at most two commands run at once; the last
        # delivery finishes and is reported.
        self.broker.queue("jobs", lease=500, max_attempts=10)
        client, began = K.Client(self.server.url), time.monotonic()
        heartbeat = client.heartbeat

        def flaky(*args, **more):
            if time.monotonic() - began < 1.2:
                raise ConnectionResetError("a network blip")
            return heartbeat(*args, **more)
        client.heartbeat = flaky
        marks = os.path.join(self.directory, "marks")
        lines = self.runner(["sh", "-c", 'echo "start $KATAR_ATTEMPT" >> %s; sleep 1; echo "end $KATAR_ATTEMPT" >> %s'
                             % (marks, marks)], client=client, concurrency=2, heartbeat=0.3, cancel_grace=0.5)
        task_id = self.jobs.insert({"data": 1})["_id"]
        task = self.jobs.task(task_id, wait=20000)
        self.assertEqual(task["status"], "done", lines)
        ran = read_file(marks).split()
        last = str(task["attempt"])
        self.assertGreater(task["attempt"], 1, "the blip made the lease run out")
        self.assertEqual([ran[i + 1] for i in range(0, len(ran), 2) if ran[i] == "end"], [last], ran)
        for attempt in range(1, task["attempt"]):
            self.assertTrue(any(f"{task_id} attempt {attempt} stopped after" in line and "superseded" in line
                                for line in lines), lines)

    def test_a_cancel_before_the_command_starts_still_kills_a_command_that_ignores_sigterm(self):
        real_mkstemp, started = tempfile.mkstemp, threading.Event()

        def slow_mkstemp(*args, **more):  # the Runner is between its lease and its command's start
            started.set()
            time.sleep(0.5)
            return real_mkstemp(*args, **more)
        K.tempfile.mkstemp = slow_mkstemp
        self.addCleanup(setattr, K.tempfile, "mkstemp", real_mkstemp)
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: the command ignores it from exec on
        self.addCleanup(signal.signal, signal.SIGTERM, previous)
        lines = self.runner(["sleep", "30"], heartbeat=0.3, cancel_grace=0.5)
        task_id = self.jobs.insert({"data": 1})["_id"]
        self.assertTrue(started.wait(10))
        self.jobs.cancel(task_id)
        cancelled = time.monotonic()
        until(self, lambda: any("stopped after" in line for line in lines), "the command to be killed", 10)
        self.assertLess(time.monotonic() - cancelled, 5.0, "SIGKILL follows SIGTERM after --cancel-grace")

    def test_a_command_whose_child_ignores_sigterm_is_killed_after_the_grace_even_once_its_leader_exited(self):
        lines = self.runner(["sh", "-c", "sh -c 'trap \"\" TERM; while :; do sleep 0.1; done'; true"],
                            heartbeat=0.2, cancel_grace=0.5)
        task_id = self.jobs.insert({"data": 1})["_id"]
        until(self, lambda: self.jobs.task(task_id)["status"] == "in progress", "the lease")
        time.sleep(0.3)  # the command runs
        self.jobs.cancel(task_id)
        cancelled = time.monotonic()
        until(self, lambda: any("stopped after" in line for line in lines), "the command to be killed", 10)
        self.assertLess(time.monotonic() - cancelled, 3.0, "SIGKILL after --cancel-grace reaches the whole group")

    def test_work_sends_the_progress_its_command_writes_and_a_producer_follows_it(self):
        task_id = self.jobs.insert({"data": 1})["_id"]
        self.start_worker("--heartbeat", "0.2", "--", "sh", "-c",
                          'echo "{\\"step\\": 1}" >> "$KATAR_PROGRESS_FILE"; sleep 0.6; '
                          'echo "half way" >> "$KATAR_PROGRESS_FILE"; sleep 0.6; echo done')
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            task = self.jobs.task(task_id, wait=5000)
            if task["progress"] is not None and (not seen or task["progress"] != seen[-1]):
                seen.append(task["progress"])
            if task["status"] == "done":
                break
        self.assertEqual(seen, [{"step": 1}, "half way"])
        self.assertEqual((task["status"], task["result"], task["progress"]), ("done", "done", "half way"))


class SteeringCrashTest(unittest.TestCase):
    """kill -9 after each kind of steering: what was acknowledged is what a restarted server holds."""

    def start_server(self, directory):
        process, url = start_journalled_server(self, directory)
        client = K.Client(url)
        self.addCleanup(client.close)
        return process, client

    def test_a_cancel_a_chosen_lease_progress_a_snooze_and_a_run_time_failure_survive_kill_9(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "queues.json"), "w") as handle:
            json.dump({"queues": {"jobs": {"persistent": True, "max_lease": 600000},
                                  "capped": {"persistent": True, "max_run": 300, "backoff": 600000}}}, handle)
        process, client = self.start_server(directory)
        cancelled, chosen, snoozed = [t["_id"] for t in client.insert("jobs", [{"data": n} for n in range(3)])]
        leased, _ = client.poll("jobs", max=3, worker="w1", lease=500000)
        self.assertEqual([t["_id"] for t in leased], [cancelled, chosen, snoozed])
        client.heartbeat("jobs", chosen, 1, worker="w1", progress={"step": 4}, lease=550000)
        client.request("DELETE", f"/v1/queue/jobs/tasks/{cancelled}")
        client.report("jobs", [{"_id": snoozed, "attempt": 1, "status": "queued", "retry_after": 500000}])
        overran = client.insert("capped", [{"data": "long"}])[0]["_id"]
        client.poll("capped", worker="w2")
        time.sleep(0.4)
        self.assertEqual(client.poll("capped", max=0, worker="w2"), ([], [overran]))  # the clock ran: told
        before = {task_id: client.task("jobs", task_id) for task_id in (cancelled, chosen, snoozed)}
        before[overran] = client.task("capped", overran)
        self.assertEqual(before[overran]["history"][-1]["error"], K.RUN_TIME_EXCEEDED)
        process.kill()  # kill -9: no chance to write anything more
        process.wait()
        client.close()
        process, client = self.start_server(directory)
        after = {task_id: client.task("jobs", task_id) for task_id in (cancelled, chosen, snoozed)}
        after[overran] = client.task("capped", overran)
        self.assertEqual(after, before)
        self.assertEqual((after[cancelled]["status"], after[chosen]["progress"], after[snoozed]["attempts_spent"]),
                         ("cancelled", {"step": 4}, 0))
        self.assertGreater(after[snoozed]["run_at"], time.time() * 1000 + 400000)
        self.assertEqual(client.poll("jobs", max=10, worker="w3"), ([], []))  # none due: nothing leased again
        with self.assertRaises(K.Conflict) as refused:
            client.report("jobs", [{"_id": cancelled, "attempt": 1, "status": "done"}])
        self.assertEqual(refused.exception.fields["cancel"], [cancelled])


# ---------------------------------------------------------------------------------------------------------------
# Flow control: capacity per queue, rate limits, throttle
# ---------------------------------------------------------------------------------------------------------------

class FlowControlTest(ServerTestCase):
    queue_options = {"persistent": True}

    def test_a_full_queue_refuses_inserts_with_503_while_workers_lease_and_report(self):
        self.broker.queue("jobs", max_queued=5)
        self.insert({"data": 1}, {"data": 2}, {"data": 3})
        status, payload, headers = self.call("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": n} for n in range(3)]},
                                             allow_503=True)
        self.assertEqual((status, headers["Retry-After"], payload["max_queued"], payload["queue"]),
                         (503, "1", 5, "jobs"))
        self.assertIn("max_queued", payload["error"])
        self.assertEqual(self.counts()["queued"], 3)  # the batch is all or nothing
        task = self.lease_one()
        self.poll({"tasks": [{"_id": task["_id"], "status": "done"}], "max": 0}, expect=204)
        self.assertEqual(len(self.insert({"data": 4}, {"data": 5}, {"data": 6})), 3)  # room again: 2 + 3
        self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", {"data": 7}, allow_503=True)[0], 503)
        self.assertEqual(self.call("DELETE", "/v1/queue/jobs/tasks?status=queued")[1], {"purged": 5})

    def test_under_a_flood_every_insert_answered_201_is_kept_and_worked(self):
        self.broker.queue("jobs", max_queued=20)
        accepted, refused, done, stop = [], [0], [], threading.Event()
        lock = threading.Lock()

        def produce():
            while not stop.is_set():
                status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 1}, {"data": 2}]},
                                               allow_503=True)
                with lock:
                    if status == 201:
                        accepted.extend(task["_id"] for task in payload["tasks"])
                    else:
                        self.assertEqual(status, 503)
                        refused[0] += 1

        def work():
            reports = []
            while not stop.is_set() or reports:
                status, tasks = self.poll({"tasks": reports, "max": 3 if not stop.is_set() else 0})
                with lock:
                    done.extend(report["_id"] for report in reports)
                reports = [{"_id": task["_id"], "status": "done"} for task in (tasks if status == 200 else [])]

        run_for(1.0, stop, [threading.Thread(target=produce) for _ in range(3)] + [threading.Thread(target=work)])
        self.assertGreater(refused[0], 0, "the flood was refused at times")
        while True:  # drain what is left
            status, tasks = self.poll({"max": 100})
            if status == 204:
                break
            self.poll({"tasks": [{"_id": t["_id"], "status": "done"} for t in tasks], "max": 0}, expect=204)
            done.extend(t["_id"] for t in tasks)
        self.assertEqual(sorted(done), sorted(accepted))  # each 201'd task worked once, nothing else
        self.assertEqual(self.counts()["done"], len(accepted))

    def test_throttle_from_a_worker_pauses_the_queue_for_everyone_for_that_long(self):
        self.insert({"data": 1}, {"data": 2})
        task = self.lease_one(worker="w1")
        self.poll({"tasks": [{"_id": task["_id"], "status": "queued"}], "throttle": 5000, "max": 0}, expect=204)
        self.assertEqual(self.poll({"worker": "w2"})[0], 204)
        self.clock.advance(4999)
        self.assertEqual(self.poll({"worker": "w2"})[0], 204)
        self.clock.advance(1)
        self.assertEqual(self.poll({"worker": "w2"}, expect=200)[0], 200)

    def test_a_throttle_is_capped_by_max_throttle_and_a_lowered_cap_shortens_it(self):
        self.insert({"data": 1})
        self.poll({"throttle": 10 ** 9, "max": 0}, expect=204)
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats")[1]["throttled_for_ms"], 300000)
        self.call("PUT", "/v1/queue/jobs", {"max_throttle": 1000})
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats")[1]["throttled_for_ms"], 1000)
        self.clock.advance(1000)
        self.assertEqual(self.poll({"max": 1})[0], 200)

    def test_bad_flow_control_input_is_refused_and_changes_nothing(self):
        before = self.jobs.describe()
        for options in ({"rate": "fast"}, {"rate": -1}, {"rate": 10 ** 7}, {"rate": None}, {"rate": True},
                        {"rate": 5e-324}, {"rate": 0.0009}, {"max_throttle": -1},
                        {"burst": 0}, {"burst": 1.5}, {"max_queued": -1}, {"max_queued": "9"}):
            with self.subTest(options=options):
                self.assertEqual(self.call("PUT", "/v1/queue/jobs", options)[0], 400)
        self.assertEqual(self.jobs.describe(), before)
        self.insert({"data": 1})
        for body in ({"throttle": -1}, {"throttle": "1s"}, {"throttle": 10 ** 20}, {"throttle": None},
                     {"throttle": 1.5}):
            with self.subTest(body=body):
                self.assertEqual(self.call("POST", "/v1/queue/jobs", body)[0], 400)
        self.assertEqual(self.counts()["queued"], 1)


class RateLimitTest(ServerTestCase):
    real_clock = True
    queue_options = {"rate": 20, "burst": 5}

    def test_a_long_poll_for_tasks_of_groups_waits_for_the_next_token_not_its_whole_wait(self):
        self.broker.queue("jobs", rate=2, burst=1)
        self.jobs.insert([{"data": n, "group": f"g{n}"} for n in range(3)])
        self.assertEqual(len(self.jobs.lease()), 1)
        began = time.monotonic()
        self.assertEqual(len(self.jobs.lease(wait=5000)), 1)  # the Python API's wait: the next token, 0.5 s
        self.assertLess(time.monotonic() - began, 2.0)
        began = time.monotonic()
        self.assertEqual(self.poll({"max": 1, "wait": 5000})[0], 200)  # and over HTTP
        self.assertLess(time.monotonic() - began, 2.0)

    def test_a_rate_of_20_a_second_leases_20_a_second_to_many_long_polling_workers(self):
        self.jobs.insert([{"data": n} for n in range(200)])
        leased, stop = [], threading.Event()
        lock = threading.Lock()

        def work():
            reports = []
            while not stop.is_set():
                status, tasks = self.poll({"tasks": reports, "max": 10, "wait": 500})
                with lock:
                    leased.extend(time.monotonic() for _ in (tasks if status == 200 else []))
                reports = [{"_id": t["_id"], "status": "done"} for t in (tasks if status == 200 else [])]

        began = time.monotonic()
        workers = [threading.Thread(target=work) for _ in range(8)]
        for worker in workers:
            worker.start()
        time.sleep(3.0)
        stop.set()
        for worker in workers:
            worker.join(10)
        within = [at for at in leased if at - began <= 3.0]
        self.assertGreaterEqual(len(within), 20 * 3 - 5)
        self.assertLessEqual(len(within), 20 * 3 + 5 + 1)  # the burst, and the token of the last instant
        per_second = [sum(1 for at in within if second <= at - began < second + 1) for second in range(3)]
        for count in per_second[1:]:
            self.assertLessEqual(abs(count - 20), 5, per_second)


class FlowControlJournalTest(JournalOverHttpTestCase):
    def test_a_throttle_and_the_flow_options_survive_a_restart_and_a_compaction(self):
        self.broker.queue("jobs", max_queued=10, rate=2.5, burst=3)
        self.insert({"data": 1})
        self.poll({"throttle": 5000, "max": 0}, expect=204)

        def check(broker):
            jobs = broker.get("jobs")
            options = jobs.describe()
            self.assertEqual((options["max_queued"], options["rate"], options["burst"]), (10, 2.5, 3))
            self.assertEqual(jobs.stats()["throttled_for_ms"], 5000)
            self.assertEqual(jobs.lease(), [])
        self.check_reopened(check)
        self.clock.advance(5000)
        self.assertEqual(len(self.reopen().get("jobs").lease()), 1)


class AgesTest(ServerTestCase):
    """expire_after, retain and key_ttl, with the fake clock, through HTTP."""

    queue_options = {"persistent": True}

    def test_a_task_queued_past_expire_after_becomes_a_dead_letter_named_expired(self):
        self.broker.queue("jobs", expire_after=60000)
        fresh, delayed, taken = self.insert({"data": 1}, {"data": 2, "delay": 30000}, {"data": 3})
        self.call("PATCH", f"/v1/queue/jobs/tasks/{taken}", {"status": "paused"})  # paused: it does not age
        self.clock.advance(59999)
        self.assertEqual(self.task(fresh)["status"], "queued")
        self.clock.advance(1)
        expired = self.task(fresh)
        self.assertEqual((expired["status"], expired["error"], expired["attempt"]), ("failed", "expired", 0))
        self.assertEqual(self.task(delayed)["status"], "queued")  # due 30 s later: 60 s from then
        self.clock.advance(30000)
        self.assertEqual(self.task(delayed)["status"], "failed")
        self.assertEqual(self.task(taken)["status"], "paused")
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats")[1]["totals"]["failed"], 2)
        status, payload, _ = self.call("PATCH", f"/v1/queue/jobs/tasks/{fresh}", {"status": "queued"})
        self.assertEqual(payload["status"], "queued")  # a dead letter retried: it ages again from now
        self.clock.advance(60000)
        self.assertEqual(self.task(fresh)["status"], "failed")

    def test_retain_drops_finished_tasks_after_their_age_and_a_later_switch_on_indexes_the_old_ones(self):
        done, dead, running = self.insert({"data": 1}, {"data": 2}, {"data": 3})
        first = self.lease_one()
        self.poll({"tasks": [{"_id": first["_id"], "status": "done"}], "max": 0}, expect=204)
        self.clock.advance(10000)
        self.broker.queue("jobs", retain=20000)  # switched on later: the done task counts from when it finished
        second = self.lease_one()
        self.poll({"tasks": [{"_id": second["_id"], "status": "failed", "error": "x", "retry": False}], "max": 0},
                  expect=204)
        self.lease_one()
        self.clock.advance(10000)
        self.assertEqual(self.call("GET", f"/v1/queue/jobs/tasks/{done}")[0], 404)
        self.assertEqual(self.task(dead)["status"], "failed")
        self.clock.advance(10000)
        self.assertEqual(self.call("GET", f"/v1/queue/jobs/tasks/{dead}")[0], 404)
        self.assertEqual(self.task(running)["status"], "in progress")  # only finished tasks go
        self.assertEqual(self.counts(), {"paused": 0, "queued": 0, "in progress": 1, "done": 0, "failed": 0,
                                         "cancelled": 0})

    def test_ages_end_from_the_servers_timer_without_a_request(self):
        self.broker.queue("jobs", expire_after=1000)
        self.insert({"data": 1})
        self.clock.advance(1000)
        # No request from here on: the totals are read without running the queue's clock.
        until(self, lambda: self.jobs.totals["failed"] == 1, "the age timer to expire the task", 5)

    def test_key_ttl_dedupes_a_key_that_long_after_its_task_finished_even_once_it_is_forgotten(self):
        self.broker.queue("mail", key_ttl=60000)  # not persistent: a done task is dropped at once
        self.addCleanup(setattr, K, "FINISHED_MEMORY", K.FINISHED_MEMORY)
        K.FINISHED_MEMORY = 1  # and soon forgotten
        first, = self.insert({"data": "welcome", "key": "user-7"}, queue="mail")
        for _ in range(2):
            status, payload, _ = self.call("POST", "/v1/queue/mail", {"max": 1})
            self.call("POST", "/v1/queue/mail", {"tasks": [{"_id": payload["tasks"][0]["_id"], "status": "done"}],
                                                 "max": 0})
            self.insert({"data": "other"}, queue="mail")  # finishing it pushes the first out of memory
        self.clock.advance(59999)
        status, payload, _ = self.call("POST", "/v1/queue/mail/tasks", {"data": "again", "key": "user-7"})
        self.assertEqual((status, payload["tasks"][0]), (200, {"_id": first, "status": "done", "created": False}))
        self.clock.advance(1)
        status, payload, _ = self.call("POST", "/v1/queue/mail/tasks", {"data": "again", "key": "user-7"})
        self.assertEqual((status, payload["tasks"][0]["created"]), (201, True))
        self.assertNotEqual(payload["tasks"][0]["_id"], first)

    def test_a_paused_task_does_not_age_and_ages_from_its_resume(self):
        self.broker.queue("jobs", expire_after=10000)
        task_id, = self.insert({"data": 1, "status": "paused"})
        self.clock.advance(60000)
        self.call("PATCH", f"/v1/queue/jobs/tasks/{task_id}", {"status": "queued"})
        self.clock.advance(9999)
        self.assertEqual(self.task(task_id)["status"], "queued")
        self.clock.advance(1)
        self.assertEqual(self.task(task_id)["error"], "expired")

    def test_bad_age_options_are_refused(self):
        for options in ({"expire_after": -1}, {"retain": "1h"}, {"expire_after": 10 ** 20}, {"retain": None}):
            with self.subTest(options=options):
                self.assertEqual(self.call("PUT", "/v1/queue/jobs", options)[0], 400)
        self.assertEqual((self.jobs.describe()["expire_after"], self.jobs.describe()["retain"]), (0, 0))


class AgesJournalTest(JournalOverHttpTestCase):
    def test_a_key_window_holds_across_a_restart_and_a_compaction(self):
        self.addCleanup(setattr, K, "FINISHED_MEMORY", K.FINISHED_MEMORY)
        K.FINISHED_MEMORY = 0  # a discarded task is forgotten at once: only its key's window is left
        mail = self.broker.queue("mail", key_ttl=60000)
        first, = self.insert({"data": 1, "key": "k"}, queue="mail")
        mail.report([{"_id": mail.lease()[0]["_id"], "status": "done"}])
        self.check_reopened(lambda broker: self.assertEqual(
            broker.get("mail").insert({"data": 2, "key": "k"})["_id"], first))
        self.clock.advance(60000)
        self.assertTrue(self.reopen().get("mail").insert({"data": 2, "key": "k"})["created"])

    def test_ages_hold_across_a_restart_and_a_compaction(self):
        self.broker.queue("jobs", expire_after=60000, retain=60000)
        finished, waiting = self.insert({"data": 1}, {"data": 2})
        self.clock.advance(30000)
        self.assertEqual(self.lease_one()["_id"], finished)
        self.poll({"tasks": [{"_id": finished, "status": "done"}], "max": 0}, expect=204)
        self.check_reopened(lambda broker: self.assertEqual(
            (broker.get("jobs").task(waiting)["status"], broker.get("jobs").task(finished)["status"]),
            ("queued", "done")))
        self.clock.advance(30000)  # `waiting` has been due for 60 s; `finished` finished 30 s ago
        again = K.Broker(clock=self.clock, journal=self.path)
        jobs = again.get("jobs")
        self.assertEqual((jobs.task(waiting)["status"], jobs.task(waiting)["error"]), ("failed", "expired"))
        self.assertEqual(jobs.task(finished)["status"], "done")
        again.compact()
        again.close()
        self.clock.advance(30000)
        again = K.Broker(clock=self.clock, journal=self.path)
        self.addCleanup(again.close)
        with self.assertRaises(K.NotFound):
            again.get("jobs").task(finished)

class GroupTest(ServerTestCase):
    """Groups through HTTP: order and limits per group, turns among groups."""

    queue_options = {"persistent": True, "group_limit": 1, "backoff": 1000, "max_backoff": 1000}

    def test_ten_groups_of_fifty_with_eight_workers_finish_in_order_one_at_a_time_and_together(self):
        for group in range(10):  # one group after the other: first come would be first served, without turns
            self.insert(*[{"data": [group, n], "group": f"customer-{group}"} for n in range(50)])
        lock, running, received, violations, done_order = threading.Lock(), set(), {}, [], []

        def work(name):
            while True:
                status, tasks = self.poll({"worker": name, "max": 1})
                if status == 204:
                    return
                group, n = tasks[0]["data"]
                with lock:
                    if group in running:
                        violations.append(("two at once", group, n))
                    running.add(group)
                    received.setdefault(group, []).append(n)
                with lock:  # the work is done before its report leaves
                    running.discard(group)
                    done_order.append(group)
                self.poll({"tasks": [{"_id": tasks[0]["_id"], "status": "done"}], "max": 0}, expect=204)

        workers = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        self.assertEqual(violations, [])
        self.assertEqual({group: ns for group, ns in received.items()}, {group: list(range(50)) for group in range(10)})
        # Fairness, measured: at every point of the run, the groups' progress differs by less than a round of turns
        # (first come, first served would finish customer-0 first: a spread of 50). Threads finishing out of turn
        # make it a few; exact turns are checked one lease at a time in the test below.
        progress, spread = [0] * 10, 0
        for group in done_order:
            progress[group] += 1
            spread = max(spread, max(progress) - min(progress))
        self.assertLessEqual(spread, 10, "the groups progress together")

    def test_groups_take_their_turns_exactly_one_lease_at_a_time(self):
        for group in range(5):  # one group after the other
            self.insert(*[{"data": group, "group": f"g{group}"} for _ in range(4)])
        served = []
        while True:
            status, tasks = self.poll({"max": 1})
            if status == 204:
                break
            served.append(tasks[0]["data"])
            self.poll({"tasks": [{"_id": tasks[0]["_id"], "status": "done"}], "max": 0}, expect=204)
        self.assertEqual(served, [0, 1, 2, 3, 4] * 4)

    def failing_group(self, on_failure):
        self.broker.queue("jobs", group_on_failure=on_failure)
        first, second = self.insert({"data": "a", "group": "g"}, {"data": "b", "group": "g"})
        other, = self.insert({"data": "c", "group": "h"})
        task = self.lease_one(worker="w")
        self.assertEqual(task["_id"], first)
        self.poll({"tasks": [{"_id": first, "status": "failed", "error": "x"}], "max": 0}, expect=204)
        return first, second, other

    def test_block_keeps_a_groups_order_while_its_failed_task_waits_for_its_retry(self):
        first, second, other = self.failing_group("block")
        self.assertEqual(self.lease_one()["_id"], other)  # another group goes on
        self.assertEqual(self.poll({"max": 1})[0], 204)  # g waits for its retry
        self.clock.advance(1000)
        self.assertEqual(self.lease_one()["_id"], first)  # the retry, then the rest, in order
        self.poll({"tasks": [{"_id": first, "status": "done"}], "max": 0}, expect=204)
        self.assertEqual(self.lease_one()["_id"], second)

    def test_skip_lets_a_group_go_on_while_its_failed_task_waits(self):
        first, second, other = self.failing_group("skip")
        self.assertEqual({self.lease_one()["_id"] for _ in range(2)}, {second, other})
        self.clock.advance(1000)
        self.assertEqual(self.poll({"max": 1})[0], 204)  # the retry is due, but its group has one in progress
        self.poll({"tasks": [{"_id": second, "status": "done"}], "max": 0}, expect=204)
        self.assertEqual(self.lease_one()["_id"], first)

    def test_a_group_held_back_by_a_retry_goes_on_once_that_task_leaves_the_queue(self):
        self.broker.queue("jobs", backoff=600000, max_backoff=600000)
        for leave in ("cancel", "pause"):
            with self.subTest(leave=leave):
                first, second = self.insert({"data": 1, "group": leave}, {"data": 2, "group": leave})
                self.assertEqual(self.lease_one()["_id"], first)
                self.poll({"tasks": [{"_id": first, "status": "failed", "error": "x"}], "max": 0}, expect=204)
                self.assertEqual(self.poll({"max": 1})[0], 204)  # held back by the retry, 10 minutes away
                if leave == "cancel":
                    self.call("DELETE", f"/v1/queue/jobs/tasks/{first}")
                else:
                    self.call("PATCH", f"/v1/queue/jobs/tasks/{first}", {"status": "paused"})
                task = self.lease_one()
                self.assertEqual(task["_id"], second)
                self.poll({"tasks": [{"_id": second, "status": "done"}], "max": 0}, expect=204)

    def test_a_retry_that_came_due_keeps_its_place_when_a_change_serves_a_waiting_poll(self):
        self.broker.queue("jobs", backoff=1000, max_backoff=1000)
        for change in ("insert", "resume"):
            with self.subTest(change=change):
                first, second = [t["_id"] for t in self.jobs.insert([{"data": 1, "group": change},
                                                                      {"data": 2, "group": change}])]
                self.jobs.lease()
                self.jobs.report([{"_id": first, "status": "failed", "error": "x"}])
                if change == "resume":
                    self.broker.queue("jobs", paused=True)
                waiter = self.jobs.begin_poll((), max=5, wait=60000, wake=lambda: None)
                self.clock.advance(1000)  # the retry is due; nothing has run the clock since
                if change == "insert":
                    self.jobs.insert({"data": 3, "group": change})
                else:
                    self.broker.queue("jobs", paused=False)
                self.assertEqual([t["_id"] for t in self.jobs.end_wait(waiter)], [first])
                self.jobs.report([{"_id": first, "status": "done"}])
                for task in self.jobs.lease(max=5):
                    self.jobs.report([{"_id": task["_id"], "status": "done"}])
                self.jobs.purge("queued")

    def test_a_group_freed_with_nobody_polling_is_an_unattended_backlog(self):
        first, second = self.insert({"data": 1, "group": "g"}, {"data": 2, "group": "g"})
        self.lease_one()
        self.assertEqual(self.poll({"max": 1})[0], 204)  # the group is held: nothing due for anyone
        self.jobs.report([{"_id": first, "status": "done"}])  # freed, through the API: no poll
        self.clock.advance(60000)
        self.assertEqual(self.jobs.unattended_ms(), 60000)

    def test_changed_group_options_let_waiting_groups_go_on_at_once(self):
        self.broker.queue("jobs", backoff=600000, max_backoff=600000)
        first, second, third = self.insert(*[{"data": n, "group": "g"} for n in range(3)])
        self.lease_one()
        self.poll({"tasks": [{"_id": first, "status": "failed", "error": "x"}], "max": 0}, expect=204)
        self.assertEqual(self.poll({"max": 1})[0], 204)
        self.broker.queue("jobs", group_on_failure="skip")
        self.assertEqual(self.lease_one()["_id"], second)
        self.assertEqual(self.poll({"max": 1})[0], 204)  # one in progress: the limit
        self.broker.queue("jobs", group_limit=2)
        self.assertEqual(self.lease_one()["_id"], third)

    def test_groups_take_turns_with_ungrouped_tasks_and_a_limit_above_one(self):
        self.broker.queue("jobs", group_limit=2)
        busy = self.insert(*[{"data": n, "group": "busy"} for n in range(6)])
        quiet, = self.insert({"data": "q", "group": "quiet"})
        plain, = self.insert({"data": "p"})
        status, tasks = self.poll({"max": 10}, expect=200)
        self.assertEqual([t["_id"] for t in tasks], [busy[0], quiet, plain, busy[1]])  # turns, then busy's limit
        self.assertEqual(self.counts()["in progress"], 4)

    def test_bad_group_input_is_refused(self):
        for body in ({"data": 1, "group": 5}, {"data": 1, "group": "x" * 257}, {"data": 1, "group": None},
                     {"data": 1, "group": ["a"]}, {"data": 1, "group": ""}):
            with self.subTest(body=str(body)[:60]):
                self.assertEqual(self.call("POST", "/v1/queue/jobs/tasks", body)[0], 400)
        for options in ({"group_limit": -1}, {"group_limit": "1"}, {"group_on_failure": "wait"},
                        {"group_on_failure": None}, {"group_limit": 10 ** 7}):
            with self.subTest(options=options):
                self.assertEqual(self.call("PUT", "/v1/queue/jobs", options)[0], 400)
        self.assertEqual(self.counts()["queued"], 0)


class GroupJournalTest(JournalOverHttpTestCase):
    def test_groups_and_their_limits_hold_across_a_restart_and_a_compaction(self):
        self.broker.queue("jobs", group_limit=1)
        first, second = self.insert({"data": 1, "group": "g"}, {"data": 2, "group": "g"})
        self.assertEqual(self.lease_one()["_id"], first)

        def check(broker):
            self.assertEqual(broker.get("jobs").task(second)["group"], "g")
            self.assertEqual(broker.get("jobs").lease(), [])  # g has one in progress still
        self.check_reopened(check)
        jobs = self.reopen().get("jobs")
        jobs.report([{"_id": first, "status": "done"}])
        self.assertEqual(jobs.lease()[0]["_id"], second)


# ---------------------------------------------------------------------------------------------------------------
# Cron expressions (for schedules, issue 15)
# ---------------------------------------------------------------------------------------------------------------

class CronTest(unittest.TestCase):
    @staticmethod
    def ms(text):
        return int(datetime.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(
            tzinfo=datetime.timezone.utc).timestamp() * 1000)

    def test_next_fire_times_as_vixie_cron_reads_the_fields(self):
        # (expression, after, the next fire time): 1 December 2026 is a Tuesday.
        table = [
            ("*/5 * * * *", "2026-12-01 10:03", "2026-12-01 10:05"),
            ("*/5 * * * *", "2026-12-01 10:05", "2026-12-01 10:10"),  # strictly after
            ("0 9 * * mon-fri", "2026-12-05 10:00", "2026-12-07 09:00"),  # names, a range
            ("0 9 * * MON-FRI", "2026-12-04 08:59", "2026-12-04 09:00"),  # any case
            ("0 12 * * 7", "2026-12-01 00:00", "2026-12-06 12:00"),  # Sunday as 7
            ("0 12 * * 0", "2026-12-01 00:00", "2026-12-06 12:00"),  # and as 0
            ("0 0 29 feb *", "2026-03-01 00:00", "2028-02-29 00:00"),  # a leap day, years away
            ("0 0 13 * 5", "2026-12-01 00:00", "2026-12-04 00:00"),  # both days named: either (Friday 4th)
            ("0 0 13 * 5", "2026-12-05 00:00", "2026-12-11 00:00"),
            ("0 0 */2 * 5", "2026-12-01 00:00", "2026-12-11 00:00"),  # day of month starts with *: both
            ("0 0 29 2 1", "2026-01-01 00:00", "2026-02-02 00:00"),  # a Monday of February, or the 29th
            ("30 4 1,15 * *", "2026-12-01 04:30", "2026-12-15 04:30"),  # a list
            ("15-45/10 * * * *", "2026-12-01 10:40", "2026-12-01 10:45"),  # a range with a step
            ("50/5 * * * *", "2026-12-01 10:56", "2026-12-01 11:50"),  # a start with a step: 50, 55
            ("0 0 1 jan *", "2026-12-01 00:00", "2027-01-01 00:00"),
            ("59 23 31 dec *", "2026-12-31 23:58", "2026-12-31 23:59"),
        ]
        for expression, after, expected in table:
            with self.subTest(expression=expression, after=after):
                self.assertEqual(K.next_fire(K.parse_cron(expression), self.ms(after)), self.ms(expected))

    def test_a_fixed_utc_offset_reads_the_fields_on_that_clock(self):
        nine_in_paris = K.next_fire(K.parse_cron("0 9 * * *"), self.ms("2026-12-01 00:00"), utc_offset_minutes=60)
        self.assertEqual(nine_in_paris, self.ms("2026-12-01 08:00"))

    def test_an_expression_that_never_fires_has_no_next_time(self):
        self.assertIsNone(K.next_fire(K.parse_cron("0 0 31 feb *"), self.ms("2026-12-01 00:00")))

    def test_bad_expressions_are_refused_naming_the_field_and_the_part(self):
        cases = [("* * * *", "5"), ("60 * * * *", "minute 60"), ("* 24 * * *", "hour 24"), ("* * 0 * *", "day of month"),
                 ("* * * 13 *", "month 13"), ("* * * * 8", "day of week 8"), ("*/0 * * * *", "step"),
                 ("5-1 * * * *", "backwards"), ("x * * * *", "'x'"), ("* * * foo *", "'foo'"), ("1,,2 * * * *", "''"),
                 ("* * * * * *", "6"), ("１ * * * *", "not a number"), (5, "string"), ("", "0 fields")]
        for expression, named in cases:
            with self.subTest(expression=expression):
                with self.assertRaises(K.BadRequest) as refused:
                    K.parse_cron(expression, "schedules[0].cron")
                self.assertIn(named, str(refused.exception))
                self.assertEqual(refused.exception.fields["field"], "schedules[0].cron")


# ---------------------------------------------------------------------------------------------------------------
# Schedules: periodic tasks that fire once per slot, across restarts
# ---------------------------------------------------------------------------------------------------------------

MIDNIGHT = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc).timestamp()  # a Tuesday


def slot_keys(queue, name):
    """The slots (ms since the epoch) of the tasks schedule `name` inserted into `queue`, in order of insertion."""
    keys = [task["key"] for task in queue.tasks(limit=1000)["tasks"] if (task["key"] or "").startswith("schedule:")]
    prefix = f"schedule:{name}:"
    return [int(datetime.datetime.strptime(key[len(prefix):], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000) for key in keys if key.startswith(prefix)]


class ScheduleTest(unittest.TestCase):
    """The core's schedules with a fake clock, and a journal where restarts matter."""

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "tasks.journal")
        self.clock = FakeClock(MIDNIGHT - 30)

    def open(self, journal=True):
        broker = K.Broker(clock=self.clock, journal=self.path if journal else None)
        self.addCleanup(broker.close)
        return broker

    def minutes(self, broker, minutes, step_ms=37000):
        """Let `minutes` pass in uneven steps, running the schedules after each, as the server's timer would."""
        end = self.clock.elapsed + minutes * 60
        while self.clock.elapsed < end:
            self.clock.advance(min(step_ms, (end - self.clock.elapsed) * 1000))
            broker.run_schedules()

    def test_every_five_minutes_fires_each_slot_of_a_day_exactly_once_and_on_time(self):
        broker = self.open(journal=False)
        queue = broker.queue("jobs", persistent=True, schedules=[{"name": "five", "cron": "*/5 * * * *",
                                                                  "data": {"report": True}, "priority": "high"}])
        self.minutes(broker, 24 * 60 + 1)
        slots = slot_keys(queue, "five")
        day = int(MIDNIGHT * 1000)
        self.assertEqual(slots, [day + n * 300000 for n in range(288)] + [day + 86400000])
        for task in queue.tasks(limit=1000)["tasks"]:
            self.assertEqual((task["data"], task["priority"]), ({"report": True}, 10))
        created = {task["key"]: task["created_at"] for task in queue.tasks(limit=1000)["tasks"]}
        lateness = [created[f"schedule:five:{K.slot_name(slot)}"] - slot for slot in slots]
        self.assertTrue(all(0 <= late < 37000 for late in lateness), max(lateness))  # within one step of the slot
        next_fire = queue.stats()["schedules"][0]
        self.assertEqual(next_fire["next_fire_ms"], day + 86400000 + 300000)
        self.assertEqual(next_fire["next_fire"], "2026-12-02T00:05:00.000Z")

    def test_the_server_asks_for_the_moment_of_the_next_slot_not_a_polling_interval(self):
        broker = self.open(journal=False)
        broker.queue("jobs", schedules=[{"name": "nightly", "cron": "0 3 * * *"}])
        self.assertAlmostEqual(broker.run_schedules(), 3 * 3600 + 30, delta=0.01)
        broker.queue("other", schedules=[{"name": "often", "every": 7000}])
        self.assertLessEqual(broker.run_schedules(), 7.0)

    def test_a_new_schedule_starts_now_and_a_retimed_one_does_not_run_its_past(self):
        broker = self.open(journal=False)
        queue = broker.queue("jobs", persistent=True, schedules=[{"name": "hourly", "cron": "0 * * * *"}])
        self.minutes(broker, 90)  # 00:00 and 01:00
        self.assertEqual(len(slot_keys(queue, "hourly")), 2)
        queue.configure(schedules=[{"name": "hourly", "cron": "* * * * *"}])  # every minute from now on
        broker.run_schedules()
        self.assertEqual(len(slot_keys(queue, "hourly")), 2, "the minutes before the change are not missed runs")
        self.minutes(broker, 3)
        self.assertEqual(len(slot_keys(queue, "hourly")), 5)
        queue.configure(schedules=[])
        self.minutes(broker, 3)
        self.assertEqual(len(slot_keys(queue, "hourly")), 5)
        self.assertNotIn("schedules", queue.stats())

    def test_a_restart_in_the_middle_of_a_due_slot_fires_it_once(self):
        schedules = [{"name": "five", "cron": "*/5 * * * *"}]
        self.clock.advance(30000 + 240000)  # 00:04
        broker = self.open()
        broker.queue("jobs", persistent=True, schedules=schedules)
        self.clock.advance(62000)  # 00:05:02: the slot is due, the timer has not rung yet
        broker.close()  # the server stops before it runs the slot, and comes back 20 s later
        self.clock.advance(20000)
        broker = self.open()
        broker.run_schedules()
        broker.run_schedules()
        self.assertEqual(slot_keys(broker.get("jobs"), "five"), [int(MIDNIGHT * 1000) + 300000])
        broker.close()  # it stops again, just after running the slot: the slot is not run a second time
        for compact in (False, True):
            broker = self.open()
            if compact:
                broker.compact()
                broker.close()
                broker = self.open()
            broker.run_schedules()
            self.assertEqual(slot_keys(broker.get("jobs"), "five"), [int(MIDNIGHT * 1000) + 300000])
            broker.close()

    def test_slots_missed_in_an_outage_of_three_hours_are_skipped_run_once_or_all_run(self):
        policies = {"skip": [], "once": ["02:55"], "all": None}
        broker = self.open()
        for missed in policies:
            broker.queue(missed, persistent=True,
                         schedules=[{"name": "five", "cron": "*/5 * * * *", "missed": missed}])
        self.minutes(broker, 1)  # 00:00 runs
        broker.close()
        self.clock.advance(3 * 3600 * 1000)  # down from 00:00:30 to 03:00:30: 00:05 to 03:00 are missed
        broker = self.open()
        broker.run_schedules()
        day = int(MIDNIGHT * 1000)
        at = lambda hhmm: day + int(hhmm[:2]) * 3600000 + int(hhmm[3:]) * 60000  # noqa: E731
        self.assertEqual(slot_keys(broker.get("skip"), "five"), [day, at("03:00")])  # 03:00 is on time
        self.assertEqual(slot_keys(broker.get("once"), "five"), [day, at("02:55"), at("03:00")])
        self.assertEqual(slot_keys(broker.get("all"), "five"), [day + n * 300000 for n in range(37)])
        for missed in policies:
            self.assertEqual(broker.get(missed).stats()["schedules"][0]["next_fire"], "2026-12-01T03:05:00.000Z")
        self.minutes(broker, 5)
        self.assertEqual(slot_keys(broker.get("skip"), "five")[-1], at("03:05"))

    def test_missed_all_runs_at_most_the_latest_thousand_slots(self):
        broker = self.open(journal=False)
        queue = broker.queue("jobs", persistent=True, schedules=[{"name": "second", "every": 1000, "missed": "all"}])
        self.clock.advance(3 * 3600 * 1000)  # 10,800 slots late
        broker.run_schedules()
        slots = slot_keys(queue, "second")
        self.assertEqual(len(slots), K.MAX_MISSED_RUNS)
        self.assertEqual(slots[-1], self.clock.ms // 1000 * 1000)
        self.assertEqual(slots, sorted(set(slots)))

    def test_a_full_queue_holds_a_slot_back_until_it_has_room_then_missed_decides(self):
        broker = self.open(journal=False)
        queue = broker.queue("jobs", persistent=True, max_queued=1,
                             schedules=[{"name": "minute", "cron": "* * * * *", "missed": "skip"}])
        self.minutes(broker, 1, step_ms=1000)  # 00:00 runs and fills the queue
        self.assertEqual(len(slot_keys(queue, "minute")), 1)
        self.clock.advance(30000)
        self.assertEqual(broker.run_schedules(), K.SCHEDULE_RETRY_MS / 1000.0)  # 00:01 waits for room
        self.clock.advance(10000)
        queue.lease()
        broker.run_schedules()
        self.assertEqual(len(slot_keys(queue, "minute")), 2, "00:01, 10 s late, is still on time")
        self.assertEqual(queue.stats()["totals"]["refused"], 0)  # a slot waiting is not a producer refused

    def test_tasks_of_a_slot_wake_a_long_poll(self):
        broker = self.open(journal=False)
        queue = broker.queue("jobs", schedules=[{"name": "minute", "cron": "* * * * *", "data": "tick"}])
        woken = []
        waiter = queue.begin_poll(wait=120000, wake=lambda: woken.append(1))
        self.clock.advance(30000)
        broker.run_schedules()
        self.assertEqual(woken, [1])
        self.assertEqual([task["data"] for task in queue.end_wait(waiter)], ["tick"])

    def test_bad_schedules_are_refused_naming_the_field_and_change_nothing(self):
        broker = self.open(journal=False)
        queue = broker.queue("jobs", schedules=[{"name": "keep", "every": 60000}])
        cases = [
            ("not a list", "schedules must be a list"), ([1], "schedules[0] must be an object"),
            ([{"name": "a"}], "either cron"), ([{"name": "a", "cron": "* * * * *", "every": 1000}], "either cron"),
            ([{"name": "a", "cron": "61 * * * *"}], "schedules[0].cron: minute 61"),
            ([{"name": "a", "cron": "* * * * mon-xyz"}], "schedules[0].cron"),
            ([{"name": "a", "every": 999}], "schedules[0].every"), ([{"name": "a", "every": "60"}], "every"),
            ([{"name": "a", "every": 1e999}], "every"), ([{"name": "", "every": 1000}], "schedules[0].name"),
            ([{"name": "a/b", "every": 1000}], "name"), ([{"name": "x" * 101, "every": 1000}], "name"),
            ([{"name": "a", "every": 1000}, {"name": "a", "every": 2000}], "schedules[1].name 'a' is taken"),
            ([{"name": "a", "every": 1000, "missed": "twice"}], "schedules[0].missed"),
            ([{"name": "a", "every": 1000, "utc_offset": 1440}], "utc_offset"),
            ([{"name": "a", "every": 1000, "priority": "urgent"}], "schedules[0].priority"),
            ([{"name": "a", "every": 1000, "data": float("nan")}], "data"),
            ([{"name": "a", "every": 1000, "when": 1}], "unknown field 'when'"),
            ([{"name": f"s{n}", "every": 1000} for n in range(K.MAX_SCHEDULES + 1)], "at most"),
            ([{"name": None, "every": 1000}], "name"), ([{"name": "a", "cron": None}], "cron must be a string"),
            ([{"name": "a", "cron": "0 0 31 2 *"}], "never fires"), ([{"name": "a", "cron": "0 0 30,31 feb *"}], "never"),
        ]
        for schedules, named in cases:
            with self.subTest(schedules=str(schedules)[:60]):
                with self.assertRaises(K.BadRequest) as refused:
                    queue.configure(schedules=schedules)
                self.assertIn(named, str(refused.exception))
        self.assertEqual(queue.describe()["schedules"][0]["name"], "keep")
        self.assertEqual(len(queue.describe()["schedules"]), 1)


class QueueUndoTest(unittest.TestCase):
    def test_a_queue_whose_making_fails_is_undone_and_the_journal_goes_on(self):
        # (found by an adversarial pass: the undo of a queue never made failed, and failed the journal)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        broker = K.Broker(journal=os.path.join(directory, "tasks.journal"))
        self.addCleanup(broker.close)
        jobs = broker.queue("jobs")
        original = K.make_schedule

        def fail(option):
            raise MemoryError("injected")
        K.make_schedule = fail
        try:
            with self.assertRaises(K.Unavailable):
                broker.queue("new", schedules=[{"name": "s", "every": 1000}])
        finally:
            K.make_schedule = original
        self.assertNotIn("new", broker)
        self.assertIsNone(broker.health())
        jobs.insert({"data": 1})
        self.assertEqual(jobs.stats()["counts"]["queued"], 1)


class ScheduleOverHttpTest(ServerTestCase):
    real_clock = True

    def test_put_sets_schedules_and_stats_metrics_and_the_description_show_the_next_fire(self):
        status, queue, _ = self.call("PUT", "/v1/queue/jobs", {"schedules": [
            {"name": "nightly", "cron": "0 3 * * *", "data": {"kind": "report"}, "utc_offset": 60}]})
        self.assertEqual(status, 200)
        self.assertEqual(queue["schedules"], [{"name": "nightly", "cron": "0 3 * * *", "data": {"kind": "report"},
                                               "priority": 0, "missed": "once", "utc_offset": 60}])
        stats = self.call("GET", "/v1/queue/jobs/stats")[1]["schedules"][0]
        expected = K.next_fire(K.parse_cron("0 3 * * *"), int(time.time() * 1000), 60)
        self.assertEqual(stats["next_fire_ms"], expected)
        self.assertTrue(stats["next_fire"].endswith("T02:00:00.000Z"), stats)
        metrics = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        self.assertIn(f'katar_schedule_next_fire_timestamp_seconds{{queue="jobs",schedule="nightly"}} '
                      f'{expected / 1000.0}', metrics)

    def test_an_every_schedule_fires_through_the_server_timer_without_requests(self):
        self.call("PUT", "/v1/queue/jobs", {"persistent": True, "schedules": [{"name": "tick", "every": 1000}]})
        asked = time.time()
        until(self, lambda: slot_keys(self.broker.get("jobs"), "tick"), "a slot of a 1 s schedule")
        slot = slot_keys(self.broker.get("jobs"), "tick")[0]
        self.assertEqual((slot % 1000, slot > asked * 1000), (0, True))
        task = self.broker.get("jobs").tasks()["tasks"][0]
        self.assertLess(task["created_at"] - slot, 500, "inserted at its slot, not at a polling interval")

    def test_bad_schedules_are_400_naming_the_field(self):
        deep = json.loads("[" * 200 + "]" * 200)
        self.assertEqual(self.call("PUT", "/v1/queue/jobs", {"schedules": [{"name": "a", "every": 1000,
                                                                             "data": deep}]})[0], 400)
        self.assertEqual(self.call("PUT", "/v1/queue/jobs", {"schedules": [{"name": "a", "every": 1000,
                                                                             "data": "x" * 70000}]})[0], 413)
        for schedules, field in [([{"name": "a", "cron": "* * 32 * *"}], "schedules[0].cron"),
                                 ([{"name": "a"}], "schedules[0]"), ("x", "schedules")]:
            status, payload, _ = self.call("PUT", "/v1/queue/jobs", {"schedules": schedules})
            self.assertEqual(status, 400)
            self.assertEqual(payload.get("field"), field, payload)
        self.assertEqual(self.call("GET", "/v1/queue/jobs/stats")[1].get("schedules"), None)


class ScheduleCrashTest(unittest.TestCase):
    def test_a_one_second_schedule_runs_every_slot_once_across_kill_9(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "queues.json"), "w") as handle:
            json.dump({"queues": {"jobs": {"persistent": True,
                                           "schedules": [{"name": "tick", "every": 1000, "missed": "all"}]}}}, handle)
        process, url = start_journalled_server(self, directory)
        client = K.Client(url)
        self.addCleanup(client.close)

        def slots():
            tasks = client.request("GET", "/v1/queue/jobs/tasks?limit=1000")[1]["tasks"]
            return [task["key"] for task in tasks]

        until(self, lambda: len(slots()) >= 1, "a slot")
        process.kill()  # kill -9
        process.wait()
        down = time.time()
        time.sleep(1.05 - down % 1)  # a slot comes while it is down: missed "all" runs it after the restart
        client.close()
        process, url = start_journalled_server(self, directory)
        client = K.Client(url)
        self.addCleanup(client.close)
        before = len(slots())
        until(self, lambda: len(slots()) >= before + 1, "a slot after the restart")
        keys = slots()
        self.assertEqual(len(keys), len(set(keys)), "no slot ran twice")
        stamps = [datetime.datetime.strptime(key.split(":", 2)[2], "%Y-%m-%dT%H:%M:%S.%fZ") for key in keys]
        self.assertEqual(sorted(stamps), stamps)
        gaps = {(later - earlier).total_seconds() for earlier, later in zip(stamps, stamps[1:])}
        self.assertEqual(gaps, {1.0}, f"no slot went missing across the kill: {keys}, {before} before the first slot after the restart")


# ---------------------------------------------------------------------------------------------------------------
# One poll over several queues
# ---------------------------------------------------------------------------------------------------------------

class MultiPollTest(ServerTestCase):
    real_clock = True
    queue_options = {"persistent": True}

    def setUp(self):
        super().setUp()
        for name in ("critical", "default", "low"):
            self.broker.queue(name, persistent=True)

    def multi(self, body, expect=None, headers=None):
        status, payload, _ = self.call("POST", "/v1/poll", body, headers=headers)
        if expect is not None:
            self.assertEqual(status, expect, payload)
        return status, payload

    def test_strict_order_holds_under_load(self):
        # Eight workers poll critical, then default, then low, while a producer keeps adding to critical: no task
        # of a later queue is leased while a task of an earlier one was due and waiting.
        for name in ("critical", "default", "low"):
            self.insert(*[{"data": n} for n in range(150)], queue=name)
        produced = threading.Event()

        def worker(number):
            client = K.Client(self.url)
            try:
                while True:
                    tasks, _ = client.poll(["critical", "default", "low"], max=3, worker=f"w{number}", wait=100)
                    if not tasks and produced.is_set():
                        return
                    order = [["critical", "default", "low"].index(task["queue"]) for task in tasks]
                    if order != sorted(order):
                        errors.append(order)
                    client.report(["critical", "default", "low"],
                                  [{"_id": task["_id"], "status": "done"} for task in tasks])
            finally:
                client.close()

        def producer():
            client = K.Client(self.url)
            for n in range(40):
                client.insert("critical", [{"data": f"late {n}"}])
                time.sleep(0.005)
            client.close()
            produced.set()

        errors = []
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)] + [threading.Thread(target=producer)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(errors, [], "each answer lists its tasks in the queues' order")
        tasks = {name: self.broker.get(name).tasks(limit=1000)["tasks"] for name in ("critical", "default", "low")}
        self.assertTrue(all(task["status"] == "done" for listed in tasks.values() for task in listed))
        leased_at = {name: [task["history"][0]["leased_at"] for task in listed] for name, listed in tasks.items()}
        for earlier, later in (("critical", "default"), ("default", "low")):
            for task in tasks[earlier]:
                # Leased after the first of `later` only if it was made after it (the producer's late tasks).
                if task["history"][0]["leased_at"] > min(leased_at[later]):
                    self.assertGreaterEqual(task["created_at"], min(leased_at[later]), (earlier, task["data"]))
        self.assertEqual(len(tasks["critical"]), 190)

    def test_weights_share_the_leases_within_ten_percent_over_ten_thousand(self):
        for name in ("critical", "default"):
            self.broker.get(name).insert([{"data": n} for n in range(10000)])
        counts = collections.Counter()
        for _ in range(10000):
            for task in self.broker.poll({"critical": 3, "default": 1}):
                counts[task["queue"]] += 1
        self.assertEqual(sum(counts.values()), 10000)
        self.assertLess(abs(counts["critical"] - 7500), 750, counts)
        self.assertLess(abs(counts["default"] - 2500), 250, counts)
        # And through HTTP, with max: the queue drawn first gives what it has, the other the rest.
        status, payload = self.multi({"queues": {"critical": 1, "default": 1000000}, "max": 4}, expect=200)
        self.assertEqual(len(payload["tasks"]), 4)

    def test_one_long_poll_over_three_queues_is_woken_by_an_insert_into_any(self):
        for name in ("critical", "default", "low"):
            answers = []
            poller = threading.Thread(target=lambda: answers.append(self.multi(
                {"queues": ["critical", "default", "low"], "wait": 5000, "worker": "w"})))
            started = time.monotonic()
            poller.start()
            until(self, lambda: all(self.broker.get(n).stats()["waiting_workers"] == 1
                                    for n in ("critical", "default", "low")), "the poll parked in all three")
            self.insert({"data": name}, queue=name)
            poller.join(5)
            self.assertLess(time.monotonic() - started, 3.0)
            status, payload = answers[0]
            self.assertEqual((status, [(t["queue"], t["data"]) for t in payload["tasks"]]), (200, [(name, name)]))
            self.assertEqual([self.broker.get(n).stats()["waiting_workers"] for n in ("critical", "default", "low")],
                             [0, 0, 0], "answered by one queue, it left the lines of the others")
        status, payload = self.multi({"queues": ["critical", "low"], "wait": 200})  # nothing comes: 204 in time
        self.assertEqual(status, 204)

    def test_a_cancel_in_any_queue_answers_a_named_workers_long_poll_at_once(self):
        task_id = self.insert({"data": "x"}, queue="low")[0]
        self.multi({"queues": ["critical", "low"], "worker": "w"}, expect=200)
        answers = []
        poller = threading.Thread(target=lambda: answers.append(self.multi(
            {"queues": ["critical", "low"], "wait": 5000, "worker": "w"})))
        poller.start()
        until(self, lambda: self.broker.get("critical").stats()["waiting_workers"] == 1, "the poll parked")
        self.call("DELETE", f"/v1/queue/low/tasks/{task_id}")
        poller.join(5)
        self.assertEqual(answers[0], (200, {"tasks": [], "cancel": [task_id]}))

    def test_reports_name_tasks_of_any_queue_all_or_none(self):
        a = self.insert({"data": "a"}, queue="critical")[0]
        b = self.insert({"data": "b"}, queue="default")[0]
        status, payload = self.multi({"queues": ["critical", "default"], "max": 2}, expect=200)
        self.assertEqual({t["_id"] for t in payload["tasks"]}, {a, b})
        # b's report names a delivery it never had: 409, and a's done is not applied either.
        status, payload = self.multi({"queues": ["critical", "default"], "max": 0, "tasks": [
            {"_id": a, "status": "done"}, {"_id": b, "status": "done", "attempt": 2}]}, expect=409)
        self.assertEqual(self.broker.get("critical").task(a)["status"], "in progress")
        self.multi({"queues": ["default", "critical"], "max": 0, "tasks": [
            {"_id": a, "status": "done", "result": 1}, {"_id": b, "status": "failed", "error": "no", "retry": False}]},
            expect=204)
        self.assertEqual((self.broker.get("critical").task(a)["status"], self.broker.get("default").task(b)["status"]),
                         ("done", "failed"))
        # A task of a queue the poll does not name is unknown to it.
        c = self.insert({"data": "c"}, queue="low")[0]
        self.broker.get("low").lease()
        status, payload = self.multi({"queues": ["critical"], "tasks": [{"_id": c, "status": "done"}]}, expect=404)
        self.assertEqual(payload["ids"], [c])
        self.assertEqual(self.broker.get("low").task(c)["status"], "in progress")

    def test_a_worker_token_for_one_queue_is_refused_on_the_others(self):
        self.server.httpd.access = K.Access([ADMIN], {WORKER: ["critical"]})
        self.broker.get("default").insert({"data": "d"})
        mine = {"Authorization": f"Bearer {WORKER}"}
        self.multi({"queues": ["critical"], "wait": 0}, expect=204, headers=mine)
        for queues in (["critical", "default"], {"default": 1}, ["low"], ["nowhere"]):
            status, payload = self.multi({"queues": queues}, expect=403, headers=mine)
            self.assertIn("not for queue", payload["error"])
        self.assertEqual(self.broker.get("default").stats()["counts"]["queued"], 1)
        self.multi({"queues": ["critical", "default"]}, expect=200, headers={"Authorization": f"Bearer {ADMIN}"})

    def test_hostile_polls_are_400_and_change_nothing(self):
        self.insert({"data": "keep"}, queue="critical")
        cases = [{}, {"queues": []}, {"queues": "critical"}, {"queues": None}, {"queues": [1]},
                 {"queues": ["critical", "critical"]}, {"queues": ["critical"] + [f"q{n}" for n in range(40)]},
                 {"queues": {"critical": 0}}, {"queues": {"critical": -1}}, {"queues": {"critical": "3"}},
                 {"queues": {"critical": True}}, {"queues": {"critical": 1e999}}, {"queues": {"critical": 10 ** 7}},
                 {"queues": ["bad/name"]}, {"queues": ["critical"], "throttle": 1000},
                 {"queues": ["critical"], "max": "1"}, {"queues": ["critical"], "max": -1},
                 {"queues": ["critical"], "wait": -5}, {"queues": ["critical"], "tasks": "x"},
                 {"queues": ["critical"], "tasks": [{"_id": 5, "status": "done"}]},
                 {"queues": ["critical"], "worker": ["w"]}, {"queues": ["critical"], "lease": 0},
                 {"queues": {"critical": float("nan")}}]
        for body in cases:
            with self.subTest(body=str(body)[:80]):
                raw = json.dumps(body).replace("Infinity", "1e999").encode()
                status, payload, _ = self.call("POST", "/v1/poll", raw=raw,
                                               headers={"Content-Type": "application/json"})
                self.assertIn(status, (400, 404), payload)
                self.assertIn("error", payload)
        self.assertEqual(self.broker.get("critical").stats()["counts"]["queued"], 1)
        self.assertEqual(self.multi({"queues": ["nowhere", "critical"]}, expect=404)[1]["queue"], "nowhere")


class WorkSeveralQueuesTest(WorkTestCase):
    def test_work_serves_several_queues_in_order_and_tells_the_command_its_queue(self):
        self.broker.queue("urgent", persistent=True)
        for queue in ("jobs", "urgent"):
            self.broker.get(queue).insert([{"data": f"{queue} {n}"} for n in range(3)])
        out = os.path.join(self.directory, "out")
        process = subprocess.Popen([*KATAR, "work", self.server.url,
                                    "urgent,jobs", "--wait", "200", "--", "sh", "-c",
                                    f'echo "$KATAR_QUEUE $(cat)" >> {out}.both'], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(stop_process, process)
        until(self, lambda: all(self.broker.get(q).stats()["counts"]["done"] == 3 for q in ("jobs", "urgent")),
              "both queues worked off")
        with open(out + ".both") as handle:
            lines = handle.read().splitlines()
        self.assertEqual(len(lines), 6)
        self.assertTrue(all(line.split(" ", 1)[0] == json.loads(line.split(" ", 1)[1]).split()[0] for line in lines),
                        lines)
        self.assertEqual([line for line in lines if line.startswith("urgent")], lines[:len(
            [line for line in lines if line.startswith("urgent")])], "urgent before jobs")


# ---------------------------------------------------------------------------------------------------------------
# Batches: one callback when a set of tasks has ended
# ---------------------------------------------------------------------------------------------------------------

def callbacks(broker, queue="reports"):
    """The callback tasks in `queue`: their data."""
    return [task["data"] for task in broker.get(queue).tasks(limit=1000)["tasks"]
            if (task["key"] or "").startswith("batch:")]


def work_off(queue, failing):
    """Lease every task of `queue` and report each done, but those whose data is in `failing` failed for good."""
    while True:
        tasks = queue.lease(max=100)
        if not tasks:
            return
        queue.report([{"_id": t["_id"], "status": "failed", "error": "bad", "retry": False} if t["data"] in failing
                      else {"_id": t["_id"], "status": "done"} for t in tasks])


class BatchTest(unittest.TestCase):
    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "tasks.journal")

    def open(self):
        broker = K.Broker(journal=self.path)
        self.addCleanup(broker.close)
        return broker

    def test_five_hundred_tasks_fifty_failing_give_one_callback_with_the_counts(self):
        broker = self.open()
        jobs = broker.queue("jobs", persistent=True)
        broker.queue("reports", persistent=True)
        ids = [r["_id"] for r in jobs.insert([{"data": n} for n in range(500)],
                                             batch={"id": "b1", "callback": {"queue": "reports", "data": "hi"}})]
        failing = set(range(0, 500, 10))
        work_off(jobs, failing)
        self.assertEqual(callbacks(broker), [{"batch": "b1", "counts": {"done": 450, "failed": 50, "cancelled": 0},
                                              "failed": [ids[n] for n in sorted(failing)], "data": "hi"}])
        view = broker.batch("b1")
        self.assertEqual((view["ended"], view["counts"]["pending"], view["callback"]["task"] is not None),
                         (True, 0, True))
        broker.close()
        for compact in (False, True, False):  # replayed, compacted, read back compacted: still one callback
            again = self.open()
            self.assertEqual(len(callbacks(again)), 1)
            self.assertEqual(again.batch("b1"), view)
            if compact:
                again.compact()
            again.close()

    def test_a_crash_between_the_last_end_and_the_callback_inserts_it_once_at_restart(self):
        broker = self.open()
        jobs = broker.queue("jobs", persistent=True)
        broker.queue("reports", persistent=True)
        jobs.insert([{"data": n} for n in range(500)], batch={"id": "b1", "callback": {"queue": "reports"}})
        work_off(jobs, set(range(50)))
        broker.close()
        # What kill -9 leaves when it strikes between the two changes: the journal without the callback's.
        with open(self.path, "rb") as handle:
            lines = handle.read().splitlines(keepends=True)
        cut = next(index for index, line in enumerate(lines) if b'"op":"insert","q":"reports"' in line)
        self.assertIn(b'"op":"callback"', lines[cut + 1])
        with open(self.path, "wb") as handle:
            handle.writelines(lines[:cut])
        for _ in range(3):
            again = self.open()
            self.assertEqual([data["counts"] for data in callbacks(again)],
                             [{"done": 450, "failed": 50, "cancelled": 0}])
            again.close()

    def test_batches_stay_open_until_closed_and_an_empty_one_ends_at_once(self):
        broker = K.Broker()
        jobs, reports = broker.queue("jobs"), broker.queue("reports")
        made, view = broker.put_batch("b", {"queue": "reports"})
        self.assertEqual((made, view["open"], view["total"]), (True, True, 0))
        jobs.insert([{"data": 1}], batch={"id": "b"})
        work_off(jobs, ())
        self.assertEqual(callbacks(broker), [], "open: more tasks may come")
        jobs.insert([{"data": 2}, {"data": 3, "key": "k"}], batch={"id": "b"})
        jobs.insert([{"data": 4, "key": "k"}], batch={"id": "b", "open": False})  # a known key joins nothing
        self.assertEqual(broker.batch("b")["total"], 3)
        with self.assertRaises(K.Conflict):
            jobs.insert([{"data": 5}], batch={"id": "b"})
        with self.assertRaises(K.Conflict):
            broker.put_batch("b", open=True)
        work_off(jobs, {3})
        self.assertEqual([d["counts"] for d in callbacks(broker)], [{"done": 2, "failed": 1, "cancelled": 0}])
        self.assertEqual(broker.put_batch("empty", {"queue": "reports"}, open=False)[1]["ended"], True)
        self.assertEqual(len(callbacks(broker)), 2)
        # made and closed by one insert; cancelled and purged tasks count as cancelled; a retried dead letter
        # does not reopen its batch
        ids = [r["_id"] for r in jobs.insert([{"data": n} for n in range(4)], batch={
            "id": "c", "callback": {"queue": "reports", "priority": "high"}})]
        jobs.cancel(ids[0])
        jobs.set_status(ids[1], "paused")
        jobs.purge("paused")
        work_off(jobs, {2})
        self.assertEqual(callbacks(broker)[-1]["counts"], {"done": 1, "failed": 1, "cancelled": 2})
        jobs.set_status(ids[2], "queued")
        work_off(jobs, ())
        self.assertEqual(len(callbacks(broker)), 3)
        self.assertEqual(reports.tasks(limit=10)["tasks"][-1]["priority"], 10)

    def test_hostile_batches_are_refused_and_insert_nothing(self):
        broker = K.Broker()
        jobs = broker.queue("jobs")
        broker.queue("reports", max_queued=0)
        jobs.insert([{"data": 0}], batch={"id": "closed", "callback": {"queue": "reports"}})
        cases = [("x", K.BadRequest), ({"callback": {"queue": "reports"}}, K.BadRequest),
                 ({"id": "", "callback": {"queue": "reports"}}, K.BadRequest),
                 ({"id": "a/b", "callback": {"queue": "reports"}}, K.BadRequest),
                 ({"id": "x" * 200, "callback": {"queue": "reports"}}, K.BadRequest),
                 ({"id": "new"}, K.BadRequest), ({"id": "new", "callback": "reports"}, K.BadRequest),
                 ({"id": "new", "callback": {"queue": "nowhere"}}, K.NotFound),
                 ({"id": "new", "callback": {"queue": "reports", "when": 1}}, K.BadRequest),
                 ({"id": "new", "callback": {"queue": "reports", "data": float("nan")}}, K.BadRequest),
                 ({"id": "new", "callback": {"queue": "reports", "priority": "top"}}, K.BadRequest),
                 ({"id": "new", "callback": {"queue": "reports"}, "open": "yes"}, K.BadRequest),
                 ({"id": "new", "callback": {"queue": "reports"}, "extra": 1}, K.BadRequest),
                 ({"id": "closed"}, K.Conflict), ({"id": "closed", "callback": {"queue": "jobs"}}, K.Conflict)]
        for spec, error in cases:
            with self.subTest(spec=str(spec)[:60]):
                with self.assertRaises(error):
                    jobs.insert([{"data": 1}], batch=spec)
        self.assertEqual(jobs.stats()["total"], 1)
        self.assertNotIn("new", [view for view in ("new",) if self._exists(broker, view)])
        broker.queue("jobs", max_queued=1)
        with self.assertRaises(K.Unavailable):  # all or nothing: the batch is not made either
            jobs.insert([{"data": 1}], batch={"id": "full", "callback": {"queue": "reports"}})
        self.assertFalse(self._exists(broker, "full"))

    def test_a_compaction_taken_while_a_batch_ends_keeps_its_counts(self):
        # The snapshot is taken under the lock and written later by the compaction's thread: a task that ends in
        # between must be counted once after a restart (found by an adversarial pass: the snapshot shared the
        # batch's live counts).
        broker = self.open()
        jobs = broker.queue("jobs")
        broker.queue("reports")
        jobs.insert([{"data": 1}, {"data": 2}], batch={"id": "b1", "callback": {"queue": "reports"}})
        first, second = jobs.lease(max=2)
        jobs.report([{"_id": first["_id"], "status": "failed", "error": "x", "retry": False}])
        with broker._lock:  # what Durability.maybe_compact does under the lock...
            generation = broker._journal.begin_compaction()
            snapshot = broker._snapshot()
        jobs.report([{"_id": second["_id"], "status": "failed", "error": "y", "retry": False}])
        live = broker.batch("b1")
        broker._journal.compact(snapshot, generation)  # ...and its thread, later
        broker.close()
        again = self.open()
        self.assertEqual(again.batch("b1"), live)
        self.assertEqual([data["counts"] for data in callbacks(again)], [{"done": 0, "failed": 2, "cancelled": 0}])

    def test_a_callback_sent_late_does_not_serve_a_long_poll_twice(self):
        # A callback whose commit failed is sent as a later change ends, never in the middle of one: here, in the
        # middle of handing a delayed task to parked polls (found by an adversarial pass).
        clock = FakeClock()
        broker = K.Broker(clock=clock)
        jobs = broker.queue("jobs")
        task = jobs.insert([{"data": "x"}], batch={"id": "b1", "callback": {"queue": "jobs"}})[0]
        jobs.insert({"data": "y", "delay": 1000})
        jobs.lease()
        parked = [jobs.begin_poll(max=5, wait=60000, wake=lambda: None) for _ in range(2)]
        original = K.Broker._apply_callback

        def fail_once(*args):
            K.Broker._apply_callback = original
            raise MemoryError("injected")
        K.Broker._apply_callback = fail_once
        self.addCleanup(setattr, K.Broker, "_apply_callback", original)
        jobs.report([{"_id": task["_id"], "status": "done"}])
        clock.advance(1000)
        broker.next_due()  # the server's clock: y goes to a parked poll; the callback is sent as this change ends
        stats = jobs.stats()
        results = [[t["data"] for t in waiter.result or []] for waiter in parked]
        self.assertEqual(sorted(map(len, results)), [1, 1], results)
        self.assertEqual(results[0], ["y"])
        self.assertEqual(results[1][0]["batch"], "b1")  # the callback task, to the next poll in line
        self.assertEqual((stats["waiting_workers"], jobs.stats()["counts"]["in progress"]), (0, 2))
        self.assertEqual(len(callbacks(broker, "jobs")), 1)

    def test_batches_count_against_max_memory_with_their_dead_letters(self):
        broker = K.Broker(max_memory=200000)
        jobs = broker.queue("jobs")
        broker.queue("reports")
        before = broker.memory()[0]
        ids = [r["_id"] for r in jobs.insert([{"data": n} for n in range(50)],
                                             batch={"id": "b", "callback": {"queue": "reports"}})]
        work_off(jobs, set(range(50)))
        for task_id in ids:
            jobs.cancel(task_id)
        jobs.purge("cancelled")
        broker.get("reports").purge("queued")
        self.assertGreaterEqual(broker.memory()[0] - before, 50 * K.FAILED_ID_BYTES, "its dead letters' ids")
        with self.assertRaises(K.Unavailable):  # (found by an adversarial pass: batches escaped the bound)
            for n in range(100):
                broker.put_batch(f"big{n}", {"queue": "reports", "data": "x" * 5000})
        self.assertLessEqual(broker.memory()[0], broker.memory()[1])

    @staticmethod
    def _exists(broker, batch_id):
        try:
            broker.batch(batch_id)
            return True
        except K.NotFound:
            return False


class BatchOverHttpTest(ServerTestCase):
    real_clock = True
    queue_options = {"persistent": True}

    def test_a_producer_waiting_on_a_batch_is_answered_when_it_ends(self):
        self.broker.queue("reports")
        status, payload, _ = self.call("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": n} for n in range(20)],
                                       "batch": {"id": "b1", "callback": {"queue": "reports", "data": {"n": 20}}}})
        self.assertEqual(status, 201)
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(self.call("GET", "/v1/batches/b1?wait=5000")))
        started = time.monotonic()
        waiter.start()
        time.sleep(0.1)
        self.assertEqual(answers, [], "it waits")
        tasks = self.poll({"max": 20}, expect=200)[1]
        self.poll({"max": 0, "tasks": [{"_id": t["_id"], "status": "done"} for t in tasks]}, expect=204)
        waiter.join(5)
        self.assertLess(time.monotonic() - started, 3)
        status, view, _ = answers[0]
        self.assertEqual((status, view["ended"], view["counts"]), (200, True, {"done": 20, "failed": 0,
                                                                              "cancelled": 0, "pending": 0}))
        callback = self.call("POST", "/v1/queue/reports", {})[1]["tasks"][0]
        self.assertEqual((callback["_id"], callback["data"]["data"]), (view["callback"]["task"], {"n": 20}))
        self.assertEqual(self.call("GET", "/v1/batches/b1?wait=5000")[1]["ended"], True)  # at once, ended
        self.assertEqual(self.call("GET", "/v1/batches/nope")[0], 404)

    def test_hostile_batch_requests_are_4xx_and_change_nothing(self):
        self.broker.queue("reports")
        for method, path, body, status in [
                ("PUT", "/v1/batches/b", {}, 400), ("PUT", "/v1/batches/b", {"callback": None}, 400),
                ("PUT", "/v1/batches/b", {"callback": {"queue": "reports"}, "open": 1}, 400),
                ("PUT", "/v1/batches/b", {"callback": {"queue": "reports"}, "other": 1}, 400),
                ("PUT", "/v1/batches/b", {"callback": {"queue": "nowhere"}}, 404),
                ("PUT", "/v1/batches/b", {"callback": {"queue": "reports", "data": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
                    []]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}, 400),
                ("PUT", "/v1/batches/" + "x" * 200, {"callback": {"queue": "reports"}}, 400),
                ("PUT", "/v1/batches/b", {"open": False}, 400),
                ("POST", "/v1/queue/jobs/tasks", {"data": 1, "batch": None}, 400),
                ("POST", "/v1/queue/jobs/tasks", {"data": 1, "batch": []}, 400),
                ("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": 1}], "batch": {"id": "b"}}, 400),
                ("GET", "/v1/batches/b?wait=-1", None, 400), ("GET", "/v1/batches/b?wait=x", None, 400)]:
            with self.subTest(method=method, path=path[:40], body=str(body)[:60]):
                self.assertEqual(self.call(method, path, body)[0], status)
        self.assertEqual(self.jobs.stats()["total"], 0)
        self.assertEqual(self.call("GET", "/v1/batches/b")[0], 404)
        status, view, _ = self.call("PUT", "/v1/batches/b", {"callback": {"queue": "reports"}})
        self.assertEqual((status, view["open"]), (201, True))
        self.assertEqual(self.call("PUT", "/v1/batches/b", {"callback": {"queue": "reports"}})[0], 200)
        self.assertEqual(self.call("PUT", "/v1/batches/b", {"callback": {"queue": "jobs"}})[0], 409)
        listed = self.call("GET", "/v1/batches")[1]
        self.assertEqual(([b["id"] for b in listed["batches"]], listed["not_ended"], listed["ended"]), (["b"], 1, 0))
        self.assertEqual(self.call("GET", "/v1/batches?limit=0")[0], 400)
        metrics = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        self.assertIn('katar_batches{state="not_ended"} 1', metrics)


class BatchCrashTest(unittest.TestCase):
    def test_one_callback_across_kill_9_as_the_batch_ends(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "queues.json"), "w") as handle:
            json.dump({"queues": {"jobs": {"persistent": True}, "reports": {"persistent": True}}}, handle)
        process, url = start_journalled_server(self, directory)
        client = K.Client(url)
        self.addCleanup(client.close)
        client.request("POST", "/v1/queue/jobs/tasks", {"tasks": [{"data": n} for n in range(500)],
                                                         "batch": {"id": "b1", "callback": {"queue": "reports"}}})
        for _ in range(5):  # 500 leased and reported, 50 of them failed for good: the batch ends with the last
            tasks, _ = client.poll("jobs", max=100)
            client.report("jobs", [{"_id": t["_id"], "status": "failed", "error": "x", "retry": False}
                                   if t["data"] % 10 == 0 else {"_id": t["_id"], "status": "done"} for t in tasks])
        process.kill()  # kill -9 the moment the last report was acknowledged
        process.wait()
        client.close()
        for _ in range(2):
            process, url = start_journalled_server(self, directory)
            client = K.Client(url)
            view = client.request("GET", "/v1/batches/b1?wait=5000")[1]
            self.assertEqual(view["counts"], {"done": 450, "failed": 50, "cancelled": 0, "pending": 0})
            reports = client.request("GET", "/v1/queue/reports/tasks")[1]["tasks"]
            self.assertEqual([(t["key"], t["data"]["counts"]) for t in reports],
                             [("batch:b1", {"done": 450, "failed": 50, "cancelled": 0})])
            self.assertEqual(len(reports[0]["data"]["failed"]), 50)
            process.kill()
            process.wait()
            client.close()


# ---------------------------------------------------------------------------------------------------------------
# A standby: a second process on the same journal takes over when the active one dies
# ---------------------------------------------------------------------------------------------------------------

class StandbyTest(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        with open(os.path.join(self.directory, "queues.json"), "w") as handle:
            json.dump({"queues": {"jobs": {"persistent": True, "lease": 600000}}}, handle)

    def start(self, *more):
        process = subprocess.Popen(
            [*KATAR, "--port", "0", "--quiet",
             "--journal", os.path.join(self.directory, "tasks.journal"),
             "--config", os.path.join(self.directory, "queues.json"), *more],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.addCleanup(stop_process, process)
        self.addCleanup(process.stderr.close)
        return process, wait_until_listening(self, process)

    def assert_journal_holds(self, broker, data):
        """Close `broker`; the journal, opened again, holds tasks of `data` in queue jobs, and no others."""
        broker.close()
        again = K.Broker(journal=os.path.join(self.directory, "tasks.journal"))
        self.addCleanup(again.close)
        self.assertEqual([t["data"] for t in again.get("jobs").tasks()["tasks"]], data)

    @staticmethod
    def health(url):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                return response.status, json.load(response)["status"]
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)["status"]

    def test_kill_9_of_the_active_under_load_and_the_standby_serves_what_it_acknowledged(self):
        active, first = self.start()
        standby, second = self.start("--standby")
        self.assertEqual((self.health(first), self.health(second)), ((200, "ok"), (503, "standby")))
        client = K.Client(second)
        with self.assertRaises(K.Unavailable):
            client.stats("jobs")
        client.close()
        held = K.Client(first)
        held_id = held.insert("jobs", [{"data": "held"}])[0]["_id"]
        held.poll("jobs", worker="w0")
        lease_before = held.task("jobs", held_id)["lease_expires_at"]
        held.close()
        lock = threading.Lock()
        inserted, done, stop = set(), set(), threading.Event()

        def call(clients, action):
            """Try the active address, then the other: a client that knows both, as a balancer would."""
            for client in clients:
                try:
                    return action(client)
                except (OSError, http.client.HTTPException, K.Unavailable):
                    continue
            return None

        def producer():
            clients = [K.Client(first, timeout=5), K.Client(second, timeout=5)]
            n = 0
            while not stop.is_set():
                n += 1
                made = call(clients, lambda c: c.insert("jobs", [{"data": n}]))
                if made:
                    with lock:
                        inserted.add(made[0]["_id"])
                time.sleep(0.002)
            for client in clients:
                client.close()

        def worker():
            clients = [K.Client(first, timeout=5), K.Client(second, timeout=5)]
            while not stop.is_set():
                leased = call(clients, lambda c: c.poll("jobs", max=5, worker="w1", wait=100))
                if not leased or not leased[0]:
                    continue
                reports = [{"_id": t["_id"], "attempt": t["attempt"], "status": "done"} for t in leased[0]]
                with contextlib.suppress(K.Conflict):
                    if call(clients, lambda c: c.report("jobs", reports) or True):
                        with lock:
                            done.update(r["_id"] for r in reports)
            for client in clients:
                client.close()

        threads = [threading.Thread(target=producer), threading.Thread(target=worker)]
        for thread in threads:
            thread.start()
        until(self, lambda: len(done) > 50, "the load under way")
        active.kill()  # kill -9
        killed = time.monotonic()
        until(self, lambda: self.health(second) == (200, "ok"), "the standby taking over", timeout=10)
        took = time.monotonic() - killed
        count = len(inserted)
        until(self, lambda: len(inserted) > count + 20, "inserts going on through the standby")
        stop.set()
        for thread in threads:
            thread.join(10)
        self.assertLess(took, 2.0, "the standby served within 2 s")
        client = K.Client(second)
        self.addCleanup(client.close)
        tasks, after = {}, None
        while True:
            page = client.request("GET", "/v1/queue/jobs/tasks?limit=1000" + (f"&after={after}" if after else ""))[1]
            tasks.update((task["_id"], task) for task in page["tasks"])
            after = page["next"]
            if after is None:
                break
        self.assertEqual(inserted - set(tasks), set(), "acknowledged inserts are all there")
        self.assertEqual({tid for tid in done if tasks[tid]["status"] != "done"}, set(), "acknowledged done stay done")
        self.assertTrue(all(len(tasks[tid]["history"]) == 1 for tid in done), "none delivered again after its done")
        self.assertEqual(tasks[held_id]["lease_expires_at"], lease_before, "a live lease keeps its deadline")

    def test_other_processes_taking_and_dropping_locks_never_make_an_active_server_give_up_its_journal(self):
        # Locks come and go all over a machine; /proc/locks, read a page at a time meanwhile, skips lines (here
        # about one read in seven misses the journal's), so no check may take a line missing there for the lock
        # lost: that would stop a healthy server for good.
        broker = K.Broker(journal=os.path.join(self.directory, "tasks.journal"))
        self.addCleanup(broker.close)
        jobs = broker.queue("jobs")
        others = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import fcntl, os, sys
            held = [os.open(os.path.join(sys.argv[1], "held%d" % n), os.O_RDWR | os.O_CREAT) for n in range(2000)]
            for fd in held:
                fcntl.flock(fd, fcntl.LOCK_EX)
            churn = [os.open(os.path.join(sys.argv[1], "churn%d" % n), os.O_RDWR | os.O_CREAT) for n in range(50)]
            print("holding", flush=True)
            while True:
                for fd in churn:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                for fd in churn:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            """), self.directory], stdout=subprocess.PIPE, text=True)
        self.addCleanup(stop_process, others)
        self.addCleanup(others.stdout.close)
        self.assertEqual(others.stdout.readline(), "holding\n")
        for n in range(300):
            broker.run_ages()  # the server's check, once a second
            if n % 30 == 0:
                jobs.insert({"data": n})
        self.assertIsNone(broker.health())
        jobs.insert({"data": "after"})
        self.assertEqual(len(jobs.tasks()["tasks"]), 11)

    def test_an_active_server_whose_lock_is_refused_when_asked_again_writes_nothing_more(self):
        # On NFS the lock is the NFS server's: asked for again once a second, it is refused once another machine
        # took it (this one's lease ran out in a partition). Where no lock is refused, nothing changes.
        broker = K.Broker(journal=os.path.join(self.directory, "tasks.journal"))
        self.addCleanup(broker.close)
        jobs = broker.queue("jobs")
        jobs.insert({"data": 1})
        for _ in range(3):
            broker.run_ages()
        jobs.insert({"data": 2})
        self.assertIsNone(broker.health())
        original = K._lock_refused
        K._lock_refused = lambda fd: True
        self.addCleanup(setattr, K, "_lock_refused", original)
        server = K.serve(broker, port=0)
        self.addCleanup(server.close)
        client = K.Client(server.url)
        self.addCleanup(client.close)
        self.assertEqual(client.stats("jobs")[0]["counts"]["queued"], 2)
        broker.run_ages()  # once is enough
        with self.assertRaises(K.Unavailable):
            jobs.insert({"data": 3})
        self.assertIn("refused when asked for again", broker.health())
        # Over HTTP it serves nothing more, reads included (another server may hold newer state): /healthz says why.
        for method, path in (("GET", "/v1/queue/jobs/stats"), ("GET", "/v1/queues"), ("POST", "/v1/queue/jobs")):
            with self.assertRaises(K.Unavailable) as refused:
                client.request(method, path, {} if method == "POST" else None)
            self.assertIn("lost its journal's lock", str(refused.exception))
        with self.assertRaises(K.Unavailable) as health:
            client.request("GET", "/healthz")
        self.assertEqual(health.exception.fields.get("status"), "degraded")
        K._lock_refused = original
        broker.run_ages()
        with self.assertRaises(K.Unavailable):  # for good
            jobs.insert({"data": 4})
        self.assert_journal_holds(broker, [1, 2])

    def test_a_journal_that_failed_is_not_cut_back_once_its_lock_is_refused(self):
        # A write that fails is undone by cutting the file back to its last acknowledged byte; a server whose lock
        # is refused must not cut a file another server may be writing. Two failures: the file found longer than
        # this server wrote (another appended), and an fsync that fails (on NFS: EIO, once the lock is lost).
        original = K._lock_refused
        self.addCleanup(setattr, K, "_lock_refused", original)

        def failing_fsync(fd):
            raise OSError(errno.EIO, "injected: the NFS client lost its lock")

        for failure in ("another server appended", "fsync failed"):
            with self.subTest(failure):
                K._lock_refused = original
                path = os.path.join(self.directory, failure.replace(" ", "-") + ".journal")
                broker = K.Broker(journal=path)
                self.addCleanup(broker.close)
                jobs = broker.queue("jobs")
                jobs.insert({"data": 1})
                size = os.path.getsize(path)
                with open(path, "ab") as other:  # what another server would have appended by then
                    other.write(b"x" * 100 + b"\n")
                K._lock_refused = lambda fd: True
                if failure == "fsync failed":
                    broker._journal._fsync = failing_fsync
                with self.assertRaises(K.Unavailable):
                    jobs.insert({"data": 2})
                broker._journal._fsync = os.fsync
                with self.assertRaises(K.Unavailable):  # and no reset: the file may be another server's now
                    jobs.insert({"data": 3})
                self.assertGreater(os.path.getsize(path), size + 100, "the file was not cut back")
                self.assertEqual(read_file(path).count("x" * 100), 1)

    def test_a_third_process_waits_or_is_refused_and_a_restarted_active_stands_by(self):
        active, first = self.start()
        standby, second = self.start("--standby")
        third, url_third = self.start("--standby")
        refused = subprocess.run([*KATAR, "--port", "0",
                                  "--journal", os.path.join(self.directory, "tasks.journal")],
                                 capture_output=True, text=True, timeout=30)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("--standby", refused.stderr)
        active.kill()
        active.wait()
        until(self, lambda: (200, "ok") in (self.health(second), self.health(url_third)), "one standby taking over")
        time.sleep(0.3)
        states = sorted([self.health(second), self.health(url_third)])
        self.assertEqual(states, [(200, "ok"), (503, "standby")], "one active, never two")
        again, url_again = self.start("--standby")  # the old active, restarted: it stands by
        self.assertEqual(self.health(url_again), (503, "standby"))
        no_journal = subprocess.run([*KATAR, "--port", "0",
                                     "--standby"], capture_output=True, text=True, timeout=30)
        self.assertEqual(no_journal.returncode, 2)
        self.assertIn("--standby needs --journal", no_journal.stderr)


class ShardedToolsTest(unittest.TestCase):
    """put, stats and work given several server URLs: each queue goes to one server, the same every time."""

    def setUp(self):
        self.servers = []
        for _ in range(3):
            broker = K.Broker()
            for n in range(10):
                broker.queue(f"q{n}", persistent=True)
            server = K.serve(broker, port=0)
            self.addCleanup(server.close)
            self.servers.append(server)
        self.urls = [server.url for server in self.servers]

    def tool(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = K.main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def test_each_queue_goes_to_one_server_the_same_every_time_in_any_order_of_the_urls(self):
        for urls in (self.urls, self.urls[::-1], self.urls[1:] + self.urls[:1]):
            for n in range(10):
                status, out, err = self.tool("put", ",".join(urls), f"q{n}", '{"n": %d}' % n)
                self.assertEqual(status, 0, err)
        holders = {}
        for n in range(10):
            counts = [server.broker.get(f"q{n}").stats()["total"] for server in self.servers]
            self.assertEqual(sorted(counts), [0, 0, 3], f"q{n}: one server holds all three")
            holders[f"q{n}"] = self.urls[counts.index(3)]
            self.assertEqual(holders[f"q{n}"], K.shard_for(self.urls, f"q{n}"))
        self.assertGreater(len(set(holders.values())), 1, "the queues are spread over the servers")
        # Every server restarted on its address (its queues made again, empty): each queue goes where it went.
        for index, server in enumerate(self.servers):
            server.close()
            broker = K.Broker()
            for n in range(10):
                broker.queue(f"q{n}", persistent=True)
            self.servers[index] = K.serve(broker, port=server.port)
            self.addCleanup(self.servers[index].close)
        for n in range(10):
            self.assertEqual(self.tool("put", ",".join(self.urls[::-1]), f"q{n}", "1")[0], 0)
            counts = {server.url: server.broker.get(f"q{n}").stats()["total"] for server in self.servers}
            self.assertEqual(counts[holders[f"q{n}"]], 1, f"q{n}: the same server after the restart")
            self.assertEqual(sum(counts.values()), 1)
        status, out, _ = self.tool("stats", ",".join(self.urls), "q3")
        self.assertEqual(status, 0)
        self.assertEqual([line.split()[:2] for line in out.splitlines()[1:]], [["q3", "1"]])
        status, out, _ = self.tool("stats", ",".join(self.urls))  # every server's queues
        self.assertEqual(sum(int(line.split()[1]) for line in out.splitlines()[1:]), 10)
        # Spaces and trailing slashes change nothing, in the tools or in shard_for; a URL given twice counts once.
        for n in range(10):
            self.assertEqual(K.shard_for([f" {url}/ " for url in self.urls], f"q{n}").strip().rstrip("/"),
                             holders[f"q{n}"])
        status, out, _ = self.tool("stats", ",".join(self.urls + [self.urls[0] + "/"]))
        self.assertEqual(sum(int(line.split()[1]) for line in out.splitlines()[1:]), 10)
        # Removing a server moves only its own queues.
        fewer = [url for url in self.urls if url != self.urls[0]]
        for queue, holder in holders.items():
            if holder != self.urls[0]:
                self.assertEqual(K.shard_for(fewer, queue), holder)
        for server in self.servers:  # each server says which it is
            with urllib.request.urlopen(server.url + "/v1/queues", timeout=5) as response:
                self.assertEqual(json.load(response)["server"]["address"], f"127.0.0.1:{server.port}")
        apart = next((a, b) for a in holders for b in holders if holders[a] != holders[b])
        status, _, err = self.tool("work", ",".join(self.urls), ",".join(apart), "--", "true")
        self.assertEqual(status, 2)
        self.assertIn("live on different servers", err)


class ProxyTest(unittest.TestCase):
    """Three shards, each an active server and its standby on one journal, behind HAProxy or nginx configured by the
    README's own files: 30 queues spread over the shards, a producer and a worker that know only the proxy, and one
    shard's active server killed under them while its standby takes over behind the proxy."""

    QUEUES = [f"q{n}" for n in range(30)]

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        os.chmod(self.directory, 0o755)  # nginx's workers (another user, when run as root) reach its sockets here

    def server(self, shard, *more):
        process = subprocess.Popen(
            [*KATAR, "--port", "0", "--quiet",
             "--journal", os.path.join(self.directory, f"shard{shard}.journal"), *more],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.addCleanup(stop_process, process)
        self.addCleanup(process.stderr.close)
        return process

    def start_shards(self):
        """{shard: {"active": (process, url), "standby": (process, url)}}, the actives started first."""
        shards = {n: {"active": self.server(n)} for n in (1, 2, 3)}
        for n in shards:
            process = shards[n]["active"]
            shards[n]["active"] = (process, wait_until_listening(self, process))
        for n in shards:
            shards[n]["standby"] = self.server(n, "--standby")
        for n in shards:
            process = shards[n]["standby"]
            shards[n]["standby"] = (process, wait_until_listening(self, process))
        return shards

    def config(self, name, shards):
        """The README's `name` block with the shards' real addresses in place of 10.0.N.1:3000 (shard N's active)
        and 10.0.N.2:3000 (its standby), and a free port of 127.0.0.1 for the proxy; returns (text, proxy URL)."""
        (text, line), = blocks(name)
        for n, pair in shards.items():
            for role, host in (("active", 1), ("standby", 2)):
                placeholder = f"10.0.{n}.{host}:3000"
                self.assertIn(placeholder, text, f"README line {line}: the {name} block names {placeholder}")
                text = text.replace(placeholder, urlsplit(pair[role][1]).netloc)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return text, port

    def start_haproxy(self, shards):
        text, port = self.config("haproxy.cfg", shards)
        self.assertIn("bind :8080", text)
        unique = os.path.basename(self.directory)  # abstract socket names are one namespace for the machine
        text = text.replace("bind :8080", f"bind 127.0.0.1:{port}").replace("abns@katar-", f"abns@{unique}-")
        path = os.path.join(self.directory, "haproxy.cfg")
        with open(path, "w") as handle:
            handle.write(text)
        process = subprocess.Popen(["haproxy", "-db", "-f", path], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(stop_process, process, group=True)
        return f"http://127.0.0.1:{port}"

    def start_nginx(self, shards):
        text, port = self.config("nginx.conf", shards)
        self.assertIn("listen 8080;", text)
        self.assertIn("/run/katar/", text)
        text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("/run/katar/",
                                                                                self.directory + "/")
        path = os.path.join(self.directory, "nginx.conf")
        with open(path, "w") as handle:
            handle.write(text)
        process = subprocess.Popen(
            ["nginx", "-p", self.directory, "-e", os.path.join(self.directory, "error.log"), "-c", path,
             "-g", f"daemon off; pid {os.path.join(self.directory, 'nginx.pid')};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(stop_process, process, group=True)  # its workers with it
        return f"http://127.0.0.1:{port}"

    @unittest.skipUnless(shutil.which("haproxy"), "haproxy is not installed (Debian package haproxy): the README's "
                                                  "HAProxy configuration cannot be run")
    def test_three_shards_behind_haproxy_and_a_takeover_behind_it(self):
        shards = self.start_shards()
        self.exercise(self.start_haproxy(shards), shards)

    @unittest.skipUnless(shutil.which("nginx"), "nginx is not installed (Debian package nginx): the README's nginx "
                                                "configuration cannot be run")
    def test_three_shards_behind_nginx_and_a_takeover_behind_it(self):
        shards = self.start_shards()
        self.exercise(self.start_nginx(shards), shards)

    def exercise(self, proxy, shards):
        client = K.Client(proxy, timeout=5)
        self.addCleanup(client.close)

        def made(queue):
            try:
                client.request("PUT", "/v1/queue/" + queue, {"persistent": True, "lease": 600000})
                return True
            except (OSError, http.client.HTTPException, K.Unavailable):  # the proxy starting, a standby answering
                return False

        for queue in self.QUEUES:
            until(self, lambda: made(queue), f"queue {queue} made through the proxy")
        # Each queue on exactly one shard, and every shard holding some.
        held = {}
        for n, pair in shards.items():
            with urllib.request.urlopen(pair["active"][1] + "/v1/queues", timeout=5) as response:
                held[n] = {stats["queue"] for stats in json.load(response)["queues"]}
        self.assertEqual(sorted(q for names in held.values() for q in names), sorted(self.QUEUES),
                         "every queue on exactly one shard")
        self.assertTrue(all(held.values()), f"the 30 queues spread over the three shards: {held}")
        # A name spelled with escapes reaches its queue's shard; so does HTTP/1.0 without a Host header.
        self.assertEqual(client.request("GET", "/v1/queue/%71%31%37/stats")[1]["queue"], "q17")
        with socket.create_connection(("127.0.0.1", urlsplit(proxy).port), timeout=5) as raw:
            raw.sendall(b"GET /v1/queue/q23/stats HTTP/1.0\r\n\r\n")
            answer = b"".join(iter(lambda: raw.recv(65536), b""))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["queue"], "q23")
        lock, stop = threading.Lock(), threading.Event()
        inserted, done = {}, {}  # task id -> queue

        def producer():
            producer_client = K.Client(proxy, timeout=5)
            n = 0
            while not stop.is_set():
                n += 1
                queue = self.QUEUES[n % len(self.QUEUES)]
                with contextlib.suppress(OSError, http.client.HTTPException, K.KatarError):
                    task = producer_client.insert(queue, [{"data": n, "key": f"k{n}"}])[0]
                    with lock:
                        inserted[task["_id"]] = queue
                time.sleep(0.002)
            producer_client.close()

        def worker():
            worker_client = K.Client(proxy, timeout=5)
            while not stop.is_set():
                for queue in self.QUEUES:
                    with contextlib.suppress(OSError, http.client.HTTPException, K.KatarError):
                        tasks = worker_client.lease(queue, max=5, worker="w1")
                        if tasks:
                            reports = [{"_id": t["_id"], "attempt": t["attempt"], "status": "done"} for t in tasks]
                            worker_client.report(queue, reports)
                            with lock:
                                done.update((t["_id"], queue) for t in tasks)
            worker_client.close()

        threads = [threading.Thread(target=producer), threading.Thread(target=worker)]
        for thread in threads:
            thread.start()
        try:
            until(self, lambda: len(done) > 60, "tasks leased and done through the proxy")
            # Kill shard 1's active server: its queues come back through the proxy, from its standby.
            victim = sorted(held[1])[0]
            shards[1]["active"][0].kill()
            killed = time.monotonic()

            def answers():
                try:
                    return client.stats(victim)[0]["queue"] == victim
                except (OSError, http.client.HTTPException, K.KatarError):
                    return False

            until(self, answers, f"queue {victim} served again through the proxy", timeout=10)
            took = time.monotonic() - killed
            count = sum(1 for queue in list(inserted.values()) if queue in held[1])
            until(self, lambda: sum(1 for q in list(inserted.values()) if q in held[1]) > count + 10,
                  "inserts into the killed shard's queues going on")
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        self.assertLess(took, 3.0, "the standby served through the proxy within 3 s of the kill")
        with urllib.request.urlopen(shards[1]["standby"][1] + "/v1/queues", timeout=5) as response:
            self.assertEqual({stats["queue"] for stats in json.load(response)["queues"]}, held[1],
                             "the killed shard's queues are on its standby, and no other's")
        # Through the proxy, as one server: every acknowledged insert there, every acknowledged done still done.
        tasks = {}
        for queue in self.QUEUES:
            after = None
            while True:
                page = client.request("GET", f"/v1/queue/{queue}/tasks?limit=1000" +
                                      (f"&after={after}" if after else ""))[1]
                tasks.update((task["_id"], task) for task in page["tasks"])
                after = page["next"]
                if after is None:
                    break
        self.assertEqual({tid for tid, queue in inserted.items() if tasks.get(tid, {}).get("queue") != queue},
                         set(), "acknowledged inserts are all there, in their queues")
        self.assertEqual({tid for tid in done if tasks[tid]["status"] != "done"}, set(),
                         "acknowledged done stay done")
        self.assertGreater(sum(1 for queue in done.values() if queue in held[1]), 0)


if __name__ == "__main__":
    unittest.main()
