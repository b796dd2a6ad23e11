"""Context parallel against one process: the same seed and global batch give the same losses
and every gradient (fp32; 1e-5, each gradient relative to its own scale), with causal and
block_causal masks, documents of arbitrary lengths (a BOS starts each, anywhere), ignored labels,
and CP composed with FSDP, HSDP, TP, PP, activation checkpointing and compile."""

import pytest
import torch
from layout_expect import check_layout, fsdp, fsdp_tp
from parallel_harness import (
    COUNTING_BACKEND,
    assert_matches,
    ignore_some_labels,
    run_layouts,
    run_single,
)
from test_document_mask import BLOCK, BOS, _packed_batches

from titan.compat import compiled_ring_attention_unsupported
from titan.config import load_config
from titan.data.dataloader import document_ids
from titan.models.llama3.build import model_args_for
from titan.models.llama3.parallelize import check_supported_layout
from titan.parallelisms.context_parallel import (
    check_cp,
    chunk_order,
    document_chunks,
    shard_sequence,
    take_chunks,
)
from titan.parallelisms.parallel_dims import resolve_parallel_dims

SEQ_LEN = 32
ALONE = ["--parallelism.data_parallel_shard_degree", "1", "--training.local_batch_size", "4"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
CP4 = ["--parallelism.context_parallel_degree", "4"]
OP_AC = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
         "op"]  # fmt: skip
COMPILE = ["--compile.enable", "true", "--compile.backend", COUNTING_BACKEND]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
ALLTOALL = ["--parallelism.context_parallel_rotate_method", "alltoall"]

# name: (overrides, expected layout (None: pipelined, checked by its stages), block_causal)
TWO_RANKS = {
    "cp2": ([*CP2, *ALONE], fsdp("cp 2", cp=2), False),
    # torch 2.11 refuses it at start-up (test_compiled_ring_attention_needs_torch_2_12)
    **({} if compiled_ring_attention_unsupported() else {
        "cp2_compile": ([*CP2, *ALONE, *COMPILE], fsdp("cp 2", cp=2, compiled=True), False),
    }),
    "cp2_block_causal": ([*CP2, *ALONE, *BLOCK], fsdp("cp 2", cp=2), True),
    "cp2_block_causal_op_ac": ([*CP2, *ALONE, *BLOCK, *OP_AC],
                               fsdp("cp 2", cp=2, ac_blocks=6), True),
    "cp2_block_causal_compile": ([*CP2, *ALONE, *BLOCK, *COMPILE],
                                 fsdp("cp 2", cp=2, compiled=True), True),
}  # fmt: skip
FOUR_RANKS = {
    "cp4": ([*CP4, *ALONE], fsdp("cp 4", cp=4), False),
    "cp4_alltoall": ([*CP4, *ALONE, *ALLTOALL], fsdp("cp 4", cp=4), False),
    "cp2_tp2": ([*CP2, *TP2, *ALONE], fsdp_tp("cp 2 x tp 2", cp=2), False),
    "cp4_block_causal": ([*CP4, *ALONE, *BLOCK], fsdp("cp 4", cp=4), True),
    "fsdp2_cp2_block_causal": ([*CP2, "--training.local_batch_size", "2", *BLOCK],
                               fsdp("dp_shard 2 x cp 2", cp=2), True),
    "cp2_tp2_block_causal": ([*CP2, *TP2, *ALONE, *BLOCK], fsdp_tp("cp 2 x tp 2", cp=2), True),
    "pp2_cp2_block_causal": ([*CP2, *PP2, *ALONE, *BLOCK], None, True),
    "hsdp2_cp2_block_causal": ([*CP2, "--parallelism.data_parallel_replicate_degree", "2",
                                *ALONE[:2], "--training.local_batch_size", "2", *BLOCK],
                               fsdp("dp_replicate 2 x cp 2", cp=2,
                                    fsdp_mesh=("dp_replicate", "dp_shard_cp")), True),
}  # fmt: skip


@pytest.fixture(scope="module")
def batches():
    # documents of random lengths (a BOS starts each) and labels ignored in varying numbers
    return ignore_some_labels(_packed_batches(3, 4, SEQ_LEN))


@pytest.fixture(scope="module")
def references(batches) -> dict[bool, dict]:
    whole = ["--training.local_batch_size", "4"]
    return {False: run_single(whole, batches), True: run_single([*whole, *BLOCK], batches)}


def _check(cases: dict, world_size: int, batches, references) -> None:
    results = run_layouts(world_size, [args for args, _, _ in cases.values()], batches)
    for (name, (_, expect, block)), got in zip(cases.items(), results, strict=True):
        layout = got["layout"]
        blocks = 6
        if expect is not None:
            check_layout(name, layout, expect)
        else:
            assert layout["stages"] == {0: [0], 1: [1]}, name
            blocks = 3  # rank 0's stage
        # causal: torch's ring attention; block_causal: gathered keys under the mask
        how = {"ring": 0, "gather": blocks} if block else {"ring": blocks, "gather": 0}
        assert layout["context_parallel_attention"] == how, name
        assert_matches(name, got, references[block])


def test_block_causal_cases_move_chunks(batches):
    """The block_causal cases above include steps whose documents move chunks off the head-tail
    pairs (CP 2 over the whole batch, and the second data-parallel half under FSDP 2 x CP 2)."""
    inputs, _ = batches
    docs = document_ids(inputs[1], BOS)
    assert document_chunks(docs, 2) == [[0, 2], [1, 3]]
    assert document_chunks(docs[2:], 2) == [[2, 3], [0, 1]]


def _tile_work(documents: torch.Tensor, chunks: list[list[int]], tile: int) -> list[int]:
    """Brute force: per rank, the (tile x tile) blocks of its queries against the keys gathered
    in rank order that hold a (query, key) pair of one document, key not after query."""
    seqlen = documents.shape[1]
    order = take_chunks(torch.arange(seqlen)[None], sum(map(len, chunks)), sum(chunks, []))[0]
    pos, docs = order, documents[:, order]
    allowed = (pos[:, None] >= pos[None, :]) & (docs[:, :, None] == docs[:, None, :])
    work = []
    for rows in allowed.chunk(len(chunks), dim=1):  # (bs, seqlen / cp, seqlen)
        tiles = rows.unflatten(1, (-1, tile)).unflatten(3, (-1, tile)).any(2).any(-1)
        work.append(int(tiles.sum()))
    return work


def test_document_chunks_balance_documents_of_any_length():
    """Random document lengths (up to 1500 tokens, none dividing 2 x cp): every chunk goes to
    one rank, 2m to each; the ranks' block-sparse work, counted by brute force, is within 3% of
    even where head-tail pairs leave it over 20% off."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        lengths = []
        while sum(lengths) < 4096:
            lengths.append(int(torch.randint(1, 1500, (1,), generator=gen)))
        docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        docs = docs[:4096].expand(2, 4096)
        chunks = document_chunks(docs, 4)
        assert sorted(sum(chunks, [])) == list(range(32)) and {len(c) for c in chunks} == {8}
        balanced = _tile_work(docs, chunks, 128)
        pairs = [[i * 4 + j for i in (r, 7 - r) for j in range(4)] for r in range(4)]
        head_tail = _tile_work(docs, pairs, 128)
        assert max(balanced) / (sum(balanced) / 4) < 1.03, balanced
        assert max(head_tail) / (sum(head_tail) / 4) > 1.2, head_tail  # measured 1.24 - 1.40


def test_document_chunks_keep_head_tail_when_it_is_even():
    """One document (causal work): the head-tail pairs are already even and are kept."""
    docs = torch.zeros(1, 1024, dtype=torch.long)
    assert document_chunks(docs, 2) == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert document_chunks(docs[:, :32], 4) == [[r, 7 - r] for r in range(4)]


def test_masks_differ(references):
    """The documents change the loss: a causal run could not pass for a block_causal one."""
    assert abs(references[True]["losses"][0] - references[False]["losses"][0]) > 1e-3


def test_two_rank_context_parallel_matches_one_process(batches, references):
    _check(TWO_RANKS, 2, batches, references)


@pytest.mark.heavy
def test_four_rank_context_parallel_matches_one_process(batches, references):
    _check(FOUR_RANKS, 4, batches, references)


def test_load_balanced_chunks():
    """Rank r holds chunks r and 2cp-1-r: every rank one early and one late chunk, and the
    ranks' parts together are the sequence."""
    x = torch.arange(16)[None]
    parts = [shard_sequence(x, 4, r)[0].tolist() for r in range(4)]
    assert parts == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert sorted(sum(parts, [])) == list(range(16))
    assert chunk_order(2, 1) == [1, 2]


def test_sequence_length_must_split_into_equal_chunks():
    check_cp(2, 2, True, 32)  # 2 x 2 x 2 = 8 divides 32
    with pytest.raises(ValueError, match=r"seq_len 36 does not divide into 2 x context_parallel"
                       r"_degree 2 x tensor_parallel_degree 2 \(sequence parallel\) = 8 equal "
                       r"chunks: use a seq_len that is a multiple of 8"):  # fmt: skip
        check_cp(2, 2, True, 36)
    with pytest.raises(ValueError, match="2 x context_parallel_degree 4 = 8 equal chunks"):
        check_cp(4, 1, True, 36)


def test_mask_rotation_and_dtype_need_a_cp_attention():
    """block_causal all-gathers keys (torch's ring knows only causal masks), and torch's ring on
    CUDA runs the flash kernel, which has no fp32 version: both stop start-up, naming the fix."""
    check_cp(2, 1, True, 32, "block_causal", "allgather")
    check_cp(2, 1, True, 32, "causal", "alltoall", torch.bfloat16)
    block_alltoall = (r"context_parallel_rotate_method = 'alltoall' with model\.attn_mask_type "
                      r"= 'block_causal': .* use rotate_method 'allgather'")  # fmt: skip
    with pytest.raises(ValueError, match=block_alltoall):
        check_cp(2, 1, True, 32, "block_causal", "alltoall")
    with pytest.raises(ValueError, match=r"ring flash attention, which has no float32 kernel: use "
                       r"training.mixed_precision_param = 'bfloat16'"):  # fmt: skip
        check_cp(2, 1, True, 32, "causal", "allgather", torch.float32)


def test_compiled_ring_attention_needs_torch_2_12(monkeypatch):
    """torch 2.11's compile gives zero gradients through the ring attention: start-up refuses
    causal CP in compiled blocks there, naming the version and the ways out."""
    cfg = load_config([*CP2, *ALONE, "--compile.enable", "true"])
    dims = resolve_parallel_dims(cfg.parallelism, world_size=2)
    args = model_args_for(cfg.model, 32, 0)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.12.0"))
    check_supported_layout(dims, args, cfg)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0"))
    with pytest.raises(ValueError) as e:
        check_supported_layout(dims, args, cfg)
    assert str(e.value) == (
        "context parallel with causal attention in compiled blocks needs torch 2.12 or newer "
        "(installed: 2.11.0): torch 2.11's compile loses the ring attention's gradient; upgrade "
        "torch, use model.attn_mask_type = 'block_causal', or compile only the loss"
    )
    cfg.model.attn_mask_type = "block_causal"  # gathered keys: compiled right on 2.11
    check_supported_layout(dims, model_args_for(cfg.model, 32, 0), cfg)
