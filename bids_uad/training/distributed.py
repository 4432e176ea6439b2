"""Multi-process (DistributedDataParallel) training helpers: process groups, launching, sharding.

Two ways to get several training processes:

* ``torchrun --nproc-per-node N -m bids_uad ...``: torchrun starts the processes and sets
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
  :func:`init_from_torchrun` joins them into a process group.
* :func:`launch`: this process spawns N workers itself (``spawn`` start method, a free
  localhost port), runs a function in each and returns rank 0's JSON-safe result.  A worker
  that raises or dies makes :func:`launch` raise :class:`WorkerError` (the others are
  terminated), so a failure never hangs the parent.

The backend is "gloo" on CPU and "nccl" on CUDA (one process per GPU, rank r on
``cuda:<local rank>``).  Models and arrays never travel through pickle: workers share data
through files (memory-mapped ``.npy``, checkpoints) and return plain JSON.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from bids_uad.errors import BidsUadError

LOG = logging.getLogger(__name__)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a rank waits this long for the others (e.g. calibration)


class WorkerError(BidsUadError):
    """A spawned training worker raised, died or ran out of time (exit status 1)."""

    exit_code = 1


# ---------------------------------------------------------------- process group state

def torchrun_env(environ: dict | None = None) -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` when started by torchrun (all of its variables
    set), else None."""
    env = os.environ if environ is None else environ
    if not all(env.get(name) for name in TORCHRUN_VARS):
        return None
    return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]), "local_rank": int(env["LOCAL_RANK"])}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the current group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if is_initialized() else 0


def is_distributed() -> bool:
    """A process group with more than one process is active."""
    return world_size() > 1


def backend_for(device: torch.device | str) -> str:
    """"nccl" for CUDA devices, "gloo" otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_group(device: torch.device | str, rank: int, world_size: int, init_method: str = "env://",
               local_rank: int | None = None) -> None:
    """Join a process group (gloo on CPU, nccl on CUDA; CUDA processes bind ``cuda:<local_rank>``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(rank if local_rank is None else local_rank)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def init_from_torchrun(device: torch.device | str) -> bool:
    """Initialise the process group from torchrun's variables, once per process (destroyed at
    exit).  Returns whether a group is active (False when not started by torchrun)."""
    env = torchrun_env()
    if env is None or is_initialized():
        return is_initialized()
    init_group(device, env["rank"], env["world_size"], "env://", env["local_rank"])
    atexit.register(destroy_group)
    LOG.info("torchrun: rank %d of %d (%s)", env["rank"], env["world_size"], backend_for(device))
    return True


def destroy_group() -> None:
    """Leave the process group if one is active."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (returns ``values`` itself without a group)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_root(values: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``values`` on every rank (in place), so that decisions taken from them agree."""
    if is_distributed():
        dist.broadcast(values, src=0)
    return values


# ---------------------------------------------------------------- sharding

def shard_slice(n: int, world: int, rank: int) -> slice:
    """Contiguous part of ``n`` items for ``rank`` (sizes differ by at most one; may be empty)."""
    base, extra = divmod(n, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def shard_weight(n_shard: int, n_global: int, world: int) -> float:
    """Loss weight of a shard so that DDP's average of the ranks' gradients equals the gradient
    of the mean loss over the global batch: ``world * n_shard / n_global`` (0 for an empty shard)."""
    return world * n_shard / n_global if n_global else 0.0


# ---------------------------------------------------------------- spawning

def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for the workers' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plan_processes(requested: int, device: torch.device | str) -> int:
    """Workers to spawn for ``requested`` processes: at most one per GPU on CUDA."""
    requested = max(1, int(requested))
    if torch.device(device).type == "cuda":
        return max(1, min(requested, torch.cuda.device_count()))
    return requested


def _worker(local_rank: int, fn: Callable, args: Sequence, world: int, port: int, device: str,
            threads: int, run_dir: str) -> None:
    """Body of one spawned process: join the group, run ``fn(*args)``, rank 0 writes the result.

    A failure is also recorded as ``error-<rank>.json`` (with the time it happened), so the
    parent can name the rank that failed first rather than one that only lost its peer.
    """
    torch.set_num_threads(max(1, threads))
    try:
        init_group(device, local_rank, world, f"tcp://127.0.0.1:{port}", local_rank)
        result = fn(*args)
        if local_rank == 0:
            _write_json(Path(run_dir) / "result.json", result)
    except BaseException as exc:
        _write_json(Path(run_dir) / f"error-{local_rank}.json",
                    {"rank": local_rank, "time": time.time(), "error": f"{type(exc).__name__}: {exc}",
                     "exit_code": getattr(exc, "exit_code", None), "traceback": traceback.format_exc()})
        raise
    finally:
        destroy_group()


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def _first_failure(run_dir: Path) -> dict | None:
    """The earliest error a worker recorded, or None."""
    errors = [json.loads(p.read_text()) for p in run_dir.glob("error-*.json")]
    return min(errors, key=lambda e: e["time"]) if errors else None


def launch(fn: Callable, nprocs: int, args: Sequence = (), device: torch.device | str = "cpu",
           threads: int = 1, timeout: float | None = None) -> Any:
    """Run ``fn(*args)`` in ``nprocs`` spawned processes joined in a process group; return rank 0's
    result (which must be JSON-serialisable).

    ``fn`` must be importable (a module-level function) and ``args`` picklable; pass large
    arrays as file paths.  ``threads``: torch threads per worker.  The first worker exception
    is re-raised here as :class:`WorkerError` (its traceback is logged; a bids_uad error keeps
    its exit status), as is a worker killed by a signal or the whole run exceeding ``timeout``
    seconds; the other workers are terminated.
    """
    import torch.multiprocessing as mp

    device = str(torch.device(device))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bids_uad_ddp_") as tmp:
        run_dir = Path(tmp)
        context = mp.start_processes(_worker, args=(fn, tuple(args), nprocs, port, device, threads, tmp),
                                     nprocs=nprocs, join=False, start_method="spawn")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                if deadline is not None and time.monotonic() > deadline:
                    raise WorkerError(f"distributed training did not finish within {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            first = _first_failure(run_dir)
            if first is None:  # killed without raising (signal, out of memory)
                raise WorkerError(f"a training worker died: {exc}") from None
            LOG.error("training worker rank %d failed:\n%s", first["rank"], first["traceback"])
            error = WorkerError(f"training worker rank {first['rank']} failed: {first['error']}")
            if isinstance(first["exit_code"], int):  # keep the exit status of a bids_uad error
                error.exit_code = first["exit_code"]
            raise error from None
        finally:
            _terminate(context)
        result = run_dir / "result.json"
        if not result.is_file():
            raise WorkerError("rank 0 finished without writing its result")
        return json.loads(result.read_text())


def _terminate(context) -> None:
    """Stop workers that are still running (after a failure or timeout in the parent)."""
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

