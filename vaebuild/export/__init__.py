"""Export: the two graphs to ONNX (`onnx`), each validated right after (`check`: the ONNX checker, shape
inference, ONNX Runtime against PyTorch), with an export record beside them."""

RECORD_NAME = "export_record.json"
