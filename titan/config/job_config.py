"""The training config: one dataclass per TOML table, each field documented by the string below it.

`titan.config.manager` loads TOML into these classes, applies `--section.key value` overrides
and validates the result. Builders take their own section only:
`build_optimizer(model, cfg.optimizer)`.
"""

from dataclasses import dataclass, field

from titan.config.converter_config import MX, NVFP4, Float8, Lora, Quantize, QuantizeLinear
from titan.config.ft_config import FaultTolerance
from titan.config.optimizer_config import LRScheduler, Optimizer

# with the sections below
__all__ = [
    "MX", "NVFP4", "FaultTolerance", "Float8", "LRScheduler", "Lora", "Optimizer", "Quantize",
    "QuantizeLinear",
]  # fmt: skip


@dataclass
class Job:
    config_file: str | None = None
    """Path of the TOML file this config was loaded from."""
    dump_folder: str = "./outputs"
    """Folder for everything a run writes: logs, effective config, traces, checkpoints."""
    description: str = ""
    """The run's name: in the log line that starts training, as TensorBoard text ("run") and
    as the W&B run name."""
    print_config: bool = False
    """Print the effective config at start-up."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family."""
    flavor: str = "debugmodel"
    """Architecture size, a key of llama3.FLAVORS: debugmodel, 1B, 3B, 8B, 70B, 405B."""
    tokenizer_path: str = "titan/assets/tokenizer/tokenizer.model"
    """Tokenizer: a tiktoken tokenizer.model (Meta's original/tokenizer.model), a tokenizer.json,
    a folder holding one, or a Hugging Face hub id (org/name[@revision]) fetched to the cache."""
    vocab_size: int = -1
    """Embedding rows; -1 takes the flavor's vocabulary (the tokenizer must fit in it)."""
    attn_mask_type: str = "causal"
    """causal, or block_causal: tokens attend only within their own document of the packed
    window (documents start at the BOS token the data packer puts before each)."""
    converters: list[str] = field(default_factory=list)
    """Model converters applied before parallelizing: float8 ([quantize.linear.float8]), mx
    ([quantize.linear.mx]) or nvfp4 ([quantize.linear.nvfp4]), at most one of the three; or lora
    ([lora]: adapters on a frozen model)."""


@dataclass
class Training:
    steps: int = 10
    """Optimizer steps to train for."""
    local_batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 means local_batch_size x dp degree.
    Gradient accumulation steps = global / (local x dp degree)."""
    batch_size_schedule: list[str] = field(default_factory=list)
    """A global batch that grows with the tokens trained: 'TOKENS GLOBAL_BATCH_SIZE' entries,
    e.g. ['252e6 1024', '2.87e12 2048'] (Llama 3 405B: 4M tokens a step at seq 8192, 8M after
    252M tokens, 16M after 2.87T); before the first, global_batch_size. Each must divide by
    local_batch_size x dp degree (more accumulation steps, same micro-batches)."""
    seq_len: int = 2048
    """Tokens per training sequence."""
    loss_chunk_tokens: int = 1024
    """The loss runs over this many tokens of a micro-batch at a time, holding fp32 copies of
    one chunk's logits only (the whole micro-batch's fp32 log-probabilities are 7.8 GiB for 8B
    at local batch 2, seq 8192); 0: the plain cross-entropy over the whole micro-batch."""
    max_norm: float = 1.0
    """Gradient clipping: maximum global L2 norm; 0 disables clipping."""
    mixed_precision_param: str = "bfloat16"
    """Compute dtype on GPU (bfloat16 or float32); CPU always computes in float32."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    seed: int = 0
    """Seed for weights, data order and dropout-free randomness."""
    deterministic: bool = False
    """Use deterministic algorithms (slower); with a fixed seed two runs give identical losses."""
    gc_freq: int = 50
    """Run Python's garbage collector every N steps (automatic collection is disabled)."""


@dataclass
class Data:
    dataset: str = "default"
    """default (the embedded corpus), synthetic (random tokens, for benchmarks),
    or a Hugging Face hub dataset name such as allenai/c4."""
    path: str | None = None
    """Local file or folder (jsonl, json, parquet, txt, arrow) read instead of the hub."""
    config_name: str | None = None
    """Hugging Face dataset config (subset), e.g. en for allenai/c4."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Column holding each document's text."""
    streaming: bool = True
    """Stream hub datasets instead of downloading them whole."""
    infinite: bool = True
    """Start another pass over the data when it runs out (else stop with an error)."""
    shuffle: bool = True
    """Put the documents in a new order each epoch, drawn from training.seed (not for streamed
    hub datasets, which are read in order)."""
    holdout_every: int = 0
    """Hold every N-th document of each source (indices N-1, 2N-1, ...) out of training, as the
    validation split; 0 trains on all. Not for streamed hub datasets."""
    blend: list[str] = field(default_factory=list)
    """Mix several sources instead of dataset/path: 'WEIGHT SOURCE' entries, SOURCE 'default'
    (the embedded corpus), a titan-preprocess prefix or local files, e.g.
    ['0.5 /data/general', '0.25 /data/math', '0.17 /data/code', '0.08 /data/multilingual']."""
    blend_schedule: list[str] = field(default_factory=list)
    """New blend weights from a token count on: 'TOKENS W1 W2 ...' entries (one weight per
    blend source), e.g. ['2.8e12 0.2 0.4 0.3 0.1'] to anneal on other data at the end."""
    format: str = "text"
    """text (documents packed back to back, every token a target) or chat (each example a list
    of messages in Llama 3's chat template; only assistant tokens are targets)."""
    messages_field: str = "messages"
    """With format = chat: the column holding each example's [{role, content}, ...] list."""
    packing: bool = True
    """With format = chat: pack whole examples into each window (needs model.attn_mask_type =
    block_causal); false gives one example per window, padded. Text is always packed."""


@dataclass
class Validation:
    enable: bool = False
    """Compute the loss on held-out data during training, logged as validation/loss and
    validation/perplexity beside the training metrics (forward only; training is unchanged)."""
    freq: int = 500
    """Validate every N steps, and after the last step."""
    steps: int = -1
    """Batches per validation, each training.local_batch_size windows per data-parallel rank;
    -1: every complete batch of one pass over the validation data."""
    dataset: str = "holdout"
    """holdout (the documents data.holdout_every holds out of training), default (the embedded
    corpus), synthetic (random tokens, for tests), or a Hugging Face hub dataset name (downloaded
    whole, not streamed)."""
    path: str | None = None
    """Local files or a titan-preprocess prefix to validate on, instead of dataset."""
    split: str = "validation"
    """Split of a hub dataset."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas of the model (DDP, or the replicate dimension of HSDP)."""
    data_parallel_shard_degree: int = -1
    """Ranks each replica's FSDP shards span; -1 fills what the other degrees leave of the world."""
    tensor_parallel_degree: int = 1
    """Ranks splitting each layer's matmuls (Megatron-style tensor parallel)."""
    enable_sequence_parallel: bool = True
    """With tensor parallel, also shard norms and residuals along the sequence."""
    enable_async_tensor_parallel: bool = False
    """Overlap tensor-parallel communication with matmuls (CUDA, needs compile)."""
    disable_loss_parallel: bool = False
    """With tensor parallel, gather logits before the loss instead of a vocab-parallel loss."""
    pipeline_parallel_degree: int = 1
    """Pipeline stages' ranks."""
    pipeline_parallel_schedule: str = "1F1B"
    """GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble or
    DualPipeV (the last two place two stages per rank in a V)."""
    pipeline_parallel_schedule_csv: str = ""
    """A custom schedule: a CSV file with one row of actions per pipeline rank (e.g. 0F0, 0B0,
    0I0, 0W0); it replaces pipeline_parallel_schedule and says which rank runs which stage."""
    pipeline_parallel_microbatch_size: int = 1
    """Sequences per pipeline micro-batch (local_batch_size must be a multiple)."""
    pipeline_parallel_layers_per_stage: int | None = None
    """Most transformer blocks per stage (stages = ceil(n_layers / this)); None gives one stage
    per rank (two for V schedules)."""
    pipeline_parallel_module_names_per_stage: list[str] = field(default_factory=list)
    """An explicit split: one entry per stage, its module names separated by spaces, e.g.
    ["tok_embeddings layers.0", "layers.1 norm output"]; replaces the even split."""
    pipeline_parallel_first_stage_less_layers: int = 0
    """Give the first stage this many blocks fewer, for the cost of the embedding."""
    pipeline_parallel_last_stage_less_layers: int = 0
    """Give the last stage this many blocks fewer, for the cost of the norm, output and loss."""
    pipeline_parallel_grad_reduce: str = "stage"
    """With FSDP, when a stage's gradients are reduce-scattered: stage (once, after the stage's
    last backward of the step; its unsharded fp32 gradients are held until then) or microbatch
    (after every micro-batch's backward, accumulated sharded: less memory, one reduce-scatter
    per micro-batch)."""
    context_parallel_degree: int = 1
    """Ranks splitting each sequence (context parallel)."""
    context_parallel_rotate_method: str = "allgather"
    """How torch's ring attention passes keys and values between cp ranks (causal masks):
    allgather (all at once) or alltoall (one neighbour's per step, overlapped with compute).
    block_causal always all-gathers."""
    fsdp_reshard_after_forward: str = "default"
    """default, always or never: whether FSDP frees gathered parameters after forward."""
    fsdp_cpu_offload: bool = False
    """Keep FSDP's sharded parameters, gradients and optimizer state in host memory (pinned on
    CUDA; data_parallel_shard_degree > 1); the optimizer then steps on the CPU."""


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """none, full, selective or memory_budget."""
    selective_ac_option: str = "op"
    """For selective: op (save matmul outputs by policy) or N (checkpoint every N-th block)."""
    memory_budget: float = 0.5
    """For memory_budget: fraction of activation memory to keep (0 = recompute all, 1 = none)."""
    offload: bool = False
    """Keep what each transformer block saves for backward in host memory until backward (not
    the last block's); with mode none, or selective every N-th block (the others offload)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block and the loss."""
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    """What to compile: model and/or loss."""
    backend: str = "inductor"
    """torch.compile backend."""

    @property
    def blocks(self) -> bool:
        """Whether the transformer blocks are compiled (enabled, with "model" a component)."""
        return self.enable and "model" in self.components


@dataclass
class Checkpoint:
    enable: bool = False
    """Save and resume training state with torch.distributed.checkpoint."""
    folder: str = "checkpoint"
    """Sub-folder of job.dump_folder holding step-N checkpoints."""
    interval: int = 500
    """Save every N steps."""
    keep_latest_k: int = 0
    """Keep the newest K checkpoints and delete older ones; 0 keeps all."""
    async_mode: str = "disabled"
    """disabled, async or async_with_pinned_mem."""
    load_step: int = -1
    """Step to resume from; -1 takes the newest complete checkpoint."""
    last_save_model_only: bool = True
    """At the last step, save the model weights only (no optimizer state)."""
    export_dtype: str = "float32"
    """dtype of a model-only save and of hf_save's weights: float32 or bfloat16."""
    hf_save: str = "none"
    """Also write the weights as a Hugging Face (transformers) folder, step-N-hf beside step-N,
    every rank writing its pieces: none, last (the last step's save) or every (each save)."""
    exclude_from_loading: list[str] = field(default_factory=list)
    """Parts not restored on resume: model, optimizer, lr_scheduler, dataloader, train_state."""
    initial_load_path: str | None = None
    """Weights to start from when the run has no checkpoint of its own."""
    initial_load_in_hf: bool = False
    """initial_load_path holds Hugging Face safetensors rather than DCP: a folder, or a hub id
    (org/name[@revision]) whose safetensors and config.json are fetched to the hub cache."""
    create_seed_checkpoint: bool = False
    """Write step-0 weights from one process and exit."""
    checksums: bool = True
    """Record a checksum of every file a save writes, and verify them before loading: a changed
    file is treated like a missing one."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log metrics every N steps (and at the first and last step)."""
    enable_tensorboard: bool = False
    """Write metrics to TensorBoard under job.dump_folder/save_tb_folder."""
    save_tb_folder: str = "tb"
    """TensorBoard sub-folder of job.dump_folder."""
    enable_wandb: bool = False
    """Send metrics to Weights & Biases (WANDB_MODE=offline works without network)."""
    wandb_project: str = "titan"
    """W&B project name."""
    rank_0_only: bool = True
    """Log from rank 0 only (else every rank logs, prefixed by its rank)."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch profiler traces."""
    save_traces_folder: str = "profile_traces"
    """Trace sub-folder of job.dump_folder."""
    profile_freq: int = 100
    """Record a trace every N steps."""
    profiler_warmup: int = 3
    """Profiler warmup steps before each recorded window."""
    profiler_active: int = 1
    """Steps recorded in each window."""
    enable_memory_snapshot: bool = False
    """Dump CUDA memory snapshots (CUDA only)."""
    save_memory_snapshot_folder: str = "memory_snapshot"
    """Memory snapshot sub-folder of job.dump_folder."""


@dataclass
class Resilience:
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals (names) that make every rank finish its step, save a checkpoint (with
    checkpoint.enable) and exit with status 143; empty: the signals' default action."""
    on_anomaly: str = "stop"
    """A non-finite loss or grad norm, or a spike, that a replay gives again (the data or the
    numerics, not a hardware fault): 'stop' the run, 'skip' the step's update, or 'rollback' to
    the newest checkpoint and skip the next rollback_skip_batches global batches."""
    replay: bool = True
    """Re-run an anomalous step from the same weights and data: a different result is a
    transient fault (the ranks whose gradients differed are logged; training goes on with the
    replayed step)."""
    spike_sigma: float = 0.0
    """A loss more than this many standard deviations above the mean of the last spike_window
    steps' losses is a spike; 0: off."""
    grad_norm_spike_factor: float = 0.0
    """A grad norm above this factor times the mean of the last spike_window steps' norms is a
    spike; 0: off."""
    spike_window: int = 100
    """Steps of loss and grad norm history the spike tests compare with (none before it fills)."""
    rollback_skip_batches: int = 200
    """With on_anomaly = 'rollback': global batches skipped after the checkpoint rolled back to
    (recorded in the checkpoint folder, so a resume skips them too)."""
    watchdog_timeout_s: float = 1800.0
    """A rank on which no step (validation or checkpoint save) completes for this long writes
    every thread's stack to the log and exits with status 1 (MAX_RESTARTS restarts the group);
    0: off."""
    straggler_report_freq: int = 100
    """Every N steps, log the slowest ranks' step and data-loading times against the median;
    0: off."""


@dataclass
class DryRun:
    memory_gib: float = 80.0
    """A dry run (COMM_MODE=fake_backend) reports whether each traced rank's peak fits in this
    much device memory (GiB; H100 80, H200 141) and exits with status 1 when one does not."""
    ranks: list[int] = field(default_factory=list)
    """Ranks a dry run traces (forked, as many at a time as there are cores); empty: rank 0,
    and with pipeline parallel also the first rank of the last pipeline stage."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    validation: Validation = field(default_factory=Validation)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    quantize: Quantize = field(default_factory=Quantize)
    lora: Lora = field(default_factory=Lora)
    resilience: Resilience = field(default_factory=Resilience)
    dry_run: DryRun = field(default_factory=DryRun)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
