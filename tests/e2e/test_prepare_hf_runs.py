"""The end-to-end cases of tests/unit/test_prepare_hf.py: those that start a process or run a training
job."""

import json
import os
import signal
import subprocess
import sys
import time

from ..conftest import ROOT
from ..unit.test_prepare_hf import CACHE, hf_cache, sources, tokenizer  # noqa: F401  (hf_cache: autouse)


def run_cli(code, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # SIGINT as a terminal delivers it: a suite started from a background job (nohup ... &) hands its children
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    return subprocess.Popen([sys.executable, "-c", code], env=env, preexec_fn=default_sigint, **kwargs)


def test_without_datasets_installed_names_the_extra(sources, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['datasets'] = None; from exp.data.prepare import main; "
        f"raise SystemExit(main([{sources['json']!r}, '--out', {str(out)!r}]))"
    )
    proc = run_cli(code, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "needs the Hugging Face `datasets` package" in lines[0], err
    assert "pip install -e '.[hf]'" in lines[0] and not out.exists()


def test_progress_bar_on_a_terminal_shows_documents_tokens_and_rate(sources, tokenizer, tmp_path):
    import fcntl
    import struct
    import termios

    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    out = tmp_path / "out"
    code = (
        "import exp.data.prepare as p; p.BATCH_DOCS = 4; p.REFRESH_S = 0; "
        f"raise SystemExit(p.main([{sources['json']!r}, '--out', {str(out)!r}, '--tokenizer', {str(tokenizer)!r}, "
        f"'--cache-dir', {CACHE['dir']!r}]))"
    )
    proc = run_cli(code, stderr=secondary, stdout=subprocess.DEVNULL)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    lines = shown.decode(errors="replace").replace("\r", "\n")
    assert "tokenizing: 40 docs" in lines and " tokens, " in lines and "MB/s" in lines, lines[-2000:]


def test_interrupted_prepare_writes_nothing(tmp_path):
    fifo = tmp_path / "slow.jsonl"  # a JSONL input that arrives slowly: prepare waits on it mid-build
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = run_cli(
        f"from exp.data.prepare import main; raise SystemExit(main([{str(fifo)!r}, '--out', {str(out)!r}]))",
        stderr=subprocess.PIPE,
        text=True,
    )
    with open(fifo, "w") as f:
        f.write(json.dumps({"text": "first document"}) + "\n")
        f.flush()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("out.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob("out.tmp-*")), "prepare never started writing"
        proc.send_signal(signal.SIGINT)
    # the input ends now: the kernel may hand SIGINT to a helper thread (OpenBLAS's, say), and then only the main
    # thread's next bytecode raises KeyboardInterrupt, which needs its read of the FIFO to return
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: nothing written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.jsonl"]
