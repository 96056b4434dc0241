"""Domain errors. The CLI turns `SglError` into a one-line message and exit code 2; `ItemError` becomes the
`error` field of one output record while the run goes on."""


class SglError(Exception):
    """A problem with the user's settings, preset or models: the run cannot start."""


class SettingError(SglError, ValueError):
    """A setting's value (or a combination of settings) that cannot be used. `settings` are the settings' names,
    in the order `template`'s `{}` fields name them: the library says the names, the CLI its flags for them
    (`commands/_common.py`'s FLAGS), so that no layer rewords another's message."""

    def __init__(self, template: str, *settings: str):
        self.template = template
        self.settings = settings
        super().__init__(template.format(*settings))

    @property
    def setting(self) -> str:
        return self.settings[0]

    def worded(self, names: dict[str, str]) -> str:
        """The message with each setting called by `names` (a setting missing from it: by its own name)."""
        return self.template.format(*(names.get(s, s) for s in self.settings))

    @classmethod
    def about(cls, setting: str, exc: Exception) -> "SettingError":
        """`setting: <exc's message>` (a message from below that does not name the setting)."""
        return cls("{}: " + str(exc).replace("{", "{{").replace("}", "}}"), setting)


class PresetError(SglError):
    """A preset file or name that cannot be used."""


class ModelLoadError(SglError):
    """A model or processor that cannot be loaded."""


class NoSmallModel(SettingError, ModelLoadError):
    """A guide that needs the small model, where the preset names none (the setting named: `guide`)."""


class ItemError(Exception):
    """A problem with one input item; reported in that item's record."""


class PluginError(SglError):
    """A plugin (a guide, large backend or input format) that failed where the run cannot go on without it: one
    asked for by name whose `load`, `check_spec` or `from_settings` raised. One line naming it."""


class ContractError(Exception):
    """What a guide, large backend or input format gave back breaks its contract (`plugins.py`'s checks). Not an
    ItemError: the engine retries a failed batch item by item, so that each item's error record says its own
    violation, naming the plugin, and its neighbours go on."""
