"""A worker process that checks batches for the aggregator (``processes.ProcessChecker``), started as
``python -m collector.aggregator.check_worker MAX_FUTURE_S MAX_BATCH_SAMPLES``.

It reads requests on stdin and writes answers on stdout, one frame each (``frames``), until stdin ends: its life is
the aggregator's (it ignores SIGINT and SIGTERM, which the aggregator handles; when the aggregator exits or closes
it, stdin ends). Its own output goes to stderr, the aggregator's.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys

from collector.aggregator import frames
from collector.aggregator.checks import Limits, check, to_wire
from collector.aggregator.rules import StreamRefused


def answer(request: bytes, received_ns: int, limits: Limits) -> bytes:
    try:
        checked = check(request, received_ns, limits)
    except StreamRefused as exc:
        return frames.REFUSED + pickle.dumps((type(exc).__name__, str(exc)))
    except Exception as exc:  # a bug: the aggregator refuses to guess, the batch is not acknowledged
        return frames.FAILED + pickle.dumps(f"{type(exc).__name__}: {exc}")
    return frames.CHECKED + to_wire(checked)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    limits = Limits(float(argv[0]), int(argv[1]))
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # print() and stray writes go to stderr, not into the frames
    answers.write(frames.encode(0, frames.READY + pickle.dumps(os.getpid())))
    while (request := frames.read_request(requests)) is not None:
        number, received_ns, data = request
        answers.write(frames.encode(number, answer(data, received_ns, limits)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
