"""Unit tests: nothing starts a process or runs a training job; each test takes at most seconds. `pytest` runs
these (the default: -m 'not slow and not gpu')."""
