"""Operations: the serve command, tritonserver's command line and roles, the supervisor and its probes."""
