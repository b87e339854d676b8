"""Evaluation: running the deployed graphs (ONNX Runtime or PyTorch), latency, size, the dense reference.

The quality metrics themselves are the task's (tasks/): this layer runs models, tasks score them.
"""
