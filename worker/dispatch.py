"""The API's side of Celery: check the broker quickly (503 instead of a hang), send jobs by task name, and list
the messages the broker still holds (for the sweeper, ``kvcalib.service.sweeper``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kvcalib.service.errors import UnavailableError
from kvcalib.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

# kombu's Redis transport layout: a queue is one list per priority step (the step 0 list is named after the queue,
# the others ``<queue>\x06\x16<step>``); delivered, unacknowledged messages sit in the ``unacked`` hash as JSON
# ``[message, exchange, routing_key]``; a message's task id is ``headers.id`` (Celery protocol 2).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"


def _add_id(ids: set[str], raw: bytes, unacked: bool = False) -> None:
    try:
        msg = json.loads(raw)
        if unacked:
            msg = msg[0]
        task_id = msg["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):  # not a Celery message: not ours
        return
    if isinstance(task_id, str):
        ids.add(task_id)


class CeleryDispatcher:
    kind = "celery"

    def __init__(self, settings: Settings, app: Celery | None = None):
        from kvcalib.worker.app import make_celery

        self.settings = settings
        self.app = app or make_celery(settings)

    def check(self) -> None:
        url = self.settings.broker_url
        t = self.settings.broker_timeout
        try:
            if url.startswith(("redis://", "rediss://", "unix://")):
                import redis

                client = redis.Redis.from_url(url, socket_connect_timeout=t, socket_timeout=t)
                try:
                    client.ping()
                finally:
                    client.close()
            else:
                with self.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=t)
        except Exception as exc:  # noqa: BLE001
            raise UnavailableError(f"the job broker is unavailable ({type(exc).__name__}: {exc}); "
                                   "stored budgets are still served, job submission is not") from exc

    def submit(self, run_id: int) -> str | None:
        from kvcalib.worker.app import TASK_CALIBRATE

        res = self.app.send_task(TASK_CALIBRATE, args=[run_id], queue=self.settings.calibration_queue, retry=True,
                                 retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2,
                                               "interval_max": 0.5})
        return res.id

    def outstanding(self) -> set[str] | None:
        """Task ids of the calibration messages the broker holds: waiting in the queues (every priority level) or
        delivered and not yet acknowledged (kombu's ``unacked`` hash: reserved, or being executed). Redis only;
        None for other brokers (the sweeper then falls back to the visibility timeout)."""
        url = self.settings.broker_url or ""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        import redis

        t = self.settings.broker_timeout
        client = redis.Redis.from_url(url, socket_connect_timeout=t, socket_timeout=max(t, 5.0))
        ids: set[str] = set()
        try:
            keys = [q + suffix for q in {self.settings.queue, self.settings.calibration_queue}
                    for suffix in ("", *(f"{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS[1:]))]
            for key in keys:
                for raw in client.lrange(key, 0, -1):
                    _add_id(ids, raw)
            for raw in client.hvals(UNACKED_KEY):
                _add_id(ids, raw, unacked=True)
        finally:
            client.close()
        return ids

    def close(self, wait: bool = False) -> None:
        try:
            self.app.close()
        except Exception:  # noqa: BLE001
            pass
