"""Shared helpers of the test suite: small deterministic LightningModules and data, quiet Trainer settings, and the
harness that runs a function on several CPU processes joined by a gloo process group.

Tests import them from ``tests.conftest``; the modules and functions here are importable by spawned DDP ranks.

The DDP harness gives each process the environment a launcher such as ``torchrun`` would give it (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so a Lightning ``Trainer(strategy="ddp", devices=2)``
created inside it joins the group instead of launching processes of its own. Results come back through files, one per
rank.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# --------------------------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------------------------


def blobs(samples: int = 240, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """A classification problem a small MLP can fit: labels from a random linear map of Gaussian inputs."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
    return TensorDataset(inputs, labels)


class TinyClassifier(pl.LightningModule):
    """An MLP classifier with Adam (optionally with a StepLR scheduler), logging its loss every epoch."""

    def __init__(
        self,
        features: int = 8,
        classes: int = 3,
        hidden: int = 16,
        lr: float = 0.01,
        batch_size: int = 32,
        samples: int = 240,
        with_scheduler: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.lr = lr
        self.batch_size = batch_size
        self.samples = samples
        self.with_scheduler = with_scheduler
        self.features, self.classes = features, classes
        self.logged_batches = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(inputs), labels))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.with_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(blobs(self.samples, self.features, self.classes), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(blobs(60, self.features, self.classes, seed=1), batch_size=60)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, CPU-only Trainer settings for tests."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    kwargs.update(overrides)
    return kwargs


def fit(model: pl.LightningModule, *callbacks: pl.Callback, **overrides: Any) -> pl.Trainer:
    """Fit ``model`` with ``callbacks`` on a quiet CPU Trainer (:func:`trainer_kwargs` with ``overrides``)."""
    trainer = pl.Trainer(callbacks=list(callbacks), **trainer_kwargs(**overrides))
    trainer.fit(model)
    return trainer


def swap_at(epoch: int | float, **kwargs: Any) -> Any:
    """A callback that swaps at ``epoch`` exactly (no swap rule): what most tests of the CG phase need."""
    from lightning_twophase import ConvexitySwapCallback

    return ConvexitySwapCallback(detector=None, swap_epoch=epoch, **kwargs)


#: The CPU has a GradScaler from torch 2.3 (``torch.amp.GradScaler("cpu")``); CI also tests an older floor.
needs_cpu_grad_scaler = pytest.mark.skipif(
    not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch 2.3 or newer"
)


def scaler_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    """``precision="16-mixed"`` with a GradScaler on the CPU: the set-up Lightning builds for it on a GPU (on the CPU
    Lightning's own 16-mixed is bfloat16 without a scaler). Its scaler is ``plugin.scaler``."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


class PeakingClassifier(TinyClassifier):
    """Deeper, with small initial weights: its gradient norm rises for a few epochs, peaks and falls (the paper's
    non-convex-then-convex picture), so the detector has a real peak to find."""

    def __init__(self, init_scale: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(
            nn.Linear(self.features, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, self.classes)
        )
        with torch.no_grad():
            for parameter in self.net.parameters():
                parameter.mul_(init_scale)


# --------------------------------------------------------------------------------------------------------------------
# Several processes (DDP on CPU)
# --------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int) -> None:
    """Join the process group described by the environment (for tests that do not use Lightning)."""
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    partial = Path(out_dir) / f"rank{rank}.pt.partial"
    torch.save(result, partial)
    partial.replace(Path(out_dir) / f"rank{rank}.pt")  # whole, or not there: the parent reads it once it exists
    if dist.is_available() and dist.is_initialized():
        # Leave together: a rank that tears gloo down while its peer still talks to it aborts the process.
        dist.barrier()
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 240.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes and return each rank's return value.

    ``fn`` must be importable (defined at module level). A run that outlasts ``timeout`` seconds, a deadlock for
    instance, is killed and fails the test.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, _free_port(), out_dir, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        results = [Path(out_dir) / f"rank{rank}.pt" for rank in range(world_size)]
        finished_at = None
        while not context.join(timeout=1.0):
            if finished_at is None and all(path.exists() for path in results):
                finished_at = time.monotonic()
            # torch 2.2's gloo can hang in destroy_process_group after every rank has saved its result (seen once in
            # a few dozen runs): the work is done, so a teardown that outlasts a grace period is cut short.
            if finished_at is not None and time.monotonic() > finished_at + 20.0:
                _kill(context.processes)
                break
            if time.monotonic() > deadline:
                _kill(context.processes)
                raise TimeoutError(f"the {world_size} ranks did not finish within {timeout} s (deadlock?)")
        return [torch.load(path, weights_only=False) for path in results]


def _kill(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
