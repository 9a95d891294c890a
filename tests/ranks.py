"""Two CPU ranks under torchrun (gloo), judged by what every rank reports (tests/rank_main.py)."""
import os
import subprocess
import sys

from conftest import ROOT


def torchrun(script, args: list[str], tmp_path, nproc: int = 2, timeout: int = 300):
    """Run `script ARGS` on `nproc` ranks; assert that it exited 0 and that every rank finished its
    work. --standalone picks a free port (two tests at once, or a port still held, never clash)."""
    done = tmp_path / "ranks-done"
    done.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(ROOT / "tests" / "rank_main.py"), str(done), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(done)) == [f"rank-{r}" for r in range(nproc)], proc.stderr[-3000:]
    return proc
