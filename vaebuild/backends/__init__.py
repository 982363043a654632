"""Engine backends: full TensorRT and TensorRT for RTX, both driven through Polygraphy."""
