"""The Triton Python backend glue: the only place that imports triton_python_backend_utils."""
