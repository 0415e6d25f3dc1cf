"""ONNX Runtime's quantization API over lowbit: change one import and keep the rest of the script::

    from lowbit.onnx.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    # instead of: from onnxruntime.quantization import ...

    quantize_dynamic("bert.onnx", "bert.int8.onnx", weight_type=QuantType.QInt8)
    quantize_static("cnn.onnx", "cnn.qdq.onnx", reader, quant_format=QuantFormat.QDQ)

Both read an ONNX model (a path or an ``onnx.ModelProto``), write an ONNX file and return a
:class:`QuantizationReport` (ONNX Runtime returns None): per node, what was written or why it stayed float. Every
argument that takes a :class:`QuantType`, :class:`QuantFormat` or :class:`CalibrationMethod` also takes ONNX Runtime's
own members (matched by ``.name``; onnxruntime is never imported) and their names as strings, in any case (``"int8"``,
``"qint8"``, ``"uint8"``, ``"int4"``, ``"uint4"``, ``"minmax"``, ``"entropy"``, ``"percentile"``, ``"mse"``...). The
``onnx`` package is needed (``pip install 'lowbit[onnx]'``).

What is written
---------------
:func:`quantize_dynamic` (weights quantized ahead, activations at run time) rewrites each ``MatMul`` by a constant 2-D
float32 weight ``[K, N]`` and each ``Gemm`` with a constant weight (``transA=0``, ``alpha=1``, ``beta=1`` or no ``C``;
``transB`` either way), with the bias of a following ``Add`` of a constant ``[N]`` vector (read by nothing else)
or Gemm's ``C`` folded in:

* ``QInt8`` / ``QUInt8``: weights int8 symmetric (``[-127, 127]``, ``[-64, 64]`` with ``reduce_range``) or uint8
  asymmetric, one scale per output column (``per_channel``) or one in all. With ``per_token=True`` (lowbit's
  default) the node is ``lowbit.DynamicQuantizeMatMul`` (below), which only lowbit runs; with ``per_token=False``
  ``com.microsoft.DynamicQuantizeMatMul``, which ONNX Runtime runs as well (and lowbit, per tensor as specified).
* ``QInt4`` / ``QUInt4``: ``com.microsoft.MatMulNBits`` (``bits=4``, ``block_size`` 16..256, a power of two, along
  K; a K that is not a multiple of it pads the last block with zeros as ONNX Runtime does; ``accuracy_level=4``;
  the bias as input 5). QInt4: symmetric, zero point 8 implied (no zero-point input), each block's scale making
  its largest magnitude land on code 0 (``-8``, when that value is negative) or 15 (``+7``); QUInt4: asymmetric,
  packed uint8 zero points. ``method="rtn"`` rounds to nearest; ``"gptq"`` and ``"awq"`` fit the codes to
  activations read from ``calibration_data_reader`` (:func:`lowbit.quantization.weights.gptq` / ``awq``), in bounded
  memory: GPTQ accumulates ``X^T X`` (``[K, K]``) over the batches, AWQ keeps a uniform sample of at most
  ``MAX_ROWS`` (2048) rows per input tensor; AWQ's per-channel factors ``s`` become a ``Mul(x, 1 / s)`` before the
  product. ``method`` applies to int8 too.
* ``NF4``, ``Ternary``, ``Binary``: the weight-only op of that row of lowbit's format table
  (:mod:`lowbit.quantization.formats`), domain ``lowbit``: ``NF4Gemm`` (groups of ``block_size``, 32..256),
  ``TernaryGemm``, ``BinaryGemm`` (which also takes ``sign(x)``), inputs ``(A [..., K], codes [N, K], scales, bias?)``,
  ``Y = A @ W.T + bias``; the codes are stored in ONNX's 4-bit and 2-bit types (uint4 NF4 indices, int2 ternary and
  binary codes). Round to nearest only.

``smoothquant=alpha`` (SmoothQuant, :func:`lowbit.quantization.weights.smoothquant_scales`) moves activation range
into the weights before quantizing them: per input channel ``s = max|x| ** alpha / max|w| ** (1 - alpha)`` (over
the calibration data and every product reading that input), the weights' columns times ``s``, the input divided by
``s``: folded into the ``LayerNormalization`` that makes the input when only quantized products read it (its scale
and bias divided by ``s``), else one ``Mul`` by ``1 / s`` after the producer, shared by those products.

``bias_correction=True`` (rounded-to-nearest weights) subtracts from each product's bias the mean output shift of
its weight error, ``(W_q - W) @ E[x]`` with ``E[x]`` from the calibration data (a product without one gains one).

``accuracy_target`` (a minimum cosine such as ``0.99``, or ``{"relative_error": 0.02}``, of the outputs against the
float model's: :mod:`lowbit.onnx.accuracy`) picks each layer's precision among ``weight_type``, 8-bit (per token)
and float: the first ``EVALUATION_BATCHES`` (8) batches of ``calibration_data_reader`` are kept and every choice
is measured on them, by lowbit running the model as written; the report's notes give the metric reached, the share
of the weights in each precision and each layer's choice with what ``weight_type`` alone would cost it.

``quantize_static``'s ``accuracy_target`` (lowbit's) keeps layers float instead, the most helpful per byte first,
until the outputs meet it (every candidate written and run as above; pass-through ops stay on codes only beside a
quantized layer).

``Conv`` stays float under quantize_dynamic (lowbit quantizes convolutions in :func:`quantize_static`).

:func:`quantize_static` (activations calibrated) quantizes ``Conv``, ``MatMul`` and ``Gemm`` with constant weights,
with the ``Relu`` or ``Clip(0, 6)`` that alone reads their output, and passes quantization through ``MaxPool``,
``Flatten``, ``Reshape``, ``Transpose``, ``Squeeze``, ``Unsqueeze`` and ``Identity`` whose input is quantized (same
scale and zero point on both sides, so they run on the codes). A ``BatchNormalization`` that alone reads a
quantized ``Conv``'s output is folded into its weights first. Calibration imports the float model into lowbit and
runs it batch by batch (:class:`lowbit.runtime.session.Session`), each needed tensor feeding a streaming observer
(:mod:`lowbit.quantization.calibration`): nothing of a batch is kept once the next one is read. Activations: uint8
asymmetric (``QUInt8``) or int8 symmetric (``QInt8``; ``extra_options={"ActivationSymmetric": False}`` for
asymmetric int8), per tensor. Weights: int8 symmetric or uint8 asymmetric, per output channel with ``per_channel``
(axis 0 for Conv, 1 for MatMul's ``[K, N]``, Gemm's by ``transB``). Biases: int32 codes in units of
``x_scale * w_scale``, zero point 0. Formats:

* ``QDQ``: ONNX QuantizeLinear / DequantizeLinear pairs on the quantized tensors, weights and biases as integer
  initializers read through DequantizeLinear. lowbit fuses the groups into its int8 kernels
  (:mod:`lowbit.runtime.qdq_fusion`: QLinearConv, QLinearMatMul, lowbit.QGemm, ops on codes), ONNX Runtime into its
  own.
* ``QOperator``: ``QLinearConv``, ``QLinearMatMul``, ``com.microsoft.QGemm`` (and the pass-through ops) on codes,
  a QuantizeLinear where codes are first needed and a DequantizeLinear where a float reader (or graph output) needs
  the values. A Relu / Clip(0, 6) vanishes into the saturation when its output's zero point is the lowest code
  (asymmetric activations), else it runs in float between a DequantizeLinear and a QuantizeLinear.

lowbit-domain ops
-----------------
``lowbit.DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?) -> Y`` (domain ``lowbit``, version 1): the
inputs of ``com.microsoft.DynamicQuantizeMatMul`` — ``A`` float32 ``[..., K]``, ``B`` int8 / uint8 constant
``[K, N]``, ``b_scale`` float32 scalar or ``[N]``, ``b_zero_point`` B's type, scalar or ``[N]`` (absent: 0),
``bias`` float32 ``[N]`` — but ``A`` is quantized per row (each token: every index of its leading axes) with that
row's own range, ONNX DynamicQuantizeLinear applied to the row alone::

    lo = min(0, min A[r]),  hi = max(0, max A[r]),  sa[r] = (hi - lo) / 255  (1 / 255 when hi == lo)
    za[r] = rint(clip(-lo / sa[r], 0, 255)),   q[r, k] = saturate_uint8(rint(A[r, k] / sa[r]) + za[r])
    Y[r, n] = float32(sum_k (q[r, k] - za[r]) (B[k, n] - b_zero_point[n])) * float32(sa[r] b_scale[n]) + bias[n]

float32 throughout, the integer sum exact (``kernels.linear_dynamic_int8``, ``per_row``). K is at most
``kernels.DynamicLinearPlan.max_k``; larger K is written as the com.microsoft op. ONNX Runtime does not know the
domain: run these files in lowbit (``lowbit.onnx.InferenceSession``).

Differences from ONNX Runtime: ``quantize_dynamic``'s ``per_channel`` defaults to True and its extra keywords
(``block_size``, ``method``, ``calibration_data_reader``, ``per_token``, ``accuracy_target``, ``smoothquant``,
``bias_correction``) are lowbit's;
``quantize_static``'s
``activation_type`` defaults to QUInt8 and int8 activations are symmetric unless ``ActivationSymmetric`` says
otherwise; QInt16 / QUInt16 / float8 types and ``CalibrationMethod.Distribution`` (float8's) are refused; of
``extra_options`` lowbit reads ``ActivationSymmetric``, ``WeightSymmetric``, ``CalibTensorRangeSymmetric``,
``CalibMovingAverage``, ``CalibMovingAverageConstant``, ``CalibPercentile``, ``CalibNumBins`` and
``accuracy_level`` (MatMulNBits), and lists the others it ignored in the report.
"""

from lowbit.onnx.quantization._common import (CalibrationDataReader, CalibrationMethod, NodeQuantization,
                                               QuantFormat, QuantizationReport, QuantType)
from lowbit.onnx.quantization.dynamic import quantize_dynamic
from lowbit.onnx.quantization.static import quantize_static

__all__ = ["CalibrationDataReader", "CalibrationMethod", "NodeQuantization", "QuantFormat", "QuantType",
           "QuantizationReport", "quantize_dynamic", "quantize_static"]
