"""Muon for the transformer blocks' matrices and AdamW for everything else, as one optimizer
(optimizer.name = "Muon"); the matrices may be FSDP or tensor-parallel shards (DTensors)."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.compat import muon_unsupported
from titan.config.job_config import Optimizer

if muon_unsupported() is None:
    from torch.optim import Muon as _TorchMuon
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
else:  # torch < 2.9: config validation stops a Muon run before it gets here
    _TorchMuon = torch.optim.Optimizer


def is_muon_matrix(name: str, p: nn.Parameter) -> bool:
    """Muon takes the blocks' 2-D weights: wq, wk, wv, wo, w1, w2, w3, each as one whole matrix
    (wq/wk/wv are not split by head). The embedding (a lookup table: its rows are updated
    one token at a time, not as a linear map), the output layer (Muon's authors keep it on
    AdamW) and the 1-D norm gains stay on AdamW."""
    return p.ndim == 2 and name.startswith("layers.")


class ShardedMuon(_TorchMuon):
    """torch.optim.Muon whose parameters may be DTensors (FSDP, TP, FSDP x TP shards).

    torch's step orthogonalizes each tensor it is given as a whole matrix, which on a shard
    would orthogonalize the shard. This step does torch's update per parameter, with the
    momentum kept sharded like the parameter (one buffer, the parameter's size, per rank's
    shard) and only the Newton-Schulz input gathered:

      momentum (local) -> full_tensor() (all-gather) -> torch's Newton-Schulz on the full
      matrix -> this rank's block of the result -> weight decay and update (local)

    Gather-to-full, not a distributed scheme where each rank orthogonalizes a subset of the
    matrices and scatters the results: every rank runs Newton-Schulz on every matrix (compute
    repeated on each rank that shares the matrix), for one process's update (to rounding: see
    optimizer.muon_ns_dtype) and no bookkeeping of which rank owns which matrix.
    Cost per step: one all-gather per matrix over the ranks that shard it (the bytes of
    FSDP's fp32 parameter all-gather: (n - 1)/n x the matrix per rank); memory, one matrix at
    a time: the gathered fp32 matrix, plus Newton-Schulz's bf16 working copies (the matrix,
    two min(m, n)^2 Gram matrices, the next iterate), which the dry run traces as optimizer
    temporaries. Pipeline stages each build one over their own parameters."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    def _orthogonalize(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
        if self.ns_dtype == torch.bfloat16:
            return _zeropower_via_newtonschulz(update, *args)
        return newton_schulz(update, *args)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # torch's Muon: momentum as a running average
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = self._orthogonalize(_full(update), group)
                local = _local(p)
                local.mul_(1 - lr * wd)
                step_size = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)  # the full shape
                local.add_(_block_of(ortho, p), alpha=-step_size)
        return loss


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch's Newton-Schulz quintic in g's dtype (fp32). Written here because torch's rounds
    the matrix to bf16, which amplifies fp32 rounding differences of its input (FSDP's reduced
    gradients against one process') into ~1% of the update; fp32 gives layouts one process's
    update to rounding (optimizer.muon_ns_dtype)."""
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g  # (k, n), k <= n: the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T  # (k, k)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _block_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's block of the full matrix, placed as `like` (sliced locally, no messages)."""
    if not isinstance(like, DTensor):
        return full
    block = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return block.to_local()


class MuonAdamW(torch.optim.Optimizer):
    """ShardedMuon on the matrices' group and torch's AdamW on the others, seen as one optimizer:
    its param_groups (Muon's first) and state are the two optimizers', shared, so the LR
    schedule scales every group, and checkpoints (DCP's optimizer state dict) and resumes
    treat it as any torch optimizer. State keys are torch's: momentum_buffer (Muon),
    step/exp_avg/exp_avg_sq (AdamW)."""

    def __init__(self, muon: ShardedMuon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._share()
        # Optimizer.load_state_dict replaces param_groups and state with new objects
        self.register_load_state_dict_post_hook(MuonAdamW._share)

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n]
        self.adamw.param_groups = self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def build_muon(model: nn.Module, cfg: Optimizer, adamw_kwargs: dict) -> MuonAdamW:
    """MuonAdamW over model's trainable parameters: groups Muon matrices (muon_lr,
    muon_weight_decay), AdamW 2-D (lr, weight_decay), AdamW 1-D (lr, no decay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if is_muon_matrix(n, p)]
    others = [p for n, p in named if not is_muon_matrix(n, p)]
    muon = ShardedMuon(
        [{"params": matrices}], lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=cfg.muon_adjust_lr, ns_dtype=getattr(torch, cfg.muon_ns_dtype),
    )  # fmt: skip
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in others if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in others if p.ndim < 2], "weight_decay": 0.0},
        ],
        **adamw_kwargs,
    )
    return MuonAdamW(muon, adamw)
