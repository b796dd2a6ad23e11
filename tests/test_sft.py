"""Supervised finetuning data (data.format = "chat"): the chat template and its loss mask, packed
examples that do not see each other, padding, truncation, shuffling, layouts and resume, errors,
and a finetune from run_train.sh whose assistant-token loss falls."""

import dataclasses
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from titan.config import load_config
from titan.config.job_config import Data, Validation
from titan.data.chat import ChatExamples, ChatWindows, render_chat
from titan.data.dataloader import build_dataloader, document_ids
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.data.tokens import GlobalBatchLoader
from titan.errors import ConfigError, DataError
from titan.models.llama3 import FLAVORS
from titan.models.llama3.model import Transformer
from titan.trainer.loss import IGNORE_INDEX
from titan.trainer.validate import validation_windows

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs" / "debug_model.toml")
TOK = build_tokenizer(SHIPPED_TOKENIZER)
SH, EH = TOK.special_tokens["<|start_header_id|>"], TOK.special_tokens["<|end_header_id|>"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # datasets reads its env vars at import, so point its config (not the env) at a tmp dir.
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def chat_set(n: int, seed: int = 0) -> list[dict]:
    """Additions a tiny model learns the shape of in a few steps: a system message every third
    example, a second turn every fourth."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        a, b, c = rng.randint(0, 50), rng.randint(0, 50), rng.randint(0, 9)
        messages = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]  # fmt: skip
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a calculator."})
        if i % 4 == 0:
            messages += [{"role": "user", "content": f"Plus {c}?"},
                         {"role": "assistant", "content": str(a + b + c)}]  # fmt: skip
        examples.append({"messages": messages})
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_loader(
    path: Path, seq_len: int, batch: int, dp: tuple[int, int] = (0, 1), **data
) -> GlobalBatchLoader:
    """build_dataloader on chat examples in `path`: one dp rank's micro-batches."""
    cfg = Data(path=str(path), format="chat", **data)
    return build_dataloader(cfg, TOK, seq_len=seq_len, local_batch_size=batch, dp_rank=dp[0],
                            dp_degree=dp[1])  # fmt: skip


def windows_of(rows: list[dict], seq_len: int, **kw) -> ChatWindows:
    examples = ChatExamples.from_rows("rows", len(rows), rows.__getitem__, "messages", TOK)
    opts = {"seed": 0, "shuffle": False, "infinite": True, "packing": True, **kw}
    return ChatWindows(examples, seq_len, TOK.pad_id, **opts)


def enc(text: str) -> list[int]:
    return TOK.encode(text, bos=False, eos=False)


def test_template_and_loss_mask_are_exact(tmp_path):
    """A 2-turn conversation with a system prompt, against tokens and labels built by hand: the
    targets are exactly each assistant message's content and its <|eot_id|>; a special token
    spelled in content stays text; content is stripped of surrounding whitespace."""
    turns = [("system", "You add numbers."), ("user", "2 + 3? <|eot_id|>"), ("assistant", " 5\n"),
             ("user", "And 4 + 4?"), ("assistant", "It is 8.")]  # fmt: skip
    tokens, labels = [TOK.bos_id], [IGNORE_INDEX]
    for role, content in turns:
        header = [SH, *enc(role), EH, *enc("\n\n")]
        body = [*enc(content.strip()), TOK.eot_id]
        tokens += header + body
        ignored = [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(header) + (body if role == "assistant" else ignored)
    assert tokens.count(TOK.eot_id) == 5  # the spelled one is not the special token
    pad = 3
    seq_len = len(tokens) + pad - 1
    messages = [{"role": r, "content": c} for r, c in turns]
    path = write_jsonl(tmp_path / "one.jsonl", [{"messages": messages, "id": 7}])
    inputs, got = next(iter(chat_loader(path, seq_len, 1, packing=False)))
    assert inputs[0].tolist() == (tokens + [TOK.pad_id] * pad)[:-1]
    assert got[0].tolist() == (labels + [IGNORE_INDEX] * pad)[1:]


def _model(mask: str, seq_len: int) -> Transformer:
    torch.manual_seed(0)
    args = dataclasses.replace(FLAVORS["debugmodel"], max_seq_len=seq_len, attn_mask_type=mask)
    model = Transformer(args)
    model.init_weights()
    return model


def _example_losses(model: Transformer, inputs, labels, block: bool) -> list[tuple[float, int]]:
    """(mean target loss, target count) of each example (BOS-started run) in the batch's rows."""
    docs = document_ids(inputs, TOK.bos_id)
    with torch.no_grad():
        logits = model(inputs, docs) if block else model(inputs)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX).view(labels.shape)  # fmt: skip
    out = []
    for row in range(inputs.shape[0]):
        for d in range(1, int(docs[row].max()) + 1):
            here = (docs[row] == d) & (labels[row] != IGNORE_INDEX)
            out.append((losses[row][here].sum().item() / int(here.sum()), int(here.sum())))
    return out


@pytest.mark.parametrize("mask", ["block_causal", "causal"])
def test_packed_examples_lose_what_they_lose_alone(mask):
    """Three examples packed into one window give each example's mean target loss of the example
    alone in a window (block_causal: within 1e-5); causal masking lets the later ones see the
    earlier ones, and their losses change."""
    rows = chat_set(3, seed=1)  # 69 (a system prompt, two turns), 34 and 36 tokens
    seq_len = 160
    packed = GlobalBatchLoader(windows_of(rows, seq_len), 1, 0, 1)
    alone = GlobalBatchLoader(windows_of(rows, seq_len, packing=False), 3, 0, 1)
    (p_in, p_lab), (a_in, a_lab) = next(packed), next(alone)
    assert int((p_in[0] == TOK.bos_id).sum()) == 3  # all three in the one window
    model = _model(mask, seq_len)
    got = _example_losses(model, p_in, p_lab, block=mask == "block_causal")
    want = _example_losses(model, a_in, a_lab, block=mask == "block_causal")
    assert [n for _, n in got] == [n for _, n in want]
    diffs = [abs(g - w) for (g, _), (w, _) in zip(got, want, strict=True)]
    if mask == "block_causal":
        assert max(diffs) < 1e-5, diffs
    else:
        assert diffs[0] < 1e-5 and min(diffs[1:]) > 1e-4, diffs  # the first sees nothing before


def test_unpacked_windows_are_one_example_padded():
    rows = chat_set(5)
    windows = windows_of(rows, 96, packing=False)
    assert windows.windows_in_epoch(0) == 5
    for k, row in enumerate(rows):
        ids, targets = render_chat(row["messages"], TOK)
        pad = 97 - len(ids)
        tokens, labels = windows[k]
        assert tokens.tolist() == ids + [TOK.pad_id] * pad
        want = [t if is_target else IGNORE_INDEX for t, is_target in zip(ids, targets, strict=True)]
        assert labels.tolist() == want + [IGNORE_INDEX] * pad
    assert windows_of(rows, 96).windows_in_epoch(0) < 5  # packed, examples share windows


def test_long_examples_are_cut_with_one_warning(tmp_path, caplog):
    rows = chat_set(6)
    long = {"role": "assistant", "content": " ".join(str(i) for i in range(40))}
    for k in (1, 4):
        rows[k]["messages"].append(long)
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="titan"):
        loader = chat_loader(path, 80, 1, shuffle=False, packing=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "2 of 6 chat examples" in warnings[0], warnings
    ids, _ = render_chat(rows[1]["messages"], TOK)
    assert len(ids) > 81 and loader.windows[1][0].tolist() == ids[:81]  # its first 81 tokens


def _examples_in(windows: ChatWindows, first: int, count: int) -> list[list[int]]:
    """The examples (BOS-started token runs, padding dropped) of windows [first, first + count)."""
    found = []
    for w in range(first, first + count):
        tokens = windows[w][0].tolist()
        starts = [i for i, t in enumerate(tokens) if t == TOK.bos_id] + [len(tokens)]
        for a, b in zip(starts, starts[1:], strict=False):
            found.append([t for t in tokens[a:b] if t != TOK.pad_id])
    return found


def test_each_epoch_shuffles_the_examples_by_seed():
    """Every example once an epoch, in an order drawn from (seed, epoch): the same for the same
    seed, another for another seed or epoch; shuffle = false keeps the file order."""
    rows = chat_set(12)
    every = sorted(render_chat(r["messages"], TOK)[0] for r in rows)

    def epochs(seed: int, shuffle: bool = True) -> list[list[list[int]]]:
        windows = windows_of(rows, 96, seed=seed, shuffle=shuffle)
        n0, n1 = windows.windows_in_epoch(0), windows.windows_in_epoch(1)
        return [_examples_in(windows, 0, n0), _examples_in(windows, n0, n1)]

    first = epochs(3)
    assert all(sorted(epoch) == every for epoch in first)
    assert first[0] != first[1] and first == epochs(3) and first[0] != epochs(4)[0]
    in_order = [render_chat(r["messages"], TOK)[0] for r in rows]
    assert epochs(3, shuffle=False) == [in_order, in_order]


def test_same_batches_under_dp_layouts_and_exact_resume(tmp_path):
    """Chat windows go through the global reader: dp 2 ranks' rows are one process's global
    batch, and a state saved after k steps (JSON) resumes on the next batch, under dp 1 or 2,
    across an epoch boundary (12 examples, 4 rows a step)."""
    path = write_jsonl(tmp_path / "chat.jsonl", chat_set(12))
    one = chat_loader(path, 64, 4)
    steps = [next(one) for _ in range(6)]
    assert one.windows.windows_in_epoch(0) < 24  # six steps cross into the second epoch
    ranks = [chat_loader(path, 64, 2, dp=(r, 2)) for r in range(2)]
    for inputs, labels in steps:
        (in0, lab0), (in1, lab1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([in0, in1]), inputs)
        assert torch.equal(torch.cat([lab0, lab1]), labels)
    for dp in (1, 2):
        loader = chat_loader(path, 64, 4)
        for _ in range(2):
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = [chat_loader(path, 64, 4 // dp, dp=(r, dp)) for r in range(dp)]
        for part in resumed:
            part.load_state_dict(state)
        for inputs, labels in steps[2:]:
            rows = [next(part) for part in resumed]
            assert torch.equal(torch.cat([r[0] for r in rows]), inputs)
            assert torch.equal(torch.cat([r[1] for r in rows]), labels)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "hi"}, "example 1 has no 'messages' field (it has ['text'])"),
        ({"messages": "hi"}, "example 1: 'messages' must be a non-empty list of {role, content}"),
        ({"messages": [{"role": "bot", "content": "x"}]},
         "example 1, message 0: role 'bot' is not one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": "x"}]},
         "example 1 has no assistant message: nothing to train on"),
        ({"messages": [{"role": "assistant", "content": 5}]},
         "example 1, message 0 (assistant): content is int, not a string"),
    ],
)  # fmt: skip
def test_bad_examples_are_named(bad, message):
    rows = [GOOD, bad, GOOD]
    with pytest.raises(DataError, match=re.escape(f"rows: {message}")):
        ChatExamples.from_rows("rows", 3, rows.__getitem__, "messages", TOK)


def test_bad_files_are_named(tmp_path):
    no_column = write_jsonl(tmp_path / "text.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match=r"example 0 has no 'messages' field \(columns: \['text'\]"):
        chat_loader(no_column, 32, 1)
    missing = write_jsonl(tmp_path / "missing.jsonl", [GOOD, GOOD, {"id": 3}])
    with pytest.raises(DataError, match="missing.jsonl: example 2 has no 'messages' field"):
        chat_loader(missing, 32, 1)


CHAT = ["--data.format", "chat", "--data.path", "chat.jsonl"]
BLOCK = ["--model.attn_mask_type", "block_causal"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.format", "chats"], "data.format = 'chats' is not one of text, chat; did you"),
        (CHAT, "set --model.attn_mask_type block_causal so that they do not attend to each other"),
        ([*CHAT, *BLOCK, "--data.blend", "1 default"], "drop data.blend"),
        (["--data.format", "chat", *BLOCK], "give --data.path FILE or a hub --data.dataset"),
        (["--data.format", "chat", "--data.dataset", "org/chats", *BLOCK],
         "set --data.streaming false (downloads it)"),
        (["--data.packing", "false"], "text documents are always packed"),
    ],
)  # fmt: skip
def test_bad_chat_configs_are_refused(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["--job.config_file", DEBUG_TOML, *args])
    if args == CHAT:  # the two fixes the message names are accepted
        load_config(["--job.config_file", DEBUG_TOML, *CHAT, "--data.packing", "false"])
        load_config(["--job.config_file", DEBUG_TOML, *CHAT, *BLOCK])


def test_run_train_sh_finetune_lowers_assistant_loss(tmp_path):
    """The debug model finetuned from run_train.sh on generated additions: the logged loss (over
    assistant tokens only) falls by a clear margin in 20 steps, and validation on held-out
    examples runs through the same windows."""
    path = write_jsonl(tmp_path / "sums.jsonl", chat_set(400))
    env = {"OMP_NUM_THREADS": "1", **os.environ, "TITAN_PYTHON": sys.executable,
           "CONFIG_FILE": DEBUG_TOML}  # fmt: skip
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    args = [
        f"--job.dump_folder={tmp_path / 'run'}", "--training.device=cpu", *BLOCK,
        "--data.format", "chat", "--data.path", str(path), "--data.holdout_every", "5",
        "--validation.enable", "--validation.freq", "20", "--validation.steps", "2",
        "--training.steps", "20", "--training.seq_len", "96", "--training.local_batch_size", "8",
        "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2",
    ]  # fmt: skip
    out = subprocess.run([str(ROOT / "run_train.sh"), *args], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert re.search(r"data: --data.path \S+, 320 chat examples, [\d,]+ tokens", log), log[-4000:]
    losses = [float(x) for x in re.findall(r"step: +\d+ +loss: (\d+\.\d+) +grad_norm", log)]
    assert len(losses) == 20 and losses[-1] < losses[0] - 3.0, losses
    validation = re.findall(r"validation: step: 20 +loss: (\d+\.\d+)", log)
    assert validation and float(validation[0]) < losses[0] - 3.0, log[-3000:]


def test_validation_reads_other_chat_data_once_in_order(tmp_path):
    rows = chat_set(10)
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    v = Validation(enable=True, path=str(path))
    windows, n = validation_windows(v, Data(path="train.jsonl", format="chat"), TOK, 96, 0, 2304)
    assert isinstance(windows, ChatWindows) and n == windows.windows_in_epoch(0)
    assert _examples_in(windows, 0, n) == [render_chat(r["messages"], TOK)[0] for r in rows]
    with pytest.raises(DataError, match="ran out of data: one pass"):
        windows[n]
