"""Retention: delete kept local copies of *uploaded* recordings past `storage.retention_days`.

Nothing else is ever deleted by age: a recording not yet uploaded, or kept by local storage, stays.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.journal import Journal
from edge_agent.tasks import utc_now

log = logging.getLogger(__name__)


def apply_retention(cfg: AgentConfig, journal: Journal) -> int:
    """Delete the local copies of uploaded recordings older than the retention; how many were."""
    days = cfg.storage.retention_days
    if days is None or cfg.storage.type != "minio":
        return 0
    cutoff = utc_now().timestamp() - days * 86400
    deleted = 0
    for task in journal.finished_uploaded_kept():
        if task.started.timestamp() < cutoff:
            with contextlib.suppress(FileNotFoundError):
                Path(task.local_file).unlink()
            task.local_file_deleted = True
            task.updated = utc_now()
            journal.save(task)
            deleted += 1
            log.info("retention: deleted local copy of uploaded %s", task.task_id)
    return deleted
