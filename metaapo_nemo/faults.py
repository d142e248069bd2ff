"""Fault points for the crash tests: with ``METAAPO_FAULT=NAME`` (or ``NAME:N``) in its
environment, a process SIGKILLs itself the first (or N-th) time it reaches ``point(NAME)``: a real
kill at a known place (mid-scoring, mid-sampling, mid-checkpoint-write), which a timer cannot aim
at on a shared machine. Unset, a point costs one dictionary lookup. The points are listed in README
"Operations"."""
import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("METAAPO_FAULT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
