"""A deadline for a whole request, where the libraries offer only a timeout per read.

huggingface_hub, datasets and httpx bound each socket read: a server that sends one byte every 2 s never trips a
5 s read timeout, and a request could wait forever. `deadline` bounds the block instead: once its time has passed, a
watchdog thread signals the main thread (SIGALRM, which also interrupts a blocking read), and the handler raises
DeadlinePassed, a TimeoutError, so callers treat it as any other network timeout. It repeats the signal every
half second until the block ends, in case library code swallowed the exception (as code run from C may).
"""

from __future__ import annotations

import contextlib
import signal
import threading

REPEAT_SECONDS = 0.5  # how often the signal is sent again until the block ends


class DeadlinePassed(TimeoutError):
    """The block ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise DeadlinePassed in the block after `seconds`. Only the main thread can receive it; elsewhere the block
    runs with the libraries' own timeouts."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        yield
        return
    ended, passed = threading.Event(), threading.Event()
    main = threading.main_thread().ident

    def on_alarm(signum, frame):
        if passed.is_set() and not ended.is_set():
            raise DeadlinePassed(f"no complete answer within {seconds:g} s")

    def watchdog():
        if ended.wait(seconds):
            return
        passed.set()
        while not ended.is_set():
            signal.pthread_kill(main, signal.SIGALRM)
            ended.wait(REPEAT_SECONDS)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    thread = threading.Thread(target=watchdog, name="deadline", daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        thread.join()
        signal.signal(signal.SIGALRM, previous)
