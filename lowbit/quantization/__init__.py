"""Quantization toolkit.

- ``scheme``: QScheme (bits, signedness, symmetry, granularity, rounding, grid) and presets
- ``grid``: fitting scales to data, values to codes and back (ONNX semantics for uniform grids)
- ``qdq``: ONNX QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear on arrays
- ``metrics``: MSE, SQNR, cosine, max / relative error, and a report table
- ``calibration``: streaming observers (min-max, moving average, percentile, MSE, KL entropy)
- ``fake``: fake quantization with straight-through, LSQ, sign and ternary gradients
- ``weights``: bias correction, SmoothQuant, GPTQ and AWQ
- ``formats``: the table of weight formats (int8, int4, nf4, ternary, binary): ops, storage, dequantization
"""
