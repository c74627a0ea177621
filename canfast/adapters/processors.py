"""Processors of vision-language checkpoints, loaded on a machine without torchvision.

transformers builds every processor with its torchvision image processor and a video processor
when torchvision is installed. Without it, ``AutoProcessor`` fails for several families canfast
supports: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and SmolVLM ask for a
video processor, which needs torchvision, and Mistral 3's ``PixtralProcessor`` does not import at
all. canfast never feeds videos, so without torchvision a processor is built here from the
checkpoint's own files with the PIL image processor and no video processor; with torchvision,
``AutoProcessor`` is used as is.
"""

from __future__ import annotations

import importlib.util
import inspect
import json

from canfast.errors import BadInput

__all__ = ["load_processor", "processor_class_name", "torchvision_available"]

# Files of a checkpoint that may name its processor class, the most specific first.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
VIDEO = "video_processor"


def _torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def torchvision_available() -> bool:
    """Whether transformers can use torchvision here. One that is installed but does not import
    (a build for another torch) is bad input: transformers would still reach for it."""
    if not _torchvision_installed():
        return False
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a wheel built for another torch fails in many ways
        import torch

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(
            f"torchvision is installed but does not import beside torch {torch.__version__} "
            f"({first}); uninstall it (canfast loads processors without it) or install the "
            "build made for this torch"
        ) from None
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


def _processor_fields(name: str) -> dict:
    """The fields of the first of the checkpoint's files that names its processor (a class, or
    remote code for ``AutoProcessor``); empty when none does."""
    from transformers.utils import cached_file

    for filename in PROCESSOR_FILES:
        try:
            path = cached_file(
                name,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError):
            path = None
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                fields = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(fields, dict):
            continue
        auto_map = fields.get("auto_map")
        if isinstance(fields.get("processor_class"), str) or (
            isinstance(auto_map, dict) and "AutoProcessor" in auto_map
        ):
            return fields
    return {}


def processor_class_name(name: str, model_type: str) -> str | None:
    """The processor class a checkpoint names in its files, else the one transformers maps its
    model type to; None when neither says."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    named = _processor_fields(name).get("processor_class")
    return named if isinstance(named, str) else PROCESSOR_MAPPING_NAMES.get(model_type)


def load_processor(name: str, model_type: str, trust_remote_code: bool = False):
    """The processor of checkpoint ``name`` (a local directory or a Hub id, cached or not).

    Without torchvision, a processor that takes a video processor is built without one and with
    the PIL image processor, and Pixtral's processor is replaced by :class:`PixtralProcessorPil`;
    a processor that cannot work without torchvision at all is bad input naming it.
    """
    from transformers import AutoProcessor

    if torchvision_available():
        return AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    auto_map = _processor_fields(name).get("auto_map")
    if trust_remote_code and isinstance(auto_map, dict) and "AutoProcessor" in auto_map:
        # The checkpoint's own code is trusted and builds its processor.
        return AutoProcessor.from_pretrained(name, trust_remote_code=True)
    class_name = processor_class_name(name, model_type)
    processor_class = _known_class(class_name)
    if processor_class is None:
        # Remote code, or a class transformers does not have: leave it to AutoProcessor.
        return AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    processor_class = without_video(processor_class)
    try:
        return processor_class.from_pretrained(name)
    except ImportError as exc:
        raise BadInput(
            f"the processor of {name!r} ({class_name}) needs a package that is not installed: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from None


def _known_class(class_name: str | None):
    """The transformers processor class called ``class_name``, the PIL stand-in for Pixtral's;
    None for a name transformers does not have. A class transformers only has as a placeholder
    (it needs torchvision) is bad input."""
    import transformers
    from transformers import ProcessorMixin

    if class_name is None:
        return None
    if class_name in ("PixtralProcessor", "PixtralProcessorPil"):
        return PixtralProcessorPil
    try:
        found = getattr(transformers, class_name)
    except (AttributeError, ImportError, RuntimeError):
        return None
    if not (isinstance(found, type) and issubclass(found, ProcessorMixin)):
        raise BadInput(
            f"processor {class_name} needs torchvision, which is not installed (or does not "
            "import beside this torch)"
        )
    return found


def without_video(processor_class):
    """``processor_class`` built and saved without its video processor (itself if it takes
    none). Give the constructor ``video_processor=None`` where it requires the argument.

    Its attributes leave the video processor out, so transformers neither loads one (it needs
    torchvision) nor checks or saves it; the constructor gets None in its place. Only processors
    whose video processor is the last of their sub-processors in the constructor qualify, which
    is the case of every family canfast supports.
    """
    attributes = processor_class.get_attributes()
    if VIDEO not in attributes:
        return processor_class
    parameters = list(inspect.signature(processor_class.__init__).parameters)[1:]
    if attributes[-1:] != [VIDEO] or parameters[: len(attributes)] != attributes:
        raise BadInput(
            f"processor {processor_class.__name__} takes a video processor that canfast cannot "
            "leave out without torchvision; install torchvision"
        )

    class ImageOnly(processor_class):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != VIDEO]

        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):
            processor_dict = {k: v for k, v in processor_dict.items() if k != VIDEO}
            return super().from_args_and_dict([*args, None], processor_dict, **kwargs)

    ImageOnly.__name__ = processor_class.__name__
    ImageOnly.__qualname__ = processor_class.__qualname__
    ImageOnly.__doc__ = f"{processor_class.__name__} without its video processor."
    return ImageOnly


def _pixtral_base():
    from transformers import ProcessorMixin

    return ProcessorMixin


class PixtralProcessorPil(_pixtral_base()):
    """Mistral 3's image-and-text processor for a machine without torchvision.

    Reads the same saved configuration as transformers' ``PixtralProcessor`` (whose module
    imports torchvision). An image placeholder of the text becomes the image's grid of merged
    patches, one ``image_token`` each, every row closed by ``image_break_token`` and the last one
    by ``image_end_token``: the layout the model's vision tower produces features for.
    """

    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **kwargs,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        ids = tokenizer.convert_tokens_to_ids([image_token, image_break_token, image_end_token])
        self.image_token_id, self.image_break_token_id, self.image_end_token_id = ids

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    @property
    def _token_step(self) -> int:
        """Pixels per image token along each side: a patch, merged ``spatial_merge_size``-fold."""
        return self.patch_size * self.spatial_merge_size

    def _process_images(self, images, **images_kwargs):
        # Resized to a whole number of merged patches, so that the grid below is exact.
        images_kwargs["patch_size"] = self._token_step
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        rows, columns = height // self._token_step, width // self._token_step
        row = self.image_token * columns
        return self.image_break_token.join([row] * rows) + self.image_end_token

    def to_dict(self) -> dict:
        # Saved under transformers' name, so that a machine with torchvision loads it too.
        return {**super().to_dict(), "processor_class": "PixtralProcessor"}

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        return [*names, "image_sizes"]
