"""Load Stability AI's single-file SD3 / SD3.5 checkpoints.

`sd3_medium.safetensors`, `sd3.5_medium.safetensors`, `sd3.5_large.safetensors`
and the like hold the MMDiT (`model.diffusion_model.*`) and the VAE
(`first_stage_model.*`, LDM layout) in one file. The text encoders are either
in the same file (`text_encoders.clip_l.transformer.*`,
`text_encoders.clip_g.transformer.*`, `text_encoders.t5xxl.transformer.*`,
transformers' names) or separate files next to it, as Stability's
repositories ship them: `clip_l.safetensors`, `clip_g.safetensors` and
`t5xxl_fp16.safetensors` (or `t5xxl.safetensors`, `t5xxl_fp32.safetensors`,
`t5xxl_bf16.safetensors`) in the file's folder or its `text_encoders/`.

`from_preset(path)` accepts the file, or a folder whose top level holds
exactly one such file. Nothing but safetensors is read (never a pickle); the
header is checked against the file size first, then each tensor is read
lazily, renamed to diffusers' names (`stability_keys`) and copied into the
model, so little beyond the model itself is ever in memory.

The architecture is inferred from the tensor shapes (`stability_config`):
the MMDiT's width, depth, patch and position-table sizes, RMS q/k norm and
MMDiT-X dual-attention blocks, with 64-wide heads unless the q/k norm says
otherwise; the VAE's level widths and block counts; the CLIP and T5
encoders' sizes (CLIP-L uses quick-GELU and CLIP-G GELU, as in SD3). What
shapes cannot tell is taken from SD3: VAE group norms of 32, latent scale
1.5305 and shift 0.0609, sigma shift 3.0, and 1024x1024 as the default
resolution (smaller if the position table is). The sampling defaults are
the generic ones (50 steps, guidance 7.0): pass `num_steps` and
`guidance_scale` for, e.g., the 4-step Large Turbo.

T5 is used when the file or a sibling file holds it; without it the
context's T5 tokens are zeros. A CLIP encoder without
`text_projection.weight` (Stability's `clip_l.safetensors` has none; the
reference uses CLIP-L's pooled output unprojected) gets the identity.

Tokenizers: a single file has none. They are read from diffusers-named
folders next to the file (`tokenizer/`, `tokenizer_2/` and, with T5,
`tokenizer_3/`; Stability's repositories have them), else from a built-in
SD3 preset's Hugging Face repository if the local Hugging Face cache already
holds it (never downloaded here: SD3's tokenizers are the same for every
version). Failing both, loading the task or preprocessor raises a
`FileNotFoundError` naming the missing folders; `Backbone.from_preset` needs
no tokenizer.
"""

import json
import os
import struct

from keras_diffusion.converters import (
    diffusers_mmdit,
    diffusers_vae,
    stability_config,
    stability_keys,
    transformers_text,
)
from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.converters.sd3_checkpoint import SD3Checkpoint

MMDIT_PREFIX = stability_keys.MMDIT_PREFIX
VAE_PREFIX = stability_keys.VAE_PREFIX
ENCODERS = {  # name -> (in-file prefix, separate file names, activation)
    "clip_l": ("text_encoders.clip_l.transformer.", ("clip_l",), "quick_gelu"),
    "clip_g": ("text_encoders.clip_g.transformer.", ("clip_g",), "gelu"),
    "t5": (
        "text_encoders.t5xxl.transformer.",
        ("t5xxl_fp16", "t5xxl", "t5xxl_fp32", "t5xxl_bf16"),
        None,
    ),
}
TOKENIZERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
DEFAULT_SIZE = 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def _header_keys(path):
    """Tensor names in a safetensors header, or () if it is not readable."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(os.path.getsize(path), 100_000_000):
                return ()
            return tuple(json.loads(f.read(length)))
    except (OSError, ValueError, struct.error):
        return ()


def _candidates(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    paths = [os.path.join(folder, n) for n in names]
    return [
        p for p in paths if any(k.startswith(MMDIT_PREFIX) for k in _header_keys(p))
    ]


def is_single_file(path):
    """A checkpoint file, or a plain folder holding an SD3 single file.

    Pickle checkpoints (`.ckpt`, `.pt`, ...) are claimed too, only to be
    refused with a message: they are never unpickled.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path.endswith((".safetensors",) + PICKLE_SUFFIXES)
    if not os.path.isdir(path):
        return False
    markers = ("model_index.json", "config.json", "metadata.json")
    if any(os.path.exists(os.path.join(path, m)) for m in markers):
        return False
    return bool(_candidates(path))


def _prefixed(prefix, name):
    return None if name is None else prefix + name


def _clip_source(source):
    """`source`, with an identity `text_projection.weight` if it has none."""
    mapping = {k: (k, None) for k in source.keys()}
    if "text_projection.weight" not in source:
        width = source.shape("text_model.embeddings.token_embedding.weight")[1]
        mapping["text_projection.weight"] = (None, ("eye", width))
    return stability_keys.RenamedSource(source, mapping)


class StabilitySingleFile(SD3Checkpoint):
    """A Stability single-file SD3 checkpoint, offering a PresetFolder's methods.

    Examples:
    ```python
    task = keras_diffusion.models.ImageToImage.from_preset(
        "./stable-diffusion-3.5-medium/sd3.5_medium.safetensors"
    )
    ```
    """

    def __init__(self, path, handle=None):
        path = os.fspath(path)
        self.handle = handle or path
        if os.path.isdir(path):
            found = _candidates(path)
            if len(found) != 1:
                names = [os.path.basename(f) for f in found]
                raise ValueError(
                    f"{self.handle}: the folder holds {len(found)} SD3 single-file "
                    f"checkpoints {names}; pass the one to load as the preset."
                )
            path = found[0]
        if path.endswith(PICKLE_SUFFIXES):
            raise ValueError(
                f"{self.handle} is a pickle checkpoint; keras_diffusion never "
                "unpickles files (they can run code). Use the .safetensors "
                "version of the checkpoint."
            )
        self.file = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.source = TensorSource.from_files(path)  # checks header and size
        keys = self.source.keys()
        for prefix, what in ((MMDIT_PREFIX, "MMDiT"), (VAE_PREFIX, "VAE")):
            if not any(k.startswith(prefix) for k in keys):
                raise ValueError(
                    f"{self.handle} is not a Stability SD3 checkpoint: it holds no "
                    f"{what} tensors ({prefix}*)."
                )
        known = (MMDIT_PREFIX, VAE_PREFIX) + tuple(p for p, _, _ in ENCODERS.values())
        unknown = sorted(k for k in keys if not k.startswith(known))
        if unknown:
            raise ValueError(
                f"{self.handle}: {len(unknown)} tensor(s) belong to no SD3 "
                f"component: {unknown[:10]}."
            )
        self.locations = {"mmdit": (path, MMDIT_PREFIX), "vae": (path, VAE_PREFIX)}
        self.encoders = {name: self._encoder(name) for name in ENCODERS}
        for name in ("clip_l", "clip_g"):
            if self.encoders[name] is None:
                prefix, files, _ = ENCODERS[name]
                raise FileNotFoundError(
                    f"{self.file} holds no {name} weights ({prefix}*), and no "
                    f"{files[0]}.safetensors was found in {self.folder} or its "
                    "text_encoders/ folder."
                )

    def _encoder(self, name):
        """The source of a text encoder: in the file, else a sibling file."""
        prefix, files, _ = ENCODERS[name]
        if any(k.startswith(prefix) for k in self.source.keys()):
            self.locations[name] = (self.file, prefix)
            return self.source.scoped(prefix)
        for folder in (self.folder, os.path.join(self.folder, "text_encoders")):
            for file in files:
                path = os.path.join(folder, f"{file}.safetensors")
                if os.path.isfile(path):
                    source = TensorSource.from_files(path)
                    if all(k.startswith(prefix) for k in source.keys()):
                        self.locations[name] = (path, prefix)
                        return source.scoped(prefix)
                    self.locations[name] = (path, "")
                    return source
        return None

    # -------------------------------------------------------------- backbone
    def _infer(self, name, function, source, *args):
        try:
            return function(source, *args)
        except (KeyError, ValueError) as e:
            path, prefix = self.locations[name]
            message = e.args[0] if isinstance(e, KeyError) else e
            raise ValueError(
                f"{self.handle}: cannot infer {name!r} from the tensors under "
                f"{prefix or 'the top level'!r} of {path}: {message}"
            ) from e

    def backbone_config(self):
        infer, encoders = stability_config, self.encoders
        mmdit = self._infer(
            "mmdit", infer.mmdit_kwargs, self.source.scoped(MMDIT_PREFIX)
        )
        vae = self._infer("vae", infer.vae_kwargs, self.source.scoped(VAE_PREFIX))
        factor = 2 ** (len(vae["block_channels"]) - 1)
        size = min(DEFAULT_SIZE, mmdit["position_size"] * mmdit["patch_size"] * factor)
        clip_l, clip_g = (
            self._infer(n, infer.clip_kwargs, encoders[n], ENCODERS[n][2])
            for n in ("clip_l", "clip_g")
        )
        t5 = encoders["t5"]
        return {
            "clip_l": clip_l,
            "clip_g": clip_g,
            "t5": None if t5 is None else self._infer("t5", infer.t5_kwargs, t5),
            "t5_sequence_length": 256,
            "mmdit": mmdit,
            "vae": vae,
            "scheduler_shift": 3.0,
            "height": size,
            "width": size,
        }

    def load_weights(self, backbone, progress=None):
        from keras_diffusion.converters.diffusers_folder import _PROGRESS

        progress = progress or _PROGRESS.get()
        mmdit = self.source.scoped(MMDIT_PREFIX)
        vae = self.source.scoped(VAE_PREFIX)
        keys = stability_keys
        renamed = keys.RenamedSource
        levels = keys.vae_levels(vae)
        encoders = self.encoders
        clip = transformers_text.load_clip_text_encoder
        steps = [
            ("clip_l", backbone.clip_l, clip, _clip_source(encoders["clip_l"])),
            ("clip_g", backbone.clip_g, clip, _clip_source(encoders["clip_g"])),
        ]
        if encoders["t5"] is not None and backbone.t5 is not None:
            t5 = transformers_text.load_t5_encoder
            steps.append(("t5", backbone.t5, t5, encoders["t5"]))
        steps += [
            (
                "mmdit",
                backbone.mmdit,
                diffusers_mmdit.load_mmdit,
                renamed(
                    mmdit,
                    stability_keys.mmdit_names(mmdit),
                    lambda n: _prefixed(MMDIT_PREFIX, keys.mmdit_reference_name(n)),
                ),
            ),
            (
                "vae",
                backbone.vae,
                diffusers_vae.load_vae,
                renamed(
                    vae,
                    stability_keys.vae_names(vae),
                    lambda n: _prefixed(VAE_PREFIX, keys.vae_reference_name(n, levels)),
                ),
            ),
        ]
        for name, layer, load, source in steps:
            try:
                load(layer, source)
            except (KeyError, ValueError) as e:
                path, prefix = self.locations[name]
                message = e.args[0] if isinstance(e, KeyError) else str(e)
                raise ValueError(
                    f"{self.handle}: cannot convert {name!r} from {path}: "
                    f"{source.explain(message, prefix)}"
                ) from e
            if progress is not None:
                progress(name)

    # ---------------------------------------------------------- preprocessor
    def has(self, name):
        return name == "preprocessor.json"

    def _tokenizer_roots(self):
        """The file's folder, then cached built-in repos (never downloaded)."""
        yield self.folder
        try:
            import huggingface_hub

            from keras_diffusion.presets import catalogue
        except ImportError:
            return
        patterns = [f"{d}/*" for d in TOKENIZERS.values()]
        for entry in catalogue.entries_for(None).values():
            for source in entry.get("sources", []):
                if not source.startswith("hf://"):
                    continue
                try:
                    yield huggingface_hub.snapshot_download(
                        source[len("hf://") :],
                        allow_patterns=patterns,
                        local_files_only=True,
                    )
                except Exception:  # not cached: the next one
                    continue

    def _tokenizer_root(self, needed):
        from keras_diffusion.models.stable_diffusion_3 import clip_tokenizer_files

        def complete(root):
            for name in needed:
                folder = os.path.join(root, TOKENIZERS[name])
                files = ("spiece.model", "tokenizer.json")
                if name != "t5":
                    files = ("tokenizer.json", "vocab.json")
                if not any(os.path.isfile(os.path.join(folder, f)) for f in files):
                    return False
                if name != "t5":
                    try:
                        clip_tokenizer_files.load_clip_tokenizer_files(folder)
                    except (OSError, ValueError):
                        return False
            return True

        for root in self._tokenizer_roots():
            if complete(root):
                return root
        folders = [TOKENIZERS[n] + "/" for n in needed]
        raise FileNotFoundError(
            f"{self.handle} has no tokenizers: a single-file checkpoint needs the "
            f"tokenizer folders {folders} (diffusers layout: CLIP vocab.json + "
            f"merges.txt, T5 spiece.model) next to it in {self.folder}, e.g. from "
            "hf://stabilityai/stable-diffusion-3.5-medium. None were there, and "
            "the local Hugging Face cache holds no built-in SD3 repository with "
            "them."
        )

    def load_preprocessor(self, expected_base=None):
        from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import (
            CLIPTokenizer,
        )
        from keras_diffusion.models.stable_diffusion_3.clip_tokenizer_files import (
            load_clip_tokenizer_files,
            read_pad_token,
        )
        from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_preprocessor import (  # noqa: E501
            StableDiffusion3Preprocessor,
        )

        needed = ["clip_l", "clip_g"] + (["t5"] if self.encoders["t5"] else [])
        root = self._tokenizer_root(needed)
        tokenizers = []
        for name in ("clip_l", "clip_g"):
            folder = os.path.join(root, TOKENIZERS[name])
            vocabulary, merges = load_clip_tokenizer_files(folder)
            pad = read_pad_token(folder)
            tokenizers.append(
                CLIPTokenizer(vocabulary, merges, sequence_length=77, pad_token=pad)
            )
        t5 = None
        if "t5" in needed:
            from keras_diffusion.models.stable_diffusion_3.t5_tokenizer import (
                T5Tokenizer,
            )

            folder = os.path.join(root, TOKENIZERS["t5"])
            for file in ("tokenizer.json", "spiece.model"):
                if os.path.isfile(os.path.join(folder, file)):
                    t5 = T5Tokenizer(os.path.join(folder, file), sequence_length=256)
                    break
        return StableDiffusion3Preprocessor(*tokenizers, t5)


def register():
    from keras_diffusion.presets.loader import register_format

    register_format("stability_single_file", is_single_file, StabilitySingleFile)
