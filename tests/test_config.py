"""Config loading: TOML, overrides, printing, and a clear error for each kind of bad input."""

import dataclasses
import sys
from pathlib import Path

import pytest

from titan.config import JobConfig, load_config
from titan.config.manager import field_docs, help_text, to_toml
from titan.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "titan/train_configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_parse(path):
    cfg = load_config([], config_file=str(path))
    with path.open("rb") as f:
        table = tomllib.load(f)
    assert set(table) <= {f.name for f in dataclasses.fields(JobConfig)}, path.name
    _check_table(cfg, JobConfig(), table, str(path), ())


def _check_table(got, defaults, written: dict, path: str, where: tuple) -> None:
    """Every field: the file's value where it sets one, else the dataclass default; sub-tables
    ([quantize.linear.float8]) likewise."""
    assert set(written) <= set(vars(got)), (where, set(written) - set(vars(got)))
    for key, value in vars(got).items():
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(value):
            _check_table(value, default, written.get(key, {}), path, (*where, key))
            continue
        expected = written.get(key, default)
        if (*where, key) == ("job", "config_file"):
            expected = path  # not in the file: load_config records where it read it
        assert value == expected, (where, key, value, expected)


def test_seed_layouts():
    c70 = load_config([], config_file=str(ROOT / "titan/train_configs/llama3_70b.toml"))
    assert (c70.model.flavor, c70.parallelism.tensor_parallel_degree) == ("70B", 8)
    c405 = load_config([], config_file=str(ROOT / "titan/train_configs/llama3_405b.toml"))
    p = c405.parallelism
    assert (p.data_parallel_shard_degree, p.tensor_parallel_degree, p.pipeline_parallel_degree) == (
        8,
        8,
        8,
    )
    assert p.pipeline_parallel_schedule == "Interleaved1F1B"


def test_overrides_both_spellings_and_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[training]\nsteps = 3\nseq_len = 64\n[optimizer]\nlr = 1e-3\n")
    cfg = load_config(
        ["--job.config_file", str(toml), "--training.steps", "7", "--optimizer.lr=0.5",
         "--job.print_config", "--compile.components", "model", "--lr_scheduler.decay_ratio", "0.2",
         "--data.path=none"]
    )  # fmt: skip
    assert cfg.training.steps == 7 and cfg.training.seq_len == 64
    assert cfg.optimizer.lr == 0.5 and cfg.job.print_config is True
    assert cfg.compile.components == ["model"] and cfg.lr_scheduler.decay_ratio == 0.2
    assert cfg.data.path is None


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(
        [
            "--training.steps",
            "5",
            "--lr_scheduler.decay_ratio",
            "0.5",
            "--lr_scheduler.warmup_steps",
            "1",
        ]
    )
    path = tmp_path / "effective.toml"
    path.write_text(to_toml(cfg))
    again = load_config([], config_file=str(path))
    again.job.config_file = cfg.job.config_file
    assert again == cfg


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--trainng.steps", "3"],
            "unknown config section 'trainng' (command line); did you mean 'training'?",
        ),
        (
            ["--training.step", "3"],
            "unknown config key training.'step' (command line); did you mean 'steps'?",
        ),
        (["--training.steps", "three"], "--training.steps: expected int, got 'three'"),
        (["--training.steps", "0"], "training.steps = 0 must be > 0"),
        (["--compile.enable", "maybe"], "--compile.enable: expected bool"),
        (
            ["--optimizer.name", "adamw"],
            "optimizer.name = 'adamw' is not one of AdamW, Adam, Muon; did you mean 'AdamW'?",
        ),
        (
            ["--optimizer.name", "muon"],
            "optimizer.name = 'muon' is not one of AdamW, Adam, Muon; did you mean 'Muon'?",
        ),
        (
            ["--optimizer.name", "Muon", "--optimizer.state_dtype", "bfloat16"],
            "optimizer.state_dtype = 'bfloat16' applies to AdamW/Adam's moments; with "
            "optimizer.name = 'Muon' keep float32",
        ),
        (
            ["--optimizer.name", "Muon", "--model.converters", "lora"],
            "optimizer.name = 'Muon' with LoRA: orthogonalizing the low-rank adapters' updates",
        ),
        (
            ["--optimizer.name", "Muon", "--optimizer.muon_momentum", "1"],
            "optimizer.muon_momentum = 1.0 must be in [0, 1)",
        ),
        (
            ["--optimizer.name", "Muon", "--optimizer.muon_ns_steps", "0"],
            "optimizer.muon_ns_steps = 0 must be in [1, 99]",
        ),
        (["--optimizer.name", "Muon", "--optimizer.muon_lr", "0"], "muon_lr = 0.0 must be > 0"),
        (
            ["--optimizer.name", "Muon", "--parallelism.fsdp_cpu_offload", "true"],
            "optimizer.name = 'Muon' gathers each block matrix across its ranks in the step",
        ),
        (
            ["--optimizer.muon_adjust_lr", "rms"],
            "optimizer.muon_adjust_lr = 'rms' is not one of original, match_rms_adamw",
        ),
        (["--model.name", "llama4"], "model.name = 'llama4' is not one of llama3"),
        (
            ["--parallelism.context_parallel_rotate_method", "all2all"],
            "parallelism.context_parallel_rotate_method = 'all2all' is not one of allgather, "
            "alltoall; did you mean 'alltoall'?",
        ),
        (["--optimizer.beta2", "1.0"], "optimizer.beta2 = 1.0 must be in [0, 1)"),
        (
            ["--parallelism.tensor_parallel_degree", "0"],
            "parallelism.tensor_parallel_degree = 0 must be >= 1",
        ),
        (["--activation_checkpoint.mode", "memory_budget"], "set compile.enable = true"),
        (
            ["--resilience.preemption_signals", "SIGTERM,SIGKILL"],
            "resilience.preemption_signals: 'SIGKILL' is not a signal a process can catch",
        ),
        (
            ["--resilience.preemption_signals", "USR1"],
            "resilience.preemption_signals: 'USR1' is not a signal",
        ),
        (
            ["--resilience.on_anomaly", "ignore"],
            "resilience.on_anomaly = 'ignore' is not one of stop, skip, rollback",
        ),
        (["--resilience.on_anomaly", "rollback"], "add --checkpoint.enable"),
        (
            ["--checkpoint.hf_save", "final"],
            "checkpoint.hf_save = 'final' is not one of none, last, every",
        ),
        (["--checkpoint.hf_save", "last"], "writes beside the run's checkpoints: add"),
        (
            ["--checkpoint.hf_save", "every", "--checkpoint.enable", "--model.converters", "lora"],
            "checkpoint.hf_save does not write LoRA runs: export with titan-convert-to-hf",
        ),
        (["--resilience.grad_norm_spike_factor", "0.5"], "must be > 1"),
        (["--resilience.spike_sigma", "-1"], "resilience.spike_sigma = -1.0 must be >= 0"),
        (["--resilience.spike_window", "1"], "resilience.spike_window = 1 must be >= 2"),
        (["--resilience.straggler_report_freq", "-1"], "must be >= 0 (0: off)"),
        (
            [
                "--fault_tolerance.enable",
                "--fault_tolerance.replica_groups",
                "2",
                "--fault_tolerance.replica_group",
                "2",
            ],
            "fault_tolerance.replica_group = 2 must be in [0, replica_groups = 2)",
        ),  # fmt: skip
        (
            ["--fault_tolerance.enable", "--fault_tolerance.min_replicas", "2"],
            "fault_tolerance.min_replicas = 2 must be in [1, replica_groups = 1]",
        ),
        (
            ["--fault_tolerance.enable", "--fault_tolerance.process_group", "mpi"],
            "fault_tolerance.process_group = 'mpi' is not one of gloo, nccl",
        ),
        (
            ["--fault_tolerance.enable", "--fault_tolerance.timeout_s", "0"],
            "fault_tolerance.timeout_s = 0 must be >= 1",
        ),
        (
            ["--fault_tolerance.enable", "--parallelism.data_parallel_replicate_degree", "2"],
            "the replica dimension is fault_tolerance.replica_groups",
        ),
        (
            [
                "--fault_tolerance.enable",
                "--resilience.on_anomaly",
                "rollback",
                "--checkpoint.enable",
            ],
            "resilience.on_anomaly = 'rollback' with fault_tolerance.enable",
        ),  # fmt: skip
        (["training.steps", "3"], "unexpected argument 'training.steps'"),
        (["--job.config_file", "/nonexistent.toml"], "config file not found: /nonexistent.toml"),
    ],
)
def test_bad_config_errors(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value)


def test_fault_tolerance_off_takes_any_values():
    """The [fault_tolerance] checks apply only with enable: a disabled section never stops a run."""
    cfg = load_config(
        ["--fault_tolerance.replica_group", "7", "--fault_tolerance.min_replicas", "0"]
    )
    assert not cfg.fault_tolerance.enable and cfg.fault_tolerance.replica_group == 7
    cfg = load_config(
        [
            "--fault_tolerance.enable",
            "--fault_tolerance.replica_groups",
            "3",
            "--fault_tolerance.replica_group",
            "2",
            "--fault_tolerance.min_replicas",
            "2",
        ]
    )
    assert (cfg.fault_tolerance.replica_group, cfg.fault_tolerance.min_replicas) == (2, 2)


def test_bad_toml_errors(tmp_path):
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('[training]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"training.steps in .*bad_type.toml: expected int"):
        load_config([], config_file=str(bad_type))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optimizer]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown config key optimizer.'learning_rate'"):
        load_config([], config_file=str(unknown))
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\nsteps = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config([], config_file=str(broken))


def test_every_field_is_documented():
    sections = list(vars(JobConfig()).values())
    while sections:
        section = sections.pop()
        docs = field_docs(type(section))
        for name, value in vars(section).items():
            assert docs.get(name), f"{type(section).__name__}.{name} has no doc"
            if dataclasses.is_dataclass(value):  # a [table.sub]
                sections.append(value)
    assert "--training.local_batch_size" in help_text()
    assert "--quantize.linear.float8.recipe_name" in help_text()


def test_nested_tables_from_toml_and_command_line(tmp_path):
    path = tmp_path / "f8.toml"
    path.write_text(
        '[model]\nconverters = ["float8"]\n'
        '[quantize.linear.float8]\nrecipe_name = "rowwise"\nfilter_fqns = ["output", "wk"]\n'
    )
    cfg = load_config(["--quantize.linear.float8.debug_log_freq", "5"], config_file=str(path))
    f8 = cfg.quantize.linear.float8
    assert (f8.recipe_name, f8.filter_fqns, f8.debug_log_freq) == ("rowwise", ["output", "wk"], 5)
    assert cfg.quantize.linear.mx.recipe_name == "mxfp8_rceil"  # untouched: the default
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert "[quantize.linear.float8]" in to_toml(cfg) and "[quantize]" not in to_toml(cfg)
    assert load_config([], config_file=str(again)) == dataclasses.replace(
        cfg, job=dataclasses.replace(cfg.job, config_file=str(again))
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize.linear.float8.recipe", "rowwise"],
         "unknown config key quantize.linear.float8.'recipe' (command line); did you mean "
         "'recipe_name'?"),
        (["--quantize.linaer.float8.recipe_name", "rowwise"],
         "unknown config section quantize.'linaer' (command line); did you mean 'linear'?"),
        (["--quantize.linear", "x"], "unknown config key quantize.'linear' (command line)"),
        (["--quantize.linear.float8.recipe_name", "rowise"],
         "quantize.linear.float8.recipe_name = 'rowise' is not one of tensorwise, hybrid, "
         "rowwise, rowwise_with_gw_hp; did you mean 'rowwise'?"),
        (["--model.converters", "float8,fp8"],
         "model.converters names 'fp8', which is not a converter: valid ones are float8, mx"),
        (["--model.converters", "float8,mx"],
         "model.converters = ['float8', 'mx']: name each converter once, and use float8 or mx"),
        (["--model.converters", "float8", "--quantize.linear.float8.recipe_name", "rowwise",
          "--quantize.linear.float8.enable_fsdp_float8_all_gather", "true"],
         "enable_fsdp_float8_all_gather needs per-tensor scales; recipe 'rowwise' scales per "
         "row: use recipe_name = 'tensorwise' or turn it off"),
        (["--model.converters", "float8", "--quantize.linear.float8.debug_log_freq", "5",
          "--compile.enable", "true"],
         "quantize.linear.float8.debug_log_freq records from eager blocks: set compile.components "
         "= ['loss'] or compile.enable = false, or turn the stats off"),
        (["--quantize.linear.float8.debug_log_freq", "-1"],
         "quantize.linear.float8.debug_log_freq = -1 must be >= 0"),
        (["--training.loss_chunk_tokens", "-1"], "training.loss_chunk_tokens = -1 must be >= 0"),
    ],
)  # fmt: skip
def test_converter_and_nested_key_errors(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch):
    """From an empty folder a shipped config loads by name, with or without .toml, and by its path
    beside the titan package; a file of that name in the folder wins."""
    expected = load_config([], config_file=str(ROOT / "titan/train_configs/llama3_8b.toml"))
    monkeypatch.chdir(tmp_path)
    for name in ("llama3_8b.toml", "llama3_8b", "titan/train_configs/llama3_8b.toml"):
        cfg = load_config(["--job.config_file", name])
        assert cfg.job.config_file == name
        cfg.job.config_file = expected.job.config_file
        assert cfg == expected, name
    (tmp_path / "llama3_8b.toml").write_text("[training]\nsteps = 3\n")
    assert load_config(["--job.config_file", "llama3_8b.toml"]).training.steps == 3


def test_missing_config_names_where_it_looked_and_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = ", ".join(p.name for p in CONFIGS)
    typo, in_folder = "debug_modle", "configs/debug_model.toml"
    cases = {  # where each is looked for; a path with a folder is not a shipped config's name
        typo: [typo, ROOT / typo, ROOT / "titan/train_configs" / f"{typo}.toml"],
        in_folder: [in_folder, ROOT / in_folder],
    }
    for name, looked in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(["--job.config_file", name])
        where = ", ".join(str(tmp_path / p) for p in looked)  # absolute ones stay themselves
        assert str(e.value) == (
            f"config file not found: {name} (looked at {where}); the shipped configs, which any "
            f"folder can name: {shipped}"
        )
