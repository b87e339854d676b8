"""Runner: the same task model through PyTorch and through its ONNX file gives the same outputs."""

from __future__ import annotations

import numpy as np

from evaluation.runner import Runner


def test_onnxruntime_and_pytorch_agree(llama_onnx):
    tm, path, _, (ids,) = llama_onnx
    torch_out = Runner(tm, None, threads=1)({"input_ids": ids})
    ort = Runner(tm, path, threads=1)
    assert ort.sess is not None and ort.names == ("input_ids",)
    ort_out = ort({"input_ids": ids})
    assert len(torch_out) == len(ort_out) == 1 and ort_out[0].shape == (1, 16, tm.model.config.vocab_size)
    np.testing.assert_allclose(ort_out[0], torch_out[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(torch_out[0], tm(ids)[0].detach().numpy())
