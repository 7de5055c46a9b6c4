"""Budgets for servers (issue 17, items 4 and 5): what a budget was measured on and how to lay it out.

* ``profiles``: ``ids_hash`` (SHA-256 over the model name and the exact context token ids of the calibration,
  ``calib.integrations.servers.token_ids_hash``; indexed: ``GET /budget?ids_hash=``), ``dtype`` (fp32 | bf16 | fp16),
  ``model_shape`` (layers, kv / query heads, head dim, dtype, model type), ``prompt_format`` (the prompt layout the
  ids follow: kind, document start, context tokens) and ``kept_positions`` (the kept positions at r*,
  ``encode_kept_positions``, per layer with the ``per_layer`` allocator);
* ``predictions``: ``ids_hash`` (indexed) and ``dtype``;
* ``calibration_runs``: ``dtype`` (the dtype the job loads the model in).

Every column is nullable: rows written before this revision have none (their dtype was the service's, fp32 unless
configured otherwise).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('profiles') as batch:
        batch.add_column(sa.Column('ids_hash', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('dtype', sa.String(length=8), nullable=True))
        batch.add_column(sa.Column('model_shape', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('prompt_format', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('kept_positions', sa.JSON(), nullable=True))
        batch.create_index(batch.f('ix_profiles_ids_hash'), ['ids_hash'], unique=False)
    with op.batch_alter_table('predictions') as batch:
        batch.add_column(sa.Column('ids_hash', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('dtype', sa.String(length=8), nullable=True))
        batch.create_index(batch.f('ix_predictions_ids_hash'), ['ids_hash'], unique=False)
    with op.batch_alter_table('calibration_runs') as batch:
        batch.add_column(sa.Column('dtype', sa.String(length=8), nullable=True))


def downgrade() -> None:
    # ALTER TABLE … DROP COLUMN (SQLite >= 3.35), never a copy of the table: on SQLite (foreign keys on) dropping the
    # old copy of calibration_runs would cascade to its profiles, curve points and batch items.
    with op.batch_alter_table('calibration_runs', recreate='never') as batch:
        batch.drop_column('dtype')
    with op.batch_alter_table('predictions') as batch:
        batch.drop_index(batch.f('ix_predictions_ids_hash'))
        batch.drop_column('dtype')
        batch.drop_column('ids_hash')
    with op.batch_alter_table('profiles') as batch:
        batch.drop_index(batch.f('ix_profiles_ids_hash'))
        batch.drop_column('kept_positions')
        batch.drop_column('prompt_format')
        batch.drop_column('model_shape')
        batch.drop_column('dtype')
        batch.drop_column('ids_hash')
