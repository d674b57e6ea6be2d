"""ONNX and ONNX Runtime QNN EP targets."""
