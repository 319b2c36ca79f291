"""Data workers start from a forkserver when the main module may be imported again, else fork."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BODY = """
import warnings
warnings.simplefilter("always")
from lightning_wsi.data.processes import worker_context
print(worker_context(["lightning_wsi.data.tiling"]).get_start_method())
"""


@pytest.mark.parametrize(("guarded", "method"), [(True, "forkserver"), (False, "fork")])
def test_start_method_follows_the_main_guard(tmp_path: Path, guarded: bool, method: str) -> None:
    script = tmp_path / "job.py"
    if guarded:
        body = "".join(f"    {line}\n" for line in BODY.strip().splitlines())
        script.write_text(f'if __name__ == "__main__":\n{body}')
    else:
        script.write_text(BODY)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [method]
    warned = 'if __name__ == "__main__":` guard' in done.stderr
    assert warned == (not guarded), done.stderr[-2000:]
