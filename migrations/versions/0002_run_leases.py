"""Run leases: ``lease_owner`` / ``lease_expires_at`` (who executes a calibration run and until when, renewed by a
heartbeat) and ``dispatched_at`` (when its message was last sent), read by the sweeper that re-dispatches runs whose
lease expired or whose message was lost (issue 13, items 5 and 6).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('calibration_runs') as batch:
        batch.add_column(sa.Column('lease_owner', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('calibration_runs') as batch:
        batch.drop_column('dispatched_at')
        batch.drop_column('lease_expires_at')
        batch.drop_column('lease_owner')
