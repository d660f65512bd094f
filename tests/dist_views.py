"""torchrun helper: run a stage script with rank 1 seeing its own view of the files, as a node with its own
disk does (tests/test_dpo.py).

    VIEW=no_ref_cache torchrun --nproc_per_node=2 tests/dist_views.py dpo.py --ref_cache=1 ...
    VIEW=fewer_rows   torchrun --nproc_per_node=2 tests/dist_views.py dpo.py ...
"""

import os
import runpy
import sys

import tasks

if os.environ["RANK"] == "1" and os.environ["VIEW"] == "no_ref_cache":  # rank 0's disk has the cache, rank 1's not
    exists = os.path.exists
    os.path.exists = lambda path: "ref_logps" not in str(path) and exists(path)
if os.environ["RANK"] == "1" and os.environ["VIEW"] == "fewer_rows":  # an older copy of the data file
    read = tasks.read_jsonl
    tasks.read_jsonl = lambda *args, **kwargs: read(*args, **kwargs)[:-5]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
