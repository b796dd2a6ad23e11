"""The tokenizer.json backend against the tiktoken one: same ids, decodes and chat rendering.

No Meta tokenizer.json can be fetched offline, so each tokenizer.json here is made from a tiktoken
tokenizer.model by transformers' TikTokenConverter, the converter Hugging Face's Llama 3 conversion
uses (Llama3Converter is a TikTokenConverter), with Llama 3's BOS post-processor and
tokenizer_config.json: Meta's 128,256-id vocabulary (llama-models' copy) and titan's shipped one.
"""

import json
import random
from pathlib import Path

import pytest
from llama_models.llama3 import tokenizer as llama3_tokenizer
from test_tokenizer import TEXTS, _long_text
from tokenizers import processors
from transformers.convert_slow_tokenizer import TikTokenConverter

from titan.data.chat import chat_prompt, render_chat
from titan.data.hf_tokenizer import HFTokenizer
from titan.data.tokenizer import (
    LLAMA3_PATTERN,
    REPO_ROOT,
    SHIPPED_TOKENIZER,
    TiktokenTokenizer,
    build_tokenizer,
    special_token_names,
)

META_MODEL = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"
# What Meta-Llama-3-8B's tokenizer_config.json says of its tokens (its chat_template is omitted).
BASE_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
MORE_TEXTS = [
    "x = [1, 22, 333, 4444, 55555]; y = 3.14159e-10 // 0xDEADBEEF",
    "tabs\t\tand\u2003em spaces\u2028line sep\n\n\n\nend   ",
    "I'LL say it's THEY'VE we'D'   'll",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|reserved_special_token_7|>",
]
CHAT = [
    {"role": "system", "content": "You are terse. Ignore <|eot_id|> in text."},
    {"role": "user", "content": "  Sum 12345 + 678?\n"},
    {"role": "assistant", "content": "13023 — done. 😀"},
]


def convert(model: Path, folder: Path, config: dict | None) -> Path:
    """tokenizer.json (and tokenizer_config.json when given) in `folder`, made from `model`."""
    tok = TikTokenConverter(
        str(model), pattern=LLAMA3_PATTERN, extra_special_tokens=special_token_names()
    ).converted()
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module", params=["shipped", "meta"])
def pair(request, tmp_path_factory) -> tuple[TiktokenTokenizer, HFTokenizer]:
    model = REPO_ROOT / SHIPPED_TOKENIZER if request.param == "shipped" else META_MODEL
    path = convert(model, tmp_path_factory.mktemp(request.param), BASE_CONFIG)
    hf = build_tokenizer(str(path))
    assert isinstance(hf, HFTokenizer)
    return TiktokenTokenizer(model), hf


def test_same_attributes(pair):
    ours, hf = pair
    assert hf.n_words == ours.n_words in (2304, 128256)
    assert hf.special_tokens == ours.special_tokens
    assert (hf.bos_id, hf.eos_id, hf.eot_id, hf.pad_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.eot_id,
        ours.pad_id,
    )


@pytest.mark.parametrize("bos,eos", [(False, False), (True, True)])
def test_same_ids_and_decodes(pair, bos: bool, eos: bool):
    ours, hf = pair
    for text in TEXTS + MORE_TEXTS:
        ids = ours.encode(text, bos=bos, eos=eos)
        assert hf.encode(text, bos=bos, eos=eos) == ids, text
        assert hf.decode(ids) == ours.decode(ids)
        for allowed in ["all", {"<|eot_id|>"}, {"<|eot_id|>", "not a token"}]:
            expected = ours.encode(text, bos=bos, eos=eos, allowed_special=allowed)
            assert hf.encode(text, bos=bos, eos=eos, allowed_special=allowed) == expected, text
    with pytest.raises(ValueError, match="disallowed"):
        hf.encode("a <|eot_id|>", bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError):
        ours.encode("a <|eot_id|>", bos=False, eos=False, disallowed_special="all")
    assert hf.encode("a <|eot_id|>", bos=False, eos=False, disallowed_special={"<|eom_id|>"}) == (
        ours.encode("a <|eot_id|>", bos=False, eos=False)
    )


def test_same_on_random_unicode_and_ids(pair):
    ours, hf = pair
    rng = random.Random(2)
    chars = [chr(c) for c in range(0x20000) if not 0xD800 <= c < 0xE000] + [" ", "\n", "7"] * 9000
    text = "".join(rng.choice(chars) for _ in range(4000))
    ids = ours.encode(text, bos=False, eos=False)
    assert hf.encode(text, bos=False, eos=False) == ids
    assert hf.decode(ids) == text
    # Random ids cut UTF-8 sequences apart: both must put U+FFFD in the same places.
    for _ in range(20):
        ids = [rng.randrange(ours.n_words) for _ in range(50)]
        assert hf.decode(ids) == ours.decode(ids)


def test_same_on_long_text(pair):
    ours, hf = pair
    text = _long_text()  # over 400k characters, runs past 25k: encode() cuts them the same way
    ids = ours.encode(text, bos=True, eos=True)
    assert hf.encode(text, bos=True, eos=True) == ids
    assert hf.decode(ids[1:-1]) == text


def test_same_chat_rendering(pair):
    ours, hf = pair
    ids, targets = render_chat(CHAT, ours)
    assert render_chat(CHAT, hf) == (ids, targets)
    assert chat_prompt(CHAT[:2], hf) == chat_prompt(CHAT[:2], ours)
    if ours.n_words == 128256:  # Meta's own chat format on Meta's vocabulary
        assert ids[:2] == [128000, 128006] and ids.count(128009) == 3


def test_bos_eos_from_the_files(tmp_path: Path):
    shipped = REPO_ROOT / SHIPPED_TOKENIZER
    # An instruct model's config ends documents with <|eot_id|>, as Hugging Face does.
    instruct = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}
    tok = HFTokenizer(convert(shipped, tmp_path / "instruct", instruct))
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (2048, 2057, 2057)
    # No tokenizer_config.json: BOS from the post-processor, made the end of text here.
    path = convert(shipped, tmp_path / "bare", None)
    raw = json.loads(path.read_text())
    raw["post_processor"]["single"][0]["SpecialToken"]["id"] = "<|end_of_text|>"
    path.write_text(json.dumps(raw))
    assert (HFTokenizer(path).bos_id, HFTokenizer(path).eos_id) == (2049, 2049)
    (tmp_path / "bare" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(ValueError, match="eos_token '</s>' is not in its vocabulary"):
        HFTokenizer(path)


def test_file_chooses_the_backend(tmp_path: Path):
    shipped = REPO_ROOT / SHIPPED_TOKENIZER
    json_path = convert(shipped, tmp_path / "hf", BASE_CONFIG)
    assert isinstance(build_tokenizer(str(tmp_path / "hf")), HFTokenizer)  # only tokenizer.json
    (tmp_path / "hf" / "original").mkdir()
    (tmp_path / "hf" / "original" / "tokenizer.model").write_bytes(shipped.read_bytes())
    tok = build_tokenizer(str(tmp_path / "hf"))  # the tiktoken file wins
    assert isinstance(tok, TiktokenTokenizer) and tok.path.parent.name == "original"
    renamed = tmp_path / "named.model"  # the content decides, not the name
    renamed.write_bytes(json_path.read_bytes())
    assert isinstance(build_tokenizer(str(renamed)), HFTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json or a folder holding either"):
        build_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text('{"model": {"type": "BPE"}}\n')
    with pytest.raises(ValueError, match="is not a tokenizer.json the tokenizers library reads"):
        build_tokenizer(str(tmp_path / "bad.json"))
