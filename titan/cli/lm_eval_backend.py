"""lm-evaluation-harness on a titan model: `TitanLM`, lm-eval's model interface backed by titan's
Transformer and tokenizer (loglikelihood, rolling loglikelihood, greedy generate_until with the
KV cache), and `run_tasks`, which titan-evaluate --tasks calls.

Its tokens mirror lm-eval's Hugging Face backend (HFLM) on a Llama 3 export, so both give the
same numbers: every encoded text starts with BOS, as the HF tokenizer's post-processor adds it
(unless the text already starts with <|begin_of_text|>), BOS is the prefix of an empty context
and of the first rolling window, contexts too long are cut from the left as HFLM cuts them.
"""

import json
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval import simple_evaluate, utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.tasks import TaskManager
from torch.distributed.device_mesh import DeviceMesh

from titan.data.tokenizer_base import Tokenizer
from titan.models.llama3.generation import Sampling, generate
from titan.models.llama3.model import Transformer

BOS_TEXT = "<|begin_of_text|>"
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


class TitanLM(TemplateLM):
    """lm-eval's LM over a titan model in eval mode (one process, or each rank's part of a
    tensor-parallel model: every rank runs every request and gets the same results)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        tp_mesh: DeviceMesh | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.tp_mesh = model, tokenizer, tp_mesh
        self.batch_size = batch_size
        self.max_length = max_length or model.args.max_seq_len
        if self.max_length > model.args.max_seq_len:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's max_seq_len "
                f"{model.args.max_seq_len}"
            )
        self.model_device = model.rope_cache.device
        self.special_ids = set(tokenizer.special_tokens.values())
        # padding is never attended (right padding under a causal mask, or masked): any id
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id < model.args.vocab_size else 0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """Ids of `string`, BOS first unless add_special_tokens is False or the text starts
        with BOS already; text spelling a special token is that token (as in HF tokenizers)."""
        bos = not string.startswith(BOS_TEXT) if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos, eos=False, allowed_special="all")

    def tok_decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens (HFLM decodes with skip_special_tokens)."""
        return self.tokenizer.decode([i for i in ids if i not in self.special_ids])

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """(bs, longest, vocab) fp32 log-probabilities of the next token after each position
        of the rows, right-padded: causal attention keeps the padding out of real positions."""
        longest = max(map(len, rows))
        tokens = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        return self.model(tokens.to(self.model_device)).float().log_softmax(-1)

    def _loglikelihood_tokens(
        self, requests: list[tuple], disable_tqdm: bool = False, **kw
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per
        (key, context ids, continuation ids); batches of similar length, longest first."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            # the model reads all but the last token, cut from the left to max_length
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            logprobs = self._logprobs(rows)
            for r, i in enumerate(batch):
                cont = torch.tensor(requests[i][2], device=logprobs.device)
                lp = logprobs[r, len(rows[r]) - len(cont) : len(rows[r])]  # (len(cont), vocab)
                total = lp.gather(-1, cont[:, None]).sum().item()
                results[i] = (total, bool((lp.argmax(-1) == cont).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of max_length predicted tokens,
        each conditioned on the one token before it (BOS before the first)."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            for context, target in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, target))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (until, and EOS's text), of at
        most max_gen_toks tokens; requests with the same generation kwargs are batched."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out = [""] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id])
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ValueError(f"titan's lm-eval backend decodes greedily only, got {kwargs}")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be < max_length {self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0]) for i in indices}
            indices.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                # contexts cut from the left to leave room for max_gen new tokens (as HFLM)
                ids = [prompts[i][-(self.max_length - max_gen) :] for i in batch]
                gen = generate(
                    self.model, ids, max_gen, Sampling(temperature=0), pad_id=self.pad_id,
                    stop_ids=(self.eot_token_id,), tp_mesh=self.tp_mesh,
                )  # fmt: skip
                for row, i in enumerate(batch):
                    text = self.tok_decode(gen.completion(row))
                    out[i] = postprocess_generated_text(text, until, think_end_token=None)
        return out


def run_tasks(
    lm: TitanLM,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's results dict (the JSON `lm_eval --output_path` writes, less the samples
    unless log_samples) of `tasks` run on `lm`; include_path: a folder of task YAMLs."""
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples,
        batch_size=lm.batch_size,
    )  # fmt: skip
    # as lm-eval's own CLI writes it (numpy numbers, dtypes and the like made plain)
    return json.loads(json.dumps(results, default=utils.handle_non_serializable))
