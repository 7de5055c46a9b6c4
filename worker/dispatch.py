"""The API's side of Celery: check the broker quickly (503 instead of a hang) and send jobs by task name."""

from __future__ import annotations

from kvcalib.service.errors import UnavailableError
from kvcalib.settings import Settings


class CeleryDispatcher:
    kind = "celery"

    def __init__(self, settings: Settings):
        from kvcalib.worker.app import make_celery

        self.settings = settings
        self.app = make_celery(settings)

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

    def close(self, wait: bool = False) -> None:
        try:
            self.app.close()
        except Exception:  # noqa: BLE001
            pass
