"""Make the helper modules in tests/ (paths, gguf_helpers) importable from every test folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
