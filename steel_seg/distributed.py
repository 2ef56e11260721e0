"""Data-parallel training across the processes that `paddle.distributed.launch` starts.

The launcher sets PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM for each process (rank); collectives
go over NCCL on GPUs and gloo on CPUs. Everything here is a no-op in a single process, so the
experiment and the trainer call it unconditionally. Rank 0 ("main") alone writes checkpoints
and talks to MLflow; the other ranks train and help validate.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Messages of a collective whose peer went away (gloo on CPU, NCCL on GPU).
_PEER_GONE = re.compile(r"gloo|nccl", re.IGNORECASE)


class RankFailure(RuntimeError):
    """Another rank of a data-parallel job stopped; this one cannot go on alone."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


SINGLE = World()
_initialised: World | None = None
_guards: list = []


def launched_world(environ=os.environ) -> World:
    """The rank and size the launcher gave this process (0 of 1 when not launched)."""
    size = int(environ.get("PADDLE_TRAINERS_NUM", "1") or 1)
    rank = int(environ.get("PADDLE_TRAINER_ID", "0") or 0)
    return World(rank, size) if size > 1 else SINGLE


def local_size(environ=os.environ) -> int:
    """Processes of this job on this machine (to share its CPU cores between them)."""
    return int(environ.get("PADDLE_LOCAL_SIZE") or environ.get("PADDLE_TRAINERS_NUM") or 1)


def init_world() -> World:
    """Join the job's process group once (collective init); a single process does nothing."""
    global _initialised
    world = launched_world()
    if world.parallel and _initialised is None:
        import paddle.distributed as dist

        dist.init_parallel_env()
        _initialised = World(dist.get_rank(), dist.get_world_size())
    return _initialised or world


def log_hint() -> str:
    """Where the launcher keeps each rank's output."""
    return f"{os.environ.get('PADDLE_LOG_DIR', 'log')}/workerlog.N"


def peer_failure(exc: BaseException, world: World) -> RankFailure | None:
    """A clear error for a collective that failed because a peer died, else None."""
    if not world.parallel or isinstance(exc, RankFailure) or not _PEER_GONE.search(str(exc)):
        return None
    return RankFailure(
        f"rank {world.rank} of {world.size}: a collective operation failed, so another rank has most likely "
        f"stopped (its error is in {log_hint()}): {type(exc).__name__}: {str(exc).strip()[:300]}"
    )


def stopped_by_launcher(world: World) -> RankFailure:
    return RankFailure(
        f"rank {world.rank} of {world.size} stopped by SIGTERM from paddle.distributed.launch: another rank failed "
        f"(its error is in {log_hint()}) or the job was cancelled"
    )


# ---------------------------------------------------------------------------------------------
# Collectives on Python objects (small: decisions, evaluator counts, progress)


def broadcast(world: World, value: T) -> T:
    """Rank 0's `value`, on every rank."""
    if not world.parallel:
        return value
    import paddle.distributed as dist

    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(world: World, value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not world.parallel:
        return [value]
    import paddle.distributed as dist

    out: list = []
    dist.all_gather_object(out, value)
    return out


def mean_over_ranks(world: World, value: float) -> float:
    if not world.parallel:
        return value
    values = all_gather(world, float(value))
    return sum(values) / len(values)


def mean_loss(world: World, loss) -> float:
    """The step's loss over the global batch (the mean of the ranks' losses), on every rank,
    so the log and the non-finite check agree everywhere."""
    if not world.parallel:
        return float(loss)
    import paddle.distributed as dist

    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world.size


def main_decides(world: World, decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only and hand its result (or its error) to every rank.

    For choices with side effects or that must agree (the output folder, whether a resume is
    complete): if rank 0 refuses, every rank stops with the same error instead of waiting.
    """
    if not world.parallel:
        return decide()
    outcome: tuple[str, Any]
    if world.is_main:
        try:
            outcome = ("ok", decide())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            outcome = ("error", exc)
    else:
        outcome = ("pending", None)
    outcome = broadcast(world, outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def in_turn(world: World, work: Callable[[], T]) -> T:
    """Rank 0 does `work` first (builds caches, converts data); the others then reuse it.

    An error on rank 0 stops every rank with it, before any of them repeats the work.
    """
    if not world.parallel:
        return work()
    done: list = []
    main_decides(world, lambda: done.append(work()))  # only success or the error crosses over
    return done[0] if world.is_main else work()


def combine_evaluations(world: World):
    """For `evaluate(combine=...)`: every rank ends with the counts of all ranks' shards."""
    if not world.parallel:
        return None

    def combine(evaluator) -> None:
        states = all_gather(world, evaluator.state())
        evaluator.reset()
        for state in states:
            evaluator.merge(state)

    return combine


# ---------------------------------------------------------------------------------------------
# The model


def wrap_model(model, world: World, sync_bn: bool, device: str):
    """(model, the layer to train through): `paddle.DataParallel` over `model` in a parallel job.

    Gradients are averaged over ranks in backward. With `sync_bn`, BatchNorm layers become
    SyncBatchNorm (statistics over the global batch); Paddle has no SyncBatchNorm kernel on CPU,
    so there BatchNorm statistics stay per rank, with a warning.
    """
    if not world.parallel:
        return model, model
    import paddle

    if sync_bn:
        if device == "gpu":
            model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif world.is_main:
            print("warning: train.sync_bn: Paddle has no SyncBatchNorm kernel on CPU; "
                  "BatchNorm statistics stay per rank", file=sys.stderr)
    return model, paddle.DataParallel(model)


def sync_buffers(model, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which drift apart per
    rank without SyncBN), so each evaluates the model that rank 0 checkpoints."""
    if not world.parallel:
        return
    import paddle.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------------------------------------
# Rank 0's MLflow run outlives rank 0


def guard_run(uri: str, run_id: str, world: World):
    """Start a small watcher process that marks rank 0's run FAILED if rank 0 dies first.

    Paddle aborts a process whose gradient all-reduce loses its peer (C++ terminate), and a
    rank can be killed outright (OOM, kill -9): no Python code runs to end the run then. The
    watcher is in a session of its own, so the launcher's stop signal to the rank's process
    group does not reach it. None in a single process.
    """
    if not (world.parallel and world.is_main and run_id):
        return None
    guard = subprocess.Popen(
        [sys.executable, "-m", "steel_seg.distributed", "guard", str(os.getpid()), uri, run_id, log_hint()],
        start_new_session=True,
    )
    _guards.append(guard)  # kept referenced: it is meant to outlive this process
    return guard


def _guard(pid: int, uri: str, run_id: str, logs: str) -> int:
    import time

    from steel_seg.tracking import fail_unfinished_run  # imported first: act at once when needed

    while os.getppid() == pid:  # reparented once rank 0 is gone
        time.sleep(0.5)

    reason = (f"rank 0 (pid {pid}) of a data-parallel job died without ending the run: another rank failed "
              f"or it was killed; the ranks' output is in {logs}")
    if fail_unfinished_run(uri, run_id, reason):
        print(f"error: {reason}; MLflow run {run_id} marked FAILED", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Launching (`python -m steel_seg.run CONFIG --nproc N`)


def launch_command(argv: list[str], nproc: int, log_dir: str) -> list[str]:
    """paddle.distributed.launch starting `python -m steel_seg.run ARGV` in `nproc` processes.

    The launcher reads a `-m` of its own (its legacy mode), so the interpreter is named as the
    program to start and `-m steel_seg.run` goes to it.
    """
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", log_dir,
            sys.executable, "-m", "steel_seg.run", *argv]


def launch(argv: list[str], nproc: int, log_dir: str = "log") -> int:
    """Run one experiment data-parallel on this machine; returns the launcher's exit code.

    On CPU each process gets its share of the cores (the launcher would give each one thread).
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(launch_command(argv, nproc, log_dir), env=env)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "guard":
    sys.exit(_guard(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
