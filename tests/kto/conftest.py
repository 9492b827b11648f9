"""Fixtures for the KTO engine tests: a toy tokenizer and model folders made locally."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    from worker.kto import toy

    return toy.make_tokenizer()


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """An untrained toy model + tokenizer folder."""
    from worker.kto import toy

    return toy.make_toy_folder(tmp_path_factory.mktemp("toy") / "model", seed=0)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A toy model SFT-trained on the arithmetic task to be right only part of the time."""
    from worker.kto import toy

    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=0)
    toy.sft_base_model(model, tok, p_correct=0.4, steps=300, seed=0)
    return toy.save_folder(model, tok, tmp_path_factory.mktemp("base") / "model")
