"""Run several gpt2ft training commands in one torchrun launch (tests/test_distributed.py): each process
imports torch once and runs every command of the plan in-process, in order, through gpt2ft.cli.main.

    torchrun --nproc_per_node 2 tests/distributed_driver.py PLAN.json

PLAN.json: {"runs": [{"name": ..., "argv": [...], "kill": {"rank": 1, "call": 4}}], "done": DIR, "device": "cpu"}.
The process group is gloo on CPUs, NCCL (and gloo for CPU tensors) on GPUs. After each
command every process writes DIR/NAME.RANK with its exit status. "kill": that rank SIGKILLs itself in its
given call of the loop's accumulate_gradients (in the middle of that optimizer step, after its first
forward), as a crashed node would; the other processes are left to notice.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def kill_in_call(rank: int, call: int) -> None:
    from gpt2ft.train import loop

    if int(os.environ["RANK"]) != rank:
        return
    real, calls = loop.accumulate_gradients, [0]

    def accumulate(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    loop.accumulate_gradients = accumulate


def main(plan_file: str) -> int:
    from gpt2ft.cli import main as gpt2ft

    torch.set_num_threads(1)
    plan = json.loads(Path(plan_file).read_text())
    done = Path(plan["done"])
    if plan.get("device", "cpu").startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:  # once for every command: the strategies leave a group they did not make
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    for run in plan["runs"]:
        if run.get("kill"):
            kill_in_call(**run["kill"])
        started = time.process_time()
        code = gpt2ft(run["argv"])
        print(f"[driver rank {rank}] {run['name']}: exit {code}, {time.process_time() - started:.1f} s CPU",
              file=sys.stderr, flush=True)
        (done / f"{run['name']}.{rank}").write_text(str(code))
        if code != 0:
            return code
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
