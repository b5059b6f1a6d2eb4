"""Extract: load and check models, run them with out-of-memory back-off, stream latents to netCDF."""
