"""The torchtitan leg of the GPU check: torchtitan's own Trainer on a Llama 3 flavor with fewer
blocks, random tokens, no tokenizer files, no hub. Run in its own process by gpu_check.py:

    python benchmarks/gpucheck/torchtitan_leg.py SPEC_JSON RESULT_JSON

SPEC_JSON holds flavor, layers, seq_len, batch, warmup, steps, compile, device (cases.py). The
config is torchtitan's Python config (0.3.0 moved it there): its shipped 8B recipe's loss,
optimizer and selective AC, flex attention (every torchtitan language model masks by document
positions; each synthetic row is one document, so the mask is causal), bf16 autocast with fp32
master weights on one GPU, its default CUDA-graph capture of forward and backward. Each step is
timed here around Trainer.train_step (synchronized); RESULT_JSON gets tokens/s and
torch.cuda.max_memory_allocated over the steps after the warmup. If torchtitan cannot be
imported (not installed, or a torch older than it needs) RESULT_JSON says why, as a skip.
"""

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # titan, for its FLOP count

# torchtitan's own release (docs/release.md of its repository) pins this torch for 0.3.0.
RELEASE_TORCH = "2.14.0"


def skip(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def import_torchtitan() -> str | None:
    """None when torchtitan's trainer imports, else why not (one line)."""
    try:
        import torchtitan.trainer  # noqa: F401
        from torchtitan.models.llama3 import model_registry  # noqa: F401
    except Exception as e:  # ImportError, or an AttributeError from a torch API it lacks
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        version = torch.__version__.split("+")[0]
        if isinstance(e, ModuleNotFoundError) and e.name == "torchtitan":
            return f"torchtitan is not installed ({detail}): see --wheels"
        if isinstance(e, ModuleNotFoundError) and not (e.name or "").startswith("torchtitan"):
            return f"torchtitan 0.3.0 needs {e.name}, missing here ({detail})"
        older = tuple(map(int, version.split(".")[:2])) < (2, 14)
        needs = f"; its release is tested with torch {RELEASE_TORCH}" if older else ""
        return f"torchtitan 0.3.0 does not import on torch {version} ({detail}){needs}"
    return None


def build_config(spec: dict, dump_folder: str):
    """torchtitan's Trainer.Config for the spec: its 8B recipe's components, fewer blocks."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.models.common.config_utils import decoder_vocab_size
    from torchtitan.models.llama3 import model_registry
    from torchtitan.trainer import Trainer

    no_tokenizer, random_tokens = _configurable_classes()
    model_spec = model_registry(spec["flavor"])
    model_spec.model.layers = model_spec.model.layers[: spec["layers"]]
    steps = spec["warmup"] + spec["steps"]
    return Trainer.Config(
        model_spec=model_spec,
        dump_folder=dump_folder,
        loss=ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(model_spec))
        ),
        tokenizer=no_tokenizer.Config(),
        dataloader=random_tokens.Config(vocab_size=model_spec.model.vocab_size),
        optimizer=default_adamw(lr=3e-4),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=1),
        training=TrainingConfig(
            local_batch_size=spec["batch"],
            seq_len=spec["seq_len"],
            steps=steps,
            # CUDA graphs are torchtitan's default; there is nothing to capture on a CPU
            disable_cuda_graphs=spec["device"] != "cuda",
        ),
        metrics=MetricsProcessor.Config(log_freq=steps),
        activation_checkpoint=SelectiveAC.Config(),
        compile=CompileConfig(enable=spec["compile"], components=["model", "loss"]),
    )


def _configurable_classes():
    """The two components the benchmark swaps in, defined once torchtitan has imported."""
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.tokenizer import BaseTokenizer

    class NoTokenizer(BaseTokenizer):
        """Random token ids need no tokenizer; torchtitan builds one, so it gets this."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseTokenizer.Config):
            pass

        def __init__(self, config=None, **kwargs) -> None:
            super().__init__()

        def encode(self, *args, **kwargs) -> list[int]:
            raise NotImplementedError("the benchmark feeds token ids")

        def decode(self, *args, **kwargs) -> str:
            raise NotImplementedError("the benchmark feeds token ids")

        def get_vocab_size(self) -> int:
            return 0

    class RandomTokens(BaseDataLoader):
        """Uniform random token ids, one document per row (positions 0..seq_len-1)."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            vocab_size: int = 128256

        def __init__(self, config, *, seq_len: int, local_batch_size: int, **kwargs) -> None:
            self.vocab_size, self.seq_len, self.batch = config.vocab_size, seq_len, local_batch_size

        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            positions = torch.arange(self.seq_len).expand(self.batch, -1).contiguous()
            while True:
                ids = torch.randint(
                    0, self.vocab_size, (self.batch, self.seq_len + 1), generator=gen
                )
                yield {"input": ids[:, :-1], "positions": positions}, ids[:, 1:]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

    return NoTokenizer, RandomTokens


def titan_flops_per_token(spec: dict, n_params: int) -> int:
    """titan's count (6N + 12·L·H·Q·T, trainer/metrics.py) for torchtitan's model of the same
    shape, so that every leg's MFU is measured the same way."""
    from titan.models.llama3.args import FLAVORS
    from titan.trainer.metrics import flops_per_token

    a = FLAVORS[spec["flavor"]]
    embedding = 0 if a.tie_word_embeddings else a.vocab_size * a.dim
    return flops_per_token(n_params, embedding, spec["layers"], a.n_heads, a.head_dim,
                           spec["seq_len"])  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(spec: dict, dump_folder: str) -> dict:
    why = import_torchtitan()
    if why is not None:
        return skip(why)
    config = build_config(spec, dump_folder)
    if not torch.cuda.is_available():
        return skip(
            "torchtitan 0.3.0 trains on an accelerator only (with none, its device is cuda); "
            f"its config for this case was built ({spec['layers']} blocks)"
        )
    import torch.distributed as dist
    from torchtitan.tools.logging import init_logger

    init_logger()
    with socket.socket() as s:  # one process, as torchrun would start it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    for key, value in env.items():
        os.environ.setdefault(key, value)
    trainer = config.build()
    device = trainer.device
    step_s: list[float] = []
    inner = trainer.train_step

    def timed_step(data_iterator) -> None:
        if len(step_s) == spec["warmup"] and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak, as titan's
        _sync(device)
        start = time.perf_counter()
        inner(data_iterator)
        _sync(device)
        step_s.append(time.perf_counter() - start)

    trainer.train_step = timed_step
    try:
        trainer.train()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    from titan.trainer.metrics import peak_flops

    timed = step_s[spec["warmup"] :]
    tokens_per_s = spec["batch"] * spec["seq_len"] * len(timed) / sum(timed)
    n_params = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
    fpt = titan_flops_per_token(spec, n_params)
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, "bfloat16")
    return {
        "status": "ok",
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * sum(timed) / len(timed),
        "mfu": tokens_per_s * fpt / peak if peak else None,
        "flops_per_token": fpt,
        "n_params": n_params,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device),
        "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        "device_name": name,
        "cuda_graphs": not config.training.disable_cuda_graphs,
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec, spec.get("dump_folder", "/tmp/gpu_check_torchtitan"))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
