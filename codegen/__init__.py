"""Code generation targets (installed as ``attncc.codegen``)."""
