"""A quiet console: warnings and log records of third-party libraries (megatron-core, Transformer
Engine, Apex, torch, transformers, datasets, ...) stay off the console and go to the run's log,
output_dir/console.log (rank 0), with every console line. This project's own warnings still show.

`install()` (idempotent, early: before megatron imports) routes them; until `attach(path)` names the
log file they wait in a small buffer, written to the file when it opens. `attach(None)` (ranks
other than 0) drops them: rank 0's log has the same ones.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

# Top-level packages whose warnings and log records go to the log file only.
THIRD_PARTY = ("megatron", "transformer_engine", "apex", "torch", "transformers", "datasets", "accelerate",
               "huggingface_hub", "tokenizers", "safetensors", "numpy", "triton", "flash_attn", "nemo",
               "lightning", "pytorch_lightning", "tensorboard", "torch_tensorrt", "tensorrt_llm", "modelopt")
_BUFFER_LIMIT = 1000

_state = {"file": None, "buffer": [], "attached": False, "previous_showwarning": None}


def is_third_party(filename: str) -> bool:
    """A warning raised from `filename` is another library's: a file of one of THIRD_PARTY or of
    site-packages that is not this package's. Ours, user code and scripts are not."""
    parts = Path(str(filename)).parts
    if "metaapo_nemo" in parts:
        return False
    stems = {Path(p).stem for p in parts}
    return bool(stems & set(THIRD_PARTY)) or "site-packages" in parts or "dist-packages" in parts


def record(line: str) -> None:
    """Append `line` to the log file (or the buffer before attach; dropped after attach(None))."""
    text = f"{time.strftime('%H:%M:%S')} {line.rstrip()}\n"
    if _state["file"] is not None:
        _state["file"].write(text)
        _state["file"].flush()
    elif not _state["attached"] and len(_state["buffer"]) < _BUFFER_LIMIT:
        _state["buffer"].append(text)


def _showwarning(message, category, filename, lineno, file=None, line=None):
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    record(text)
    if not is_third_party(filename):
        previous = _state["previous_showwarning"] or warnings._showwarning_orig
        previous(message, category, filename, lineno, file, line)


class _ToLog(logging.Handler):
    def emit(self, rec: logging.LogRecord) -> None:
        try:
            record(f"{rec.levelname} {rec.name}: {rec.getMessage()}")
        except Exception:  # a log record must never stop the run
            self.handleError(rec)


_HANDLER = _ToLog()


def _route_loggers() -> None:
    consoles = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):  # e.g. transformers' own stderr handler
            if type(h) is logging.StreamHandler and h.stream in consoles:
                lg.removeHandler(h)
        if _HANDLER not in lg.handlers:
            lg.addHandler(_HANDLER)
        lg.propagate = False


def install() -> None:
    """Route third-party warnings and log records to the log; again after more libraries imported
    (transformers adds its console handler on import) is harmless."""
    if warnings.showwarning is not _showwarning:
        _state["previous_showwarning"] = warnings.showwarning
        warnings.showwarning = _showwarning
    _route_loggers()


def attach(path: str | Path | None) -> None:
    """Write the log to `path` from now on (appending: a resumed run keeps the earlier lines),
    first what waited in the buffer; None: drop them (ranks other than 0)."""
    install()
    detach()
    _state["attached"] = True
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _state["file"] = open(path, "a", encoding="utf-8")
        _state["file"].writelines(_state["buffer"])
        _state["file"].flush()
    _state["buffer"] = []


def detach() -> None:
    """Close the log file (the end of the run); later lines wait in the buffer again."""
    if _state["file"] is not None:
        _state["file"].close()
    _state["file"], _state["attached"] = None, False


def log_path() -> Path | None:
    f = _state["file"]
    return Path(f.name) if f is not None else None
