"""Safe (de)serialization of configs: only registered classes, no imports.

Keras' own `deserialize_keras_object` imports whatever module a config names.
A preset is untrusted input, so before anything is instantiated the whole
config tree is checked: every `registered_name` must be one that
keras_diffusion registered, and every `module` must belong to Keras itself or
to keras_diffusion. Nothing here executes code from the preset.
"""

import keras

from keras_diffusion.api_export import PACKAGE

_SAFE_MODULE_ROOTS = ("keras", PACKAGE)


def serialize(obj):
    """Serialize a registered keras_diffusion object to a JSON-able dict."""
    return keras.saving.serialize_keras_object(obj)


def registered_class(registered_name, expected_base=object, source="config"):
    """Return the class registered as `registered_name`, or raise ValueError."""
    if not isinstance(registered_name, str) or not registered_name.startswith(
        PACKAGE + ">"
    ):
        raise ValueError(
            f"{source} names class {registered_name!r}, which is not a registered "
            f"keras_diffusion class (expected 'keras_diffusion>ClassName'). "
            "Refusing to load it."
        )
    cls = keras.saving.get_registered_object(registered_name)
    if cls is None:
        raise ValueError(
            f"{source} names unknown class {registered_name!r}. Known classes: "
            f"{', '.join(sorted(known_registered_names()))}."
        )
    if not (isinstance(cls, type) and issubclass(cls, expected_base)):
        raise ValueError(
            f"{source} names {registered_name!r}, which is not a "
            f"{expected_base.__name__}."
        )
    return cls


def known_registered_names():
    from keras.src.saving import object_registration

    return [
        name
        for name in object_registration.GLOBAL_CUSTOM_OBJECTS
        if name.startswith(PACKAGE + ">")
    ]


def check_config_is_safe(config, source="config"):
    """Raise ValueError if any nested object could import foreign code."""
    if isinstance(config, dict):
        name = config.get("registered_name")
        module = config.get("module")
        if isinstance(name, str) and name.startswith(PACKAGE + ">"):
            # Looked up in the registry; its `module` is never imported.
            registered_class(name, source=source)
        elif isinstance(module, str) and "class_name" in config:
            if module.split(".")[0] not in _SAFE_MODULE_ROOTS:
                raise ValueError(
                    f"{source} refers to module {module!r}; only Keras and "
                    "keras_diffusion objects may appear in a preset."
                )
        if config.get("class_name") == "__lambda__":
            raise ValueError(f"{source} contains a lambda; refusing to load it.")
        for value in config.values():
            check_config_is_safe(value, source)
    elif isinstance(config, (list, tuple)):
        for value in config:
            check_config_is_safe(value, source)


def deserialize(config, expected_base=object, source="config", **overrides):
    """Instantiate a serialized object after checking that it is safe.

    `overrides` replace keys of the object's own config (for example `dtype`).
    """
    if not isinstance(config, dict) or "config" not in config:
        raise ValueError(
            f"{source} is not a serialized keras_diffusion object "
            "(expected a dict with 'registered_name' and 'config')."
        )
    check_config_is_safe(config, source)
    cls = registered_class(config.get("registered_name"), expected_base, source)
    inner = dict(config["config"])
    inner.update(overrides)
    return cls.from_config(inner)
