"""titan's one logger: `from titan.logger import logger`; `init_logger` once per process."""

import logging
import os

logger = logging.getLogger("titan")


def init_logger(rank: int | None = None, rank_0_only: bool = True) -> None:
    """Log INFO to stderr from rank 0 (or every rank, prefixed, when rank_0_only is False)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    logger.handlers.clear()
    logger.propagate = False
    if rank_0_only and rank != 0:
        logger.setLevel(logging.WARNING)  # other ranks still report warnings and errors
    else:
        logger.setLevel(logging.INFO)
    prefix = "" if rank_0_only else f"[rank{rank}] "
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(f"{prefix}[titan] %(asctime)s %(levelname)s %(message)s")
    )
    logger.addHandler(handler)
