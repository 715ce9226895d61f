"""Data flow: loader (files → checked records) → SemanticTokenizer (record → tokens, types, labels) → collator."""

from hsa_train.data.collator import SemanticCollator
from hsa_train.data.loader import DataError, LoadReport, Record, load_records
from hsa_train.data.tokenizer import IGNORE_INDEX, SemanticTokenizer

__all__ = ["SemanticTokenizer", "SemanticCollator", "DataError", "LoadReport", "Record", "load_records", "IGNORE_INDEX"]
