"""Graph passes: small functions `model -> (model, changed)` with checked pre/post conditions.

One pass a file (locate, factorize, cleanup, flush, verify); a pipeline is a plain list of them, composed by
the caller (`onnx_inher.api`). A pass that finds its own precondition or postcondition broken raises
`PassError` naming itself.
"""
