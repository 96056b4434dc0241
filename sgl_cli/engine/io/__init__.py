"""Input and output: items from input files (`formats/`), their images (`images`, `fetch`), records written
resumably (`output`), rankings (`scores`), and the batching and retry rules (`batches`). `Run`, which ties them to
the engine, is in `runs/`."""
