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

from onnx_inher.distill.options import AUGMENTS
from onnx_inher.errors import InputError

IDS, MASK, TYPES = "input_ids", "attention_mask", "token_type_ids"
JOIN_SHARE = 0.5

Augment = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


def augmenter(kind: str, input_names: list[str]) -> Augment | None:
    """The augmentation `kind` for a model with these inputs (None for 'none'); checked before training."""
    if kind == "none":
        return None
    if kind == "join":
        extra = sorted(set(input_names) - {IDS, MASK, TYPES})
        if IDS not in input_names or MASK not in input_names or extra:
            raise InputError(f"--augment join works on tokenised text (inputs {IDS}, {MASK}, optional {TYPES}); "
                             f"this model reads {sorted(input_names)}. Use --augment none.")
        return join_sentences
    raise InputError(f"--augment must be one of {', '.join(AUGMENTS)}, got '{kind}'")


def join_sentences(feeds: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Half the rows (drawn by `rng`) become that row's text followed by another row's text.

    Rows are right-padded token sequences `[CLS] a ... [SEP] pad...` (the BERT layout, which every
    tokenizer with a start and an end token shares). A joined row is `[CLS] a ... b ... [SEP]`: the first
    row without its end token, the partner without its start token, cut to the row length and closed
    with the first row's own end token. Token types, if present, follow the first row's (one segment).
    """
    ids, mask = feeds[IDS], feeds[MASK]
    n, width = ids.shape
    lengths = mask.sum(axis=1).astype(np.int64)
    if n < 2 or np.any(lengths < 2) or np.any(mask[np.arange(width)[None, :] >= lengths[:, None]] != 0):
        return feeds  # a batch of one, or rows that are not right-padded [start ... end]: leave it alone
    chosen = np.flatnonzero(rng.random(n) < JOIN_SHARE)
    partners = (chosen + rng.integers(1, n, size=len(chosen))) % n  # never the row itself
    pad = ids[mask == 0][0] if np.any(mask == 0) else 0
    out = {k: v.copy() for k, v in feeds.items()}
    for row, partner in zip(chosen, partners, strict=True):
        head = ids[row, :lengths[row] - 1]
        tail = ids[partner, 1:lengths[partner] - 1]
        end = ids[row, lengths[row] - 1]
        body = np.concatenate([head, tail])[:width - 1]
        joined = np.concatenate([body, [end]])
        out[IDS][row] = pad
        out[IDS][row, :len(joined)] = joined
        out[MASK][row] = 0
        out[MASK][row, :len(joined)] = 1
        if TYPES in out:
            out[TYPES][row] = 0
            out[TYPES][row, :len(joined)] = feeds[TYPES][row, 0]
    return out
