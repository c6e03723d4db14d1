"""The choices of ``upop export`` that the parser lists without importing torch (the library's own
tuples are checked against these by ``tests/test_export_embeddings.py``)."""

from __future__ import annotations

#: ``--pooling``: ``auto``, ``none`` and the sentence-transformers pooling modes
#: (:data:`upop.models.sentence_transformers.POOLING_MODES`, in that order)
POOLINGS = ("auto", "none", "cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: ``--format``
FORMATS = ("onnx",)
#: the graph's file name in an exported folder (the name optimum's ORTModel classes look for)
MODEL_FILE = "model.onnx"
#: an ``--out`` with this suffix is the one file to write; any other ``--out`` is a folder
FILE_SUFFIX = ".onnx"

__all__ = ["FILE_SUFFIX", "FORMATS", "MODEL_FILE", "POOLINGS"]
