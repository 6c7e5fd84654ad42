"""Fixtures for training tests: stdlib corpora (code folder, docstring JSONL), a tiny BPE tokenizer and a tiny
random LlamaMoE model saved to a temporary folder."""

import inspect
import json
import os
import shutil
import sysconfig

import pytest

from tests.conftest import tiny_moe_config

CODE_FILES = ["textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "shlex.py", "string.py", "glob.py"]
DOC_MODULES = ["textwrap", "heapq", "json", "shlex", "string", "collections", "functools", "itertools", "os.path"]


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    code = root / "code"
    code.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in CODE_FILES:
        shutil.copy(os.path.join(stdlib, name), code / name)
    docs = root / "docs.jsonl"
    import importlib

    with open(docs, "w") as handle:
        for module_name in DOC_MODULES:
            module = importlib.import_module(module_name)
            for _, member in inspect.getmembers(module):
                doc = inspect.getdoc(member)
                if doc and len(doc) > 40:
                    handle.write(json.dumps({"text": doc}) + "\n")
    return {"code": str(code), "docs": str(docs)}


VOCAB = 384


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpora):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    files = [os.path.join(corpora["code"], name) for name in sorted(os.listdir(corpora["code"]))]
    tok.train(files + [corpora["docs"]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    assert len(fast) == VOCAB
    return str(folder)


def make_tiny_model(folder, tokenizer_dir, **overrides):
    """Save a tiny random LlamaMoE model (plus the tokenizer) to `folder`; returns the folder."""
    import torch
    from transformers import AutoTokenizer

    from llama_moe.modeling import LlamaMoEForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    options = dict(vocab_size=VOCAB, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    options.update(overrides)
    torch.manual_seed(0)
    model = LlamaMoEForCausalLM(tiny_moe_config(**options))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_moe"), tokenizer_dir)
