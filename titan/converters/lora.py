"""LoRA and DoRA adapters on the model's linears (converter "lora", build step 2), with PEFT's
semantics so that exports load into peft: y = W x + s B A dropout(x), s = alpha / rank, W frozen;
DoRA scales each output row by m / ||W + s B A||_row (the norm a constant to autograd)."""

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from titan.config.job_config import Lora

ADAPTER_PARAMS = ("lora_a", "lora_b", "lora_magnitude")


class LoRALinear(nn.Linear):
    """A bias-free nn.Linear (every Llama 3 linear is one) whose frozen `weight` (out, in) is
    adapted by trained `lora_a` (r, in) and `lora_b` (out, r), and with DoRA `lora_magnitude`
    (out,). The adapters are parameters of this module itself, not of sub-modules, so the
    checkpoint keys of the base weight do not change and TP styles see every parameter."""

    def __init__(self, base: nn.Linear, cfg: Lora, name: str):
        w = base.weight
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = w  # the same Parameter: a tied output stays tied to the embedding
        self.adapter_name = name  # the full model's name of this linear: seeds its A
        self.scaling = cfg.alpha / cfg.rank
        # a float, not an nn.Dropout: TP styles partition every sub-module as a linear
        self.dropout = cfg.dropout
        make = dict(device=w.device, dtype=w.dtype)  # FSDP shards one dtype per block
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, self.in_features, **make))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, cfg.rank, **make))
        magnitude = torch.empty(self.out_features, **make) if cfg.use_dora else None
        self.lora_magnitude = nn.Parameter(magnitude) if cfg.use_dora else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # (..., out)
        dropping = self.training and self.dropout > 0  # peft's nn.Identity at 0
        dropped = F.dropout(x, self.dropout) if dropping else x
        update = F.linear(F.linear(dropped, self.lora_a), self.lora_b)  # B A x: (..., out)
        if self.lora_magnitude is None:
            return out + update * self.scaling
        # DoRA as peft computes it: the row norm of the adapted weight is detached (DoRA paper,
        # section 4.3), and with dropout on, the magnitude rescales W dropout(x), not W x.
        scale = self.lora_magnitude / self.row_norm().detach()  # (out,)
        base = F.linear(dropped, self.weight) if dropping else out
        return out + (scale - 1) * base + scale * update * self.scaling

    def row_norm(self) -> torch.Tensor:
        """||W + s B A|| of each output row: (out,). Under row-parallel TP each rank holds
        columns of W and A: DTensor sums the squares over the ranks."""
        with torch.no_grad():
            adapted = self.weight + self.scaling * (self.lora_b @ self.lora_a)
            return torch.linalg.vector_norm(adapted, dim=1)

    def merged_weight(self) -> torch.Tensor:
        """The one weight that computes what this layer computes in eval mode (PEFT's merge)."""
        with torch.no_grad():
            adapted = self.weight + self.scaling * (self.lora_b @ self.lora_a)
            if self.lora_magnitude is None:
                return adapted
            norm = torch.linalg.vector_norm(adapted, dim=1)
            return (self.lora_magnitude / norm)[:, None] * adapted


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def adapter_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's adapters (none without LoRA)."""
    return {k for k in model.state_dict() if is_adapter_key(k)}


def apply_lora(model: nn.Module, cfg: Lora) -> None:
    """Swap the target linears of the (meta-device) model for LoRALinear and freeze every other
    parameter: only adapters train (and get gradients, optimizer state and FSDP reductions)."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.target_modules
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        if linear.bias is not None:
            raise ValueError(f"LoRA: {name} has a bias, which titan's adapters do not handle")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, cfg, name))


def apply_lora_tp(model: nn.Module) -> None:
    """Place the adapters of tensor-parallel linears (after apply_tp, on the meta model).

    ColwiseParallel shards every parameter of a linear on dim 0 and RowwiseParallel replicates
    all but its weight; adapters need: colwise (W rows sharded) A whole, B and m row-sharded;
    rowwise (W columns sharded) A column-sharded, B and m whole. Each rank's B A x is then the
    part of the update that its part of W x is of W x: sharded rows, or a partial sum that the
    row-parallel reduction adds up with the base output.
    """
    modules = lora_modules(model)
    for name, p in model.named_parameters() if modules else ():
        # torch's SequenceParallel re-creates the norms' weights trainable: freeze them again
        p.requires_grad_(is_adapter_key(name))
    for m in modules:
        if not isinstance(m.weight, DTensor):
            continue
        mesh, colwise = m.weight.device_mesh, m.weight.placements[0] == Shard(0)
        placements = {
            "lora_a": Replicate() if colwise else Shard(1),
            "lora_b": Shard(0) if colwise else Replicate(),
            "lora_magnitude": Shard(0) if colwise else Replicate(),
        }
        for name, placement in placements.items():
            p = getattr(m, name)
            if p is None:
                continue
            whole = torch.empty(p.shape, dtype=p.dtype, device="meta")  # p.shape is global
            m.register_parameter(name, nn.Parameter(distribute_tensor(whole, mesh, [placement])))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _load_full(part: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the part's parameters of those names, each rank its shard."""
    if full:
        options = StateDictOptions(full_state_dict=True, strict=False)  # adapters only
        set_model_state_dict(part, full, options=options)


def layer_seed(seed: int, name: str) -> int:
    """The seed of one adapter's A: from the run's seed and the linear's name, so that an
    adapter's init does not depend on which others this rank or pipeline stage holds."""
    return zlib.crc32(f"{seed}:{name}".encode())


@torch.no_grad()
def init_adapters(parts: list[nn.Module], seed: int) -> None:
    """Initialize the adapters after the base weights (build step 5) as PEFT does: A
    kaiming-uniform (a = sqrt(5)), B zero (so the model starts as the base model), DoRA's m the
    row norms of W. Whole tensors from their own generators, each rank keeping its shards:
    every layout starts from the one-process values, and the global RNG is left untouched."""
    for part in parts:
        full = {}
        for m in lora_modules(part):
            g = torch.Generator().manual_seed(layer_seed(seed, m.adapter_name))
            a = torch.empty(m.lora_a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            make = dict(device=m.lora_a.device, dtype=m.lora_a.dtype)  # a DTensor's: local
            full[f"{m.adapter_name}.lora_a"] = a.to(**make)
            full[f"{m.adapter_name}.lora_b"] = torch.zeros(m.lora_b.shape, **make)
        _load_full(part, full)
    init_magnitudes(parts)


@torch.no_grad()
def init_magnitudes(parts: list[nn.Module]) -> None:
    """DoRA: set each m to the row norms of W + s B A, from the whole matrices (the same values
    under any sharding). At start B is zero: ||W||, also after loading other base weights."""
    for part in parts:
        full = {}
        for m in lora_modules(part):
            if m.lora_magnitude is not None:
                adapted = _full(m.weight) + m.scaling * (_full(m.lora_b) @ _full(m.lora_a))
                full[f"{m.adapter_name}.lora_magnitude"] = torch.linalg.vector_norm(adapted, dim=1)
        _load_full(part, full)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A one-process model's state dict with each adapter merged into its weight (PEFT's
    merge: W + s B A, or m * (W + s B A) / ||W + s B A||_row) and no adapter keys."""
    state = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    for m in lora_modules(model):
        state[f"{m.adapter_name}.weight"] = m.merged_weight()
    return state
