"""Load a keras-hub Stable Diffusion 3 preset folder into our classes.

keras-hub's own SD3 presets (`kaggle://keras/stablediffusion3/...`,
`kaggle://keras/stablediffusion-3.5/...`) are folders with a `config.json`
whose `registered_name` is `keras_hub>StableDiffusion3Backbone`, weights in
`model.weights.h5` (or `model.weights.json` + shards), a `task.json` /
`preprocessor.json` and the CLIP BPE files under `assets/tokenizer/`.
`KerasHubPreset` reads them as data only (JSON and HDF5; no keras-hub code is
imported and nothing from the preset is executed), maps the config to our
`StableDiffusion3Backbone` arguments and the weights onto our variables
(see `keras_hub_weights`), and offers the methods of a `PresetFolder`, so
`from_preset` loads such a folder, or a `kaggle://` handle of one.

What keras-hub computes is reproduced exactly where our classes have the
option: its no-T5 context has `clip_l.max_sequence_length` (77) zero T5
tokens (`t5_sequence_length=77`), its CLIP pooling at argmax(ids) is pooling
at the end token `vocabulary_size - 1`, its 2-chunk AdaLN (shift, scale) is
reordered. What is left: keras-hub's CLIP final layer norm has epsilon 1e-6
where ours uses the blocks' 1e-5 (it only touches the pooled embedding), and
keras-hub computes the sigma schedule in float32 where we follow diffusers
in float64. keras-hub presets with a T5 encoder are refused (keras-hub ships
none).

Examples:

>>> clip = {"vocabulary_size": 1000, "embedding_dim": 32, "hidden_dim": 32,
...         "num_layers": 2, "num_heads": 4, "intermediate_dim": 37,
...         "intermediate_activation": "quick_gelu",
...         "intermediate_output_index": 0, "max_sequence_length": 77}
>>> kwargs = clip_kwargs(clip)
>>> kwargs["hidden_state_index"], kwargs["end_token_id"], kwargs["projection_dim"]
(1, 999, 32)
"""

import os
import re

from keras_diffusion.converters import diffusers_mmdit, diffusers_vae, transformers_text
from keras_diffusion.converters import keras_hub_weights as khw
from keras_diffusion.converters.sd3_checkpoint import SD3Checkpoint
from keras_diffusion.utils.python_utils import read_json

BACKBONE = "keras_hub>StableDiffusion3Backbone"
PREPROCESSOR = "keras_hub>StableDiffusion3TextToImagePreprocessor"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
CONTEXT_DIM_WITHOUT_T5 = 4096  # keras-hub pads the CLIP context to this width
_ASSET_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _read_json(path):
    return read_json(path, f"Corrupt keras-hub preset file {path}")


def is_keras_hub_preset(path):
    """True for a folder whose `config.json` is a keras-hub SD3 backbone."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return False
    try:
        return _read_json(config).get("registered_name") == BACKBONE
    except (OSError, ValueError, AttributeError):
        return False


def clip_kwargs(config):
    """`CLIPTextEncoder` arguments from a keras-hub `CLIPTextEncoder` config."""
    layers = int(config["num_layers"])
    index = config.get("intermediate_output_index")
    if index is None:
        raise ValueError("SD3 needs the CLIP encoders' intermediate_output_index.")
    index = int(index) + (layers if int(index) < 0 else 0)
    if config["embedding_dim"] != config["hidden_dim"]:
        raise ValueError("keras-hub CLIP with embedding_dim != hidden_dim.")
    vocabulary_size = int(config["vocabulary_size"])
    return {
        "embedding_dim": int(config["hidden_dim"]),
        "num_layers": layers,
        "num_heads": int(config["num_heads"]),
        "intermediate_dim": int(config["intermediate_dim"]),
        "intermediate_activation": config.get("intermediate_activation", "quick_gelu"),
        # keras-hub's SD3 projection is square, without bias.
        "projection_dim": int(config["hidden_dim"]),
        "vocabulary_size": vocabulary_size,
        "max_sequence_length": int(config.get("max_sequence_length", 77)),
        # keras-hub pools at argmax(ids): the end token, CLIP's largest id.
        "end_token_id": vocabulary_size - 1,
        "layer_norm_epsilon": 1e-5,
        # keras-hub counts block outputs from 0; transformers' hidden states
        # start with the embeddings.
        "hidden_state_index": index + 1,
    }


def vae_kwargs(config, latent_channels):
    """`VAE` arguments from a keras-hub `VAEBackbone` config."""
    encoder = [int(c) for c in config["encoder_num_filters"]]
    decoder = [int(c) for c in config["decoder_num_filters"]]
    encoder_blocks = set(config["encoder_num_blocks"])
    decoder_blocks = set(config["decoder_num_blocks"])
    if decoder != encoder[::-1] or len(encoder_blocks) != 1 or len(decoder_blocks) != 1:
        raise ValueError(
            "Unsupported keras-hub VAE: decoder filters must mirror the encoder's "
            f"and each side have one block count; got {config}."
        )
    if int(config.get("sample_channels", 32)) != 2 * latent_channels:
        raise ValueError("The keras-hub VAE's sample_channels != 2 * latent_channels.")
    if (
        int(config.get("input_channels", 3)) != 3
        or int(config.get("output_channels", 3)) != 3
    ):
        raise ValueError("Only 3-channel keras-hub VAEs are supported.")
    return {
        "block_channels": tuple(encoder),
        "encoder_layers_per_block": encoder_blocks.pop(),
        "decoder_layers_per_block": decoder_blocks.pop(),
        "latent_channels": latent_channels,
        "norm_groups": 32,  # fixed in keras-hub
        "norm_epsilon": 1e-6,
        "scaling_factor": float(config.get("scale", 1.5305)),
        "shift_factor": float(config.get("shift", 0.0609)),
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def backbone_kwargs(config):
    """`StableDiffusion3Backbone` arguments from keras-hub's backbone config."""
    config = config["config"]
    if config.get("t5") is not None:
        raise ValueError(
            "This keras-hub SD3 preset has a T5 encoder; converting keras-hub's T5 "
            "is not supported (keras-hub's own SD3 presets have none)."
        )
    if int(config.get("num_train_timesteps", 1000)) != 1000:
        raise ValueError("Only num_train_timesteps=1000 is supported.")
    clip_l = clip_kwargs(config["clip_l"]["config"])
    clip_g = clip_kwargs(config["clip_g"]["config"])
    latent_channels = int(config.get("latent_channels", 16))
    height, width = (int(s) for s in config.get("image_shape", (1024, 1024, 3))[:2])
    return {
        "clip_l": clip_l,
        "clip_g": clip_g,
        "t5": None,
        # Without T5, keras-hub appends clip_l.max_sequence_length zero tokens.
        "t5_sequence_length": clip_l["max_sequence_length"],
        "mmdit": {
            "hidden_dim": int(config["mmdit_hidden_dim"]),
            "num_layers": int(config["mmdit_num_layers"]),
            "num_heads": int(config["mmdit_num_heads"]),
            "position_size": int(config["mmdit_position_size"]),
            "patch_size": int(config["mmdit_patch_size"]),
            "latent_channels": latent_channels,
            "context_dim": CONTEXT_DIM_WITHOUT_T5,
            "pooled_dim": clip_l["embedding_dim"] + clip_g["embedding_dim"],
            "qk_norm": config.get("mmdit_qk_norm"),
            "dual_attention_layers": tuple(
                config.get("mmdit_dual_attention_indices") or ()
            ),
        },
        "vae": vae_kwargs(config["vae"]["config"], latent_channels),
        "scheduler_shift": float(config.get("shift", 3.0)),
        "height": height,
        "width": width,
    }


def _numbered(names, base):
    """`base`, `base_1`, ... present in `names`, in Keras' numbering order."""
    pattern = re.compile(rf"^{base}(?:_(\d+))?$")
    found = [(int(m.group(1) or 0), n) for n in names if (m := pattern.match(n))]
    return [n for _, n in sorted(found)]


def _pick(weights, groups, template, shapes, what):
    """Match groups to the shapes of `template.format(group)`, in Keras order."""
    if len(groups) != len(shapes):
        raise ValueError(f"Expected {len(shapes)} {what}; the weights have {groups}.")
    remaining, chosen = list(groups), []
    for shape in shapes:
        match = [g for g in remaining if weights.shape(template.format(g)) == shape]
        if not match:
            raise ValueError(f"No {what} with weights of shape {shape} in {remaining}.")
        chosen.append(match[0])
        remaining.remove(match[0])
    return chosen


class KerasHubPreset(SD3Checkpoint):
    """A keras-hub SD3 preset folder, offering the methods of a PresetFolder.

    `from_preset` opens a folder with it when `is_keras_hub_preset` accepts
    the folder (a local path or a downloaded `kaggle://` handle).

    Examples:
    ```python
    task = keras_diffusion.models.ImageToImage.from_preset(
        "kaggle://keras/stablediffusion-3.5/keras/stable_diffusion_3.5_medium/1"
    )
    ```
    """

    def __init__(self, path, handle=None):
        self.path = os.fspath(path)
        self.handle = handle or self.path
        self.config = _read_json(os.path.join(self.path, "config.json"))
        self.kwargs = backbone_kwargs(self.config)

    def backbone_config(self):
        return self.kwargs

    def _weights(self):
        for name in (SHARDED_WEIGHTS_FILE, WEIGHTS_FILE):
            path = os.path.join(self.path, name)
            if os.path.isfile(path):
                return khw.KerasWeights(path)
        raise FileNotFoundError(
            f"keras-hub preset {self.handle!r} has neither {WEIGHTS_FILE!r} nor "
            f"{SHARDED_WEIGHTS_FILE!r}."
        )

    def weight_sources(self, weights):
        """Each component's keras-hub weights as transformers / diffusers tensors.

        Returns `{"clip_l", "clip_g", "mmdit", "vae"}` -> a lazy mapping from
        a transformers / diffusers tensor name to its array (torch layout).
        """
        top = weights.groups("layers/")
        clip = [self.kwargs["clip_l"], self.kwargs["clip_g"]]
        # Keras names the two CLIP encoders (and projections) by class and
        # order; their widths tell them apart where they differ.
        encoders = _pick(
            weights,
            _numbered(top, "clip_text_encoder"),
            "layers/{}/layers/token_and_position_embedding/token_embedding/vars/0",
            [(c["vocabulary_size"], c["embedding_dim"]) for c in clip],
            "CLIP text encoders",
        )
        projections = _pick(
            weights,
            _numbered(top, "clip_projection"),
            "layers/{}/dense/vars/0",
            [(c["embedding_dim"],) * 2 for c in clip],
            "CLIP projections",
        )
        mmdit, root = self.kwargs["mmdit"], "layers/mm_di_t"
        d, p = mmdit["hidden_dim"], mmdit["patch_size"]
        context, output = _pick(
            weights,
            _numbered(weights.groups(f"{root}/layers/"), "dense"),
            root + "/layers/{}/vars/0",
            [(mmdit["context_dim"], d), (d, p * p * mmdit["latent_channels"])],
            "MMDiT dense layers",
        )
        vae = self.kwargs["vae"]
        levels = len(vae["block_channels"])
        encoder_blocks = [vae["encoder_layers_per_block"]] * levels
        decoder_blocks = [vae["decoder_layers_per_block"]] * levels
        sources = {
            name: khw.clip_source(
                weights, f"layers/{e}", f"layers/{q}", c["num_layers"]
            )
            for name, e, q, c in zip(("clip_l", "clip_g"), encoders, projections, clip)
        }
        sources["mmdit"] = khw.mmdit_source(
            weights,
            root,
            mmdit["num_layers"],
            mmdit["dual_attention_layers"],
            context,
            output,
        )
        vae_roots = ("layers/vae_encoder", "layers/vae_decoder")
        sources["vae"] = khw.vae_source(
            weights, *vae_roots, encoder_blocks, decoder_blocks
        )
        return sources

    def load_weights(self, backbone, progress=None):
        weights = self._weights()
        sources = self.weight_sources(weights)
        load_clip = transformers_text.load_clip_text_encoder
        steps = [
            (backbone.clip_l, load_clip, sources["clip_l"]),
            (backbone.clip_g, load_clip, sources["clip_g"]),
            (backbone.mmdit, diffusers_mmdit.load_mmdit, sources["mmdit"]),
            (backbone.vae, diffusers_vae.load_vae, sources["vae"]),
        ]
        for layer, load, source in steps:
            try:
                load(layer, source)
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"{self.handle}: cannot convert keras-hub weights into "
                    f"{layer.name!r}: {e}"
                ) from e
        unused = weights.unused()
        if unused:
            raise ValueError(
                f"{self.handle}: {len(unused)} keras-hub weight(s) were not used: "
                f"{unused[:20]}."
            )

    # ---------------------------------------------------------- preprocessor
    def has(self, name):
        return name == "preprocessor.json"

    def _tokenizer_configs(self):
        """(clip_l, clip_g) CLIP preprocessor configs, from task.json first.

        keras-hub's `save_to_preset` writes the SD3 preprocessor into
        `task.json`; its `preprocessor.json` may hold only a CLIP one.
        """
        for name in ("task.json", "preprocessor.json"):
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                continue
            config = _read_json(path)
            if name == "task.json":
                config = (config.get("config") or {}).get("preprocessor") or {}
            if config.get("registered_name") == PREPROCESSOR:
                inner = config["config"]
                return [
                    inner[f"{n}_preprocessor"]["config"] for n in ("clip_l", "clip_g")
                ]
        # keras-hub's SD3 defaults: CLIP-L pads with the end token, CLIP-G with 0.
        return [
            {"sequence_length": 77, "tokenizer": {"config": {"pad_with_end_token": p}}}
            for p in (True, False)
        ]

    def load_preprocessor(self, expected_base=None):
        from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import (
            CLIPTokenizer,
        )
        from keras_diffusion.models.stable_diffusion_3.clip_tokenizer_files import (
            END_TOKEN,
        )
        from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_preprocessor import (  # noqa: E501
            StableDiffusion3Preprocessor,
        )

        tokenizers = []
        for config in self._tokenizer_configs():
            tokenizer = config["tokenizer"]["config"]
            unsupported = {
                k: config.get(k)
                for k in ("add_start_token", "add_end_token", "to_lower")
                if config.get(k, True) is not True
            }
            if tokenizer.get("add_prefix_space"):
                unsupported["add_prefix_space"] = True
            if unsupported:
                raise ValueError(
                    f"{self.handle}: unsupported CLIP options {unsupported}."
                )
            folder = tokenizer.get("config_file", "tokenizer.json").split(".")[0]
            if not _ASSET_DIR.match(folder):
                raise ValueError(f"{self.handle}: invalid tokenizer folder {folder!r}.")
            assets = os.path.join(self.path, "assets", folder)
            vocabulary = _read_json(os.path.join(assets, "vocabulary.json"))
            by_id = {i: t for t, i in vocabulary.items()}
            # keras-hub pads with id 0 unless `pad_with_end_token`.
            pad = END_TOKEN if tokenizer.get("pad_with_end_token") else by_id.get(0)
            tokenizers.append(
                CLIPTokenizer(
                    vocabulary,
                    os.path.join(assets, "merges.txt"),
                    sequence_length=int(config.get("sequence_length") or 77),
                    pad_token=pad,
                )
            )
        return StableDiffusion3Preprocessor(*tokenizers)


def register():
    from keras_diffusion.presets.loader import register_format

    register_format("keras_hub", is_keras_hub_preset, KerasHubPreset)
