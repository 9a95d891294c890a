"""Runs one medrl script as a torchrun rank for the tests, then leaves without interpreter
teardown.

    torchrun --standalone --nproc_per_node 2 tests/rank_main.py DONE SCRIPT ARGS...

The script runs as `python SCRIPT ARGS...` would run it. Once it returns, the rank writes
DONE/rank-<RANK> and exits at once: gloo's worker threads, torn down with the interpreter after
the process group is destroyed, now and then abort a rank ("terminate called without an active
exception") after all of its work is done. The test then judges what the ranks wrote (their
files, and the DONE marks), not how the interpreter ended. A script that raises still fails the
rank: the exception propagates, and no mark is written.
"""
import os
import runpy
import sys

done, script, *args = sys.argv[1:]
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
with open(os.path.join(done, f"rank-{os.environ['RANK']}"), "w") as f:
    f.write("done\n")
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
