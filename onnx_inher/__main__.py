"""`python -m onnx_inher` is the `onnx-inher` command."""

from onnx_inher.cli import main

main()
