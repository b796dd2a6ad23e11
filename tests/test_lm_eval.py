"""lm-evaluation-harness on titan (titan.cli.lm_eval_backend, titan-evaluate --tasks): three tasks
defined here over local jsonl files (multiple choice, generate_until, rolling loglikelihood) give
the same results through titan's backend on a DCP checkpoint as through lm-eval's own Hugging Face
backend (HFLM) on that checkpoint's HF export: equal accuracies and generations, per-request
loglikelihoods within 1e-4. Nothing is downloaded."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from parallel_harness import load_script
from test_generate import CONFIG, _free_port
from test_hf_tokenizer import BASE_CONFIG, convert

from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.models.llama3.load import checkpoint_args, load_model

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402

from titan.cli.lm_eval_backend import TitanLM, run_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64  # tokens per window: the rolling task's documents take several
LL_TOL = 1e-4
WORDS = "the a river stone light sings over under quickly blue seven old market bread".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write_tasks(folder: Path) -> None:
    """Three task YAMLs and their jsonl documents in `folder`."""
    rng = random.Random(0)
    docs = {
        "mc": [
            {"question": _sentence(rng, 6), "choices": [_sentence(rng, k) for k in (1, 2, 3)],
             "answer": rng.randrange(3)}
            for _ in range(8)
        ] + [{"question": "trailing space ", "choices": ["x", "y z"], "answer": 1}],
        "gen": [{"prompt": _sentence(rng, 5 + i), "target": "the"} for i in range(6)],
        "roll": [{"text": _sentence(rng, 20 + 25 * i)} for i in range(4)],
    }  # fmt: skip
    for name, rows in docs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: train\n"
    data = "dataset_kwargs:\n  data_files:\n    train: {}\n"
    (folder / "mc.yaml").write_text(
        f"task: titan_mc\n{common}{data.format(folder / 'mc.jsonl')}output_type: multiple_choice\n"
        "doc_to_text: 'Q: {{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: titan_gen\n{common}{data.format(folder / 'gen.jsonl')}"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: [' river', '.']\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "roll.yaml").write_text(
        f"task: titan_roll\n{common}{data.format(folder / 'roll.jsonl')}"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    """A tiny random Llama as a titan DCP checkpoint (the shipped tokenizer's vocabulary), its
    fp32 HF export with a tokenizer.json of the same tokenizer, and the task folder."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    s = SimpleNamespace(src=tmp / "src", dcp=tmp / "dcp", hf=tmp / "hf", tasks=tmp / "tasks")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with torch.no_grad():
        for p in model.parameters():  # wide, so greedy decoding does not repeat one token
            p.normal_(0.0, 0.15) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(s.src)
    assert load_script("convert_from_hf").main([str(s.src), str(s.dcp)]) == 0
    tok_dir = convert(ROOT / SHIPPED_TOKENIZER, tmp / "tok", BASE_CONFIG).parent
    s.config_json = str(s.src / "config.json")
    argv = [str(s.dcp), str(s.hf), "--config-json", s.config_json, "--dtype", "float32"]
    assert load_script("convert_to_hf").main([*argv, "--tokenizer-dir", str(tok_dir)]) == 0
    s.tasks.mkdir()
    _write_tasks(s.tasks)
    s.args = checkpoint_args(s.dcp, config_json=s.config_json)
    return s


TASKS = ["titan_mc", "titan_gen", "titan_roll"]


def _titan_lm(s: SimpleNamespace, **kw) -> TitanLM:
    model = load_model(s.dcp, s.args)
    return TitanLM(model, build_tokenizer(SHIPPED_TOKENIZER), batch_size=4,
                   max_length=MAX_LENGTH, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def hf_results(setup) -> dict:
    lm = HFLM(pretrained=str(setup.hf), device="cpu", dtype="float32", batch_size=4,
              max_length=MAX_LENGTH)  # fmt: skip
    return run_tasks(lm, TASKS, setup.tasks, log_samples=True)


def _responses(results: dict, task: str) -> list:
    """Per document (in document order), its filtered responses."""
    samples = sorted(results["samples"][task], key=lambda d: d["doc_id"])
    return [d["filtered_resps"] for d in samples]


def _leaves(x) -> list:
    """The numbers, flags and strings of a response, nested lists and tuples flattened."""
    return [y for v in x for y in _leaves(v)] if isinstance(x, list | tuple) else [x]


def assert_same_results(ours: dict, ref: dict, rel_tol: float = 0.0) -> None:
    """Per request: equal strings and is_greedy flags, loglikelihoods within LL_TOL (or rel_tol
    of their size when larger); and equal accuracies."""
    for task in TASKS:
        a, b = _responses(ours, task), _responses(ref, task)
        assert len(a) == len(b) > 0, task
        for doc, (x, y) in enumerate(zip(a, b, strict=True)):
            x, y = _leaves(x), _leaves(y)
            assert len(x) == len(y), (task, doc)
            for u, v in zip(x, y, strict=True):
                if isinstance(v, float) and not isinstance(v, bool):
                    assert abs(u - v) <= max(LL_TOL, rel_tol * abs(v)), (task, doc, x, y)
                else:
                    assert u == v, (task, doc, x, y)
    assert ours["results"]["titan_mc"]["acc,none"] == ref["results"]["titan_mc"]["acc,none"]
    assert (
        ours["results"]["titan_gen"]["exact_match,none"]
        == (ref["results"]["titan_gen"]["exact_match,none"])
    )


def test_titan_backend_equals_hf_backend(setup, hf_results):
    ours = run_tasks(_titan_lm(setup), TASKS, setup.tasks, log_samples=True)
    assert_same_results(ours, hf_results)
    gens = [g for r in _responses(ours, "titan_gen") for g in _leaves(r)]
    assert any(gens), "every generation is empty: the comparison would prove little"
    w = ours["results"]["titan_roll"]["word_perplexity,none"]
    assert w == pytest.approx(hf_results["results"]["titan_roll"]["word_perplexity,none"])


@pytest.mark.heavy  # 8 s: the backend's numbers are the test above's
def test_cli_writes_lm_evals_json(setup, hf_results, tmp_path):
    """titan-evaluate --tasks writes lm-eval's JSON, with HFLM's numbers."""
    out = tmp_path / "results.json"
    argv = [str(setup.dcp), "--config-json", setup.config_json, "--tasks", "titan_mc",
            "--include-path", str(setup.tasks), "--max-length", str(MAX_LENGTH),
            "--log-samples", "--output", str(out)]  # fmt: skip
    assert load_script("evaluate").main(argv) == 0
    ours = json.loads(out.read_text())
    assert ours["results"]["titan_mc"]["acc,none"] == hf_results["results"]["titan_mc"]["acc,none"]
    ref = _responses(hf_results, "titan_mc")
    for x, y in zip(_responses(ours, "titan_mc"), ref, strict=True):
        lls = [v for v in _leaves(x) if not isinstance(v, bool)]
        want = [v for v in _leaves(y) if not isinstance(v, bool)]
        assert max(abs(a - b) for a, b in zip(lls, want, strict=True)) <= LL_TOL


def test_cli_refuses_training_overrides_with_tasks(setup, capsys):
    argv = [str(setup.dcp), "--tasks", "titan_mc", "--training.steps", "3"]
    assert load_script("evaluate").main(argv) == 1
    assert "--tasks takes no --section.key overrides" in capsys.readouterr().err


@pytest.mark.heavy  # a torchrun launch of two processes: 18 s
def test_tensor_parallel_2_equals_hf_backend(setup, hf_results, tmp_path):
    """titan-evaluate --tasks under torchrun (TP 2 on gloo) gives HFLM's results too."""
    out = tmp_path / "tp.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(_free_port()), "scripts/evaluate.py"]
    argv = [str(setup.dcp), "--config-json", setup.config_json, "--tasks", ",".join(TASKS),
            "--include-path", str(setup.tasks), "--max-length", str(MAX_LENGTH),
            "--batch-size", "4", "--log-samples", "--output", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(
        [*launch, *argv], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # TP 2 sums each matmul in two halves: a rolling document's log-likelihood, a sum over
    # hundreds of tokens of about -840, moves by 1.2e-4 (1.5e-7 of it)
    assert_same_results(json.loads(out.read_text()), hf_results, rel_tol=1e-6)
