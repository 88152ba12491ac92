"""Where the shared test data lives: $GPTLAB_SHARED_DATA, else ../shared/data beside the
repository (how CI lays it out), else /work/shared/data."""

import os
from pathlib import Path


def _find() -> str:
    here = Path(__file__).resolve().parent  # tests/
    candidates = [os.environ.get("GPTLAB_SHARED_DATA"), here.parent.parent / "shared" / "data",
                  Path("/work/shared/data")]
    for c in candidates:
        if c and Path(c).is_dir():
            return str(c)
    return str(candidates[-1])  # tests that need it skip when it is missing


SHARED = _find()
