"""Risk-controlled profiles (issue 15): ``profiles.ratio``, the ratio a profile serves — the risk controller's
⌊r* − λ̂⌋_grid (expected answer loss ≤ ε; the controller's version in ``predictor_version``) or r* itself where no
controller fits the calibration. Its budgets, token budget and kept positions realise this ratio. Nullable: rows
written before this revision serve their r* (read as ``coalesce(ratio, r_star)``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-11 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('profiles') as batch:
        batch.add_column(sa.Column('ratio', sa.Float(), nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite >= 3.35), never a copy of the table (see 0005)
    with op.batch_alter_table('profiles', recreate='never') as batch:
        batch.drop_column('ratio')
