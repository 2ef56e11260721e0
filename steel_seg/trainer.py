"""The training loop: Momentum + polynomial decay, periodic validation, best/last checkpoints.

The trainer knows models, losses and batches, not YAML or MLflow: it reports what happens to
an `events` object (see TrainingEvents), and the experiment decides what to record. In a
data-parallel job (`world`) every rank runs this loop on its shard; rank 0 writes checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import paddle
from tqdm import tqdm

from steel_seg import distributed
from steel_seg.checkpoint import BEST, LAST, atomic_save, load_training_state, restore_optimizer_state, save_training_state
from steel_seg.distributed import SINGLE, World
from steel_seg.evaluation import EvalResult, evaluate
from steel_seg.models import output_weights
from steel_seg.deploy.tta import TTAPlan


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training cannot continue meaningfully."""


class TrainingEvents(Protocol):
    def on_train_start(self, info: dict) -> None: ...
    def on_epoch_end(self, record: dict) -> None: ...
    def on_evaluation(self, epoch: int, result: EvalResult) -> None: ...


class NoEvents:
    def on_train_start(self, info: dict) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        pass

    def on_evaluation(self, epoch: int, result: EvalResult) -> None:
        pass


@dataclass
class TrainSettings:
    """What the loop needs; the experiment fills it from the config."""

    epochs: int
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 4e-5
    lr_power: float = 0.9
    end_lr: float = 0.0
    eval_interval: int = 1
    seed: int = 0
    amp: bool = False


@dataclass
class Progress:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int = 0  # last completed epoch
    step: int = 0
    best_miou: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # e.g. the tracking run id


class Trainer:
    def __init__(
        self,
        model: paddle.nn.Layer,
        loss_fn: paddle.nn.Layer,
        train_loader,
        val_loader,
        settings: TrainSettings,
        checkpoint_dir: Path,
        *,
        num_classes: int,
        class_names: list[str] | None = None,
        aux_weights: list[float] | None = None,
        tta: TTAPlan | None = None,
        events: TrainingEvents | None = None,
        progress_bars: bool = True,
        world: World = SINGLE,
        network: paddle.nn.Layer | None = None,
    ):
        """`network` is what training runs through (paddle.DataParallel over `model` in a
        data-parallel job); checkpoints and evaluation use `model` itself."""
        self.model, self.loss_fn = model, loss_fn
        self.world = world
        self.network = network if network is not None else model
        self.train_loader, self.val_loader = train_loader, val_loader
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir)
        self.num_classes, self.class_names = num_classes, class_names
        self.aux_weights, self.tta = aux_weights, tta
        self.events = events or NoEvents()
        self.progress_bars = progress_bars and world.is_main
        self.steps_per_epoch = len(train_loader)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.scheduler = paddle.optimizer.lr.PolynomialDecay(
            learning_rate=settings.learning_rate,
            decay_steps=self.total_steps,
            end_lr=settings.end_lr,
            power=settings.lr_power,
        )
        self.optimizer = paddle.optimizer.Momentum(
            learning_rate=self.scheduler,
            momentum=settings.momentum,
            parameters=model.parameters(),
            weight_decay=paddle.regularizer.L2Decay(settings.weight_decay),
        )
        self.use_amp = settings.amp and paddle.device.get_device().startswith("gpu")
        self.scaler = paddle.amp.GradScaler() if self.use_amp else None
        self.progress = Progress()

    # -- checkpoints -------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.checkpoint_dir / LAST

    @property
    def best_path(self) -> Path:
        return self.checkpoint_dir / BEST

    def _save_last(self) -> None:
        if not self.world.is_main:
            return
        save_training_state(self.last_path, self.model, self.optimizer, self.scheduler, self.progress.__dict__)

    def resume(self) -> Progress:
        """Restore model, optimizer, scheduler and progress from `last` (rank 0 reads it and
        hands it to the other ranks, so they need no shared disk)."""
        state = distributed.main_decides(self.world, lambda: load_training_state(self.last_path))
        self.model.set_state_dict(state["model"])
        restore_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.set_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        return self.progress

    # -- the loop ----------------------------------------------------------------------
    def _loss(self, outputs, labels) -> tuple[paddle.Tensor, dict]:
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        weights = output_weights(len(outputs), self.aux_weights)
        loss = weights[0] * self.loss_fn(outputs[0], labels)
        terms = dict(getattr(self.loss_fn, "last_terms", {}))  # main head's parts, for logging
        for weight, output in zip(weights[1:], outputs[1:]):
            loss = loss + weight * self.loss_fn(output, labels)
        return loss, terms

    def _step(self, batch) -> tuple[float, dict]:
        images = paddle.to_tensor(batch.images)
        labels = paddle.to_tensor(batch.labels)
        # In a data-parallel job the loss is averaged over ranks before backward: a rank that
        # died is then noticed here, as a Python error, rather than inside the gradient
        # all-reduce, where Paddle aborts the process.
        if self.use_amp:
            with paddle.amp.auto_cast(level="O1"):
                loss, terms = self._loss(self.network(images), labels)
            value = distributed.mean_loss(self.world, loss)
            scaled = self.scaler.scale(loss)
            scaled.backward()
            self.scaler.minimize(self.optimizer, scaled)
        else:
            loss, terms = self._loss(self.network(images), labels)
            value = distributed.mean_loss(self.world, loss)
            loss.backward()
            self.optimizer.step()
        self.optimizer.clear_grad()
        self.scheduler.step()
        return value, terms

    def fit(self, resume: bool = False) -> Progress:
        """Train to `settings.epochs`; with `resume`, continue from the last checkpoint."""
        if resume:
            self.resume()
        start_epoch = self.progress.epoch + 1
        self.events.on_train_start(
            {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "start_epoch": start_epoch}
        )
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            desc="train",
            unit="step",
            disable=not self.progress_bars,
            dynamic_ncols=True,
        )
        try:
            for epoch in range(start_epoch, self.settings.epochs + 1):
                self._train_epoch(epoch, bar)
        except Exception as exc:
            failure = distributed.peer_failure(exc, self.world)
            if failure is not None:
                raise failure from exc
            raise
        finally:
            bar.close()
        return self.progress

    def _train_epoch(self, epoch: int, bar) -> None:
        # Reseeding per epoch makes dropout & co. a function of (seed, epoch), so a resumed
        # run draws the same numbers as an uninterrupted one.
        paddle.seed(self.settings.seed * 100_003 + epoch)
        self.train_loader.set_epoch(epoch)
        losses, step_seconds, term_sums = [], [], {}
        bar.set_description(f"epoch {epoch}/{self.settings.epochs}")
        for batch in self.train_loader:
            lr = self.optimizer.get_lr()
            start = time.perf_counter()
            loss, terms = self._step(batch)
            step_seconds.append(time.perf_counter() - start)
            self.progress.step += 1
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss became {loss} at epoch {epoch}, step {self.progress.step} (lr {lr:.3g}); "
                    "lower train.learning_rate, or check the labels for ids outside the classes"
                )
            losses.append(loss)
            for name, value in terms.items():  # stays on the device; read once per epoch
                term_sums[name] = value if name not in term_sums else term_sums[name] + value
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

        record = {
            "epoch": epoch,
            "step": self.progress.step,
            "train_loss": float(np.mean(losses)),
            "lr": self.optimizer.get_lr(),
            "step_seconds": float(np.mean(step_seconds)),
        }
        record.update({f"loss_{name}": distributed.mean_over_ranks(self.world, float(total) / len(losses))
                       for name, total in term_sums.items()})
        if epoch % self.settings.eval_interval == 0 or epoch == self.settings.epochs:
            distributed.sync_buffers(self.model, self.world)
            result = evaluate(
                self.model, self.val_loader, self.num_classes, self.class_names, self.tta,
                progress=self.progress_bars, desc=f"val {epoch}", combine=distributed.combine_evaluations(self.world),
            )
            record["val_miou"] = result.scores["miou"]
            record["val_iou"] = result.scores["iou"]
            record["val_kaggle_dice"] = result.scores["kaggle_dice"]
            if result.scores["miou"] > self.progress.best_miou:
                self.progress.best_miou, self.progress.best_epoch = result.scores["miou"], epoch
                if self.world.is_main:
                    atomic_save(self.model.state_dict(), self.best_path)
            self.events.on_evaluation(epoch, result)
            if self.world.is_main:
                bar.write(f"epoch {epoch}: loss {record['train_loss']:.4f}  val mIoU {result.scores['miou']:.4f}  (best {self.progress.best_miou:.4f} @ {self.progress.best_epoch})")
        self.progress.epoch = epoch
        self.progress.history.append(record)
        self._save_last()
        self.events.on_epoch_end(record)
