"""Unit tests: pure functions only (no broker). Makes ``helpers`` importable
whatever pytest import mode is used."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
