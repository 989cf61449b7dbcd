"""A third-party llava-next plugin, as a user would write one.

- Image source ``example://<colour>[?size=WxH]``: a generated image of that colour (default 24x16).
- Prompt family ``plain``: ``<image>\\n<question>\\nAnswer:``; also used for text backbones of model
  type ``plain-lm``, which our built-ins do not know.
"""

from urllib.parse import parse_qs, urlparse

from llava_next_sdk.hookspecs import hookimpl  # the light import: no torch
from PIL import Image, ImageColor

PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ part['text'] + '\\n' }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


@hookimpl
def llava_next_load_image(source, timeout):
    if not (isinstance(source, str) and source.startswith("example://")):
        return None
    url = urlparse(source)
    width, height = (int(v) for v in parse_qs(url.query).get("size", ["24x16"])[0].split("x"))
    return Image.new("RGB", (width, height), ImageColor.getrgb(url.netloc))


@hookimpl
def llava_next_prompt_format(family, model_type, tokenizer):
    if family == "plain" or (family == "" and model_type == "plain-lm"):
        return PLAIN_TEMPLATE
    return None
