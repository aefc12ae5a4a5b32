"""Small Python helpers."""


class classproperty(property):  # noqa: N801 (reads like `property`)
    """A read-only property computed on the class, e.g. `Task.presets`."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)
