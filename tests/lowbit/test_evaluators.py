"""The NumPy evaluators (lowbit.runtime.evaluators) against ONNX's reference runner and ONNX Runtime.

Each case is one node built with ``onnx.helper``: default-domain ops are compared with
``onnx.reference.ReferenceEvaluator`` at the case's opset, ``com.microsoft`` ops with onnxruntime.
Integer and bool outputs must be equal; float outputs within rtol 1e-5 (plus an absolute 1e-6 where
erf or a cancellation makes relative error meaningless near zero). Shapes and dtypes must match exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.graph.ir import Graph, Node, TensorSpec
from lowbit.runtime.evaluators import EVALUATORS, SHAPE_INPUTS, erf, evaluate, prepare_evaluated
from kernels.activations import ERF_CLAMP
from lowbit.runtime.registry import PREPARERS

R = np.random.default_rng(20261206)
F32, I64 = np.float32, np.int64


def f32(*shape, low=-3.0, high=3.0):
    return R.uniform(low, high, shape).astype(F32)


def ints(*shape, low=-6, high=6, dtype=I64):
    return R.integers(low, high, shape).astype(dtype)


def i64(*values):
    return np.array(values, I64)


def case(op, inputs, attrs=None, opset=17, outputs=1, atol=0.0, id=None):
    return pytest.param(op, inputs, attrs or {}, opset, outputs, atol, id=id or f"{op}-{opset}")


CASES = [
    # ---- shapes and layout
    case("Shape", [f32(2, 3, 4)], opset=13),
    case("Shape", [f32(2, 3, 4)], {"start": 1}, opset=15, id="Shape-start"),
    case("Shape", [f32(2, 3, 4, 5)], {"start": -3, "end": -1}, opset=19, id="Shape-negative"),
    case("Shape", [f32(2, 3)], {"end": 10}, opset=21, id="Shape-clamped"),
    case("Size", [f32(2, 3, 4)]),
    case("Size", [np.array(3.0, F32)], id="Size-scalar"),
    case("Reshape", [f32(2, 3, 4), i64(4, -1)], opset=13),
    case("Reshape", [f32(2, 3, 4), i64(0, -1, 2)], opset=14, id="Reshape-copy-zero"),
    case("Reshape", [np.zeros((0, 3), F32), i64(3, 0)], {"allowzero": 1}, opset=14, id="Reshape-allowzero"),
    case("Reshape", [ints(2, 6), i64(3, 2, 2)], opset=21, id="Reshape-int"),
    case("Flatten", [f32(2, 3, 4)], {"axis": 0}, opset=13, id="Flatten-0"),
    case("Flatten", [f32(2, 3, 4)], {"axis": -1}, opset=13, id="Flatten-neg"),
    case("Flatten", [f32(2, 3, 4)], {"axis": 3}, opset=11, id="Flatten-rank"),
    case("Flatten", [f32(2, 3, 4)], opset=11, id="Flatten-default"),
    case("Transpose", [f32(2, 3, 4)]),
    case("Transpose", [ints(2, 3, 4)], {"perm": [1, 0, 2]}, id="Transpose-perm"),
    case("Squeeze", [f32(2, 1, 3, 1)], {"axes": [1]}, opset=11, id="Squeeze-attr"),
    case("Squeeze", [f32(2, 1, 3, 1), i64(1, -1)], opset=13, id="Squeeze-input"),
    case("Squeeze", [f32(1, 2, 1, 3, 1)], opset=21, id="Squeeze-all"),
    case("Unsqueeze", [f32(2, 3)], {"axes": [0, 3]}, opset=11, id="Unsqueeze-attr"),
    case("Unsqueeze", [f32(2, 3), i64(-1, 1)], opset=13, id="Unsqueeze-input"),
    case("Unsqueeze", [np.array(5, I64), i64(0)], opset=21, id="Unsqueeze-scalar"),
    case("Concat", [f32(2, 3), f32(2, 1), f32(2, 4)], {"axis": 1}),
    case("Concat", [i64(2, 3), i64(7), np.zeros(0, I64)], {"axis": -1}, id="Concat-shape-math"),
    case("Split", [f32(3, 6)], {"axis": 1, "split": [1, 2, 3]}, opset=11, outputs=3, id="Split-attr"),
    case("Split", [f32(3, 6), i64(4, 2)], {"axis": 1}, opset=13, outputs=2, id="Split-input"),
    case("Split", [f32(6, 2)], opset=13, outputs=3, id="Split-equal"),
    case("Split", [f32(7, 2)], {"num_outputs": 3}, opset=18, outputs=3, id="Split-num_outputs"),
    case("Slice", [f32(5, 6), i64(1, -4), i64(4, 100)], opset=13),
    case("Slice", [f32(5, 6), i64(-1), i64(-100), i64(1), i64(-2)], opset=13, id="Slice-negative-step"),
    case("Slice", [f32(5, 6, 3), i64(0, 2), i64(2**62, -1), i64(-1, 0), i64(1, 2)], opset=11, id="Slice-axes"),
    case("Slice", [f32(4, 5), i64(10), i64(0), i64(1), i64(-1)], opset=21, id="Slice-clamp-reverse"),
    case("Slice", [i64(2, 3, 4, 5), i64(1), i64(3)], opset=21, id="Slice-shape-math"),
    case("Expand", [f32(3, 1), i64(2, 1, 4)], opset=13),
    case("Expand", [f32(3, 1), i64(1, 1)], opset=13, id="Expand-keeps"),
    case("Tile", [f32(2, 3), i64(2, 1)]),
    case("ConstantOfShape", [i64(2, 3)], {"value": np.array([7], I64)}),
    case("ConstantOfShape", [i64(2, 0)], id="ConstantOfShape-default"),
    case("ConstantOfShape", [np.zeros(0, I64)], {"value": np.array([1.5], F32)}, id="ConstantOfShape-scalar"),
    case("Range", [np.array(1, I64), np.array(10, I64), np.array(3, I64)]),
    case("Range", [np.array(10, np.int32), np.array(1, np.int32), np.array(-3, np.int32)], id="Range-down"),
    case("Range", [np.array(0.5, F32), np.array(3.2, F32), np.array(0.7, F32)], id="Range-float"),
    case("Range", [np.array(5, I64), np.array(1, I64), np.array(2, I64)], id="Range-empty"),
    case("Gather", [f32(5, 4), np.array([[0, -1], [2, 4]], I64)], {"axis": 0}),
    case("Gather", [f32(3, 5, 2), np.array([4, -2, 0], np.int32)], {"axis": -2}, id="Gather-axis"),
    case("Gather", [i64(2, 3, 4), np.array(0, I64)], id="Gather-scalar"),
    case("GatherElements", [f32(3, 4), np.array([[0, -1], [3, 1], [-4, 2]], I64)], {"axis": 1}),
    case("GatherElements", [f32(3, 4), np.array([[2, 0, 1, 1]], np.int32)], {"axis": 0}, id="GatherElements-0"),
    case("DepthToSpace", [f32(2, 8, 3, 2)], {"blocksize": 2}),
    case("DepthToSpace", [f32(1, 12, 2, 3)], {"blocksize": 2, "mode": "CRD"}, id="DepthToSpace-CRD"),
    case("SpaceToDepth", [f32(2, 3, 4, 6)], {"blocksize": 2}),
    case("Pad", [f32(2, 3), i64(1, 0, 2, 3), np.array(1.5, F32)], opset=11),
    case("Pad", [f32(3, 4), i64(2, 1, 1, 2)], {"mode": "reflect"}, opset=13, id="Pad-reflect"),
    case("Pad", [ints(3, 4), i64(2, 0, 1, 3)], {"mode": "edge"}, opset=13, id="Pad-edge"),
    case("Pad", [f32(2, 3, 4), i64(1, 2), None, i64(-1)], opset=18, id="Pad-axes"),
    case("Pad", [f32(3, 4), i64(1, 3, 2, 0)], {"mode": "wrap"}, opset=19, id="Pad-wrap"),
    # ---- types
    case("Cast", [np.array([-2.7, -0.5, 0.5, 2.7, 100.2], F32)], {"to": 6}, id="Cast-f2i"),
    case("Cast", [np.array([0.0, -0.0, 2.5, np.nan], F32)], {"to": 9}, id="Cast-f2bool"),
    case("Cast", [np.array([200, -129, 7], I64)], {"to": 3}, id="Cast-wrap"),
    case("Cast", [np.array([True, False])], {"to": 1}, id="Cast-bool2f"),
    case("Cast", [f32(7)], {"to": 10}, id="Cast-half"),
    case("Cast", [R.standard_normal(5)], {"to": 1}, id="Cast-f64"),
    case("Cast", [ints(6)], {"to": 11}, id="Cast-i2f64"),
    case("Cast", [np.array([1e6, -3.2, 0.37, np.inf], F32)], {"to": 17}, opset=19, id="Cast-float8"),
    case("Cast", [f32(6)], {"to": 16}, opset=19, id="Cast-bfloat16"),
    case("Cast", [np.array([-8, -1, 0, 3, 7], np.int32)], {"to": 22}, opset=21, id="Cast-int4"),
    case("CastLike", [f32(5, low=-9, high=9), np.zeros(0, I64)], opset=15),
    # ---- elementwise
    case("Add", [f32(2, 3), f32(3)]),
    case("Sub", [ints(2, 1, 3), ints(4, 1)], id="Sub-int"),
    case("Mul", [f32(4, 1), f32(1, 5)]),
    case("Div", [f32(2, 3), f32(2, 3, low=0.5, high=2.0)]),
    case("Div", [np.array([7, -7, 7, -7, 6], np.int32), np.array([2, 2, -2, -2, 3], np.int32)], id="Div-int"),
    case("Mod", [np.array([7, -7, 7, -7], I64), np.array([3, 3, -3, -3], I64)]),
    case("Mod", [f32(6), f32(6, low=0.5, high=2.0)], {"fmod": 1}, id="Mod-fmod"),
    case("Mod", [np.array([7, -7, 7, -7], np.int32), np.array([3, 3, -3, -3], np.int32)], {"fmod": 1},
         id="Mod-int-fmod"),
    case("Pow", [f32(2, 3, low=0.1, high=3.0), f32(3)]),
    case("Pow", [f32(4), i64(2, 3, 0, 1)], opset=15, id="Pow-int-exponent"),
    case("Pow", [np.array([2, 3, -2], I64), np.array([3, 2, 3], I64)], opset=15, id="Pow-int"),
    case("Equal", [ints(3, 4), ints(4)]),
    case("Less", [f32(3, 4), f32(3, 1)]),
    case("LessOrEqual", [ints(3, 4), ints(3, 4)], opset=16),
    case("Greater", [f32(2, 3), np.array(0.0, F32)]),
    case("GreaterOrEqual", [ints(5), ints(5)], opset=16),
    case("Not", [R.random((3, 4)) > 0.5]),
    case("And", [R.random((3, 4)) > 0.5, R.random(4) > 0.5]),
    case("Or", [R.random((3, 1)) > 0.5, R.random((1, 4)) > 0.5]),
    case("Xor", [R.random((3, 4)) > 0.5, R.random((3, 4)) > 0.5]),
    case("Where", [R.random((3, 1)) > 0.5, f32(1, 4), np.array(9.0, F32)]),
    case("Where", [R.random(4) > 0.5, ints(4), ints(4)], id="Where-int"),
    case("Identity", [ints(3, 2)]),
    case("Dropout", [f32(3, 4)], opset=13, outputs=2),
    case("Dropout", [f32(3, 4)], {"ratio": 0.3}, opset=11, id="Dropout-11"),
    case("Clip", [f32(3, 4)], {"min": -1.0, "max": 0.5}, opset=6, id="Clip-attr"),
    case("Clip", [f32(3, 4), np.array(-1.0, F32)], opset=11, id="Clip-min"),
    case("Clip", [ints(3, 4), None, np.array(2, I64)], opset=13, id="Clip-int-max"),
    case("Sum", [f32(2, 3), f32(3), f32(2, 1)]),
    case("Mean", [f32(2, 3), f32(3), f32(2, 1)]),
    case("Min", [ints(2, 3), ints(3)], opset=13),
    case("Max", [f32(2, 3), f32(1, 3), f32(2, 1)], opset=13),
    case("Max", [f32(4)], opset=13, id="Max-one"),
    *[case(op, [f32(3, 5, low=low, high=high)], atol=1e-7, id=op) for op, low, high in (
        ("Neg", -3, 3), ("Abs", -3, 3), ("Sign", -3, 3), ("Reciprocal", 0.5, 3), ("Floor", -3, 3), ("Ceil", -3, 3),
        ("Sqrt", 0, 9), ("Exp", -3, 3), ("Log", 0.1, 9), ("Sin", -3, 3), ("Cos", -3, 3), ("Tan", -1, 1),
        ("Asin", -0.9, 0.9), ("Acos", -0.9, 0.9), ("Atan", -3, 3), ("Sinh", -3, 3), ("Cosh", -3, 3),
        ("Asinh", -3, 3), ("Acosh", 1.1, 4), ("Atanh", -0.9, 0.9), ("Tanh", -3, 3), ("Relu", -3, 3),
        ("Sigmoid", -9, 9), ("Softplus", -9, 9), ("Softsign", -3, 3), ("HardSwish", -5, 5))],
    case("Abs", [ints(7)], id="Abs-int"),
    case("Neg", [ints(7, dtype=np.int32)], id="Neg-int"),
    case("Sign", [np.array([-2, 0, 3], I64)], id="Sign-int"),
    case("Round", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.6, -2.4], F32)]),
    case("IsNaN", [np.array([1.0, np.nan, np.inf], F32)]),
    case("IsInf", [np.array([1.0, np.nan, np.inf, -np.inf], F32)]),
    case("IsInf", [np.array([1.0, np.inf, -np.inf], F32)], {"detect_positive": 0}, id="IsInf-negative"),
    case("Erf", [f32(3, 5)], atol=1e-6, id="Erf-small"),
    case("Erf", [f32(10, 30, low=-5, high=5)], atol=1e-6, id="Erf-large"),
    case("Relu", [ints(3, 4, dtype=np.int8)], opset=14, id="Relu-int8"),
    case("Relu", [f32(3, 4).astype(np.float16)], opset=14, id="Relu-half"),
    case("LeakyRelu", [f32(3, 4)], {"alpha": 0.2}),
    case("PRelu", [f32(2, 3, 4, 5), f32(3, 1, 1)], opset=16),
    case("PRelu", [f32(2, 3), f32(3)], opset=9, id="PRelu-9"),
    case("Elu", [f32(3, 4)], {"alpha": 0.7}, atol=1e-6),
    case("Selu", [f32(3, 4)], atol=1e-6),
    case("Celu", [f32(3, 4)], {"alpha": 2.0}, opset=12, atol=1e-6),
    case("ThresholdedRelu", [f32(3, 4)], {"alpha": 0.5}, opset=10),
    case("HardSigmoid", [f32(3, 4)], {"alpha": 0.3, "beta": 0.4}),
    case("Mish", [f32(3, 4)], opset=18, atol=1e-6),
    case("Gelu", [f32(4, 20, low=-5, high=5)], opset=20, atol=1e-6),
    case("Gelu", [f32(4, 5)], {"approximate": "tanh"}, opset=20, atol=1e-6, id="Gelu-tanh"),
    case("Softmax", [f32(2, 3, 4)], {"axis": 2}, opset=11, id="Softmax-11-last"),
    case("Softmax", [f32(2, 3, 4)], {"axis": 1}, opset=13, id="Softmax-13"),
    case("LogSoftmax", [f32(2, 3, 4)], opset=13, atol=1e-6, id="LogSoftmax-13"),
    case("Hardmax", [np.array([[1, 3, 3], [2, 0, 1]], F32)], opset=11, id="Hardmax-11"),
    case("Hardmax", [f32(2, 3, 4)], {"axis": 1}, opset=13, id="Hardmax-13"),
    # ---- reductions
    case("ReduceSum", [f32(2, 3, 4)], {"axes": [1]}, opset=11, atol=1e-6, id="ReduceSum-attr"),
    case("ReduceSum", [f32(2, 3, 4), i64(0, -1)], {"keepdims": 0}, opset=13, atol=1e-6, id="ReduceSum-input"),
    case("ReduceSum", [f32(2, 3), np.zeros(0, I64)], {"noop_with_empty_axes": 1}, opset=13, id="ReduceSum-noop"),
    case("ReduceSum", [ints(2, 3)], opset=13, id="ReduceSum-all-int"),
    case("ReduceMean", [f32(2, 3, 4)], {"axes": [2], "keepdims": 0}, opset=13, atol=1e-6, id="ReduceMean-attr"),
    case("ReduceMean", [f32(2, 3, 4), i64(1)], opset=18, atol=1e-6, id="ReduceMean-input"),
    case("ReduceMax", [ints(3, 4)], {"axes": [0]}, opset=13, id="ReduceMax-int"),
    case("ReduceMax", [f32(3, 4), i64(-1)], opset=18, id="ReduceMax-input"),
    case("ReduceMax", [R.random((3, 4)) > 0.5, i64(1)], opset=20, id="ReduceMax-bool"),
    case("ReduceMin", [f32(3, 4)], {"keepdims": 0}, opset=13),
    case("ReduceProd", [f32(3, 4, low=0.5, high=1.5)], {"axes": [1]}, opset=13),
    case("ReduceL1", [f32(3, 4), i64(0)], opset=18, atol=1e-6),
    case("ReduceL2", [f32(3, 4)], {"axes": [1]}, opset=13),
    case("ReduceSumSquare", [f32(3, 4), i64(1)], opset=18),
    case("ReduceLogSum", [f32(3, 4, low=0.1, high=2.0)], {"axes": [1]}, opset=13, atol=1e-6),
    case("ReduceLogSumExp", [f32(3, 4)], {"axes": [0]}, opset=13),
    case("ArgMax", [np.array([[1, 5, 5], [7, 7, 0]], F32)], {"axis": 1}),
    case("ArgMax", [np.array([[1, 5, 5], [7, 7, 0]], F32)], {"axis": 1, "keepdims": 0, "select_last_index": 1},
         id="ArgMax-last"),
    case("ArgMin", [ints(3, 4, low=0, high=3)], {"axis": 0, "select_last_index": 1}),
    case("CumSum", [f32(3, 4), np.array(1, np.int32)], atol=1e-6),
    case("CumSum", [ints(3, 4), np.array(0, I64)], {"exclusive": 1, "reverse": 1}, id="CumSum-exclusive-reverse"),
    case("CumSum", [f32(5), np.array(-1, I64)], {"exclusive": 1}, atol=1e-6, id="CumSum-exclusive"),
    case("TopK", [np.array([[3, 1, 3, 2], [0, 5, 5, 5]], F32), i64(3)], opset=11, outputs=2),
    case("TopK", [np.array([[3, 1, 3, 2], [0, 5, 5, 1]], I64), i64(2)], {"largest": 0, "axis": 1}, opset=11,
         outputs=2, id="TopK-smallest"),
    case("TopK", [f32(4, 3), i64(2)], {"axis": 0}, opset=11, outputs=2, id="TopK-axis0"),
    case("OneHot", [np.array([[0, 2], [-1, 5]], I64), np.array(4.0, F32), np.array([0, 3], np.int32)], opset=11),
    case("OneHot", [np.array([1, 0, 2], np.int32), np.array(3, I64), f32(2)], {"axis": 0}, opset=11,
         id="OneHot-axis0"),
    case("Trilu", [f32(2, 3, 4), np.array(1, I64)], opset=14),
    case("Trilu", [f32(4, 3), np.array(-1, I64)], {"upper": 0}, opset=14, id="Trilu-lower"),
    case("Trilu", [ints(3, 3)], {"upper": 0}, opset=14, id="Trilu-default-k"),
    case("ScatterND", [f32(4, 3), np.array([[1], [3]], I64), f32(2, 3)], opset=13),
    case("ScatterND", [f32(2, 3), np.array([[0, 1], [0, 1], [1, 2]], I64), f32(3)], {"reduction": "add"}, opset=16,
         id="ScatterND-add"),
    case("ScatterND", [ints(2, 3), np.array([[1, 0], [1, 0]], I64), ints(2)], {"reduction": "max"}, opset=18,
         id="ScatterND-max"),
    # ---- matrix products
    case("MatMul", [f32(2, 1, 3, 4), f32(5, 4, 2)]),
    case("MatMul", [f32(4), f32(3, 4, 2)], id="MatMul-1d"),
    case("MatMul", [ints(3, 4), ints(4)], id="MatMul-int"),
    case("Gemm", [f32(3, 4), f32(5, 4), f32(5)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, opset=13),
    case("Gemm", [f32(4, 3), f32(4, 5)], {"transA": 1}, opset=11, id="Gemm-noC"),
    case("Gemm", [f32(3, 4), f32(4, 5), f32(3, 1)], opset=13, id="Gemm-C-column"),
    case("Einsum", [f32(2, 3, 4), f32(2, 4, 5)], {"equation": "bij,bjk->bik"}, opset=12),
    case("Einsum", [f32(3, 3)], {"equation": "ii"}, opset=12, id="Einsum-trace"),
    case("Einsum", [f32(3, 4)], {"equation": "ij -> ji"}, opset=12, id="Einsum-spaces"),
    # ---- normalization
    case("LayerNormalization", [f32(2, 3, 4), f32(4), f32(4)], opset=17, outputs=3, atol=1e-6),
    case("LayerNormalization", [f32(2, 3, 4), f32(3, 4)], {"axis": 1, "epsilon": 1e-3}, opset=17, atol=1e-6,
         id="LayerNormalization-axis1"),
    case("RMSNormalization", [f32(2, 3, 4), f32(4)], opset=23, atol=1e-6),
    case("BatchNormalization", [f32(2, 3, 4, 5), f32(3), f32(3), f32(3), f32(3, low=0.5, high=2)], opset=15,
         atol=1e-6),
    case("BatchNormalization", [f32(4, 3), f32(3), f32(3), f32(3), f32(3, low=0.5, high=2)], opset=14, atol=1e-6,
         id="BatchNormalization-2d"),
    case("InstanceNormalization", [f32(2, 3, 4, 5), f32(3), f32(3)], atol=1e-6),
    case("InstanceNormalization", [f32(2, 3, 7), f32(3), f32(3)], {"epsilon": 0.01}, atol=1e-6,
         id="InstanceNormalization-1d"),
]

IMAGE = f32(1, 2, 4, 5)
NO = np.zeros(0, F32)
RESIZE_CASES = [
    case("Resize", [IMAGE, None, np.array([1, 1, 2, 3], F32)], opset=13, id="nearest-default"),
    case("Resize", [IMAGE, NO, np.array([1, 1, 1.5, 1.7], F32)],
         {"nearest_mode": "round_prefer_ceil", "coordinate_transformation_mode": "asymmetric"}, opset=11,
         id="nearest-ceil-asymmetric"),
    case("Resize", [IMAGE, None, None, i64(1, 2, 7, 3)],
         {"nearest_mode": "floor", "coordinate_transformation_mode": "align_corners"}, opset=13, id="nearest-floor"),
    case("Resize", [IMAGE, None, np.array([1, 1, 0.6, 2.5], F32)], {"nearest_mode": "ceil"}, opset=13,
         id="nearest-ceil"),
    case("Resize", [IMAGE, None, np.array([1, 1, 0.6, 0.8], F32)], {"mode": "linear"}, opset=13,
         id="linear-down"),
    case("Resize", [IMAGE, None, None, i64(1, 2, 7, 9)],
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, opset=13, id="linear-pytorch"),
    case("Resize", [IMAGE, None, None, i64(1, 2, 7, 3)],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=13, id="linear-align"),
    case("Resize", [IMAGE, None, np.array([1, 1, 2, 3], F32)],
         {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, opset=13, atol=1e-6,
         id="linear-asymmetric"),
    case("Resize", [IMAGE, None, np.array([1, 1, 0.7, 1.3], F32)],
         {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, opset=19,
         id="linear-symmetric"),
    case("Resize", [IMAGE, np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], F32), np.array([1, 1, 2, 1.6], F32)],
         {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 9.0},
         opset=13, atol=1e-6, id="linear-crop"),
    case("Resize", [IMAGE, np.array([0, 0, -0.1, 0.3, 1, 1, 0.8, 0.9], F32), None, i64(1, 2, 5, 3)],
         {"coordinate_transformation_mode": "tf_crop_and_resize"}, opset=13, id="nearest-crop"),
    case("Resize", [IMAGE, None, np.array([1, 1, 1.5, 2], F32)], {"mode": "cubic"}, opset=13, atol=1e-6,
         id="cubic"),
    case("Resize", [IMAGE, None, np.array([1, 1, 0.8, 1.6], F32)],
         {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, opset=13, atol=1e-6, id="cubic-exclude"),
    case("Resize", [f32(1, 1, 9, 11), None, np.array([1, 1, 0.4, 0.6], F32)], {"mode": "linear", "antialias": 1},
         opset=18, atol=1e-6, id="linear-antialias"),
    case("Resize", [f32(1, 1, 9, 11), None, np.array([1, 1, 0.5, 0.3], F32)], {"mode": "cubic", "antialias": 1},
         opset=18, atol=1e-6, id="cubic-antialias"),
    case("Resize", [IMAGE, None, None, i64(8, 8)],
         {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, opset=18, id="not-larger"),
    case("Resize", [IMAGE, None, None, i64(3, 3)],
         {"axes": [3, 2], "keep_aspect_ratio_policy": "not_smaller"}, opset=18, id="not-smaller"),
    case("Resize", [ints(1, 2, 3, 4, low=0, high=255, dtype=np.uint8), None, np.array([1, 1, 1.5, 1.5], F32)],
         {"mode": "linear"}, opset=13, id="linear-uint8"),
    case("Resize", [f32(2, 3, 4), None, np.array([1, 2, 0.5], F32)], {"mode": "linear"}, opset=13, id="linear-3d"),
]


def _onnx_model(op, inputs, attrs, opsets, outputs, domain="", output_type=None):
    from onnx import helper, numpy_helper

    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    node = helper.make_node(op, names, [f"y{i}" for i in range(outputs)], domain=domain,
                            **{k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v
                               for k, v in attrs.items()})
    graph = helper.make_graph(
        [node], "one_node",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
         for n, x in zip(names, inputs) if n],
        [helper.make_tensor_value_info(f"y{i}", output_type, None) if output_type else
         helper.make_empty_tensor_value_info(f"y{i}") for i in range(outputs)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]), \
        {n: x for n, x in zip(names, inputs) if n}


def _reference(op, inputs, attrs, opset, outputs):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model, feeds = _onnx_model(op, inputs, attrs, {"": opset}, outputs)
    return ReferenceEvaluator(model).run(None, feeds)


def _evaluate(op, inputs, attrs, opset, outputs):
    node = Node(op, [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)],
                [f"y{i}" for i in range(outputs)], dict(attrs), "n")
    return evaluate(node, list(inputs), opset)


def _assert_same(got, want, atol):
    want = np.asarray(want)
    if want.dtype.name in ("int4", "uint4"):  # lowbit holds 4-bit codes unpacked, one per byte
        want = want.astype(np.int8 if want.dtype.name == "int4" else np.uint8)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert got.flags.c_contiguous
    if "float" in want.dtype.name:  # NumPy's and ml_dtypes' (bfloat16, float8) floats
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-5, atol=atol)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op, inputs, attrs, opset, outputs, atol", CASES + RESIZE_CASES)
def test_matches_onnx_reference(op, inputs, attrs, opset, outputs, atol):
    want = _reference(op, inputs, attrs, opset, outputs)
    got = _evaluate(op, inputs, attrs, opset, outputs)
    assert len(got) == len(want) == outputs
    for g, w in zip(got, want):
        _assert_same(g, w, atol)


def test_every_op_is_compared():
    compared = {p.values[0] for p in CASES + RESIZE_CASES} | set(LOWBIT_OPS)
    compared |= {f"com.microsoft.{p.values[0]}" if p.values[0] in COM_MICROSOFT else p.values[0] for p in ORT_CASES}
    assert set(EVALUATORS) - compared == {"com.microsoft.SimplifiedLayerNormalization"}  # below
    assert compared <= set(EVALUATORS)


def _onnx_ops(steps: list[tuple[str, list, dict]], opset: int = 17) -> np.ndarray:
    """The output of ONNX ops run one after another: each step's inputs are arrays or "y" (the previous output)."""
    y = None
    for op, inputs, attrs in steps:
        xs = [y if isinstance(x, str) else x for x in inputs]
        y = evaluate(Node(op, [f"x{i}" for i in range(len(xs))], ["y"], attrs, op), xs, opset)[0]
    return y


def _linear_steps(x, w, b):
    return [("MatMul", [x, w], {}), ("Add", ["y", b], {})]


def _attention_steps(q, k, v, mask):
    heads = i64(2, 5, 3, 4)
    parts = [_onnx_ops([("Reshape", [x, heads], {}), ("Transpose", ["y"], {"perm": perm})])
             for x, perm in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3]))]
    return [("MatMul", parts[:2], {}), ("Mul", ["y", np.array(0.5, F32)], {}), ("Add", ["y", mask], {}),
            ("Softmax", ["y"], {"axis": -1}), ("MatMul", ["y", parts[2]], {}),
            ("Transpose", ["y"], {"perm": [0, 2, 1, 3]})]


#: lowbit's own ops (from its fusions), compared with the ONNX ops they stand for
LOWBIT_OPS = {
    "lowbit.Linear": ([f32(2, 3, 8), f32(8, 5), f32(5)], {}, _linear_steps),
    "lowbit.Attention": ([f32(2, 5, 12), i64(2, 5, 3, 4), f32(2, 5, 12), i64(0, 0, 3, 4), f32(2, 5, 12),
                          i64(2, -1, 3, 4), f32(2, 1, 1, 5)], {"scale": 0.5},
                         lambda q, qs, k, ks, v, vs, mask: _attention_steps(q, k, v, mask)),
}


@pytest.mark.parametrize("op", LOWBIT_OPS)
def test_lowbit_ops_are_the_onnx_ops_they_stand_for(op):
    inputs, attrs, steps = LOWBIT_OPS[op]
    got = evaluate(Node(op, [f"x{i}" for i in range(len(inputs))], ["y"], attrs, "n"), inputs, 1)[0]
    np.testing.assert_allclose(got, _onnx_ops(steps(*inputs)), rtol=1e-6, atol=1e-6)


def test_simplified_layer_norm_reads_under_com_microsoft_too():
    x, scale = f32(2, 3, 8), f32(8)
    default, microsoft = (evaluate(Node(op, ["x", "s"], ["y", "inv"], {"epsilon": 1e-3}, "n"), [x, scale], 17)
                          for op in ("SimplifiedLayerNormalization", "com.microsoft.SimplifiedLayerNormalization"))
    for a, b in zip(default, microsoft):
        np.testing.assert_array_equal(a, b)


# ---- com.microsoft ops, and ONNX semantics the reference runner does not follow, against onnxruntime -----------------

COM_MICROSOFT = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "SkipLayerNormalization",
                 "SkipSimplifiedLayerNormalization", "FusedMatMul", "MultiHeadAttention")
KEY_PADDING = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1]], np.int32)
X, SKIP, GAMMA, BETA, BIAS = f32(2, 3, 8), f32(2, 3, 8), f32(8), f32(8), f32(8)
ORT_CASES = [
    case("Gelu", [f32(3, 40, low=-5, high=5)], atol=1e-6),
    case("FastGelu", [f32(3, 8)], atol=1e-6),
    case("FastGelu", [f32(3, 8), f32(8)], atol=1e-6, id="FastGelu-bias"),
    case("BiasGelu", [f32(3, 8), f32(8)], atol=1e-6),
    case("QuickGelu", [f32(3, 8)], {"alpha": 1.5}, atol=1e-6),
    case("SkipLayerNormalization", [X, SKIP, GAMMA, BETA, BIAS], {"epsilon": 1e-5}, outputs=4, atol=1e-5),
    case("SkipLayerNormalization", [X, SKIP, GAMMA], outputs=1, atol=1e-5, id="SkipLayerNormalization-plain"),
    case("SkipSimplifiedLayerNormalization", [X, SKIP, GAMMA, BIAS], outputs=4, atol=1e-5),
    case("FusedMatMul", [f32(2, 3, 4, 5), f32(2, 3, 5, 6)], {"alpha": 0.5}),
    case("FusedMatMul", [f32(2, 3, 5, 4), f32(2, 3, 6, 5)], {"transA": 1, "transB": 1}, id="FusedMatMul-trans"),
    case("FusedMatMul", [f32(2, 3, 4, 5), f32(3, 4, 5, 6)], {"transBatchA": 1}, id="FusedMatMul-batchA"),
    case("FusedMatMul", [f32(2, 3, 5, 4), f32(2, 3, 5, 6)], {"transBatchA": 1, "transA": 1, "transBatchB": 1},
         id="FusedMatMul-batch-both"),
    case("MultiHeadAttention", [f32(2, 5, 12), f32(2, 7, 12), f32(2, 7, 6)], {"num_heads": 3}, atol=1e-6),
    case("MultiHeadAttention", [f32(2, 5, 12), f32(2, 7, 12), f32(2, 7, 6), f32(30), KEY_PADDING, f32(2, 1, 5, 7)],
         {"num_heads": 3, "scale": 0.3, "mask_filter_value": -1000.0}, atol=1e-6, id="MultiHeadAttention-all"),
    # ONNX Runtime's own op, in the default domain
    case("SimplifiedLayerNormalization", [X, GAMMA], outputs=2, atol=1e-5),
    case("SimplifiedLayerNormalization", [X, f32(3, 8)], {"axis": 1, "epsilon": 1e-3}, outputs=2, atol=1e-5,
         id="SimplifiedLayerNormalization-axis1"),
    # an empty axes input squeezes every size-1 axis, and before opset 13 Softmax coerces its input to 2-D (ONNX's
    # reference runner does neither)
    case("Squeeze", [f32(1, 2, 1, 3), np.zeros(0, I64)], opset=13, id="Squeeze-empty-axes"),
    case("Softmax", [f32(2, 3, 4)], opset=11, id="Softmax-11-coerced"),
    case("LogSoftmax", [f32(2, 3, 4)], {"axis": 0}, opset=11, atol=1e-6, id="LogSoftmax-11"),
    case("Hardmax", [f32(2, 3, 4)], opset=12, id="Hardmax-12"),
    # Resize: length_resized is the integer output length, and a size-1 pytorch_half_pixel axis samples 0
    case("Resize", [IMAGE, NO, np.array([1, 1, 2, 2], F32)],
         {"coordinate_transformation_mode": "tf_half_pixel_for_nn"}, opset=11, id="Resize-tf-half-pixel-for-nn"),
    case("Resize", [f32(1, 1, 3, 5), None, np.array([1, 1, 1, 1.5], F32)],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=19, atol=1e-6,
         id="Resize-align-fractional"),
    case("Resize", [IMAGE, np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], F32), np.array([1, 1, 2, 1.5], F32)],
         {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 9.0},
         opset=13, atol=1e-6, id="Resize-crop-fractional"),
    case("Resize", [f32(1, 1, 3, 5), None, None, i64(1, 1, 1, 1)],
         {"mode": "cubic", "coordinate_transformation_mode": "pytorch_half_pixel"}, opset=19, atol=1e-6,
         id="Resize-pytorch-size-1"),
]


@pytest.mark.parametrize("op, inputs, attrs, opset, outputs, atol", ORT_CASES)
def test_matches_onnxruntime(op, inputs, attrs, opset, outputs, atol):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    domain = "com.microsoft" if op in COM_MICROSOFT else ""
    skipped = {1} if op == "SkipSimplifiedLayerNormalization" else set()  # no mean for the RMS form
    model, feeds = _onnx_model(op, inputs, attrs, {"": opset, "com.microsoft": 1}, outputs, domain, output_type=1)
    for i in skipped:
        model.graph.node[0].output[i] = ""
        model.graph.output.remove(next(o for o in model.graph.output if o.name == f"y{i}"))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    node = Node(f"{domain}.{op}" if domain else op, [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)],
                ["" if i in skipped else f"y{i}" for i in range(outputs)], dict(attrs), "n")
    got = [y for i, y in enumerate(evaluate(node, list(inputs), 1 if domain else opset)) if i not in skipped]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _assert_same(g, w, atol)


def test_negative_pads_crop():
    x = f32(4, 5)
    node = Node("Pad", ["x", "p", "v"], ["y"], {}, "pad")
    (y,) = evaluate(node, [x, i64(-1, 2, 1, -3), np.array(7.0, F32)], 18)
    want = np.full((4, 4), 7.0, F32)
    want[:3, 2:] = x[1:, :2]
    np.testing.assert_array_equal(y, want)


# ---- erf -------------------------------------------------------------------------------------------------------------

def test_erf_is_within_its_documented_bound():
    """Dense and random float32 points (every binade down to 1e-30): at most 0.54 ulp and 3.2e-8 from math.erf."""
    grid = np.linspace(-4.5, 4.5, 200_001, dtype=F32)
    bits = R.integers(np.float32(1e-30).view(np.int32), np.float32(ERF_CLAMP + 0.5).view(np.int32), 100_000)
    x = np.concatenate([grid, bits.astype(np.int32).view(F32), -bits.astype(np.int32).view(F32)])
    exact = np.array([math.erf(v) for v in x.astype(np.float64).tolist()])
    got = erf(x)
    assert got.dtype == F32
    ulp = np.spacing(np.abs(exact).astype(F32)).astype(np.float64)
    assert (np.abs(got - exact) / ulp).max() <= 0.54
    assert np.abs(got - exact).max() <= 3.2e-8
    assert np.abs(erf(x.astype(np.float64)) - exact).max() <= 3.2e-8  # float64: the same absolute bound
    assert np.array_equal(erf(x[:50]), np.array([math.erf(v) for v in x[:50].tolist()], F32))  # tiny: math.erf
    special = erf(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0] * 20, F32))[:5]
    assert special[:2].tolist() == [1.0, -1.0] and np.isnan(special[2]) and special[3] == 0 and special[4] == 0


# ---- prepare_evaluated -----------------------------------------------------------------------------------------------

def _graph(node, inputs: dict, params: dict, opset=21):
    return Graph([node], {n: TensorSpec(x.shape, x.dtype.name) for n, x in inputs.items()}, list(node.outputs),
                 params, {"": opset})


@pytest.mark.parametrize("node, inputs, params", [
    (Node("Reshape", ["x", "s"], ["y"]), {"x": f32(2, 3, 4)}, {"s": i64(4, 0, -1)}),
    (Node("Expand", ["x", "s"], ["y"]), {"x": f32(3, 1)}, {"s": i64(2, 3, 5)}),
    (Node("Range", ["a", "b", "c"], ["y"]), {}, {"a": np.array(0, I64), "b": np.array(7, I64),
                                                   "c": np.array(2, I64)}),
    (Node("TopK", ["x", "k"], ["v", "i"], {"axis": 0}), {"x": f32(5, 3)}, {"k": i64(2)}),
    (Node("Resize", ["x", "", "s"], ["y"], {"mode": "linear"}), {"x": f32(1, 2, 3, 5)},
     {"s": np.array([1, 1, 2, 0.5], F32)}),
    (Node("Pad", ["x", "p", "v"], ["y"]), {"x": f32(3, 4), "v": np.array(2.0, F32)}, {"p": i64(1, 0, 0, 2)}),
    (Node("CumSum", ["x", "a"], ["y"]), {"x": f32(3, 4), "a": np.array(1, I64)}, {}),
    (Node("Cast", ["x"], ["y"], {"to": 7}), {"x": f32(3, 4)}, {}),
    (Node("Shape", ["x"], ["y"], {"start": 1}), {"x": f32(3, 4, 5)}, {}),
])
def test_prepare_evaluated_declares_what_runs_produce(node, inputs, params):
    node.name = "n"
    ins = [inputs.get(t, params.get(t)) if t else None for t in node.inputs]
    kernel = prepare_evaluated(node, _graph(node, inputs, params), [None if x is None else (x.shape, x.dtype)
                                                                    for x in ins])
    outs = kernel(ins, [np.empty(s, d) for s, d in kernel.outputs])
    assert [(y.shape, y.dtype) for y in outs] == [(tuple(s), np.dtype(d)) for s, d in kernel.outputs]
    assert kernel.note == "numpy" and kernel.ops == sum(y.size for y in outs)
    for got, want in zip(outs, evaluate(node, ins, 21)):
        np.testing.assert_array_equal(got, want)


def test_prepare_evaluated_reads_the_graph_opset():
    x = f32(2, 3, 4)
    node = Node("Softmax", ["x"], ["y"], {}, "softmax")
    graph = _graph(node, {"x": x}, {}, opset=11)
    (y,) = prepare_evaluated(node, graph, [(x.shape, x.dtype)])([x], [np.empty_like(x)])
    rows = x.reshape(2, 12)
    want = np.exp(rows - rows.max(1, keepdims=True))
    np.testing.assert_allclose(y, (want / want.sum(1, keepdims=True)).reshape(x.shape), rtol=1e-5)


def test_prepare_evaluated_needs_shape_inputs_ahead_of_a_run():
    node = Node("Reshape", ["x", "s"], ["y"], {}, "reshape_7")
    graph = Graph([node], {"x": TensorSpec((2, 3)), "s": TensorSpec((2,), "int64")}, ["y"])
    with pytest.raises(ValueError, match=r"node 'reshape_7' \(Reshape\): input 1 \('s'\) .* computable ahead of a "
                                         r"run \(a constant or computed from shapes\)"):
        prepare_evaluated(node, graph, [((2, 3), np.dtype(F32)), ((2,), np.dtype(I64))])


def test_registration():
    assert PREPARERS["Range"] is prepare_evaluated and PREPARERS["Resize"] is prepare_evaluated
    assert PREPARERS["Conv"] is not prepare_evaluated  # not an evaluated op
    assert {op: SHAPE_INPUTS[op] for op in ("Reshape", "Expand", "ConstantOfShape", "Range", "Tile", "Slice",
                                            "Squeeze", "Unsqueeze", "Split", "Pad", "Resize", "ReduceSum",
                                            "ReduceMean", "TopK", "OneHot")} == {
        "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2), "Tile": (1,),
        "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "Pad": (1, 3), "Resize": (2, 3),
        "ReduceSum": (1,), "ReduceMean": (1,), "TopK": (1,), "OneHot": (1,)}
    assert "CumSum" not in SHAPE_INPUTS and "Trilu" not in SHAPE_INPUTS


# ---- errors ----------------------------------------------------------------------------------------------------------

def test_unknown_op_is_named():
    with pytest.raises(NotImplementedError, match=r"node 'n7': op 'NonZero' has no evaluator"):
        evaluate(Node("NonZero", ["x"], ["y"], {}, "n7"), [f32(3)], 21)


@pytest.mark.parametrize("op, inputs, attrs, error, message", [
    ("Resize", [f32(1, 1, 2, 2), None, np.array([1, 1, 2, 2], F32)], {"mode": "bicubic"}, ValueError,
     r"attribute mode must be one of \['cubic', 'linear', 'nearest'\], got 'bicubic'"),
    ("Resize", [f32(1, 1, 2, 2), None, np.array([1, 1, 2, 2], F32)], {"nearest_mode": "up"}, ValueError,
     "attribute nearest_mode must be one of"),
    ("Resize", [f32(1, 1, 2, 2), None, np.array([2, 2], F32)], {}, ValueError, "must be 4 positive factors"),
    ("Pad", [f32(2, 2), i64(1, 1, 1, 1)], {"mode": "symmetric"}, ValueError, "attribute mode must be one of"),
    ("Cast", [f32(2)], {"to": 8}, ValueError, "to = 8 is not a numeric ONNX type"),
    ("Gelu", [f32(2)], {"approximate": "fast"}, ValueError, "attribute approximate must be one of"),
    ("Softmax", [f32(2, 3)], {"axis": 2}, ValueError, "axis 2 is out of range for rank 2"),
    ("Squeeze", [f32(2, 3), i64(1)], {}, ValueError, r"axes \[1\] of shape \[2, 3\] are not all of size 1"),
    ("Unsqueeze", [f32(2), i64(0, 0)], {}, ValueError, r"axes \[0, 0\] repeat an axis"),
    ("Reshape", [f32(2, 3), i64(4, -1)], {}, ValueError, r"cannot reshape \[2, 3\] to \[4, -1\]"),
    ("Mod", [f32(2), f32(2)], {}, ValueError, "fmod must be 1 for floating-point inputs"),
    ("Add", [f32(2, 3), f32(4)], {}, ValueError, "operands could not be broadcast"),
    ("Add", [f32(2), np.ones(2)], {}, TypeError, r"inputs must share one dtype, got \['float32', 'float64'\]"),
    ("Gather", [f32(3), i64(3)], {}, ValueError, "out of bounds"),
    ("TopK", [f32(3), i64(4)], {}, ValueError, r"K = 4 is out of range \[0, 3\]"),
    ("Dropout", [f32(2), np.array(0.5, F32), np.array(True)], {}, ValueError, "training_mode is true"),
    ("BatchNormalization", [f32(2, 3), *[f32(3)] * 4], {"training_mode": 1}, ValueError, "only inference"),
])
def test_bad_nodes_are_named(op, inputs, attrs, error, message):
    node = Node(op, [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)], ["y"], attrs, "bad_node")
    with pytest.raises(error, match=rf"node 'bad_node' \({op}\): .*{message}"):
        evaluate(node, inputs, 21)


def test_a_session_folds_shape_math_and_runs_evaluated_kernels():
    from lowbit.runtime import Session

    nodes = [Node("Shape", ["x"], ["shape"]), Node("Gather", ["shape", "zero"], ["batch"]),
             Node("Unsqueeze", ["batch", "axes"], ["batch1"]),
             Node("Concat", ["batch1", "rest"], ["target"], {"axis": 0}),
             Node("Reshape", ["x", "target"], ["flat"]), Node("Sin", ["flat"], ["sin"]),
             Node("ReduceMax", ["sin", "last"], ["y"], {"keepdims": 0}), Node("TopK", ["sin", "k"], ["v", "i"])]
    params = {"zero": np.array(0, I64), "axes": i64(0), "rest": i64(-1), "last": i64(-1), "k": i64(2)}
    graph = Graph(nodes, {"x": TensorSpec((None, 3, 4))}, ["y", "v", "i"], params, {"": 18})
    session = Session(graph, optimize=False)
    for batch in (2, 5):
        x = f32(batch, 3, 4)
        out = session.run({"x": x})
        sin = np.sin(x.reshape(batch, 12))
        np.testing.assert_allclose(out["y"], sin.max(axis=-1), rtol=1e-6)
        np.testing.assert_array_equal(out["i"], np.argsort(-sin, axis=-1, kind="stable")[:, :2])
    assert session.notes["sin_5"] == "numpy"
