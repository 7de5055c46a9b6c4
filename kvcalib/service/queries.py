"""Reads of the store as typed views: jobs, batches, profiles and job counts (404 for unknown ids)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.errors import NotFoundError
from kvcalib.service.orm import CalibrationRun, RunStatus
from kvcalib.service.views import BatchView, JobView, ProfileView


def job_view(s: Session, run: CalibrationRun) -> JobView:
    """The job view of a run (its profile is read only once the run succeeded)."""
    prof = repo.profile_for_run(s, run_id=run.id) if run.status == RunStatus.succeeded.value else None
    return JobView.of(run, prof)


class StoreReader:
    def __init__(self, db: Database):
        self.db = db

    def job(self, run_id: int) -> JobView:
        with self.db.session() as s:
            run = repo.get_run(s, run_id=run_id)
            if run is None:
                raise NotFoundError(f"no job {run_id}")
            return job_view(s, run)

    def jobs(self, run_ids: Sequence[int]) -> list[JobView]:
        """Views of runs known to exist (just submitted), in the order given."""
        with self.db.session() as s:
            return [job_view(s, repo.get_run(s, run_id=r)) for r in run_ids]

    def batch(self, batch_id: int, items: bool = True) -> BatchView:
        with self.db.session() as s:
            b = repo.get_batch(s, batch_id=batch_id)
            if b is None:
                raise NotFoundError(f"no batch {batch_id}")
            rows = repo.batch_rows(s, batch_id=batch_id)
        return BatchView.of(b, rows, items=items)

    def profile(self, profile_id: int) -> ProfileView:
        with self.db.session() as s:
            p = repo.get_profile(s, profile_id=profile_id)
            if p is None:
                raise NotFoundError(f"no profile {profile_id}")
            return ProfileView.of(p, repo.curve_points(s, run_id=p.run_id))

    def job_counts(self) -> dict[str, int]:
        """Jobs per status (every ``RunStatus`` value present)."""
        with self.db.session() as s:
            return repo.run_counts(s)


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (``le`` upper bounds, the last one +inf), the count and the sum of a column."""

    buckets: list[tuple[float, int]]
    count: int
    total: float


def column_histogram(s: Session, column, bounds: Sequence[float]) -> Histogram:
    """One aggregate query: how many non-null values of ``column`` lie at or below each bound (Prometheus ``le``)."""
    from sqlalchemy import case, func, select

    cols = [func.count(column), func.coalesce(func.sum(column), 0.0)]
    cols += [func.coalesce(func.sum(case((column <= b, 1), else_=0)), 0) for b in bounds]
    row = s.execute(select(*cols).where(column.is_not(None))).one()
    count, total, per = int(row[0]), float(row[1]), [int(x) for x in row[2:]]
    return Histogram(buckets=[*zip(bounds, per), (float("inf"), count)], count=count, total=total)


def profile_histograms(db: Database, r_bounds: Sequence[float], seconds_bounds: Sequence[float]
                       ) -> tuple[Histogram, Histogram]:
    """(r*, calibration seconds) of every stored profile, as histograms (the store-wide figures behind
    ``/metrics``: whichever process or worker calibrated them)."""
    from kvcalib.service.orm import Profile

    with db.session() as s:
        return column_histogram(s, Profile.r_star, r_bounds), column_histogram(s, Profile.seconds, seconds_bounds)
