"""Data as the models read it: DATA specs (mnist5k, fortunes, an .npz, a folder...) and their adapters.

Calibration, evaluation and distillation all load data here, numpy only (no torch), so a planning step
that needs data never depends on the trainer.
"""

from onnx_inher.datasets.loading import Dataset, InputSpec, input_specs, load_data, sample_shapes, split

__all__ = ["Dataset", "InputSpec", "input_specs", "load_data", "sample_shapes", "split"]
