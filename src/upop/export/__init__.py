"""ONNX export of model folders (or single towers), checked against PyTorch in ONNX Runtime."""
