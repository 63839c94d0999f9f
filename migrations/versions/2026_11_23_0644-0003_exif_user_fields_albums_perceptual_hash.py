"""exif, user fields, albums, perceptual hash

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 06:44:11.246703
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "image_albums",
        sa.Column("image_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("album", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", "album"),
    )
    with op.batch_alter_table("image_albums", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_albums_album"), ["album"], unique=False)

    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("taken_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("camera_make", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.add_column(
            sa.Column("camera_model", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.add_column(sa.Column("lens", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))
        batch_op.add_column(sa.Column("gps_lat", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("gps_lon", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("orientation", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("exif", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("phash", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("description", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("rating", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("starred", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_images_camera_make"), ["camera_make"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_camera_model"), ["camera_model"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_gps_lat"), ["gps_lat"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_gps_lon"), ["gps_lon"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_phash"), ["phash"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_rating"), ["rating"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_starred"), ["starred"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_taken_at"), ["taken_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_images_taken_at"))
        batch_op.drop_index(batch_op.f("ix_images_starred"))
        batch_op.drop_index(batch_op.f("ix_images_rating"))
        batch_op.drop_index(batch_op.f("ix_images_phash"))
        batch_op.drop_index(batch_op.f("ix_images_gps_lon"))
        batch_op.drop_index(batch_op.f("ix_images_gps_lat"))
        batch_op.drop_index(batch_op.f("ix_images_camera_model"))
        batch_op.drop_index(batch_op.f("ix_images_camera_make"))
        batch_op.drop_column("starred")
        batch_op.drop_column("rating")
        batch_op.drop_column("description")
        batch_op.drop_column("phash")
        batch_op.drop_column("exif")
        batch_op.drop_column("orientation")
        batch_op.drop_column("gps_lon")
        batch_op.drop_column("gps_lat")
        batch_op.drop_column("lens")
        batch_op.drop_column("camera_model")
        batch_op.drop_column("camera_make")
        batch_op.drop_column("taken_at")

    with op.batch_alter_table("image_albums", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_albums_album"))

    op.drop_table("image_albums")
