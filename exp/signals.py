"""Signal dispositions children inherit: the one home of "start this child with Ctrl-C ignored"."""

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_ignored():
    """SIGINT ignored while the block runs (children started in it inherit that); only the main thread may set
    handlers, so elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
