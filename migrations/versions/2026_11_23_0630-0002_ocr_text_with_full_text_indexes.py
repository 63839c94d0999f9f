"""ocr text with full-text indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 06:27:33.338817
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "image_text",
        sa.Column(
            "image_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("has_text", sa.Boolean(), nullable=False),
        sa.Column("checked", sa.Boolean(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("languages", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("ocr_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id"),
    )
    with op.batch_alter_table("image_text", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_text_has_text"), ["has_text"], unique=False)

    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # Two external-content FTS5 indexes over image_text.content: words (porter stemming, prefixes) and
        # trigrams (substrings of three or more characters). Triggers keep them in step with the table.
        for name, tokenizer in (("image_text_fts", "porter unicode61"), ("image_text_trigram", "trigram")):
            op.execute(
                f"CREATE VIRTUAL TABLE {name} USING fts5(content, content='image_text', "
                f"content_rowid='image_id', tokenize='{tokenizer}')"
            )
            op.execute(
                f"CREATE TRIGGER {name}_ai AFTER INSERT ON image_text BEGIN "
                f"INSERT INTO {name}(rowid, content) VALUES (new.image_id, new.content); END"
            )
            op.execute(
                f"CREATE TRIGGER {name}_ad AFTER DELETE ON image_text BEGIN "
                f"INSERT INTO {name}({name}, rowid, content) VALUES ('delete', old.image_id, old.content); END"
            )
            op.execute(
                f"CREATE TRIGGER {name}_au AFTER UPDATE ON image_text BEGIN "
                f"INSERT INTO {name}({name}, rowid, content) VALUES ('delete', old.image_id, old.content); "
                f"INSERT INTO {name}(rowid, content) VALUES (new.image_id, new.content); END"
            )
    elif bind.dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(
            "ALTER TABLE image_text ADD COLUMN tsv tsvector "
            "GENERATED ALWAYS AS (to_tsvector('english', content)) STORED"
        )
        op.execute("CREATE INDEX ix_image_text_tsv ON image_text USING GIN (tsv)")
        op.execute("CREATE INDEX ix_image_text_trgm ON image_text USING GIN (content gin_trgm_ops)")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in ("image_text_fts", "image_text_trigram"):
            for suffix in ("ai", "ad", "au"):
                op.execute(f"DROP TRIGGER IF EXISTS {name}_{suffix}")
            op.execute(f"DROP TABLE IF EXISTS {name}")
    elif bind.dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_image_text_trgm")
        op.execute("DROP INDEX IF EXISTS ix_image_text_tsv")
    with op.batch_alter_table("image_text", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_text_has_text"))

    op.drop_table("image_text")
