"""Data as the models read it: DATA specs (mnist5k, fortunes, an .npz, a folder, images:, wav:, lines:,
hook:...) and their adapters; data on disk is read batch by batch (`Rows`).

Calibration, evaluation and distillation all load data here, numpy only (no torch), so a planning step
that needs data never depends on the trainer.
"""

from onnx_inher.datasets.loading import Dataset, InputSpec, input_specs, load_data, sample_shapes, split
from onnx_inher.datasets.streams import Rows

__all__ = ["Dataset", "InputSpec", "Rows", "input_specs", "load_data", "sample_shapes", "split"]
