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

import torch
import torch.multiprocessing as mp

from t2i.errors import T2IError


def is_launched() -> bool:
    """Is this process already one of several (under accelerate launch, torchrun, or `launch_local`)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_local(function: Callable, args: tuple, num_processes: int) -> None:
    """Run `function(*args)` in `num_processes` fresh CPU processes that share the machine's cores."""
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    try:
        mp.start_processes(_worker, args=(function, args, num_processes, _free_port(), threads),
                           nprocs=num_processes, start_method="spawn")
    except mp.ProcessRaisedException as error:
        # The worker's own error: for T2IError its message, otherwise its traceback, which says where it failed.
        message = str(error).strip().splitlines()[-1]
        if message.startswith("t2i.errors."):
            raise T2IError(message.split(": ", 1)[1]) from None
        raise
    except mp.ProcessExitedException as error:
        raise T2IError(f"a training process died ({error}); see its output above") from None


def _worker(rank: int, function: Callable, args: tuple, world_size: int, port: int, threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    if sys.platform == "linux":  # gloo picks its interface from the hostname unless told; loopback always works
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    function(*args)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
