"""The console: no source paths, third-party warnings to the log file only, plain progress lines
off a terminal, the final table."""
import io
import sys
import warnings

import pytest

from metaapo_nemo import quiet
from metaapo_nemo.metrics import Console, summary_table


@pytest.fixture
def log_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _to_stderr  # Python's own, where pytest records them instead
        quiet.attach(tmp_path / "console.log")
        try:
            yield tmp_path / "console.log"
        finally:
            quiet.detach()


def _to_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _console(width=120):
    out = io.StringIO()
    return Console(file=out, width=width), out


def test_console_lines_carry_no_source_path():
    console, out = _console()
    console.log("held-out reward of the starting policy: 0.5000")
    text = out.getvalue()
    assert "held-out reward of the starting policy: 0.5000" in text
    assert ".py:" not in text and "test_console" not in text


def test_console_lines_reach_the_log_file_without_markup(log_file):
    console, _ = _console()
    console.log("[yellow]warning: something[/yellow]")
    assert "warning: something" in log_file.read_text() and "[yellow]" not in log_file.read_text()


def test_third_party_warnings_go_to_the_log_file_ours_to_the_console(log_file, capsys):
    warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning,
                           "/x/site-packages/megatron/core/fake.py", 7, module="megatron.core.fake")
    warnings.warn_explicit("full scope is deprecated", UserWarning, "/opt/Megatron-LM/megatron/core/fake.py", 8,
                           module="megatron.core.fake")
    warnings.warn_explicit("a warning of ours", UserWarning, "/src/metaapo_nemo/algorithm/metaapo.py", 9,
                           module="metaapo_nemo.algorithm.metaapo")
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert "Apex is not installed" not in console and "full scope is deprecated" not in console
    assert "a warning of ours" in console
    log = log_file.read_text()
    assert "Apex is not installed" in log and "full scope is deprecated" in log and "a warning of ours" in log


def test_third_party_log_records_go_to_the_log_file(log_file, capsys):
    import logging

    logging.getLogger("megatron.core.fake").warning("a megatron log record")
    captured = capsys.readouterr()
    assert "a megatron log record" not in captured.out + captured.err
    assert "a megatron log record" in log_file.read_text()


def test_warnings_before_the_log_file_opens_are_kept_for_it(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _to_stderr
        quiet.detach()
        quiet.install()
        warnings.warn_explicit("early megatron warning", UserWarning, "/x/site-packages/megatron/core/early.py", 1,
                               module="megatron.core.early")
        quiet.attach(tmp_path / "console.log")
        quiet.detach()
    assert "early megatron warning" not in capsys.readouterr().err
    assert "early megatron warning" in (tmp_path / "console.log").read_text()


def test_progress_off_a_terminal_prints_the_plain_lines(log_file):
    console, out = _console()
    with console.progress("train it1", total=20) as advance:
        for k in range(20):
            advance(f"loss {k:.4f}")
    lines = [line for line in out.getvalue().splitlines() if "train it1" in line]
    assert len(lines) == 10 and "train it1: 2/20 loss 1.0000" in lines[0] and "train it1: 20/20" in lines[-1]
    assert "train it1: 20/20 loss 19.0000" in log_file.read_text()

    console, out = _console()
    with console.progress("SFT", total=7, every=3) as advance:
        for _ in range(7):
            advance()
    assert [line.split("] ", 1)[-1].strip() for line in out.getvalue().splitlines()] == ["SFT: 3/7", "SFT: 6/7", "SFT: 7/7"]


def test_phase_off_a_terminal_writes_its_duration_to_the_log_file_only(log_file):
    console, out = _console()
    with console.phase("sampling 4 x 2 responses"):
        pass
    assert out.getvalue() == ""
    assert "sampling 4 x 2 responses:" in log_file.read_text()


def test_progress_on_a_terminal_draws_a_bar_with_rate_and_eta():
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=True)
    with console.progress("train it1", total=4) as advance:
        for _ in range(4):
            advance("loss 0.1")
    text = out.getvalue()
    assert "4/4" in text and "ETA" in text and "it/s" in text or "s/it" in text


def test_final_table_holds_the_numbers_it_was_given():
    summary = {"algorithm": "metaapo", "iterations": 2, "reward_initial": 0.4123, "reward_final": 0.6789,
               "annotation_ratio": 0.375, "prompts_annotated": 36, "prompts_considered": 96, "num_online_pairs": 31,
               "meta_updates": 12, "optimizer_steps": 24, "seconds": {"scoring": 1.25, "training": 40.5},
               "tokens_per_second": {"training": 1234.4, "generation": 567.8}}
    console, out = _console(width=100)
    console.print_table(summary_table(summary))
    text = out.getvalue()
    for wanted in ("0.4123 -> 0.6789", "0.375", "36/96", "31", "12", "24", "1.2", "40.5", "1234", "568",
                   "held-out reward", "annotation ratio", "online pairs", "meta updates", "tokens/s"):
        assert wanted in text, wanted
