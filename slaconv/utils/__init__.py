"""Small helpers shared by the pipeline's modules (files, devices and dtypes, messages)."""
