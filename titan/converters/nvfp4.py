"""NVFP4 training linears: 4-bit e2m1 values, one e4m3 scale per 16 values and one fp32 scale per
tensor, in all three matmuls of a linear, as torchao's NVFP4 training recipe quantizes them:
inputs and output gradients in 1x16 blocks, weights in 16x16 blocks, gradients stochastically
rounded, the weight gradient's operands through a random Hadamard transform (RHT). Real kernels
are torchao's Triton ones (CUDA SM 10.0+); elsewhere titan emulates the same quantization here."""

import torch
from torch import nn

from titan.config.job_config import NVFP4
from titan.logger import logger
from titan.parallelisms.distributed import comm_mode

BLOCK = 16  # values per e4m3 scale (and the RHT's size)
KERNEL_MULTIPLE = 128  # torchao's NVFP4 kernels tile M, K and N by 128
F4_MAX, F8_MAX = 6.0, 448.0  # largest e2m1 and e4m3 values


def has_nvfp4_tensor_cores(device: torch.device) -> bool:
    """NVFP4 matmuls need CUDA compute capability 10.0 (Blackwell). A dry run counts the GPU
    run's FLOPs but traces the emulated layers (torchao's Triton kernels need a GPU)."""
    if comm_mode() == "fake_backend":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)


def hadamard_signs(seed: int) -> tuple[int, ...]:
    """The RHT's 16 random signs: one set for every layer and rank, so that runs, ranks and
    checkpoints agree (torchao draws a set per layer when it is given none)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(1 if v else -1 for v in (torch.rand(BLOCK, generator=g) >= 0.5).tolist())


# The quantization, in plain PyTorch. torchao computes it only inside its Triton kernels (SM 10.0+);
# its plain-PyTorch nvfp4_quantize has 1x16 blocks with round-to-nearest only, no 16x16 blocks,
# stochastic rounding or RHT. So titan writes the kernels' arithmetic out here (hadamard_utils.
# _nvfp4_quantize), and reuses torchao's RHT matrix.


def round_e2m1(x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """x (within +-6) on the e2m1 grid, whose steps are 0.5 below 2, 1 below 4 and 2 up to 6: to
    nearest, ties to even (as PTX cvt.rn and torchao's f32_to_f4_unpacked, which a test checks
    this against; written here because torchao's bit manipulation made titan's emulated steps
    several times slower), or stochastically: up to the next grid value with probability the
    distance from the one below over the step, so the rounding is unbiased (as PTX cvt.rs)."""
    mag = x.abs().float()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    if stochastic:
        units = torch.floor(mag / step + torch.rand_like(mag))
    else:
        units = torch.round(mag / step)  # half to even: the even units are the even mantissas
    return (units * step).clamp(max=F4_MAX).copysign(x.float())


def fake_quantize(
    x: torch.Tensor, block: tuple[int, int], stochastic: bool = False
) -> torch.Tensor:
    """x (rows, cols), fp32, as the NVFP4 values a kernel multiplies, dequantized: blocks of
    block[0] x block[1] share an e4m3 scale of their largest value over 6, relative to the
    tensor's fp32 scale amax / (448 * 6)."""
    rows, cols = x.shape
    x = x.float()
    amax = x.abs().amax()
    blocks = x.reshape(rows // block[0], block[0], cols // block[1], block[1])
    block_max = blocks.abs().amax(dim=(1, 3), keepdim=True)
    fp32_max = torch.finfo(torch.float32).max
    encode = torch.where(amax == 0, 1.0, (F8_MAX * F4_MAX / amax).clamp(max=fp32_max))
    encode = torch.where(encode == 0, 1.0, encode)
    tiny = torch.finfo(torch.float8_e4m3fn).tiny
    scale = ((block_max / F4_MAX) * encode).clamp(tiny, F8_MAX).to(torch.float8_e4m3fn).float()
    scaled = (blocks * (1.0 / (scale * (1.0 / encode))).clamp(max=fp32_max)).clamp(-F4_MAX, F4_MAX)
    # the kernels' matmuls scale by the e4m3 scale and amax / (448 * 6) (per_tensor_amax_to_scale)
    values = round_e2m1(scaled, stochastic) * scale * (amax / (F8_MAX * F4_MAX))
    return values.reshape(rows, cols)


def rht(x: torch.Tensor, signs: tuple[int, ...]) -> torch.Tensor:
    """x (rows, cols) with each run of 16 values along a row multiplied by the orthogonal RHT
    matrix (torchao's: diag(signs) @ Hadamard / 4), rounded to bf16 as the kernels store it.
    Applied to both operands along the summed dimension it leaves their product unchanged."""
    from torchao.prototype.moe_training.nvfp4_training.hadamard_utils import get_rht_matrix

    h = get_rht_matrix(signs, x.device, torch.float32, BLOCK)
    return (x.float().reshape(-1, BLOCK) @ h).reshape(x.shape).bfloat16()


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """The kernels read bf16 operands and write bf16 results."""
    return t.bfloat16().float()


# The emulated matmuls are custom ops, opaque to torch.compile: inductor would round the scaling
# arithmetic (and the e4m3 casts) its own way, and at 4 bits that moves values to the other e2m1
# neighbour (measured compiled vs eager, rounding to nearest: the loss 1e-3 apart after 3 steps,
# first gradients up to 16% relative L2). As ops they run eagerly inside compiled blocks.


@torch.library.custom_op("titan::nvfp4_emulated_forward", mutates_args=())
def _forward(
    x: torch.Tensor, weight: torch.Tensor, signs: list[int], hadamard: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (tokens, in), weight (out, in) -> y (tokens, out) and what backward needs: the
    weight's 16x16 NVFP4 values and x.T's (through the RHT) in 1x16 blocks along the tokens."""
    x = _bf16(x)
    w = fake_quantize(_bf16(weight), (BLOCK, BLOCK))  # (out, in)
    y = _bf16(fake_quantize(x, (1, BLOCK)) @ w.t())
    x_t = rht(x.t(), tuple(signs)) if hadamard else x.t()  # (in, tokens)
    return y, fake_quantize(x_t, (1, BLOCK)), w


@_forward.register_fake
def _(x, weight, signs, hadamard):
    f32 = torch.float32
    return (
        x.new_empty(x.shape[0], weight.shape[0], dtype=f32),
        x.new_empty(x.shape[1], x.shape[0], dtype=f32),
        weight.new_empty(weight.shape, dtype=f32),
    )


@torch.library.custom_op("titan::nvfp4_emulated_backward", mutates_args=())
def _backward(
    dy: torch.Tensor, x_t: torch.Tensor, w: torch.Tensor, signs: list[int], hadamard: bool,
    stochastic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """dy (tokens, out) -> dx = Q(dy) @ w and dw = Q(RHT(dy.T)) @ x_t.T, in bf16 values."""
    dy = _bf16(dy)
    dx = fake_quantize(dy, (1, BLOCK), stochastic) @ w
    dy_t = rht(dy.t(), tuple(signs)) if hadamard else dy.t()  # (out, tokens)
    dw = fake_quantize(dy_t, (1, BLOCK), stochastic) @ x_t.t()
    return _bf16(dx), _bf16(dw)


@_backward.register_fake
def _(dy, x_t, w, signs, hadamard, stochastic):
    f32 = torch.float32
    return dy.new_empty(dy.shape[0], w.shape[1], dtype=f32), w.new_empty(w.shape, dtype=f32)


class _EmulatedNVFP4Matmul(torch.autograd.Function):
    """y = x @ w.T with the three matmuls on the NVFP4 values torchao's kernels make:
    forward x (1x16, nearest) @ w (16x16, nearest); input gradient dy (1x16, stochastic) @ w
    (the same 16x16 values); weight gradient RHT(dy.T) (stochastic) @ RHT(x.T) (nearest), both
    in 1x16 blocks along the tokens. Computed in fp32 with bf16 operands and results."""

    @staticmethod
    def forward(ctx, x, weight, signs, hadamard: bool, stochastic: bool):
        if x.numel() // x.shape[-1] % BLOCK:
            raise ValueError(
                f"nvfp4: a micro-batch of {x.numel() // x.shape[-1]} tokens; the weight gradient "
                f"quantizes along the tokens in blocks of {BLOCK}: make batch x seq_len a multiple"
            )
        y, x_t, w = _forward(x.reshape(-1, x.shape[-1]), weight, list(signs), hadamard)
        ctx.save_for_backward(x_t, w)
        ctx.shape, ctx.signs, ctx.hadamard, ctx.stochastic = x.shape, signs, hadamard, stochastic
        ctx.dtypes = x.dtype, weight.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_t, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out)
        dx, dw = _backward(dy2, x_t, w, list(ctx.signs), ctx.hadamard, ctx.stochastic)
        dx = dx.to(ctx.dtypes[0]).reshape(ctx.shape)
        return dx, dw.to(ctx.dtypes[1]), None, None, None


class NVFP4Linear(nn.Linear):
    """A linear whose matmuls run in NVFP4: torchao's kernels, or titan's emulation of them. Its
    state is a plain linear's (weight, bias), so checkpoints load with or without NVFP4."""

    signs: tuple[int, ...] = ()
    emulate: bool = True
    hadamard: bool = True
    stochastic: bool = True

    @classmethod
    def from_linear(cls, mod: nn.Linear, signs: tuple[int, ...], emulate: bool, cfg: NVFP4):
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, device="meta")
        new.weight, new.bias = mod.weight, mod.bias  # the same (meta) parameters
        new.signs, new.emulate = signs, emulate
        new.hadamard, new.stochastic = cfg.hadamard, cfg.stochastic_rounding
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.emulate:
            from torchao.prototype.moe_training.nvfp4_training.nvfp4_linear import nvfp4_linear

            # bf16 operands and output whatever x is; random stochastic-rounding seeds per call
            y = nvfp4_linear(x, self.weight, self.bias, sign_vector=self.signs)
            return y.to(x.dtype)
        y = _EmulatedNVFP4Matmul.apply(x, self.weight, self.signs, self.hadamard, self.stochastic)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nvfp4{' emulated' if self.emulate else ''}"


def apply_nvfp4(model: nn.Module, cfg: NVFP4, device: torch.device) -> int:
    """Swap the model's linears (those not filtered) for NVFP4Linear; returns the training FLOPs
    per token their matmuls run on NVFP4 tensor cores (0 when emulated)."""
    kernels = has_nvfp4_tensor_cores(device) and not cfg.emulate
    emulate = not kernels or comm_mode() == "fake_backend"
    if not kernels and not cfg.emulate:
        logger.info(
            f"nvfp4: {device} has no NVFP4 tensor cores (CUDA SM 10.0+): NVFP4 matmuls are "
            "emulated (NVFP4 numerics, no NVFP4 speed)"
        )
    # the kernels tile by 128; the emulation needs whole 16-value blocks
    multiple = KERNEL_MULTIPLE if kernels else BLOCK
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    converted = [
        n
        for n in names
        if not any(f in n for f in cfg.filter_fqns)
        and all(size % multiple == 0 for size in model.get_submodule(n).weight.shape)
    ]
    if not converted:
        raise ValueError(
            f"nvfp4 converted none of the model's {len(names)} linears (filter_fqns = "
            f"{cfg.filter_fqns}; sizes must be multiples of {multiple}): shorten filter_fqns, "
            "or drop the converter"
        )
    signs = hadamard_signs(cfg.hadamard_seed)
    for name in converted:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        setattr(owner, child, NVFP4Linear.from_linear(linear, signs, emulate, cfg))
    logger.info(
        f"nvfp4{' (emulated)' if emulate else ''}: {len(converted)} of {len(names)} linears"
        + ("" if cfg.hadamard else "; no Hadamard transform")
        + ("" if cfg.stochastic_rounding else "; gradients rounded to nearest")
    )
    if not kernels:
        return 0
    return 6 * sum(model.get_submodule(n).weight.numel() for n in converted)  # see float8.py
