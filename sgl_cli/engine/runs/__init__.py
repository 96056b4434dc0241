"""What drives the engine over an input file: `Run` (sgl run), locally or on the Ray backend."""
