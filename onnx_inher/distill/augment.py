"""Input augmentation for distillation: new inputs every step, labelled by the teacher on the fly.

A distilled student needs no ground truth, only the teacher's answer, so any plausible input is a
training sample. On a small corpus (13k fortunes) a student overfits after a few epochs: it matches the
teacher on the sentences it saw (pooled cosine 0.975) much better than on held-aside ones (0.93).
Augmented inputs put the same text in new contexts at every step, so the teacher is queried on far more
inputs than the corpus holds. The teacher must then see the augmented batch itself, which is why
augmentation runs with the online teacher (`--teacher-mode online`), never with cached outputs.

Augmentations are pure functions of (batch, generator); the trainer seeds the generator from
(seed, step, rank), so a resumed run draws the same inputs as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.datasets.text import INPUT_IDS as IDS
from onnx_inher.datasets.text import TOKEN_TYPE_IDS as TYPES
from onnx_inher.distill.options import AUGMENTS
from onnx_inher.errors import InputError

JOIN_SHARE = 0.5
CROP_SHARE = 0.5

Augment = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]
# (feeds, out, row lengths, chosen rows, rng): rewrites the chosen rows of `out` in place
Change = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray, np.random.Generator], None]


def augmenter(kind: str, input_names: list[str]) -> Augment | None:
    """The augmentation `kind` for a model with these inputs (None for 'none'); checked before training."""
    if kind == "none":
        return None
    kinds = {"join": join_sentences, "crop": crop_sentences, "mix": mix_sentences}
    if kind not in kinds:
        raise InputError(f"--augment must be one of {', '.join(AUGMENTS)}, got '{kind}'")
    extra = sorted(set(input_names) - {IDS, MASK, TYPES})
    if IDS not in input_names or MASK not in input_names or extra:
        raise InputError(f"--augment {kind} works on tokenised text (inputs {IDS}, {MASK}, optional {TYPES}); "
                         f"this model reads {sorted(input_names)}. Use --augment none.")
    return kinds[kind]


def join_sentences(feeds: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Half the rows (drawn by `rng`) become that row's text followed by another row's text.

    Rows are right-padded token sequences `[CLS] a ... [SEP] pad...` (the BERT layout, which every
    tokenizer with a start and an end token shares). A joined row is `[CLS] a ... b ... [SEP]`: the first
    row without its end token, the partner without its start token, cut to the row length and closed
    with the first row's own end token. Token types, if present, follow the first row's (one segment).
    """
    return _change_share(feeds, rng, JOIN_SHARE, _join)


def crop_sentences(feeds: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Half the rows (drawn by `rng`) become a random contiguous part of their own text, `[CLS] span [SEP]`.

    Joining makes long inputs; cropping makes short ones, from every position of the corpus's sentences,
    so the student also sees many more inputs of the few-token kind, where mean pooling leans hardest
    on each token (and on the start and end tokens)."""
    return _change_share(feeds, rng, CROP_SHARE, _crop)


def mix_sentences(feeds: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A third of the rows joined, a third cropped, a third as they are (drawn by `rng`)."""
    lengths = _row_lengths(feeds)
    if lengths is None:
        return feeds
    draw = rng.random(len(lengths))
    out = {k: v.copy() for k, v in feeds.items()}
    _join(feeds, out, lengths, np.flatnonzero(draw < 1 / 3), rng)
    _crop(feeds, out, lengths, np.flatnonzero((draw >= 1 / 3) & (draw < 2 / 3)), rng)
    return out


def _change_share(feeds: dict[str, np.ndarray], rng: np.random.Generator, share: float, change: Change
                  ) -> dict[str, np.ndarray]:
    """A copy of `feeds` where `change` rewrote the rows drawn with probability `share`."""
    lengths = _row_lengths(feeds)
    if lengths is None:
        return feeds
    chosen = np.flatnonzero(rng.random(len(lengths)) < share)
    out = {k: v.copy() for k, v in feeds.items()}
    change(feeds, out, lengths, chosen, rng)
    return out


def _row_lengths(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """Tokens per row, or None for a batch these augmentations leave alone: a single row, or rows that
    are not right-padded `[start ... end]` sequences."""
    ids, mask = feeds[IDS], feeds[MASK]
    n, width = ids.shape
    lengths = mask.sum(axis=1).astype(np.int64)
    if n < 2 or np.any(lengths < 2) or np.any(mask[np.arange(width)[None, :] >= lengths[:, None]] != 0):
        return None
    return lengths


def _join(feeds: dict[str, np.ndarray], out: dict[str, np.ndarray], lengths: np.ndarray, chosen: np.ndarray,
          rng: np.random.Generator) -> None:
    ids, pad = feeds[IDS], _pad_token(feeds)
    n, width = ids.shape
    partners = (chosen + rng.integers(1, n, size=len(chosen))) % n  # never the row itself
    for row, partner in zip(chosen, partners, strict=True):
        head = ids[row, :lengths[row] - 1]
        tail = ids[partner, 1:lengths[partner] - 1]
        body = np.concatenate([head, tail])[:width - 1]
        _write(feeds, out, row, np.concatenate([body, [ids[row, lengths[row] - 1]]]), pad)


def _crop(feeds: dict[str, np.ndarray], out: dict[str, np.ndarray], lengths: np.ndarray, chosen: np.ndarray,
          rng: np.random.Generator) -> None:
    ids, pad = feeds[IDS], _pad_token(feeds)
    for row in chosen:
        body = ids[row, 1:lengths[row] - 1]
        if len(body) < 2:
            continue  # nothing shorter to cut out
        size = int(rng.integers(1, len(body)))
        start = int(rng.integers(0, len(body) - size + 1))
        span = body[start:start + size]
        _write(feeds, out, row, np.concatenate([[ids[row, 0]], span, [ids[row, lengths[row] - 1]]]), pad)


def _pad_token(feeds: dict[str, np.ndarray]) -> int:
    """The batch's padding token (0 when no row is padded)."""
    ids, mask = feeds[IDS], feeds[MASK]
    return int(ids[mask == 0][0]) if np.any(mask == 0) else 0


def _write(feeds: dict[str, np.ndarray], out: dict[str, np.ndarray], row: int, tokens: np.ndarray, pad: int) -> None:
    """Row `row` of `out` becomes `tokens`, right-padded with `pad` (one segment)."""
    out[IDS][row] = pad
    out[IDS][row, :len(tokens)] = tokens
    out[MASK][row] = 0
    out[MASK][row, :len(tokens)] = 1
    if TYPES in out:
        out[TYPES][row] = 0
        out[TYPES][row, :len(tokens)] = feeds[TYPES][row, 0]
