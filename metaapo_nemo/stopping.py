"""What a rank does when a signal arrives: a user's Ctrl-C (SIGINT) or a scheduler's SIGTERM stops
the run, cleanup included (the local reward server, open files); the checkpoint signal, when one is
set (trainer.checkpoint_signal, e.g. Slurm's --signal=USR1@300), only asks the loop to checkpoint at
its next optimiser-step boundary and exit with EXIT_REQUEUE. A stopped rank ends within
STOP_GRACE_S of the signal, however its cleanup goes.

torchrun forwards SIGINT and SIGTERM to every rank's process group, so each rank stops on its own;
the launcher (launch/executors.py) forwards a terminal's Ctrl-C to torchrun.
"""
import os
import signal
import threading

STOP_GRACE_S = 20.0  # a rank still alive this long after a stop signal exits with 128 + N (see _stop)
EXIT_REQUEUE = 75  # exit status after a checkpoint requested by the checkpoint signal (EX_TEMPFAIL: "try again")
CHECKPOINT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")

_checkpoint = threading.Event()
_stopped_by: int | None = None  # the stop signal that arrived, if one did
_installed_in: int | None = None  # the pid that installed the handlers; forked children inherit them


class RunStopped(KeyboardInterrupt):
    """Raised in the main thread by a stop signal. A KeyboardInterrupt, so `except Exception` in the
    loop's components does not swallow it, while `finally` blocks still run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def install(checkpoint_signal: str | None = None) -> None:
    """Make SIGINT and SIGTERM raise RunStopped in the main thread, and `checkpoint_signal` (one of
    CHECKPOINT_SIGNALS, or None) set the flag that checkpoint_requested() reads. Python runs signal
    handlers in the main thread only, so elsewhere this does nothing."""
    if checkpoint_signal not in (None, *CHECKPOINT_SIGNALS):
        raise ValueError(f"checkpoint signal {checkpoint_signal!r}: use one of {', '.join(CHECKPOINT_SIGNALS)} or None")
    if threading.current_thread() is not threading.main_thread():
        return
    global _installed_in
    _installed_in = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    if checkpoint_signal is not None:
        signal.signal(signal.Signals[checkpoint_signal], _request_checkpoint)


def raise_if_stopped() -> None:
    """Raise RunStopped again if a stop signal arrived and its exception was lost. Python drops an
    exception raised inside a fork's callbacks or a finaliser (a __del__, a weakref callback) with
    an "Exception ignored" line, and the handler runs wherever the main thread is: the loop calls
    this at every step so that such a stop still ends in an orderly way."""
    if _stopped_by is not None:
        raise RunStopped(_stopped_by)


def checkpoint_requested() -> bool:
    return _checkpoint.is_set()


def clear() -> None:
    _checkpoint.clear()


def exit_status(exc: BaseException) -> int:
    """The shell's convention for a process ended by signal N (128 + N) for RunStopped, else 1."""
    return 128 + exc.signum if isinstance(exc, RunStopped) else 1


def _stop(signum, frame) -> None:
    global _stopped_by
    if os.getpid() != _installed_in:
        # A process forked from a rank (megatron's checkpoint writers) gets the job's SIGTERM too:
        # it must end now, not run the rank's cleanup, which belongs to the rank.
        os._exit(128 + signum)
    if _stopped_by is not None:  # the user asked twice: cleanup is hanging or too slow for them
        os._exit(128 + signum)
    _stopped_by = signum
    # The RunStopped below can be lost: Python drops an exception raised inside a fork's callbacks
    # (logging's lock release; megatron's checkpoint save forks its writers) or a finaliser. The loop re-raises it at
    # its next step (raise_if_stopped), but a rank whose peers have stopped may never get there,
    # waiting in a collective: whatever happens, the process ends STOP_GRACE_S after the signal,
    # which also bounds a cleanup that hangs (the local reward server's own grace is 10 s).
    deadline = threading.Timer(STOP_GRACE_S, os._exit, args=(128 + signum,))
    deadline.daemon = True  # an orderly stop exits without waiting for it
    deadline.start()
    raise RunStopped(signum)


def _request_checkpoint(signum, frame) -> None:
    if os.getpid() != _installed_in:
        return  # a forked writer: the rank it belongs to checkpoints
    _checkpoint.set()
    # os.write, not print: the handler may interrupt a print to stderr, and re-entering it raises.
    rank = os.environ.get("RANK", "0")
    os.write(2, f"rank {rank}: {signal.Signals(signum).name} arrived: checkpointing at the next optimiser step, "
                f"then exiting with status {EXIT_REQUEUE}\n".encode())
