"""Preference data: file reading and validation, tokenization, held-out splits (:mod:`fastdpo.data.preference`),
and the bundled demo set (``make_demo.py``)."""

from fastdpo.data.preference import (
    PAIR_KEYS,
    TOKENIZED_KEYS,
    demo_data_files,
    load_preference_file,
    pretokenize,
    read_preference_file,
    row_texts,
    split_rows,
)

__all__ = [
    "PAIR_KEYS",
    "TOKENIZED_KEYS",
    "demo_data_files",
    "load_preference_file",
    "pretokenize",
    "read_preference_file",
    "row_texts",
    "split_rows",
]
