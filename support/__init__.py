"""What tests and benches share: the prompt table and image outcomes, a tritonserver harness, encoder peers in their own processes."""
