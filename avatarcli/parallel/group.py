"""The process group of a `torchrun` launch: NCCL between GPUs, gloo between CPU processes.

The window-parallel sampler needs four things from it: the overlap exchange after each tick (point-to-point,
in the schedule's order), an agreement that every rank planned the same job, an agreement to stop, and the
per-rank transformer counts for the summary.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from avatarcli.errors import AvatarError
from avatarcli.parallel import local_rank, world_size
from avatarcli.parallel.schedule import HeldLatents, Transfer


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) for a CUDA job, the CPU for a CPU job."""
    if device.type != "cuda" or world_size() == 1:
        return device
    if device.index is not None:
        raise AvatarError(f"--device {device} picks one GPU; with several processes use --device cuda (or auto): "
                          f"each process takes the GPU of its local rank")
    if local_rank() >= torch.cuda.device_count():
        from avatarcli.errors import EnvironmentProblem

        raise EnvironmentProblem(f"process {local_rank()} has no GPU: {torch.cuda.device_count()} visible, "
                                 f"{os.environ.get('LOCAL_WORLD_SIZE', world_size())} processes on this machine")
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


class ProcessGroup:
    """This process's place in the launch and the collective operations the sampler uses.

    With context parallelism of degree `context`, consecutive groups of `context` processes share their windows
    (each runs every forward of them with diffusers' Ulysses attention, avatarcli/parallel/context.py): `rank` and
    `world_size` then count these groups, the "window ranks" the schedule deals windows to, and each process
    exchanges overlaps with the processes of the same place (`member`) in the other groups.
    """

    def __init__(self, device: torch.device, context: int = 1):
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        self.device = device
        self.global_rank, world = dist.get_rank(), dist.get_world_size()
        if context < 1 or world % context:
            raise AvatarError(f"context parallelism of {context} does not divide the {world} processes")
        self.context = context
        self.rank, self.world_size = self.global_rank // context, world // context  # window ranks
        self.member = self.global_rank % context  # place inside the group that shares the windows
        self.context_mesh = None  # the ("ring", "ulysses") device mesh of this process's context group
        if context > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (self.world_size, 1, context),
                                    mesh_dim_names=("window", "ring", "ulysses"))
            self.context_mesh = mesh["ring", "ulysses"]

    def peer(self, window_rank: int) -> int:
        """The process of window rank `window_rank` at this process's place in its context group."""
        return window_rank * self.context + self.member

    def exchange(self, transfers: list[Transfer], held: HeldLatents, frame: torch.Tensor) -> None:
        """Send the transfers this rank is the source of and receive those it is the destination of, into `held`.
        `frame`: a [1, C, 1, h, w] tensor giving the layout, dtype and device of the latents."""
        ops, received = [], []
        for tag, t in enumerate(transfers):
            if t.source == self.rank:
                latents = held.read(t.read)
                if latents.dtype != frame.dtype:
                    raise RuntimeError(f"window latents are {latents.dtype}, the exchange expects {frame.dtype}")
                ops.append(dist.P2POp(dist.isend, latents.contiguous(), self.peer(t.dest), tag=tag))
            elif t.dest == self.rank:
                shape = list(frame.shape)
                shape[2] = t.read.end - t.read.start
                buffer = torch.empty(shape, dtype=frame.dtype, device=frame.device)
                ops.append(dist.P2POp(dist.irecv, buffer, self.peer(t.source), tag=tag))
                received.append((t, buffer))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for t, buffer in received:
            held.put(t.read.window, t.read.step, t.read.start, buffer)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_counts(self, count: int) -> list[int]:
        """`count` of every process, in rank order (on every process)."""
        values = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(dist.get_world_size())]
        dist.all_gather(values, torch.tensor([count], dtype=torch.int64, device=self.device))
        return [int(v.item()) for v in values]

    def check_same(self, description: str) -> None:
        """Fail on every rank unless every rank describes its job the same way (same plan, same inputs)."""
        digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "big")
        value = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        if int(value[0]) != digest or int(value[1]) != -digest:
            raise AvatarError("the processes of this launch planned different jobs: give every process the same "
                              "inputs and settings")


def leave() -> None:
    """End this process's part in the launch (after its last job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
