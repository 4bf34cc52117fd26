"""Why a MiniLM distillation step was slow: torch threads on a busy 2-core machine, and the bridge vs transformers.

    python -m benchmarks.experiments.distill_step_profile            # batch 8 x 32 tokens, 1 and 2 threads

Times forward + backward + AdamW of one step (median of a few, after one warm-up) for the 50%-MatMul-params
SVD student through the ONNX->torch bridge, and forward + backward of the uncompressed teacher through the
bridge and through `transformers.BertModel` with the same weights. Prints a JSON record (and the machine load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch

from benchmarks.common import command, quiet, zoo
from onnx_inher import Options, compress, parse_policy
from onnx_inher.bridge import to_torch
from onnx_inher.datasets import text


def median_step(module: torch.nn.Module, inputs: list[torch.Tensor], repeats: int, optimise: bool) -> float:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6) if optimise else None
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        out = module(*inputs)
        out[0].float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            module.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return round(statistics.median(times[1:]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    quiet()
    teacher = zoo.minilm_torchscript()
    tok = text.tokenise(text.fortune_sentences("test")[:args.batch], args.tokens)
    inputs = [torch.from_numpy(tok[n]) for n in text.TOKEN_INPUTS]
    record: dict = {"batch": args.batch, "tokens": args.tokens, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        student_path = Path(tmp) / "student.onnx"
        compress(teacher, student_path, Options(mode="svd", policy=parse_policy(param_ratio=0.5)))
        student, _ = to_torch(onnx.load(str(student_path)), "factors")
    bridge_teacher, _ = to_torch(onnx.load(str(teacher)), "all")
    hf = zoo._minilm_module()
    for threads in (2, 1):
        torch.set_num_threads(threads)
        record[f"threads_{threads}"] = {
            "student_bridge_step_s": median_step(student, inputs, args.repeats, optimise=True),
            "teacher_bridge_fwd_bwd_s": median_step(bridge_teacher, inputs, args.repeats, optimise=False),
            "teacher_transformers_fwd_bwd_s": median_step(hf, inputs, args.repeats, optimise=False),
        }
    record["load_average_after"] = os.getloadavg()
    record["command"] = command("benchmarks.experiments.distill_step_profile")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
