"""A handled error's one-line message for torchrun's failure summary. torchrun prints each failed
rank's error file (the path in TORCHELASTIC_ERROR_FILE) and nothing else of a rank that
--local-ranks-filter hides: without it, an error on a rank other than LOG_RANK, or on a rank that
fails before rank 0 prints, shows only "error_file: <N/A>". Raised exceptions are written by
torch's @record on the entry point; this writes the errors titan catches and turns into a status.
"""

import json
import os
import time

ENV = "TORCHELASTIC_ERROR_FILE"


def write_error_file(message: str) -> None:
    """Record `message` as this rank's root cause; a no-op outside torchrun."""
    path = os.environ.get(ENV)
    if not path:
        return
    # torchrun's summary shows extraInfo.py_callstack when present, else message: no callstack,
    # so the summary's "traceback :" line is this one line
    data = {"message": {"message": f"titan: {message}",
                        "extraInfo": {"timestamp": str(int(time.time()))}}}  # fmt: skip
    with open(path, "w") as f:
        json.dump(data, f)
