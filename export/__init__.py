"""From a torch model to deployable files: ONNX export, checks, graph inspection."""
