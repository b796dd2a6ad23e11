"""The optimizer's and the learning-rate schedule's config sections ([optimizer],
[lr_scheduler]), kept apart from job_config.py, which imports them into the one schema
(JobConfig)."""

from dataclasses import dataclass


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer: AdamW, Adam, or Muon (torch.optim.Muon on the transformer blocks' matrices,
    AdamW with lr, betas, eps and weight_decay on the embedding, output layer and norms)."""
    lr: float = 8e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW)."""
    implementation: str = "auto"
    """for-loop, foreach, fused, or auto (fused on CUDA, foreach elsewhere)."""
    state_dtype: str = "float32"
    """Dtype of Adam's two moments: float32, or bfloat16 (half their memory; the weights stay
    float32; the update is computed in float32 and the moments rounded to bf16 after each step,
    by titan's own per-parameter step, to which optimizer.implementation does not apply)."""
    muon_lr: float = 0.02
    """Muon: peak learning rate of the blocks' matrices (scheduled as lr is)."""
    muon_momentum: float = 0.95
    """Muon: momentum of the running average of gradients it orthogonalizes."""
    muon_nesterov: bool = True
    """Muon: orthogonalize the Nesterov look-ahead of the momentum instead of the momentum."""
    muon_weight_decay: float = 0.0
    """Muon: decoupled weight decay of the blocks' matrices (each step scales them by
    1 - muon_lr x muon_weight_decay, at the step's LR)."""
    muon_ns_steps: int = 5
    """Muon: Newton-Schulz iterations that orthogonalize each update (torch's quintic)."""
    muon_ns_dtype: str = "bfloat16"
    """Muon: dtype of the Newton-Schulz iterations: bfloat16 (torch's Muon), or float32 (twice
    the bytes and slower matmuls on GPUs; parallel layouts then reproduce one process's update
    to fp32 rounding, where bf16 rounding amplifies it to ~1% of the update)."""
    muon_adjust_lr: str = "original"
    """Muon: the LR's scaling by matrix shape (m x n): "original", sqrt(max(1, m/n)) (Keller
    Jordan's); "match_rms_adamw", 0.2 sqrt(max(m, n)) (Moonshot's: updates of AdamW's size,
    so muon_lr near lr)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Steps of linear warmup from lr/(warmup_steps+1) to lr."""
    decay_type: str = "linear"
    """Shape of the decay: linear, cosine or sqrt."""
    decay_ratio: float | None = None
    """Fraction of steps spent decaying, at the end; None decays over all steps after warmup.
    Below 1 the LR holds at its peak in between: a warmup-stable-decay (WSD) schedule."""
    min_lr_factor: float = 0.0
    """The LR decays to lr x min_lr_factor."""
