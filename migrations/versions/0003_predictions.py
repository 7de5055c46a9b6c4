"""Stored predictions and predictor provenance (issue 15, item 4): the ``predictions`` table (every predicted budget,
once per document hash × model × parameters × predictor version) and, on ``predictors``, where a predictor comes from
(``source``: configured | registered | shipped), the model it is bound to and its training configuration.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('predictions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('model_revision', sa.String(length=64), nullable=False),
    sa.Column('method', sa.String(length=100), nullable=False),
    sa.Column('allocator', sa.String(length=100), nullable=False),
    sa.Column('tolerance', sa.Float(), nullable=False),
    sa.Column('params_hash', sa.String(length=64), nullable=False),
    sa.Column('ratio', sa.Float(), nullable=False),
    sa.Column('token_budget', sa.Integer(), nullable=False),
    sa.Column('context_tokens', sa.Integer(), nullable=False),
    sa.Column('predictor_version', sa.String(length=100), nullable=False),
    sa.Column('predictor_kind', sa.String(length=100), nullable=True),
    sa.Column('features', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    sa.UniqueConstraint('content_hash', 'model', 'model_revision', 'method', 'allocator', 'tolerance', 'params_hash',
                        'predictor_version', name='uq_predictions_key')
    )
    with op.batch_alter_table('predictors') as batch:
        batch.add_column(sa.Column('source', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('model', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('training_config', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('predictors') as batch:
        batch.drop_column('training_config')
        batch.drop_column('model')
        batch.drop_column('source')
    op.drop_table('predictions')
