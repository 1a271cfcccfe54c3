"""Converters from Hugging Face checkpoints to GGUF and ONNX (installed as ``edgellm.converters``)."""
