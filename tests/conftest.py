import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# CI replays the same examples every run (a red main must be reproducible); developers'
# runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
