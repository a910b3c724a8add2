# The modules live flat at the repository root; make them importable under plain `pytest` too.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
