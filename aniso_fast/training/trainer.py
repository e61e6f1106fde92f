"""The training loop of `python -m aniso_fast.train` (METHOD §2.2, §4, §8, §9); the options are `config`'s, the
starting state `setup`'s, checkpoints and resume `checkpointing`'s, and everything a family decides (its forward
path, network, loss, forward update, sampler) the family's (`processes.registry`).

Core stages (METHOD §2.2 chain: edm -> iso -> aniso, each `--init-from` the previous checkpoint):
- `edm`: train or fine-tune the network alone with EDM's own loss (`losses.edm_loss`: log-normal sigma, lambda(sigma)
  weighting); the schedule stays the frozen Karras initialisation (§2.2).
- `iso`: learn an isotropic schedule (tied MatrixSchedule) jointly with the network, `iso_loss` (§4.1).
- `aniso`: learn one schedule per subspace of the basis, `trajectory_loss` with the schedule-gradient estimator
  (§4.2, §5), c = 0.5 and a batch sum by default.

One optimiser step = one global batch of `--batch` images, split into `--grad-accum` micro-batches per rank and
sharded over ranks: `grad_accum x world_size` chunks. The step's gradient is the mean over chunks of each chunk's
loss (iso: chunk mean, so the global-batch mean; aniso: chunk sum, the reference's `loss / grad_accum`, §4.4), the
same whatever the split into ranks and accumulation. Every random draw of a chunk (t, noise, estimator direction,
dropout) is seeded from (seed, step, chunk), so a run resumes bit-identically and a 2-rank run sees the same noise
as 1 rank with twice the accumulation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..geometry.bases import SubspaceBasis
from ..networks.execution import Execution, execute
from ..processes import registry
from .. import sampling
from ..store import checkpoint as ckpt
from ..utils import figures
from ..utils.atomic import atomic_write_text
from ..utils.data import ImageDataset, InfiniteBatchSampler, load_dataset, to_uint8
from . import checkpointing, distributed, optim, setup
from .config import parse_args
from .ema import EMA, ema_beta

__all__ = ["Trainer", "run", "main"]

_FORWARD_CHUNK = 2 ** 31  # the chunk index of the forward update's path seeds (the data chunks count from 0)


def _chunk_seed(seed: int, step: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Trainer:
    """Everything one training run holds; `fit()` runs it. Validation happens in the constructor, before any
    training step and any file written: data, labels, basis/image size, network/data, checkpoint configuration."""

    def __init__(self, args: argparse.Namespace, dist: distributed.Dist | None = None):
        self.args = args
        self.family = registry.get(args.family)
        self.dist = dist if dist is not None else distributed.init(args.device)
        self.device = self.dist.device
        self.out = Path(args.out)
        self.resume_path: Path | None = None
        self.step = 0
        self.nimg = 0
        self.decay = optim.lr_decay(args.kimg, args.decay_start_kimg, args.decay_halflife_kimg)
        W = self.dist.world_size
        if args.batch % (args.grad_accum * W):
            raise ValueError(f"--batch {args.batch} must be divisible by --grad-accum x world size = "
                             f"{args.grad_accum} x {W}")

        resume = checkpointing.find_resume(args, self.out)
        self._load_data()
        if resume:
            self.resume_path, tensors, meta = resume
            checkpointing.check_resume(args, meta, list(self.data.images.shape), self.num_classes)
            net, basis, process, ema_state = setup.resumed_run(tensors, meta)
        else:
            net, basis, process, ema_state = setup.new_run(args, self.data, self.num_classes)
        self._set_basis(basis)
        self._set_process(process)
        self._set_network(net, ema_state)
        self._build_optim()
        if resume:
            self._load_state(tensors, meta)

    def _load_data(self) -> None:
        args = self.args
        try:
            data = load_dataset(args.data)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ValueError(f"--data {args.data}: {e}") from None
        if data.images.shape[0] < 1:
            raise ValueError(f"--data {args.data}: no images")
        _, C, H, W = data.images.shape
        if H != W:
            raise ValueError(f"--data {args.data}: images are {H}x{W}; the network needs square images")
        self.data = data
        self.num_classes = data.num_classes if data.labels is not None else 0
        if args.class_schedules and data.labels is None:
            raise ValueError(f"--class-schedules needs class labels, and {args.data} has none")
        if args.cond and data.labels is None:
            raise ValueError(f"--cond needs class labels, and {args.data} has none")
        self.dataset = ImageDataset(data.images, data.labels, xflip=args.xflip)
        self.sampler = InfiniteBatchSampler(len(self.dataset), args.batch, seed=args.seed)

    def _set_basis(self, basis: SubspaceBasis) -> None:
        H, W = self.data.images.shape[-2:]
        if basis.image_size is not None and tuple(basis.image_size) != (H, W):
            raise ValueError(f"the basis is for {basis.image_size[0]}x{basis.image_size[1]} images, the data is "
                             f"{H}x{W}")
        self.basis = basis.to(self.device)
        # PCA fits and GPU reductions may differ in the last bit between ranks: rank 0's basis is the basis
        self.dist.broadcast_(t for t in self.basis.state_dict().values() if t.numel())

    def _set_process(self, process) -> None:
        """The forward path (a MatrixSchedule, or the family's process): one parameter [S, K...], class rows first."""
        if process.num_subspaces != self.basis.num_subspaces:
            raise ValueError(f"the schedule has {process.num_subspaces} subspaces, the basis "
                             f"{self.basis.num_subspaces}")
        self.process = process.to(self.device)
        self.process_param, = self.process.parameters()
        self.learn_process = self.family.learns_process(self.args)
        # the alternating rules move the process only in their forward updates, apart from the network's steps
        self.alternating = self.family.alternating(self.args)
        self.process.requires_grad_(self.learn_process)
        self.dist.broadcast_([self.process_param.data])

    def _set_network(self, net, ema_state: dict | None) -> None:
        args = self.args
        setup.check_network(args, net, self.data, self.num_classes)
        inner = getattr(net, "net", net)  # VSMD's VelocityScoreNet wraps a SongUNet
        if getattr(inner, "map_augment", None) is not None:
            # no augmentation pipe passes augment labels: these weights get no gradient, and DDP must not wait for them
            inner.map_augment.requires_grad_(False)
        self.net = net.to(self.device).train()
        self.precond_config = self.family.precond_config(args)
        self.loss_model = self.family.wrap(self.net, self.basis, self.process, self.precond_config)
        self.ddp = None
        if self.dist.enabled:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # the constructor broadcasts rank 0's weights; the net's buffers are constants: no per-forward sync
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
            self.ddp = DDP(self.net, device_ids=[self.device] if self.device.type == "cuda" else None, **no_sync)
            # the loss calls precond.flow/denoise, which call .net: route that call through DDP's forward so that
            # network gradients are averaged over ranks (the reference skipped DDP's forward, METHOD §10.11): below
        # the loss's network calls run under --precision (autocast around the network only; the weights, their
        # gradients, the optimiser state and the EMA stay float32); fp16 scales the loss (CUDA only)
        execute(self.loss_model, Execution(args.precision), network=self.ddp if self.ddp is not None else self.net)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None
        self.ema = EMA(self.net)
        if ema_state is not None:
            self.ema.module.load_state_dict(ema_state)

    def _build_optim(self) -> None:
        self.opt_net = torch.optim.Adam(self.net.parameters(), lr=self.args.lr, betas=(0.9, 0.999), eps=1e-8)
        self.opt_process = (optim.ClassMaskedAdam([self.process_param], lr=self.args.glr) if self.learn_process
                            else None)

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, meta) of the whole run; collective under DDP (gathers every rank's RNG state). The forward
        path is stored as `schedule.*` and `schedule_config` whatever the family."""
        tensors = {}
        tensors.update(ckpt.prefixed("net", self.net.state_dict()))
        tensors.update(ckpt.prefixed("ema", self.ema.module.state_dict()))
        tensors.update(ckpt.prefixed("schedule", self.process.state_dict()))
        tensors.update(ckpt.prefixed("basis", self.basis.state_dict()))
        optim_info = {}
        for name, opt in (("net", self.opt_net), ("schedule", self.opt_process)):
            if opt is not None:
                t, info = ckpt.flatten_optimizer_state(f"optim.{name}", opt.state_dict())
                tensors.update(t)
                optim_info[name] = info
        rngs = self.dist.gather_objects(checkpointing.rng_state())
        for r, st in enumerate(rngs):
            tensors[f"rng.{r}.torch"] = st.pop("torch")
            if "cuda" in st:
                tensors[f"rng.{r}.cuda"] = st.pop("cuda")
        meta = {
            "family": self.family.name, "precond_config": self.precond_config, "stage": self.args.stage,
            "step": self.step, "nimg": self.nimg, "kimg": self.nimg / 1000,
            "args": vars(self.args), "net_config": self.net.config(), "basis_config": self.basis.config(),
            "schedule_config": self.process.config(), "optim": optim_info, "sampler": self.sampler.state_dict(),
            "rng": rngs, "world_size": self.dist.world_size, "versions": checkpointing.versions(),
            "data": {"spec": self.args.data, "shape": list(self.data.images.shape), "num_classes": self.num_classes},
        }
        return tensors, meta

    def _load_state(self, tensors: dict, meta: dict) -> None:
        for name, opt in (("net", self.opt_net), ("schedule", self.opt_process)):
            if opt is not None:
                if name not in meta["optim"]:
                    raise ckpt.CheckpointError(f"the checkpoint has no {name} optimizer state")
                opt.load_state_dict(ckpt.unflatten_optimizer_state(f"optim.{name}", tensors, meta["optim"][name]))
        self.sampler.load_state_dict(meta["sampler"])
        self.step, self.nimg = int(meta["step"]), int(meta["nimg"])
        r = self.dist.rank
        if len(meta["rng"]) == self.dist.world_size:
            checkpointing.set_rng_state(meta["rng"][r], tensors.get(f"rng.{r}.torch"), tensors.get(f"rng.{r}.cuda"))

    def save_checkpoint(self) -> Path | None:
        tensors, meta = self.state()
        if not self.dist.is_main:
            return None
        return checkpointing.save(self.out, self.step, tensors, meta, self.args.keep)

    def train_step(self, indices: Tensor | None = None) -> dict:
        """One optimiser step on the next global batch (or on dataset `indices` [batch]); returns the log record."""
        args, dist = self.args, self.dist
        t0 = time.perf_counter()
        idx = next(self.sampler) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        A, W, B = args.grad_accum, dist.world_size, idx.numel()
        chunks = idx.reshape(A, W, -1)
        loss_fn = self.family.loss(args, self.loss_model, self.process)
        step_process = self.learn_process and not self.alternating
        S = self.process_param.shape[0]
        present = torch.zeros(S, dtype=torch.bool)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        stats_total: dict[str, Tensor] = {}
        for a in range(A):
            chunk = a * W + dist.rank
            x0, labels = self.dataset.get_batch(chunks[a, dist.rank])
            x0 = x0.to(self.device)
            if labels is not None:
                if self.process.num_classes is not None:
                    present |= torch.bincount(labels, minlength=S)[:S] > 0
                labels = labels.to(self.device)
            seed = _chunk_seed(args.seed, self.step, chunk)
            torch.manual_seed(seed ^ 0x5DEECE66D)  # the global stream (dropout)
            gen = torch.Generator(self.device).manual_seed(seed)
            sync = a == A - 1 or self.ddp is None
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss, stats = loss_fn(x0, labels, gen)
                (loss / A if self.scaler is None else self.scaler.scale(loss / A)).backward()
            loss_total += loss.detach().double()
            for k, v in (stats or {}).items():  # per-subspace summaries; per-sample ones ("t") are skipped
                v = torch.as_tensor(v).detach()
                if k != "t" and v.dim() <= 1 and v.numel() <= 64:
                    stats_total[k] = stats_total.get(k, 0.0) + v.double().cpu() / A

        net_grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        process_grads = []
        if step_process:
            if self.process_param.grad is None:
                self.process_param.grad = torch.zeros_like(self.process_param)
            process_grads = [self.process_param.grad]
            dist.all_reduce_mean_(process_grads)  # network gradients were averaged by DDP in backward
        if self.scaler is not None:  # true gradients before the checks; a step with an inf is skipped by the scaler
            self.scaler.unscale_(self.opt_net)
            if step_process:
                self.scaler.unscale_(self.opt_process)
        bad_net, bad_process = optim.sanitize_grads_(net_grads), optim.sanitize_grads_(process_grads)

        nimg = self.nimg + B
        f = optim.lr_factor(nimg, args.rampup_kimg, *self.decay)
        for group in self.opt_net.param_groups:
            group["lr"] = args.lr * f
        self._step(self.opt_net)
        if step_process:
            present = dist.any_over_ranks(present.to(self.device)) if S > 1 else torch.ones(1, dtype=torch.bool)
            for group in self.opt_process.param_groups:
                group["lr"] = args.glr * f
            self._step(self.opt_process, present)
        if self.scaler is not None:
            self.scaler.update()
        grad_norm_net, grad_norm_process = optim.grad_norm(net_grads), optim.grad_norm(process_grads)
        self.opt_net.zero_grad(set_to_none=True)
        if self.opt_process is not None:
            self.opt_process.zero_grad(set_to_none=True)
        self.ema.update(self.net, ema_beta(B, nimg, args.ema_halflife_kimg, args.ema_rampup_ratio))
        self.nimg = nimg
        self.step += 1

        loss_mean = (loss_total / A).reshape(1)
        dist.all_reduce_mean_([loss_mean])
        record = {"step": self.step, "kimg": self.nimg / 1000, "loss": float(loss_mean),
                  "lr": args.lr * f, "glr": args.glr * f if step_process else 0.0,
                  "grad_norm_net": float(grad_norm_net), "grad_norm_schedule": float(grad_norm_process),
                  "nonfinite_net": int(bad_net), "nonfinite_schedule": int(bad_process), "precision": args.precision}
        if self.scaler is not None:
            record["loss_scale"] = float(self.scaler.get_scale())
        if S > 1:
            record["classes_present"] = int(present.sum())
        record.update({k: v.tolist() for k, v in stats_total.items()})
        if self.alternating and self.step % args.forward_every == 0:
            record.update(self.forward_update(f))
        record["sec_per_step"] = time.perf_counter() - t0
        return record

    def _step(self, opt, *args) -> None:
        """opt.step(*args), through the gradient scaler under fp16 (which skips a step whose gradients overflowed)."""
        if self.scaler is None:
            opt.step(*args)
        else:
            self.scaler.step(opt, *args)

    def forward_update(self, lr_factor: float) -> dict:
        """The alternating rule's process update (VSDM, VSMD): --forward-paths backward Euler-Maruyama paths of the
        EMA network, seeded from (seed, step) so that a resume repeats them, each rank simulating its share; then
        --forward-steps Adam steps on the family's forward SB loss over them (gradients averaged over ranks)."""
        args, dist, process, family = self.args, self.dist, self.process, self.family
        t0 = time.perf_counter()
        model = family.wrap(self.ema.module, self.basis, process, self.precond_config)
        base = _chunk_seed(args.seed, self.step, _FORWARD_CHUNK)
        seeds = [(base + i) % 2 ** 32 for i in range(dist.rank, args.forward_paths, dist.world_size)]
        classes = process.num_classes or getattr(model, "num_classes", None)
        labels = sampling.seeded_labels(seeds, classes, self.device) if classes else None
        paths = family.backward_paths(process, model, seeds, args.forward_path_steps, labels)
        S = self.process_param.shape[0]
        present = torch.ones(S, dtype=torch.bool, device=self.device)
        if S > 1:
            present = dist.any_over_ranks(torch.bincount(labels, minlength=S)[:S] > 0)
        for group in self.opt_process.param_groups:
            group["lr"] = args.glr * lr_factor
        total = 0.0
        for _ in range(args.forward_steps):
            loss = family.forward_loss(process, self.basis, paths, args.sb_zeta)
            loss.backward()
            grads = [self.process_param.grad]
            dist.all_reduce_mean_(grads)
            optim.sanitize_grads_(grads)
            self.opt_process.step(present)
            self.opt_process.zero_grad(set_to_none=True)
            total += float(loss.detach())
        loss_mean = torch.tensor([total / args.forward_steps], dtype=torch.float64, device=self.device)
        dist.all_reduce_mean_([loss_mean])
        return {"forward_loss": float(loss_mean), "forward_sec": time.perf_counter() - t0}

    def save_samples(self, path: Path) -> None:
        """A grid of the EMA network's samples with the family's preview sampler (`Family.preview_sampler`), one
        class per column when conditional."""
        args = self.args
        model = self.family.wrap(self.ema.module, self.basis, self.process, self.precond_config)
        labels, cols = None, None
        if model.num_classes:
            labels = torch.arange(args.sample_n, device=self.device) % model.num_classes
            cols = min(model.num_classes, args.sample_n)
        plan = self.family.preview_sampler(args, args.sample_nfe)
        with torch.no_grad():
            x = self.family.run_sampler(model, self.process, plan, range(args.sample_n), labels, fitted=None,
                                        device=self.device, progress=False)[0]
        figures.save_image_grid(to_uint8(x), path, cols=cols)

    def plot_process(self, path: Path) -> None:
        """The learned forward path: g_k(t) (core), VSDM's rates lambda_k, VSMD's c_k per subspace."""
        args = self.args
        title = f"{args.stage or args.family} schedule, step {self.step}, {self.nimg / 1000:.1f} kimg"
        self.family.plot_process(self.process, path, title, class_names=self.data.class_names)

    def fit(self) -> None:
        args, main = self.args, self.dist.is_main
        log_path = self.out / "log.jsonl"
        t0 = time.perf_counter()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpointing.truncate_log(log_path, self.step)
            if args.resume:
                retired = checkpointing.retire_later_checkpoints(self.out, self.step)
                tqdm.write(f"resuming from {self.resume_path} at step {self.step} ({self.nimg / 1000:.4g} kimg)"
                           + (f"; the later checkpoints of the abandoned branch moved to {retired}" if retired
                              else ""))
            else:
                atomic_write_text(self.out / "args.json", json.dumps(vars(args), indent=2, sort_keys=True))
        bar = tqdm(total=args.steps, initial=self.step, disable=not (main and args.progress), unit="step",
                   dynamic_ncols=True)
        log = open(log_path, "a") if main else None
        loss = None
        try:
            while self.step < args.steps:
                record = self.train_step()
                loss = record["loss"]
                last = self.step == args.steps
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", kimg=f"{record['kimg']:.4g}")
                    if args.sample_every and (self.step % args.sample_every == 0 or last):
                        self.save_samples(self.out / f"samples-{self.step:08d}.png")
                    if args.plot_every and (self.step % args.plot_every == 0 or last):
                        self.plot_process(self.out / f"schedule-{self.step:08d}.png")
                if (args.snapshot_every and self.step % args.snapshot_every == 0) or last:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main:
            final = "n/a (no step to run)" if loss is None else f"{loss:.4g}"
            print(f"done: step {self.step} of {args.steps}, {self.nimg / 1000:.4g} kimg, final loss {final}, "
                  f"{time.perf_counter() - t0:.1f} s, last checkpoint {ckpt.latest_checkpoint(self.out)}")


def run(args: argparse.Namespace) -> Trainer:
    """Set up (process group, validation) and train; returns the trainer (for tests and notebooks)."""
    dist = distributed.init(args.device)
    try:
        trainer = Trainer(args, dist)
        trainer.fit()
        return trainer
    finally:
        distributed.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
