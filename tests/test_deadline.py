"""deadline(): a bound on a whole block (a hub request), not on each read."""

import signal
import threading
import time

import pytest

from qwen_sft.deadline import DeadlinePassed, deadline


def test_a_blocking_call_is_interrupted_at_the_deadline():
    started = time.monotonic()
    with pytest.raises(DeadlinePassed), deadline(0.3):
        time.sleep(10)
    assert time.monotonic() - started < 2


def test_a_swallowed_deadline_is_raised_again():
    started = time.monotonic()
    with pytest.raises(DeadlinePassed), deadline(0.2):
        try:
            time.sleep(10)
        except DeadlinePassed:
            pass  # as library code may
        time.sleep(10)
    assert time.monotonic() - started < 3


def test_a_block_within_its_deadline_ends_normally_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGALRM)
    with deadline(5):
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGALRM) == before


def test_outside_the_main_thread_the_block_runs_unchanged():
    outcome = []

    def work():
        with deadline(0.1):
            time.sleep(0.4)
        outcome.append("done")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcome == ["done"]
