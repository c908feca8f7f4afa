"""Data-parallel training in several local CPU processes (torch.distributed over gloo).

One process training a small model leaves part of a multi-core CPU idle. Whether N processes win depends on
the model: on a 2-core machine, a 6.6 M-parameter U-Net trained slower as 2 processes than as one (the gloo
all-reduce costs more than the second process gains; docs/demo-tuning.md). `accelerate launch --cpu` starts
a single process, so this module does the small part it lacks: start N processes with the environment that torchrun
would give them (RANK, WORLD_SIZE, MASTER_ADDR, ...). accelerate's `PartialState(cpu=True)` then finds them
and sets up gloo DDP itself. For GPUs and several machines, use `accelerate launch`.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from t2i.errors import T2IError
from t2i.training.interrupt import StopRequest


# torch is imported where it is used: the command line asks `is_launched` before it loads torch.
FAILED_RANK_GRACE_S = 5.0


def is_launched() -> bool:
    """Is this process already one of several (under accelerate launch, torchrun, or `launch_local`)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_local(function: Callable, args: tuple, num_processes: int) -> None:
    """Run `function(*args, stop=...)` in `num_processes` fresh CPU processes that share the machine's cores.

    `stop` is each worker's StopRequest: a signal to this process, or to any worker, reaches all of them once.
    An error a worker raises as T2IError is raised here as itself.
    """
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    shared_stop, errors = context.Value("i", 0), context.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    with StopRequest(shared_stop).installed():
        workers = mp.start_processes(
            _worker, args=(function, args, num_processes, _free_port(), threads, shared_stop, errors),
            nprocs=num_processes, start_method="spawn", join=False)
        try:
            # When one worker fails, the others get FAILED_RANK_GRACE_S to stop, then SIGTERM (which our workers
            # treat as "finish the step"), then as long again before SIGKILL: all end within about twice that.
            while not workers.join(grace_period=FAILED_RANK_GRACE_S):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:
            if not errors.empty():
                raise errors.get() from None
            if isinstance(failure, mp.ProcessExitedException):
                raise T2IError(f"a training process died ({failure}); see its output above") from None
            raise
        except BaseException:  # a second signal, or any error here: the workers end with this process
            for process in workers.processes:
                process.kill()
            raise


def _worker(rank: int, function: Callable, args: tuple, world_size: int, port: int, threads: int,
            shared_stop, errors) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    if sys.platform == "linux":  # gloo picks its interface from the hostname unless told; loopback always works
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    torch.set_num_threads(threads)
    stop = StopRequest(shared_stop)
    try:
        with stop.installed():
            function(*args, stop=stop)
    except T2IError as error:
        errors.put(error)
        raise


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
