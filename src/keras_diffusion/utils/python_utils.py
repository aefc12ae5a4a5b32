"""Small Python helpers."""

import json


class classproperty(property):  # noqa: N801 (reads like `property`)
    """A read-only property computed on the class, e.g. `Task.presets`."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)


def read_json(path, corrupt):
    """The JSON document in the file `path`.

    A file that is not UTF-8 JSON raises `ValueError(f"{corrupt}: {error}")`:
    each caller names the file and what it should hold. A missing file
    raises the usual `FileNotFoundError`.

    Examples:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"a": 1')
    >>> read_json(path, "Corrupt config")
    Traceback (most recent call last):
    ...
    ValueError: Corrupt config: Expecting ',' delimiter: line 1 column 8 (char 7)
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{corrupt}: {e}") from e
