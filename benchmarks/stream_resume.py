"""Issue 21's streaming and resume benchmark: ``lmcompose compress --stream`` on a checkpoint made by
``make_random_checkpoint.py``, once uninterrupted (wall time and peak RSS), then again into another
directory, SIGKILLed at random points and continued with ``--resume`` each time; the two checkpoints must
hold bit-identical tensors (the sha256 of every tensor, re-read from the shards of both).

Each run is a child process; its peak RSS is its own (``os.wait4``). A kill lands at a random moment
while the chosen block is being compressed (the journal is polled until the blocks before it are done).

    python benchmarks/make_random_checkpoint.py --out /tmp/llama2-7b-random
    OMP_NUM_THREADS=2 python benchmarks/stream_resume.py --model /tmp/llama2-7b-random --out /tmp/sr \\
        --kills 3 --json benchmarks/results/stream_resume_7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], kill_after_done: int | None = None, journal: Path | None = None) -> dict:
    """Run `cmd`; with `kill_after_done`, SIGKILL it once the journal says that many blocks are done."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    killed = False
    while True:  # os.wait4, not Popen.poll: it reaps the child with its own resource usage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if kill_after_done is not None and not killed else 0)
        if pid:
            break
        try:
            done = json.loads(journal.read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = -1
        if done >= kill_after_done:
            time.sleep(random.uniform(0.0, 2.0))  # somewhere inside the next block
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        else:
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "killed": killed, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 3)}  # ru_maxrss is in KiB on Linux


def tensor_sums(out: Path) -> dict[str, str]:
    """sha256 of every tensor of a saved run directory, re-read from its shards one at a time."""
    from safetensors import safe_open

    from lmcompose.models.integrity import tensor_sha256

    sums = {}
    for shard in sorted(out.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                sums[key] = tensor_sha256(f.get_tensor(key))
    return sums


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="a directory for the recipe and both runs")
    p.add_argument("--recipe", default="calibration: {n: 16, seqlen: 512, batch_size: 4}\n"
                                       "steps:\n  - rtn: {bits: 4, group_size: 128}\n",
                   help="recipe YAML text (default: RTN w4 g128, 16 windows of 512 tokens)")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full", action="store_true", help="only the killed/resumed run")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    random.seed(args.seed)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    recipe = root / "recipe.yaml"
    recipe.write_text(args.recipe)
    blocks = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    base = [sys.executable, "-m", "lmcompose.cli", "compress", "--model", args.model, "--recipe", str(recipe),
            "--stream", "--eval", "none", "--overwrite"]
    results = {"model": args.model, "blocks": blocks, "recipe": args.recipe, "threads": os.environ.get("OMP_NUM_THREADS")}
    if not args.skip_full:
        results["full"] = run([*base, "--out", str(root / "full")])
        print("uninterrupted:", results["full"], flush=True)
    cut = root / "cut"
    journal = cut.with_name(cut.name + ".partial") / "journal.json"
    points = sorted(random.sample(range(0, blocks), min(args.kills, blocks)))
    results["kills"] = []
    for i, point in enumerate(points):
        cmd = [*base, "--out", str(cut)] + (["--resume"] if i else [])
        if not i:
            cmd.remove("--overwrite")
            cmd.append("--overwrite")  # a fresh start: discards an older cut run
        r = run(cmd, kill_after_done=point, journal=journal)
        r["killed_after_blocks"] = point
        results["kills"].append(r)
        print(f"kill {i + 1}:", r, flush=True)
    results["resumed"] = run([*base[:-1], "--out", str(cut), "--resume"])
    print("resumed to the end:", results["resumed"], flush=True)
    if not args.skip_full:
        a, b = tensor_sums(root / "full"), tensor_sums(cut)
        results["bit_identical"] = a == b
        results["tensors"] = len(a)
        print(f"bit-identical: {a == b} ({len(a)} tensors)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results.get("bit_identical", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
