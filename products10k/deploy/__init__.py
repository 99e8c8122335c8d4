"""The model people run: ONNX export with its preprocessing (the export stage), an onnxruntime
wrapper, the ``products10k-predict`` command and ``products10k-enrol`` for new SKUs."""
