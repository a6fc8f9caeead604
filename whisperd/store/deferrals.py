"""Part of the job store: files waiting for the job at their path to end.

A new file can settle at the path of a job that is still queued or running
(the old file was replaced under it). One path has at most one active job
(the store's identity rule), so the new file waits: a row here records it
(its job spec and file identity) and the job it waits for. Intake queues it
once that job has ended and the file is still the same one; a daemon that
restarts meanwhile finds the row in the store, not in its memory.

JobStore's methods run these statements inside its own transactions.
"""

from __future__ import annotations

import sqlalchemy as sa


def define_deferral_table(metadata: sa.MetaData) -> sa.Table:
    """One row per (inbox, path) at most: a newer replacement takes the row."""
    return sa.Table(
        "deferred_files",
        metadata,
        sa.Column("inbox", sa.Text, primary_key=True),
        sa.Column("rel_path", sa.Text, primary_key=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("file_device", sa.BigInteger, nullable=False),
        sa.Column("file_inode", sa.BigInteger, nullable=False),
        sa.Column("file_size", sa.BigInteger, nullable=False),
        sa.Column("file_mtime_ns", sa.BigInteger, nullable=False),
        # The active job at the path when the file settled (or found since).
        sa.Column("waits_for", sa.Integer, nullable=False),
        sa.Column("recorded_at", sa.Float, nullable=False),
    )
