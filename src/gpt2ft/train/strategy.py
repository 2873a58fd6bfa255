"""Where the model trains: one device, DDP (a whole copy per process, gradients all-reduced) or FSDP2
(`fully_shard`: each block's weights, gradients and optimizer state sharded over the processes). The
loop asks the strategy for the device, to wrap the model, build the optimizer, clip, reduce sums, gather
a full state to save and restore from one; nothing else knows which strategy runs.

Saved state is the same whatever the strategy and the number of processes: HF-format weights and an
optimizer state keyed by parameter name (torch.distributed.checkpoint's full state dict), so a run saved
by N processes resumes on M.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ..errors import UserError
from ..runtime import resolve_device, resolve_dtype
from .config import TrainConfig


def _dcp():
    """torch.distributed.checkpoint's state-dict functions (imported on first use)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


class Single:
    """One process on one device: nothing to wrap, reduce or gather."""

    name = "single"

    def __init__(self, device: torch.device, dtype: torch.dtype, world: int = 1, rank: int = 0,
                 owns_group: bool = False):
        self.device, self.dtype, self.world, self.rank = device, dtype, world, rank
        self.owns_group = owns_group  # set the process group up, so tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ----- the model and its optimizer --------------------------------------------------------------
    def wrap(self, model, cfg: TrainConfig):
        """Put the model on the device (fp32 master weights; autocast gives the compute dtype) and return
        what the loss calls (compiled if asked). `model` itself stays the module to save and generate with."""
        model.to(device=self.device, dtype=torch.float32)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        return torch.compile(model) if cfg.compile else model

    def place_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """Where a frozen module that runs beside the model (DPO's reference) computes: on the device in
        fp32 (autocast gives the compute dtype); FSDP shards it as it shards the model."""
        return module.to(device=self.device, dtype=torch.float32)

    def clip(self, params: list, max_norm: float) -> float:
        """Clip the gradients' global norm to max_norm (0: only measure it); returns the norm before."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # FSDP: each process holds a shard; the norm over all of them
            norm = norm.full_tensor()
        # torch's factor, max_norm / (norm + 1e-6) clamped at 1: at 1 its pass over every gradient (124M floats for
        # GPT-2) would multiply by one, so the gradients are only touched when they are scaled down
        if max_norm > 0 and float(max_norm / (norm + 1e-6)) < 1:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    # ----- collectives --------------------------------------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Each value summed over all processes, in one all-reduce of a tensor on the training device (NCCL
        reduces only GPU tensors, gloo takes CPU ones)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """The main process's `obj` on every process (so all of them take the same decision)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every process's `obj`, in rank order, on the main process (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    # ----- state in and out -------------------------------------------------------------------------
    def model_state(self, model) -> dict | None:
        """The whole model's state dict on the main process (None elsewhere), for saving."""
        return model.state_dict() if self.main else None

    def optimizer_state(self, model, optimizer) -> dict | None:
        """The whole optimizer state, keyed by parameter name, on the main process (None elsewhere)."""
        return _dcp().get_optimizer_state_dict(model, optimizer) if self.main else None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Restore a whole optimizer state (keyed by parameter name; older checkpoints keyed by index)."""
        if all(isinstance(k, int) for k in state.get("state", {})) and state.get("state"):
            optimizer.load_state_dict(state)  # saved by torch.optim's own state_dict()
            return
        dcp = _dcp()
        dcp.set_optimizer_state_dict(model, optimizer, state, options=dcp.StateDictOptions(full_state_dict=self.sharded))

    sharded = False  # whether each process holds only a shard (the saved state is then gathered / scattered)


class DDP(Single):
    """Every process holds the whole model; gradients are averaged by all-reduce after backward."""

    name = "ddp"

    def wrap(self, model, cfg: TrainConfig):
        from torch.nn.parallel import DistributedDataParallel

        compiled = super().wrap(model, cfg)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets: no second copy of them (4 bytes a parameter)
        return DistributedDataParallel(compiled, device_ids=ids, gradient_as_bucket_view=True)


class FSDP(Single):
    """FSDP2: each transformer block, then the root (embeddings, final norm), sharded over the processes;
    with bf16, FSDP's mixed precision (bf16 weights in compute, fp32 gradient reduction and fp32 master
    weights); --fsdp-offload keeps the shards (and so the optimizer state) in CPU memory."""

    name, sharded = "fsdp", True

    def __init__(self, device: torch.device, dtype: torch.dtype, world: int, rank: int, owns_group: bool,
                 offload: bool = False):
        super().__init__(device, dtype, world, rank, owns_group)
        self.offload = offload

    def wrap(self, model, cfg: TrainConfig):
        model.gradient_checkpointing = cfg.gradient_checkpointing  # per block, inside each block's shard
        self._shard(model)
        return torch.compile(model) if cfg.compile else model

    def place_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference is sharded like the policy: each process holds 1/N of it, gathered block by
        block for its no-grad forward."""
        return self._shard(module)

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options = {"mesh": init_device_mesh(self.device.type, (self.world,))}
        if self.dtype == torch.bfloat16:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        model.to(device=torch.device("cpu") if self.offload else self.device, dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, **options)
        fully_shard(model, **options)  # the tied wte/lm_head, wpe and ln_f: the root's own group
        return model

    def model_state(self, model) -> dict | None:
        dcp = _dcp()  # every process takes part in the gather; the main one gets the whole state on CPU
        state = dcp.get_model_state_dict(model, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.main else None

    def optimizer_state(self, model, optimizer) -> dict | None:
        dcp = _dcp()
        state = dcp.get_optimizer_state_dict(model, optimizer,
                                             options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.main else None



STRATEGY_TYPES: dict[str, Callable] = {"single": Single, "ddp": DDP, "fsdp": FSDP}


def make_strategy(cfg: TrainConfig) -> Single:
    """The strategy --strategy names (auto: ddp under torchrun with several processes, else single) on the
    device --device names, this process's GPU under torchrun; the process group is set up here."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    kind = cfg.strategy if cfg.strategy != "auto" else ("ddp" if world > 1 else "single")
    if kind == "single" and world > 1:
        raise UserError(f"--strategy single under torchrun with {world} processes would train {world} separate "
                        "models; use --strategy ddp or fsdp (or auto)")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if kind == "single":
        return Single(device, dtype)
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--strategy {kind} runs on CUDA GPUs (NCCL) or CPUs (gloo), not on {device.type}; "
                        "use --device cpu or --strategy single")
    if kind == "fsdp" and dtype == torch.float16:
        raise UserError("--strategy fsdp trains in bfloat16 or float32, not float16 (no loss scaler for sharded "
                        "gradients here); use --dtype bfloat16")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    owns = _init_process_group(device, world, rank)
    if kind == "fsdp":
        return FSDP(device, dtype, world, rank, owns, cfg.fsdp_offload)
    return DDP(device, dtype, world, rank, owns)


def _init_process_group(device: torch.device, world: int, rank: int) -> bool:
    """NCCL for GPU tensors (gloo beside it for CPU ones: offloaded shards), gloo on CPUs. Without torchrun
    (one process asked for ddp/fsdp, e.g. to offload to CPU on one GPU) the group is this process alone."""
    import torch.distributed as dist

    if dist.is_initialized():  # set up by the caller (who then tears it down)
        return False
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=rank, world_size=world)
    return True
