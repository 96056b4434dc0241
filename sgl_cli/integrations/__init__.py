"""sgl inside other tools (above the library: each module uses only `sgl_cli.engine`'s public API and imports its
host tool lazily)."""
