"""Deployment exports of CLAP's encoders (see ``export/README.md``).

* ``export.onnx``: ONNX graphs (waveform / token ids -> L2-normalised embedding), verified with
  onnxruntime against the PyTorch model on every export;
* ``export.trt``: TensorRT engines from those graphs (not executed in this project's CI);
* ``export.aoti``: torch.export + AOTInductor packages;
* ``export.runners``: the onnxruntime runner; ``export.trt_compat``: the TensorRT op-table check;
* ``export.encoders``: the exportable wrappers and the test inputs.
"""
