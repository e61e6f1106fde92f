"""Share of one training step spent in the fused subspace ops: `python bench/profile_train_step.py`.

The same step as bench/test_bench_train.py (AnisoPrecond(fashion_mnist_unet(), DCTBasis(28, 28, 14)), batch 32,
trajectory loss with the estimator, then backward), profiled with torch.profiler; prints the self CPU time of the
aniso_fast:: custom ops against the whole step. It bounds what any kernel speed-up can do end to end (Amdahl).
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.processes.losses import trajectory_loss
from aniso_fast.networks.unet import fashion_mnist_unet
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.geometry.schedules import MatrixSchedule


def main() -> None:
    torch.manual_seed(0)
    model = AnisoPrecond(fashion_mnist_unet(), DCTBasis(28, 28, 14)).train()
    schedule = MatrixSchedule(2, num_classes=10)
    x0 = torch.rand(32, 1, 28, 28) * 2 - 1
    labels = torch.arange(32) % 10

    def step():
        loss, _ = trajectory_loss(model, schedule, x0, labels, estimator=True, generator=torch.Generator().manual_seed(0))
        loss.backward()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    events = prof.key_averages()
    ours = [e for e in events if e.key.startswith("aniso_fast::")]
    ours_us = sum(e.self_cpu_time_total for e in ours)
    all_us = sum(e.self_cpu_time_total for e in events)
    print(f"step {seconds * 1e3:.0f} ms (torch threads {torch.get_num_threads()}); aniso_fast ops: "
          f"{ours_us / 1e3:.1f} ms self CPU = {100 * ours_us / all_us:.2f}% of the profiled CPU time")
    for e in sorted(ours, key=lambda e: -e.self_cpu_time_total):
        print(f"  {e.key:36s} calls {e.count:4d}  self {e.self_cpu_time_total / 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
