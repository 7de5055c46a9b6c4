"""Initial profile store schema: models, documents, calibration runs (jobs), curve points, profiles, predictors,
batches and batch items. Optuna's tables are not managed here.

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 13:37:29.633894
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    op.create_table('documents',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('n_bytes', sa.Integer(), nullable=False),
    sa.Column('token_count', sa.Integer(), nullable=True),
    sa.Column('source', sa.String(length=1000), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_documents')),
    sa.UniqueConstraint('content_hash', name=op.f('uq_documents_content_hash'))
    )
    op.create_table('models',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('revision', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', 'revision', name=op.f('uq_models_name_revision'))
    )
    op.create_table('predictors',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('version', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=100), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('artefact_path', sa.String(length=1000), nullable=True),
    sa.Column('artefact', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictors')),
    sa.UniqueConstraint('version', name=op.f('uq_predictors_version'))
    )
    op.create_table('calibration_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('document_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('params_hash', sa.String(length=64), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('method', sa.String(length=100), nullable=False),
    sa.Column('allocator', sa.String(length=100), nullable=False),
    sa.Column('tolerance', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('message', sa.String(length=500), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['document_id'], ['documents.id'], name=op.f('fk_calibration_runs_document_id_documents'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_calibration_runs_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_calibration_runs')),
    sa.UniqueConstraint('document_id', 'model_id', 'params_hash', name=op.f('uq_calibration_runs_document_id_model_id_params_hash'))
    )
    op.create_index(op.f('ix_calibration_runs_document_id'), 'calibration_runs', ['document_id'], unique=False)
    op.create_index(op.f('ix_calibration_runs_model_id'), 'calibration_runs', ['model_id'], unique=False)
    op.create_index(op.f('ix_calibration_runs_status'), 'calibration_runs', ['status'], unique=False)
    op.create_table('batch_items',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_batch_items_batch_id_batches'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['calibration_runs.id'], name=op.f('fk_batch_items_run_id_calibration_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_items')),
    sa.UniqueConstraint('batch_id', 'position', name=op.f('uq_batch_items_batch_id_position'))
    )
    op.create_index(op.f('ix_batch_items_batch_id'), 'batch_items', ['batch_id'], unique=False)
    op.create_index(op.f('ix_batch_items_run_id'), 'batch_items', ['run_id'], unique=False)
    op.create_table('curve_points',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('ratio', sa.Float(), nullable=False),
    sa.Column('fidelity', sa.Float(), nullable=False),
    sa.Column('kl', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['calibration_runs.id'], name=op.f('fk_curve_points_run_id_calibration_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_curve_points')),
    sa.UniqueConstraint('run_id', 'ratio', name=op.f('uq_curve_points_run_id_ratio'))
    )
    op.create_index(op.f('ix_curve_points_run_id'), 'curve_points', ['run_id'], unique=False)
    op.create_table('profiles',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('document_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('method', sa.String(length=100), nullable=False),
    sa.Column('allocator', sa.String(length=100), nullable=False),
    sa.Column('tolerance', sa.Float(), nullable=False),
    sa.Column('r_star', sa.Float(), nullable=False),
    sa.Column('token_budget', sa.Integer(), nullable=False),
    sa.Column('context_tokens', sa.Integer(), nullable=False),
    sa.Column('monotone', sa.Boolean(), nullable=False),
    sa.Column('layer_budgets', sa.JSON(), nullable=False),
    sa.Column('head_budgets', sa.JSON(), nullable=False),
    sa.Column('features', sa.JSON(), nullable=False),
    sa.Column('predictor_version', sa.String(length=100), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['document_id'], ['documents.id'], name=op.f('fk_profiles_document_id_documents'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_profiles_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['calibration_runs.id'], name=op.f('fk_profiles_run_id_calibration_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_profiles')),
    sa.UniqueConstraint('run_id', name=op.f('uq_profiles_run_id'))
    )
    op.create_index(op.f('ix_profiles_document_id'), 'profiles', ['document_id'], unique=False)
    op.create_index(op.f('ix_profiles_model_id'), 'profiles', ['model_id'], unique=False)
    op.create_index('ix_profiles_lookup', 'profiles', ['document_id', 'model_id', 'tolerance'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_profiles_lookup', table_name='profiles')
    op.drop_index(op.f('ix_profiles_model_id'), table_name='profiles')
    op.drop_index(op.f('ix_profiles_document_id'), table_name='profiles')
    op.drop_table('profiles')
    op.drop_index(op.f('ix_curve_points_run_id'), table_name='curve_points')
    op.drop_table('curve_points')
    op.drop_index(op.f('ix_batch_items_run_id'), table_name='batch_items')
    op.drop_index(op.f('ix_batch_items_batch_id'), table_name='batch_items')
    op.drop_table('batch_items')
    op.drop_index(op.f('ix_calibration_runs_status'), table_name='calibration_runs')
    op.drop_index(op.f('ix_calibration_runs_model_id'), table_name='calibration_runs')
    op.drop_index(op.f('ix_calibration_runs_document_id'), table_name='calibration_runs')
    op.drop_table('calibration_runs')
    op.drop_table('predictors')
    op.drop_table('models')
    op.drop_table('documents')
    op.drop_table('batches')
