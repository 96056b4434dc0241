"""Domain errors. The CLI turns `SglError` into a one-line message and exit code 2; `ItemError` becomes the
`error` field of one output record while the run goes on."""


class SglError(Exception):
    """A problem with the user's settings, preset or models: the run cannot start."""


class PresetError(SglError):
    """A preset file or name that cannot be used."""


class ModelLoadError(SglError):
    """A model or processor that cannot be loaded."""


class ItemError(Exception):
    """A problem with one input item; reported in that item's record."""
