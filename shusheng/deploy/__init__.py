"""Deployment: plugin-free ONNX export (``shusheng.deploy.onnx``); nothing else in shusheng imports this."""
