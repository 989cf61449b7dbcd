"""Registration: after ``import llava_next_plugin`` transformers' Auto classes give ours for llava_next only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import checkpoints
import pytest
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoProcessor,
)
from transformers.models.auto import configuration_auto, processing_auto

import llava_next_plugin
from llava_next_plugin import registration

OURS = "llava_next_plugin."


def module_of(obj) -> str:
    return (obj if isinstance(obj, type) else type(obj)).__module__


def is_ours(obj) -> bool:
    return module_of(obj).startswith(OURS)


def is_transformers(obj) -> bool:
    return module_of(obj).startswith("transformers.")


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def our_config(folder):
    return AutoConfig.from_pretrained(folder)


AUTO_MODEL_TABLES = registration.auto_model_classes_for_llava_next()


def test_every_auto_model_class_that_maps_llava_next_is_covered():
    found = {auto_class for auto_class, _ in AUTO_MODEL_TABLES}
    assert {AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining} <= found
    vision2seq = getattr(transformers, "AutoModelForVision2Seq", None)
    if vision2seq is not None and "llava_next" in vision2seq._model_mapping._model_mapping:
        assert vision2seq in found or any(a._model_mapping is vision2seq._model_mapping for a in found)


def test_auto_config_gives_ours(folder, our_config):
    assert module_of(our_config) == "llava_next_plugin.configuration"
    assert module_of(AutoConfig.for_model("llava_next")) == "llava_next_plugin.configuration"
    assert module_of(configuration_auto.CONFIG_MAPPING["llava_next"]) == "llava_next_plugin.configuration"


def test_keywords_named_like_derived_facts_are_handed_back_unused_as_by_the_reference(folder):
    """transformers' generic loaders pass a processor's ``patch_size`` / ``num_additional_image_tokens`` down to
    ``AutoConfig``; its config has no such attributes and returns them unused. Ours derives them from the
    towers (read-only): it must neither fail on them nor take them."""
    from transformers.models.llava_next import LlavaNextConfig as Reference

    extra = {"patch_size": 3, "num_additional_image_tokens": 0}
    ours, unused = transformers.AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **extra)
    assert is_ours(ours) and unused == extra
    assert (ours.patch_size, ours.num_additional_image_tokens) != (3, 0)
    _, reference_unused = Reference.from_pretrained(folder, return_unused_kwargs=True, **extra)
    assert reference_unused == extra


def test_a_config_file_or_assignment_naming_a_derived_fact_loads_and_the_towers_value_stands(folder, tmp_path, caplog):
    """A ``config.json`` with ``patch_size`` (or ``tile_size``...), as transformers' config takes any key: it loads
    (it failed: a property without a setter) and the value derived from the towers stands; one that disagrees
    with the towers is named in a warning."""
    import json
    import shutil

    from llava_next_plugin.configuration import LlavaNextConfig

    shutil.copytree(folder, tmp_path / "edited")
    path = tmp_path / "edited" / "config.json"
    values = json.loads(path.read_text())
    derived = LlavaNextConfig.from_pretrained(folder)
    values.update(patch_size=derived.patch_size + 1, tile_size=derived.tile_size, num_additional_image_tokens=5)
    path.write_text(json.dumps(values))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "edited")
    assert is_ours(loaded)
    assert (loaded.patch_size, loaded.tile_size) == (derived.patch_size, derived.tile_size)
    assert loaded.num_additional_image_tokens == derived.num_additional_image_tokens
    assert is_ours(transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "edited"))
    with caplog.at_level("WARNING", logger="llava_next_plugin.configuration"):
        caplog.clear()
        loaded.patch_size = derived.patch_size  # agrees: silent
        assert not caplog.records
        loaded.patch_size = 99
    assert loaded.patch_size == derived.patch_size
    assert f"patch_size is {derived.patch_size!r}" in caplog.text and "the 99 given is ignored" in caplog.text
    assert LlavaNextConfig(patch_size=7).patch_size == LlavaNextConfig().patch_size


@pytest.mark.parametrize("auto_class, class_name", AUTO_MODEL_TABLES, ids=[a.__name__ for a, _ in AUTO_MODEL_TABLES])
def test_auto_model_classes_give_ours(auto_class, class_name, folder, our_config):
    from_config = auto_class.from_config(our_config)
    assert module_of(from_config) == "llava_next_plugin.modeling"
    assert type(from_config).__name__ == class_name
    from_pretrained = auto_class.from_pretrained(folder)
    assert module_of(from_pretrained) == "llava_next_plugin.modeling"
    assert type(from_pretrained).__name__ == class_name


def test_auto_processor_gives_ours(folder):
    processor = AutoProcessor.from_pretrained(folder)
    assert module_of(processor) == "llava_next_plugin.processing"
    assert module_of(processor.image_processor) == "llava_next_plugin.image_processing_fast"


def test_auto_processor_without_processor_class_uses_the_config(folder, tmp_path):
    """A folder naming no processor class resolves through the model type: ours too."""
    copy = shutil.copytree(folder, tmp_path / "ckpt")
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((copy / name).read_text())
        data.pop("processor_class", None)
        (copy / name).write_text(json.dumps(data))
    assert module_of(AutoProcessor.from_pretrained(str(copy))) == "llava_next_plugin.processing"


@pytest.mark.parametrize(
    "kwargs, module",
    [
        ({}, "image_processing_fast"),
        ({"backend": "torchvision"}, "image_processing_fast"),
        ({"use_fast": True}, "image_processing_fast"),
        ({"backend": "pil"}, "image_processing"),
        ({"use_fast": False}, "image_processing"),
    ],
)
def test_auto_image_processor_gives_ours(folder, kwargs, module):
    assert module_of(AutoImageProcessor.from_pretrained(folder, **kwargs)) == f"llava_next_plugin.{module}"


def test_auto_image_processor_reads_the_older_layout(folder, tmp_path):
    """llava-hf's hub folders keep the image processor in preprocessor_config.json."""
    processor = AutoProcessor.from_pretrained(folder)
    processor.save_pretrained(tmp_path, layout="separate")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    image_processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert module_of(image_processor) == "llava_next_plugin.image_processing_fast"
    assert image_processor.image_grid_pinpoints == checkpoints.TINY_PINPOINTS


def test_default_is_our_fast_processor_without_torchvision(folder):
    """transformers falls back to PIL without torchvision; our torch processor needs none."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torchvision"] = None  # as if torchvision were not installed
        import llava_next_plugin
        from transformers import AutoImageProcessor
        from transformers.utils import is_torchvision_available
        assert not is_torchvision_available()
        print(type(AutoImageProcessor.from_pretrained({folder!r})).__module__)
        with llava_next_plugin.use_transformers_builtins():
            print(type(AutoImageProcessor.from_pretrained({folder!r})).__name__)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, builtin = result.stdout.split()[-2:]
    assert ours == "llava_next_plugin.image_processing_fast"
    assert builtin == "LlavaNextImageProcessorPil"


# --- idempotency and the way back ----------------------------------------------------------------
def snapshot():
    """Everything registration changes, by identity."""
    our_config_class = llava_next_plugin.LlavaNextConfig
    return (
        configuration_auto.CONFIG_MAPPING._extra_content.get("llava_next"),
        tuple(auto._model_mapping._extra_content.get(our_config_class) for auto, _ in AUTO_MODEL_TABLES),
        processing_auto.PROCESSOR_MAPPING._extra_content.get(llava_next_plugin.LlavaNextConfig),
        processing_auto.processor_class_from_name,
        AutoImageProcessor.__dict__["from_pretrained"],
    )


def test_register_is_idempotent():
    assert registration.is_registered()
    before = snapshot()
    registration.register()
    import importlib

    importlib.reload(importlib.import_module("llava_next_plugin"))  # a second import-time register()
    assert snapshot() == before
    # One unregister undoes it all: nothing was stacked twice.
    registration.unregister()
    try:
        assert not hasattr(processing_auto.processor_class_from_name, "__wrapped__")
        assert not hasattr(AutoImageProcessor.__dict__["from_pretrained"].__func__, "__wrapped__")
        assert "llava_next" not in configuration_auto.CONFIG_MAPPING._extra_content
    finally:
        registration.register()
    assert registration.is_registered()


def test_use_transformers_builtins_restores_and_reapplies(folder, our_config):
    builtin_config_class = transformers.LlavaNextConfig
    with llava_next_plugin.use_transformers_builtins():
        assert not registration.is_registered()
        config = AutoConfig.from_pretrained(folder)
        assert type(config) is builtin_config_class
        assert is_transformers(AutoModelForImageTextToText.from_config(config))
        assert is_transformers(AutoModel.from_pretrained(folder))
        # Our config class is not in any table now: transformers resolves it by name, to its own model.
        assert is_transformers(AutoModelForImageTextToText.from_config(our_config))
        processor = AutoProcessor.from_pretrained(folder)
        assert is_transformers(processor) and is_transformers(processor.image_processor)
        assert is_transformers(AutoImageProcessor.from_pretrained(folder))
    assert registration.is_registered()
    assert is_ours(AutoConfig.from_pretrained(folder))
    assert is_ours(AutoImageProcessor.from_pretrained(folder))
    assert is_ours(AutoProcessor.from_pretrained(folder))


def test_use_transformers_builtins_reapplies_after_an_error_and_nests():
    with pytest.raises(RuntimeError):
        with llava_next_plugin.use_transformers_builtins():
            raise RuntimeError("boom")
    assert registration.is_registered()
    with llava_next_plugin.use_transformers_builtins():
        with llava_next_plugin.use_transformers_builtins():
            pass
        assert not registration.is_registered()  # the outer block still wants the built-ins
    assert registration.is_registered()


# --- other model types untouched -----------------------------------------------------------------
OTHER_MODEL_TYPES = ["llava", "llava_next_video", "clip", "clip_vision_model", "siglip", "mistral", "llama"]


@pytest.mark.parametrize("model_type", OTHER_MODEL_TYPES)
def test_other_configs_untouched(model_type):
    assert is_transformers(AutoConfig.for_model(model_type))


def test_other_models_untouched():
    mistral = checkpoints.text_config("mistral", width=32, layers=1)
    assert is_transformers(AutoModelForCausalLM.from_config(mistral))
    assert is_transformers(AutoModel.from_config(checkpoints.vision_config("clip", layers=1)))
    llava = transformers.LlavaConfig(
        vision_config=checkpoints.vision_config("clip", layers=1), text_config=mistral, image_token_index=32000
    )
    assert is_transformers(AutoModelForImageTextToText.from_config(llava))


def test_a_transformers_llava_next_config_keeps_transformers_model():
    """Passing transformers' own config object explicitly asks for transformers' model."""
    config = checkpoints.reference_config(width=32)
    assert is_transformers(AutoModelForImageTextToText.from_config(config))


def test_other_image_processors_untouched(folder, tmp_path):
    """llava_next_video folders also say "LlavaNextImageProcessor": they keep transformers' class."""
    video = tmp_path / "video"
    transformers.LlavaNextImageProcessor().save_pretrained(video)
    transformers.LlavaNextVideoConfig().save_pretrained(video)
    assert module_of(AutoImageProcessor.from_pretrained(str(video))).startswith("transformers.models.llava_next")
    clip = tmp_path / "clip"
    transformers.CLIPImageProcessor().save_pretrained(clip)
    assert is_transformers(AutoImageProcessor.from_pretrained(str(clip)))


def test_other_processors_untouched(folder, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    llava = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(), tokenizer=tokenizer, patch_size=8
    )
    llava.save_pretrained(tmp_path)
    assert type(AutoProcessor.from_pretrained(str(tmp_path))) is transformers.LlavaProcessor


# --- the public API ------------------------------------------------------------------------------
def test_public_names_resolve():
    from llava_next_plugin import configuration, image_processing, image_processing_fast, modeling, processing

    assert llava_next_plugin.LlavaNextConfig is configuration.LlavaNextConfig
    assert llava_next_plugin.LlavaNextProcessor is processing.LlavaNextProcessor
    assert llava_next_plugin.LlavaNextImageProcessor is image_processing.LlavaNextImageProcessor
    assert llava_next_plugin.LlavaNextImageProcessorFast is image_processing_fast.LlavaNextImageProcessorFast
    assert llava_next_plugin.LlavaNextModel is modeling.LlavaNextModel
    assert llava_next_plugin.LlavaNextForConditionalGeneration is modeling.LlavaNextForConditionalGeneration
    assert llava_next_plugin.AttentionMaskVisualizer.__module__ == "llava_next_plugin.visualizer"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = llava_next_plugin.Nope


def test_routing_a_pipeline_reads_a_checkpoints_model_type_without_running_its_remote_code(tmp_path):
    """The image-to-text route asks each checkpoint's type; a remote-code checkpoint must not have its code run
    (nor be asked whether to run it: that prompt blocked on stdin) just to learn it is not ours."""
    from llava_next_plugin.registration import _model_type_of

    marker = tmp_path / "ran"
    (tmp_path / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = {"model_type": "mycustom", "auto_map": {"AutoConfig": "custom.MyConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _model_type_of(str(tmp_path)) == "mycustom"
    assert not marker.exists()
    (tmp_path / "config.json").write_text("[1, 2]")  # JSON, but no config
    assert _model_type_of(str(tmp_path)) is None
