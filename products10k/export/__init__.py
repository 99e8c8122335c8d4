"""The export stage (torch side): the chosen checkpoint as ONNX with its preprocessing and label map,
checked against PyTorch with onnxruntime. What it writes is what the light runtime (``deploy``) reads;
the runtime itself never imports torch or this package."""
