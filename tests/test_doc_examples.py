"""The LLaVA-NeXT model doc's examples, run as written.

Each snippet below is the doc's text verbatim. :func:`adapt` applies the only changes allowed, and
nothing else: ``import llava_next_plugin`` (and ``import torch``) at the top, the model id -> a local
checkpoint, ``"cuda"`` -> ``"cpu"``, the internet image -> a local image, and ``LlavaNextProcessor`` /
``LlavaNextForConditionalGeneration`` imported from our package.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from PIL import Image, ImageDraw

HUB_ID = "llava-hf/llava-v1.6-mistral-7b-hf"

DOC_PIPELINE = """
from transformers import pipeline
from PIL import Image
import requests

pipe = pipeline("image-to-text", model="llava-hf/llava-v1.6-mistral-7b-hf", device="cuda")
image = Image.open(requests.get("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/model_doc/llava_next_ocr.png", stream=True).raw)

result = pipe(image, prompt="What does this chart show?")
print(result[0]["generated_text"])
"""  # noqa: E501 (the doc's text verbatim, with its long image URL)

DOC_AUTOMODEL = """
from transformers import LlavaNextProcessor, LlavaNextForConditionalGeneration
from PIL import Image
import requests, torch

processor = LlavaNextProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
model = LlavaNextForConditionalGeneration.from_pretrained(
    "llava-hf/llava-v1.6-mistral-7b-hf", torch_dtype=torch.float16
).to("cuda")

image = Image.open(requests.get(
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/model_doc/llava_next_ocr.png", stream=True).raw)

conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does this chart show?"}]}
]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(image, prompt, return_tensors="pt").to("cuda")

output = model.generate(**inputs, max_new_tokens=100)
print(processor.decode(output[0], skip_special_tokens=True))
"""  # noqa: E501 (the doc's text verbatim, with its long image URL)

DOC_BITSANDBYTES = """
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

quant_config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_compute_dtype=torch.float16,
    bnb_4bit_quant_type="nf4"
)

model = AutoModelForImageTextToText.from_pretrained(
    "llava-hf/llava-v1.6-mistral-7b-hf",
    quantization_config=quant_config,
    device_map="auto"
)
processor = AutoProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
"""

DOC_VISUALIZER = """
from transformers.utils.attention_visualizer import AttentionMaskVisualizer

viz = AttentionMaskVisualizer("llava-hf/llava-v1.6-mistral-7b-hf")
viz("<image> What is shown in this image?")
"""

_INTERNET_IMAGE = re.compile(r'Image\.open\(requests\.get\(\s*"https://[^"]+",\s*stream=True\)\.raw\)')


def adapt(snippet: str, model: str, image: str) -> str:
    """The doc's snippet with the allowed changes, and only those."""
    code = snippet.strip("\n").replace(f'"{HUB_ID}"', repr(model))
    code = code.replace('"cuda"', '"cpu"')
    code = _INTERNET_IMAGE.sub(f"Image.open({image!r})", code)
    code = code.replace(
        "from transformers import LlavaNextProcessor, LlavaNextForConditionalGeneration",
        "from llava_next_plugin import LlavaNextProcessor, LlavaNextForConditionalGeneration",
    )
    header = "import llava_next_plugin\n"
    if "torch" in code and not re.search(r"^import .*\btorch\b", code, re.MULTILINE):
        header += "import torch\n"
    return header + code


def run_snippet(code: str) -> tuple[dict, str, str]:
    namespace: dict = {"__name__": "__doc_example__"}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exec(compile(code, "<doc example>", "exec"), namespace)
    return namespace, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint):
    """The `llava-next tiny-checkpoint` folder (64+-wide layers)."""
    return str(demo_checkpoint)


@pytest.fixture(scope="module")
def chart(tmp_path_factory):
    """A local stand-in for the doc's chart: bars on a white background."""
    image = Image.new("RGB", (480, 320), "white")
    draw = ImageDraw.Draw(image)
    for i, height in enumerate((120, 200, 90, 250)):
        draw.rectangle((40 + i * 100, 300 - height, 110 + i * 100, 300), fill=(40 + 50 * i, 90, 200 - 40 * i))
    draw.line((30, 300, 460, 300), fill="black", width=2)
    path = tmp_path_factory.mktemp("doc") / "chart.png"
    image.save(path)
    return str(path)


def test_adapt_changes_only_what_is_allowed(checkpoint, chart):
    code = adapt(DOC_AUTOMODEL, checkpoint, chart)
    assert code.startswith("import llava_next_plugin\nfrom llava_next_plugin import LlavaNextProcessor")
    assert HUB_ID not in code and "cuda" not in code and "https://" not in code
    assert "import torch\n" in adapt(DOC_BITSANDBYTES, checkpoint, chart)
    adapted = adapt(DOC_VISUALIZER, checkpoint, chart).splitlines()
    assert adapted[0] == "import llava_next_plugin"
    assert adapted[1:] == DOC_VISUALIZER.strip("\n").replace(f'"{HUB_ID}"', repr(checkpoint)).splitlines()


def test_pipeline_example(checkpoint, chart):
    from llava_next_plugin.pipeline import LlavaNextImageToTextPipeline

    namespace, out, err = run_snippet(adapt(DOC_PIPELINE, checkpoint, chart))
    assert isinstance(namespace["pipe"], LlavaNextImageToTextPipeline)
    answer = namespace["result"][0]["generated_text"]
    assert out == answer + "\n" and answer.strip()
    assert "What does this chart show?" not in answer
    assert "Logging error" not in err


def test_automodel_example(checkpoint, chart):
    import torch

    from llava_next_plugin import LlavaNextForConditionalGeneration, LlavaNextProcessor

    namespace, out, _ = run_snippet(adapt(DOC_AUTOMODEL, checkpoint, chart))
    assert type(namespace["model"]) is LlavaNextForConditionalGeneration
    assert type(namespace["processor"]) is LlavaNextProcessor
    assert namespace["model"].dtype == torch.float16
    assert namespace["prompt"] == "[INST] <image>\nWhat does this chart show? [/INST]"
    assert out.startswith("[INST] \nWhat does this chart show? [/INST]")  # <image> tokens are special: skipped
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


def test_bitsandbytes_4bit_example(checkpoint, chart):
    import torch

    from llava_next_plugin import LlavaNextForConditionalGeneration, LlavaNextProcessor

    namespace, _, _ = run_snippet(adapt(DOC_BITSANDBYTES, checkpoint, chart))
    model, processor = namespace["model"], namespace["processor"]
    assert isinstance(model, LlavaNextForConditionalGeneration) and isinstance(processor, LlavaNextProcessor)
    quantized = [type(m).__name__ for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) >= 10
    inputs = processor(images=Image.open(chart), text="[INST] <image>\nWhat is this? [/INST]", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < output.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_attention_mask_visualizer_example(checkpoint, chart):
    from llava_next_plugin import AttentionMaskVisualizer

    namespace, out, _ = run_snippet(adapt(DOC_VISUALIZER, checkpoint, chart))
    assert isinstance(namespace["viz"], AttentionMaskVisualizer)
    assert "<image> x" in out and "= base " in out and "+ newlines " in out
    assert "▁What" in out
