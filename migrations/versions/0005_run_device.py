"""Per-request device (issue 17, item 5): ``calibration_runs.device`` (cpu | cuda | cuda:N), the device the job loads
the model on. Nullable: rows written before this revision, and requests that name no device, run on the executing
worker's ``KVCALIB_WORKER_DEVICE``. Not part of ``params_hash`` (a profile computed on cuda serves cpu requests too).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('calibration_runs') as batch:
        batch.add_column(sa.Column('device', sa.String(length=16), nullable=True))


def downgrade() -> None:
    # ALTER TABLE … DROP COLUMN (SQLite >= 3.35), never a copy of the table: on SQLite (foreign keys on) dropping the
    # old copy of calibration_runs would cascade to its profiles, curve points and batch items.
    with op.batch_alter_table('calibration_runs', recreate='never') as batch:
        batch.drop_column('device')
