"""Per-step cost of torchft's quorum on CPU: what a titan step adds under [fault_tolerance].

Two replica groups of one process each (forked), a lighthouse in this process. Per step, each
group runs what FaultTolerantTrainer runs across groups: start_quorum (synchronous, as titan
uses it), the target-count all-reduce (groups + 1 float64), the loss all-reduce (1 float32),
the gradient all-reduce (`--elements` float32, one bucket) and should_commit. Without torchft
the same two processes run the gradient all-reduce alone over a plain gloo group (HSDP's
replicate all-reduce). Reported: the median per step of each part, in milliseconds.

    python benchmarks/torchft_quorum.py [--steps 50] [--elements 1000000]
"""

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(rank: int, port: int, steps: int, elements: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    grads, times = torch.ones(elements), []
    for _ in range(steps):
        start = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    out.put(("plain", rank, {"allreduce": times}))


def _ft(group: int, lighthouse: str, steps: int, elements: int, out) -> None:
    from torchft import Manager
    from torchft.process_group import ProcessGroupGloo

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timedelta(seconds=30)), load_state_dict=lambda s: None,
        state_dict=lambda: {}, min_replica_size=2, use_async_quorum=False, rank=0,
        world_size=1, store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=lighthouse,
        replica_id=f"bench_{group}", init_sync=False,
    )  # fmt: skip
    grads = torch.ones(elements)
    parts: dict[str, list[float]] = {k: [] for k in ("quorum", "counts", "allreduce", "commit")}

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        parts[name].append(time.perf_counter() - start)

    def reduce(t):
        return lambda: manager.allreduce(t, reduce_op=dist.ReduceOp.SUM).wait()

    for _ in range(steps):
        timed("quorum", manager.start_quorum)
        timed("counts", reduce(torch.zeros(3, dtype=torch.float64)))
        timed("counts", reduce(torch.zeros(1)))
        timed("allreduce", reduce(grads))
        timed("commit", manager.should_commit)
    # two small all-reduces per step: report them as one figure per step
    pairs = zip(parts["counts"][::2], parts["counts"][1::2], strict=True)
    parts["counts"] = [a + b for a, b in pairs]
    manager.shutdown(wait=False)
    out.put(("torchft", group, parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--elements", type=int, default=1_000_000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torchft.coordination import LighthouseServer

    # spawn: a process forked after torchft's Rust runtime started (the lighthouse here) never
    # reaches the lighthouse (its runtime threads are not forked)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results = {}
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
    for label, target, extra in (
        ("plain", _plain, [_free_port()]),
        ("torchft", _ft, [lighthouse.address()]),
    ):
        procs = [ctx.Process(target=target, args=(r, *extra, args.steps, args.elements, out))
                 for r in range(2)]  # fmt: skip
        for p in procs:
            p.start()
        got = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        # the first steps build the groups: skip a fifth of the steps
        skip = args.steps // 5
        results[label] = {k: 1e3 * statistics.median(v[skip:]) for k, v in got[0][2].items()}
    lighthouse.shutdown()
    mib = args.elements * 4 / 2**20
    print(f"torch {torch.__version__}, {args.steps} steps, gradient bucket {args.elements:,} "
          f"fp32 ({mib:.1f} MiB), 2 groups x 1 process, CPU gloo")  # fmt: skip
    for label, parts in results.items():
        total = sum(parts.values())
        cols = "  ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(f"{label:8s} per step (ms, median): {cols}  total {total:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
