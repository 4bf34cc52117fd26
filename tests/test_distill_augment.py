"""The online teacher (`--teacher-mode online`) and input augmentation (`--augment join|crop|mix`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnx_inher
from onnx_inher import Options, parse_policy
from onnx_inher.cli import main
from onnx_inher.distill import DistillOptions
from onnx_inher.distill.augment import augmenter, crop_sentences, join_sentences, mix_sentences
from onnx_inher.errors import InputError
from tests.helpers import CLS, SEP, WIDTH, distill_text, mlp_teacher, weights


def rows(*lengths: int, width: int = WIDTH) -> dict[str, np.ndarray]:
    """Right-padded [CLS] body [SEP] rows; row i's body tokens are 10*i+3, 10*i+4, ..."""
    ids = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = [CLS, *range(10 * i + 3, 10 * i + 3 + n - 2), SEP]
    mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_join_puts_a_row_before_another_and_keeps_the_layout() -> None:
    feeds = rows(4, 5, 3, 6)
    out = join_sentences(feeds, np.random.default_rng(0))
    joined = [i for i in range(4) if not np.array_equal(out["input_ids"][i], feeds["input_ids"][i])]
    assert joined, "seed 0 joins some rows"
    for i in range(4):
        n = int(out["attention_mask"][i].sum())
        assert np.array_equal(out["attention_mask"][i], np.arange(WIDTH) < n)  # still right-padded
        tokens = out["input_ids"][i, :n]
        assert tokens[0] == CLS and tokens[-1] == SEP and np.all(out["input_ids"][i, n:] == 0)
        if i in joined:
            own = feeds["input_ids"][i, 1:int(feeds["attention_mask"][i].sum()) - 1]
            assert np.array_equal(tokens[1:1 + len(own)], own)
            rest = tokens[1 + len(own):-1]
            partners = [j for j in range(4) if j != i and np.array_equal(
                feeds["input_ids"][j, 1:1 + len(rest)], rest)]
            assert partners and len(rest) > 0
    assert all(np.array_equal(feeds[k], v) for k, v in rows(4, 5, 3, 6).items())  # input untouched


def test_join_cuts_at_the_row_length_and_is_a_function_of_the_generator() -> None:
    feeds = rows(11, 12, 10, 12)
    out = join_sentences(feeds, np.random.default_rng(1))
    assert np.all(out["attention_mask"].sum(1) <= WIDTH) and np.all(out["input_ids"][:, -1][
        out["attention_mask"][:, -1] == 1] == SEP)
    again = join_sentences(feeds, np.random.default_rng(1))
    assert all(np.array_equal(out[k], again[k]) for k in out)


def is_span_of(tokens: np.ndarray, feeds: dict[str, np.ndarray], row: int) -> bool:
    own = feeds["input_ids"][row, 1:int(feeds["attention_mask"][row].sum()) - 1]
    body = tokens[1:-1]
    return 0 < len(body) < len(own) and any(np.array_equal(own[s:s + len(body)], body)
                                            for s in range(len(own) - len(body) + 1))


def test_crop_keeps_a_shorter_contiguous_part_of_the_row() -> None:
    feeds = rows(9, 12, 3, 7, 10, 5)
    out = crop_sentences(feeds, np.random.default_rng(3))
    cropped = [i for i in range(6) if not np.array_equal(out["input_ids"][i], feeds["input_ids"][i])]
    assert cropped and 2 not in cropped  # a one-token body has nothing shorter to cut
    for i in range(6):
        n = int(out["attention_mask"][i].sum())
        assert np.array_equal(out["attention_mask"][i], np.arange(WIDTH) < n)
        tokens = out["input_ids"][i, :n]
        assert tokens[0] == CLS and tokens[-1] == SEP and np.all(out["input_ids"][i, n:] == 0)
        if i in cropped:
            assert is_span_of(tokens, feeds, i)
    again = crop_sentences(feeds, np.random.default_rng(3))
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert all(np.array_equal(feeds[k], v) for k, v in rows(9, 12, 3, 7, 10, 5).items())  # input untouched


def test_mix_joins_crops_and_keeps_rows() -> None:
    feeds = rows(*([6, 9, 4, 11, 7, 5, 8, 10] * 4))
    out = mix_sentences(feeds, np.random.default_rng(0))
    n_in, n_out = feeds["attention_mask"].sum(1), out["attention_mask"].sum(1)
    kinds = {"kept": 0, "longer": 0, "span": 0}
    for i in range(len(n_in)):
        tokens = out["input_ids"][i, :n_out[i]]
        if np.array_equal(out["input_ids"][i], feeds["input_ids"][i]):
            kinds["kept"] += 1
        elif n_out[i] > n_in[i]:
            kinds["longer"] += 1
        else:
            assert is_span_of(tokens, feeds, i)
            kinds["span"] += 1
    assert all(v >= 5 for v in kinds.values()), kinds  # about a third each of 32 rows


def test_augments_need_token_inputs() -> None:
    for kind in ("join", "crop", "mix"):
        with pytest.raises(InputError, match="tokenised text"):
            augmenter(kind, ["x"])
        assert augmenter(kind, ["input_ids", "attention_mask"]) is not None
    assert augmenter("none", ["x"]) is None
    with pytest.raises(InputError, match="must be one of"):
        augmenter("shuffle", ["input_ids", "attention_mask"])


@pytest.mark.parametrize("kind", ["join", "mix"])
def test_augmented_distill_runs_the_teacher_online_and_is_deterministic(text: dict[str, Path], tmp_path: Path,
                                                                         kind: str) -> None:
    plain = distill_text(text, tmp_path / "plain.onnx")
    a = distill_text(text, tmp_path / "a.onnx", augment=kind)
    distill_text(text, tmp_path / "b.onnx", augment=kind)
    assert plain.teacher_mode == "cache" and a.teacher_mode == "online" and a.ort_max_rel < 1e-3
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # the augmented inputs differ from the data's, so the student is trained differently
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "plain.onnx").read_bytes()
    assert a.train.final["val_loss"] < a.train.initial["val_loss"]


def test_online_teacher_trains_like_the_cached_one(text: dict[str, Path], tmp_path: Path) -> None:
    distill_text(text, tmp_path / "cache.onnx")
    online = distill_text(text, tmp_path / "online.onnx", teacher_mode="online")
    assert online.teacher_mode == "online" and not online.teacher_cached
    cached, live = weights(tmp_path / "cache.onnx"), weights(tmp_path / "online.onnx")
    assert all(np.allclose(cached[n], live[n], atol=1e-5) for n in cached)


def test_augment_is_refused_on_labelled_or_non_text_data(tmp_path: Path) -> None:
    teacher = mlp_teacher(tmp_path / "mlp.onnx")
    onnx_inher.compress(teacher, tmp_path / "student.onnx", Options(policy=parse_policy(param_ratio=0.25),
                                                                       rank_multiple=1))
    x = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    args = ["distill", str(tmp_path / "student.onnx"), "--teacher", str(teacher), "--data", str(tmp_path / "data.npz"),
            "-o", str(tmp_path / "out.onnx"), "--augment", "join"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "tokenised text" in result.output and not (tmp_path / "out.onnx").exists()


def test_augment_refuses_labels(text: dict[str, Path], tmp_path: Path) -> None:
    with np.load(text["data"]) as z:
        np.savez(tmp_path / "labelled.npz", **z, labels=np.zeros(len(z["input_ids"]), np.int64))
    with pytest.raises(InputError, match="labels"):
        onnx_inher.distill(text["student"], text["teacher"], str(tmp_path / "labelled.npz"), tmp_path / "o.onnx",
                           DistillOptions(steps=2, batch_size=8, augment="join", checkpoint_every=0))
