"""The staged engine: models loaded (transformers), the typed stage results, the `Engine`, its records."""
