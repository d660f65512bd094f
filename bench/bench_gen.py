"""
gen.py's request concurrency against the loopback fake OpenRouter with a fixed latency per
request: records/s achieved divided by the ideal workers / latency (1.0 = every worker is
always waiting on a request; the goal is >= 0.9 at 16 workers).

    python bench/bench_gen.py                                  # 200 ms, 16 workers, 400 records
    python bench/bench_gen.py --latency 0.2 --workers 32 --records 800

Runs the real gen.py as a subprocess (its own process, as a user would), in a temp base dir.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from openrouter_server import FakeOpenRouter  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--records", type=int, default=400, help="SFT conversations, then as many DPO pairs")
    args = p.parse_args()
    server = FakeOpenRouter(latency=args.latency).start()
    with tempfile.TemporaryDirectory() as base:
        env = dict(os.environ, NANOCHAT_BASE_DIR=base, OPENROUTER_API_KEY="bench", OPENROUTER_BASE_URL=server.url)
        cmd = [sys.executable, os.path.join(ROOT, "gen.py"), f"--sft-examples={args.records}",
               f"--dpo-examples={args.records}", f"--workers={args.workers}"]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        with open(os.path.join(base, "datasets", "trader_gen_summary.json")) as f:
            summary = json.load(f)
    server.stop()
    wall = summary["wall_seconds"]  # generation only: the process start and torch import are not counted
    records = sum(k["records"] for k in summary["kinds"].values())
    requests = sum(m["requests"] for m in summary["models"].values())
    ideal = args.workers / args.latency
    print(f"latency {args.latency * 1000:.0f} ms, {args.workers} workers: {records} records ({requests} requests) "
          f"in {wall:.2f} s = {records / wall:.1f} records/s; ideal {ideal:.1f}/s; "
          f"efficiency {records / wall / ideal:.3f}")


if __name__ == "__main__":
    main()
