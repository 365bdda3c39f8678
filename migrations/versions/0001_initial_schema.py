"""Initial schema: teams, API keys, adaptations (the job rows), their events, models.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Naive UTC on disk; app.db.models.UTCDateTime adds the zone back when reading.
Timestamp = sa.DateTime


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", Timestamp(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("revoked_at", Timestamp(), nullable=True),
    )
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    op.create_table(
        "adaptations",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("config_request", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("source_bucket", sa.String(255), nullable=False),
        sa.Column("source_prefix", sa.String(1024), nullable=False),
        sa.Column("num_images", sa.Integer(), nullable=True),
        sa.Column("upload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("model_id", sa.String(40), nullable=True),
        sa.Column("cancel_requested_at", Timestamp(), nullable=True),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", Timestamp(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("requeue_at", Timestamp(), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
        sa.Column("started_at", Timestamp(), nullable=True),
        sa.Column("finished_at", Timestamp(), nullable=True),
        sa.Column("updated_at", Timestamp(), nullable=False),
        sa.UniqueConstraint("team_id", "idempotency_key", name="uq_adaptations_team_idempotency_key"),
    )
    op.create_index("ix_adaptations_team_id_id", "adaptations", ["team_id", "id"])
    op.create_index("ix_adaptations_status", "adaptations", ["status"])
    op.create_table(
        "adaptation_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column(
            "adaptation_id",
            sa.String(40),
            sa.ForeignKey("adaptations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", Timestamp(), nullable=False),
    )
    op.create_index("ix_adaptation_events_adaptation_id_id", "adaptation_events", ["adaptation_id", "id"])
    op.create_table(
        "models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("adaptation_id", sa.String(40), nullable=False, unique=True),
        sa.Column("class_names", sa.JSON(), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("artifact_prefix", sa.String(1024), nullable=False),
        sa.Column("artifact_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Timestamp(), nullable=False),
    )
    op.create_index("ix_models_team_id_id", "models", ["team_id", "id"])


def downgrade() -> None:
    op.drop_table("models")
    op.drop_table("adaptation_events")
    op.drop_table("adaptations")
    op.drop_table("api_keys")
    op.drop_table("teams")
