"""The template renders exactly what the inline script rendered (a step before the inline copy goes)."""

from __future__ import annotations

import itertools

import pytest

from export import trt_build


def _spec(cc, strongly_typed, sparsity, path, tensorrt, atol, rtol):
    return {"target": "t", "tensorrt": tensorrt, "compute_capability": cc, "strongly_typed": strongly_typed,
            "precision_flags": ["--fp16", "--int8"], "sparsity": sparsity, "workspace_mib": 512,
            "builder_optimization_level": 4, "onnx": {"path": path, "sha256": "ab" * 32},
            "golden": {"inputs": "golden/inputs.json", "outputs": "golden/onnxrt outputs.json", "atol": atol,
                       "rtol": rtol}}


@pytest.mark.parametrize("cc, strongly_typed, sparsity, path, tensorrt, atol, rtol", itertools.product(
    ["8.7", None], [True, False], [True, False], ["../model.onnx", "../my model's.onnx"], ["10.3.0", "8.5.2"],
    [0.001, 1e-05], [0.05, 2]))
def test_template_renders_the_inline_script_byte_for_byte(cc, strongly_typed, sparsity, path, tensorrt, atol, rtol):
    spec = _spec(cc, strongly_typed, sparsity, path, tensorrt, atol, rtol)
    assert trt_build.build_script(spec).encode() == trt_build._old_build_script(spec).encode()
