"""What the fair scheduler costs against FIFO, without a model: batches, padding, queue time.

Queues seeded workloads of many tenants and drains them with each policy. Reported per
workload and policy: the batches built, padded tokens over real tokens (what a padded batch
computes for nothing: the price of fairness narrowing length bucketing's choice), and the
event loop's time per ``next_batch``.

    python bench/scheduler_cost.py
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.queue import POLICIES, Entry, make_queue  # noqa: E402

# (name, tenants, calls per tenant, documents per call, shortest, longest row tokens)
WORKLOADS = [
    ("2 keys x 2 calls x 40 docs, 20-300 tokens", 2, 2, 40, 20, 300),
    ("100 keys x 4 calls x 10 docs, 20-300 tokens", 100, 4, 10, 20, 300),
    ("100 keys x 1 call x 1 doc, 40-60 tokens", 100, 1, 1, 40, 60),
    ("1 key x 8 calls x 64 docs, 50-60 tokens", 1, 8, 64, 50, 60),
]


@dataclass(eq=False)
class Call:
    cancelled: bool = False


def drain(policy: str, workload: tuple[str, int, int, int, int, int], budget: int, rows: int,
          seed: int) -> dict[str, object]:
    name, tenants, calls, docs, lo, hi = workload
    rng = random.Random(seed)
    queue = make_queue(policy, budget, rows)
    real = 0
    for tenant in range(tenants):
        for _ in range(calls):
            call = Call()
            entries = [Entry(list(range(rng.randint(lo, hi))), 0, call, i) for i in range(docs)]
            real += sum(e.cost for e in entries)
            queue.append(entries, tenant=str(tenant))
    batches = padded = 0
    started = time.perf_counter()
    while batch := queue.next_batch():
        batches += 1
        padded += len(batch) * max(e.cost for e in batch)
    seconds = time.perf_counter() - started
    return {"workload": name, "policy": policy, "batches": batches, "padded_over_real": round(padded / real, 3),
            "us_per_batch": round(1e6 * seconds / batches)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| workload | policy | batches | padded / real tokens | us per next_batch |")
    print("| --- | --- | --- | --- | --- |")
    for workload in WORKLOADS:
        for policy in POLICIES[::-1]:
            row = drain(policy, workload, args.max_batch_tokens, args.max_batch_size, args.seed)
            print("| " + " | ".join(str(v) for v in row.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
