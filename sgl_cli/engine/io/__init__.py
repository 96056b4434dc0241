"""Input and output: items from input files, their images, records written resumably, the `Run` that ties them."""
