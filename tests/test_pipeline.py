"""The image-to-text pipeline: what `pipeline("image-to-text", model=<llava_next>)` gives a user."""

from __future__ import annotations

import http.server
import io
import logging
import shutil
import threading
import warnings

import checkpoints
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import llava_next_plugin
from llava_next_plugin.errors import ImageError, InputError
from llava_next_plugin.pipeline import DEFAULT_PROMPT, LlavaNextImageToTextPipeline

QUESTION = "What does this chart show?"
NEW = 6  # generated tokens per test call: enough to compare, cheap on 2 cores


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint):
    return demo_checkpoint


@pytest.fixture(scope="module")
def pipe(checkpoint):
    from transformers import pipeline

    return pipeline("image-to-text", model=str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def photo():
    return checkpoints.real_photo("chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def tall():
    return checkpoints.real_photo("astronaut.png").convert("RGB").resize((40, 90))


def reference_answer(checkpoint, image, prompt: str, max_new_tokens: int = NEW) -> str:
    """transformers' own model and processor, the prompt formatted by hand, greedy decoding."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with llava_next_plugin.use_transformers_builtins():
        model = AutoModelForImageTextToText.from_pretrained(str(checkpoint)).eval()
        processor = AutoProcessor.from_pretrained(str(checkpoint))
    assert type(model).__module__.startswith("transformers.")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=32001)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_image_to_text_task_builds_our_pipeline_without_warnings(checkpoint, capsys):
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = pipeline("image-to-text", model=str(checkpoint), device="cpu")
    err = capsys.readouterr().err
    assert "Logging error" not in err and "has been removed" not in err
    assert isinstance(built, LlavaNextImageToTextPipeline)
    assert built.task == "image-to-text"
    assert type(built.model).__module__ == "llava_next_plugin.modeling"
    assert type(built.processor).__module__ == "llava_next_plugin.processing"


def test_calls_warn_and_log_nothing(pipe, photo, capfd):
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(photo, prompt=QUESTION, max_new_tokens=2)
        pipe([photo, photo], prompt=["a", "b c d"], max_new_tokens=2, batch_size=2)
        pipe(photo, max_new_tokens=2, do_sample=True, temperature=0.7)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_answer_matches_transformers_reference_without_prompt_echo(pipe, checkpoint, photo):
    result = pipe(photo, prompt=QUESTION, max_new_tokens=NEW, do_sample=False)
    assert isinstance(result, list) and len(result) == 1 and set(result[0]) == {"generated_text"}
    expected = reference_answer(checkpoint, photo, f"[INST] <image>\n{QUESTION} [/INST]")
    assert result[0]["generated_text"] == expected
    assert QUESTION not in result[0]["generated_text"]


def test_no_prompt_captions_with_the_default_instruction(pipe, photo):
    assert pipe(photo, max_new_tokens=NEW) == pipe(photo, prompt=DEFAULT_PROMPT, max_new_tokens=NEW)
    assert pipe(photo, max_new_tokens=NEW)[0]["generated_text"]


def test_placeholder_and_preformatted_prompts_give_the_same_request(pipe, photo):
    plain = pipe(photo, prompt=QUESTION, max_new_tokens=NEW)
    assert pipe(photo, prompt=f"<image>\n{QUESTION}", max_new_tokens=NEW) == plain
    assert pipe(photo, prompt=f"[INST] <image>\n{QUESTION} [/INST]", max_new_tokens=NEW) == plain


def test_batches_equal_single_calls(pipe, photo, tall):
    prompts = [QUESTION, "Describe the colours in a long sentence, please."]
    singles = [pipe(image, prompt=p, max_new_tokens=NEW) for image, p in zip([photo, tall], prompts, strict=True)]
    assert pipe([photo, tall], prompt=prompts, max_new_tokens=NEW, batch_size=2) == singles
    assert pipe([photo, tall], prompt=prompts, max_new_tokens=NEW) == singles  # batch_size 1
    shared = pipe([photo, tall], prompt=QUESTION, max_new_tokens=NEW, batch_size=2)
    assert shared[0] == singles[0] and len(shared) == 2


def test_chat_messages(pipe, photo):
    plain = pipe(photo, prompt=QUESTION, max_new_tokens=NEW)
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": QUESTION}]}]
    assert pipe(messages, max_new_tokens=NEW) == plain
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert pipe(photo, prompt=bare, max_new_tokens=NEW) == plain
    assert pipe([messages, messages], max_new_tokens=NEW) == [plain, plain]
    assert pipe(text=messages, max_new_tokens=NEW) == plain  # as image-text-to-text pipelines are called
    assert pipe(text=[messages, messages], max_new_tokens=NEW) == [plain, plain]


def test_multi_image_prompt(pipe, photo, tall, checkpoint):
    prompt = "<image><image> Which one is taller?"
    result = pipe([photo, tall], prompt=prompt, max_new_tokens=NEW)
    assert len(result) == 1
    formatted = "[INST] <image>\n<image>\nWhich one is taller? [/INST]"
    assert pipe([[photo, tall]], prompt=["Which one is taller?"], max_new_tokens=NEW) == [
        pipe([photo, tall], prompt=formatted, max_new_tokens=NEW)
    ]


def test_generate_arguments_pass_through(pipe, photo):
    one = pipe(photo, prompt=QUESTION, max_new_tokens=1)[0]["generated_text"]
    six = pipe(photo, prompt=QUESTION, generate_kwargs={"max_new_tokens": NEW})[0]["generated_text"]
    assert six.startswith(one) and len(six) > len(one)
    tokenizer = pipe.processor.tokenizer
    assert len(tokenizer(one, add_special_tokens=False)["input_ids"]) <= 2
    configured = pipe(photo, prompt=QUESTION, generation_config=GenerationConfig(max_new_tokens=1))
    assert configured[0]["generated_text"] == one  # its length limit kept, not replaced by the pipeline's default
    sampled = pipe(photo, prompt=QUESTION, max_new_tokens=NEW, do_sample=True, top_k=5)
    assert sampled[0]["generated_text"] != ""


def test_several_sequences_per_request_come_back_as_a_list_per_request(pipe, photo, tall):
    beams = {"max_new_tokens": NEW, "num_beams": 2, "num_return_sequences": 2}
    one = pipe(photo, prompt=QUESTION, **beams)
    assert len(one) == 2 and all(set(item) == {"generated_text"} for item in one)
    batch = pipe([photo, tall], prompt=[QUESTION, "Hi"], batch_size=2, **beams)
    assert [len(items) for items in batch] == [2, 2]
    assert batch[0] == one and batch[1] == pipe(tall, prompt="Hi", **beams)  # not shifted by the first's


def test_transformers_pipeline_arguments_act_where_they_belong(pipe, photo):
    text = pipe(photo, prompt=QUESTION, max_new_tokens=NEW)[0]["generated_text"]
    ids = pipe(photo, prompt=QUESTION, max_new_tokens=NEW, return_tensors=True)[0]["generated_token_ids"]
    tokenizer = pipe.processor.tokenizer
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text
    assert pipe(photo, prompt=QUESTION, max_new_tokens=NEW, return_full_text=False)[0]["generated_text"] == text
    kept = pipe(
        photo, prompt=QUESTION, max_new_tokens=NEW, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    assert kept[0]["generated_text"] == tokenizer.decode(ids, skip_special_tokens=False).strip()
    # stop_sequence: generation stops with the token that completes it
    stop = text.split()[0][:2]
    stopped = pipe(photo, prompt=QUESTION, max_new_tokens=NEW, stop_sequence=stop)[0]["generated_text"]
    assert stop in stopped and text.startswith(stopped) and len(stopped) < len(text)
    unpadded = pipe(photo, prompt=QUESTION, max_new_tokens=NEW, processor_kwargs={"do_pad": False})
    assert unpadded[0]["generated_text"] == text


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"max_new_tokens": "x"}, "max_new_tokens must be a whole number of at least 1, got 'x'"),
        ({"max_new_tokens": 4, "generate_kwargs": {"max_new_tokens": 3}}, "max_new_tokens was given twice"),
        ({"return_full_text": True}, "return_full_text=True is not offered"),
        ({"stop_sequence": ""}, "stop_sequence must be a non-empty string"),
        ({"processor_kwargs": {"image_detail": "low"}}, "give the image detail as detail="),
    ],
    ids=["not-a-number", "given-twice", "full-text", "empty-stop", "detail-to-the-processor-alone"],
)
def test_pipeline_arguments_that_cannot_work_are_refused_by_name(pipe, photo, arguments, match):
    with pytest.raises(InputError, match=match):
        pipe(photo, prompt=QUESTION, **arguments)


def test_an_argument_given_as_none_leaves_generate_kwargs_value_standing(pipe, photo):
    """None is "not given" throughout (a wrapper forwarding its optional arguments passes None)."""
    given = pipe(photo, prompt=QUESTION, max_new_tokens=None, generate_kwargs={"max_new_tokens": 2})
    assert given == pipe(photo, prompt=QUESTION, max_new_tokens=2)


@pytest.fixture(scope="module")
def reference_pipe(checkpoint):
    """transformers' own image-text-to-text pipeline over the same checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.pipelines import ImageTextToTextPipeline

    with llava_next_plugin.use_transformers_builtins():
        return ImageTextToTextPipeline(
            model=AutoModelForImageTextToText.from_pretrained(str(checkpoint)),
            processor=AutoProcessor.from_pretrained(str(checkpoint)),
        )


def continued_chat(photo) -> list[dict]:
    """A question about *photo*, and the start of an answer to continue."""
    return [
        {"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The chart"}]},
    ]


def test_chat_ending_with_an_assistant_turn_is_continued_as_transformers_does(pipe, reference_pipe, photo):
    messages, reference = continued_chat(photo), reference_pipe
    expected = reference(text=messages, max_new_tokens=NEW, return_full_text=False)[0]["generated_text"]
    assert pipe(messages, max_new_tokens=NEW)[0]["generated_text"] == expected.strip()
    new_turn = pipe(messages, max_new_tokens=NEW, continue_final_message=False)[0]["generated_text"]
    assert new_turn != expected.strip()


def test_a_transparent_image_is_read_as_transformers_pipelines_read_it(pipe, reference_pipe, photo):
    """transformers' pipelines read every image with ``convert("RGB")``: a transparent area keeps its colours
    (alpha dropped), where our server and SDK composite it onto white."""
    import numpy as np

    pixels = np.asarray(photo.convert("RGBA").resize((80, 60))).copy()
    pixels[:, :40, 3] = 0
    rgba = Image.fromarray(pixels, "RGBA")
    loaded = pipe._load_image(rgba, 0, 10.0)
    assert np.array_equal(np.asarray(loaded), np.asarray(rgba.convert("RGB")))
    prompt = f"[INST] <image>\n{QUESTION} [/INST]"
    expected = reference_pipe(images=rgba, text=prompt, max_new_tokens=NEW, return_full_text=False)
    assert pipe(rgba, prompt=QUESTION, max_new_tokens=NEW)[0]["generated_text"] == expected[0]["generated_text"].strip()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_image_sources_path_bytes_and_url_agree(pipe, photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    data = path.read_bytes()
    expected = pipe(photo, prompt=QUESTION, max_new_tokens=NEW)
    assert pipe(str(path), prompt=QUESTION, max_new_tokens=NEW) == expected
    assert pipe(path, prompt=QUESTION, max_new_tokens=NEW) == expected
    assert pipe(data, prompt=QUESTION, max_new_tokens=NEW) == expected

    _ImageHandler.payload = data
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photo.png"
        assert pipe(url, prompt=QUESTION, max_new_tokens=NEW, timeout=5) == expected
    finally:
        server.shutdown()
        server.server_close()


def test_bad_input_gives_clear_typed_errors(pipe, photo, tmp_path):
    with pytest.raises(InputError, match="2 <image> placeholders but 1 image"):
        pipe(photo, prompt="<image> <image> compare", max_new_tokens=1)
    with pytest.raises(ImageError, match="image 0") as info:
        pipe(b"not an image at all", prompt=QUESTION, max_new_tokens=1)
    assert info.value.index == 0
    with pytest.raises(ImageError, match="image 1"):
        pipe([photo, str(tmp_path / "missing.png")], prompt=QUESTION, max_new_tokens=1, batch_size=2)
    for batch_size in (1, 2, 3):  # an image is named by its index in the whole call, whatever batch holds it
        with pytest.raises(ImageError, match="^image 2: file not found") as info:
            pipe(
                [photo, photo, str(tmp_path / "missing.png")], prompt=QUESTION, max_new_tokens=1, batch_size=batch_size
            )
        assert info.value.index == 2
    with pytest.raises(InputError, match="2 images but 3 prompts"):
        pipe([photo, photo], prompt=["a", "b", "c"], max_new_tokens=1)
    with pytest.raises(InputError, match="nothing to answer"):
        pipe()


def test_checkpoint_without_chat_template_uses_its_family_format(checkpoint, photo, tmp_path, pipe):
    from transformers import pipeline

    bare = tmp_path / "no-template"
    shutil.copytree(checkpoint, bare)
    (bare / "chat_template.jinja").unlink()
    built = pipeline("image-to-text", model=str(bare), device="cpu")
    assert not getattr(built.processor, "chat_template", None)
    assert built(photo, prompt=QUESTION, max_new_tokens=NEW) == pipe(photo, prompt=QUESTION, max_new_tokens=NEW)
    vicuna = pipeline("image-to-text", model=str(bare), device="cpu", prompt_family="vicuna")
    assert vicuna(photo, prompt=QUESTION, max_new_tokens=NEW) != []


def test_image_text_to_text_task_works_with_our_model(checkpoint, pipe, photo):
    from transformers import pipeline

    general = pipeline("image-text-to-text", model=str(checkpoint), device="cpu")
    assert type(general.model).__module__ == "llava_next_plugin.modeling"
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": QUESTION}]}]
    result = general(text=messages, max_new_tokens=NEW, return_full_text=False)
    assert result[0]["generated_text"].strip() == pipe(photo, prompt=QUESTION, max_new_tokens=NEW)[0]["generated_text"]


def test_other_models_reach_transformers_unchanged(checkpoint):
    """A `llava` (not llava_next) model asked for image-to-text gets transformers' own pipeline."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        MistralConfig,
        pipeline,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32064,
        ),
        image_token_index=32000,
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=AutoTokenizer.from_pretrained(str(checkpoint)),
        patch_size=8,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    logging.disable(logging.CRITICAL)  # transformers' own (broken) deprecation warning fires here
    try:
        built = pipeline("image-to-text", model=model, processor=processor, device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    assert type(built).__name__ == "ImageTextToTextPipeline"
    assert not isinstance(built, LlavaNextImageToTextPipeline)


def test_unregister_gives_back_transformers_factory_and_an_early_import_is_routed_too(checkpoint):
    import inspect

    import transformers
    import transformers.pipelines as pipelines

    code = pipelines.pipeline.__code__
    llava_next_plugin.unregister()
    try:
        early = transformers.pipeline  # as `from transformers import pipeline` before `import llava_next_plugin`
        assert early is pipelines.pipeline and early.__code__ is not code
        assert not hasattr(early, "__wrapped__") and "_llava_next_pipeline_route" not in vars(pipelines)
        plain = early("image-to-text", model=str(checkpoint), device="cpu")
        assert type(plain).__name__ == "ImageTextToTextPipeline"
    finally:
        llava_next_plugin.register()
    assert early.__code__ is code and "model" in inspect.signature(early).parameters
    built = early("image-to-text", model=str(checkpoint), device="cpu")
    assert isinstance(built, LlavaNextImageToTextPipeline)


def test_direct_construction_and_bytes_roundtrip(checkpoint, photo):
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint))
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    direct = LlavaNextImageToTextPipeline(model=model, processor=processor, device="cpu", max_new_tokens=NEW)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    assert direct(Image.open(io.BytesIO(buffer.getvalue())), prompt=QUESTION)[0]["generated_text"]
    with pytest.raises(ValueError, match="processor"):
        LlavaNextImageToTextPipeline(model=model, device="cpu")
    routed = pipeline("image-to-text", model=model, processor=processor, device="cpu")  # loaded objects route too
    assert isinstance(routed, LlavaNextImageToTextPipeline)


# --- checkpoints without a chat template: the family's format, detected or named ----------------------------

VICUNA_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: <image>\n{q} ASSISTANT:"
)
LLAMA3_PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{q}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CHATML_PROMPT = "<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n"


class _PromptRecorder(LogitsProcessor):
    """Keeps the token ids generate() starts from (the prompt the model received); changes no score."""

    def __init__(self):
        self.prompt_ids = None

    def __call__(self, input_ids, scores):
        if self.prompt_ids is None:
            self.prompt_ids = input_ids.clone()
        return scores


def _without_chat_template(source, folder, special_tokens=()):
    """A copy of *source* with no chat template anywhere, its tokenizer given *special_tokens*."""
    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = None
    if special_tokens:
        tokenizer.add_tokens(list(special_tokens), special_tokens=True)
    tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def _received_and_expected(built, image, expected_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids the model got from ``built(image, prompt=QUESTION)``, and the processor's ids of
    *expected_prompt* (the question in a family's format, written by hand)."""
    recorder = _PromptRecorder()
    built(image, prompt=QUESTION, max_new_tokens=1, logits_processor=LogitsProcessorList([recorder]))
    expected = built.processor(images=image, text=expected_prompt.format(q=QUESTION), return_tensors="pt")
    return recorder.prompt_ids, expected["input_ids"]


def test_checkpoint_whose_family_cannot_be_told_is_a_clear_error_until_named(tiny_checkpoint_factory, photo, tmp_path):
    """A phi3 text backbone with the Mistral tokenizer and no chat template matches none of the four families."""
    from transformers import pipeline

    bare = _without_chat_template(tiny_checkpoint_factory(text="phi3"), tmp_path / "phi3")
    built = pipeline("image-to-text", model=str(bare), device="cpu")
    assert type(built).__name__ == "LlavaNextImageToTextPipeline"
    assert not getattr(built.processor, "chat_template", None)
    with pytest.raises(InputError, match=r"cannot tell this checkpoint's prompt format") as error:
        built(photo, prompt=QUESTION, max_new_tokens=1)
    message = str(error.value)
    assert "'phi3'" in message and "prompt_family=" in message
    for family in ("mistral", "vicuna", "llama3", "chatml"):
        assert family in message

    named = pipeline("image-to-text", model=str(bare), device="cpu", prompt_family="vicuna")
    received, expected = _received_and_expected(named, photo, VICUNA_PROMPT)
    assert torch.equal(received, expected)
    assert named(photo, prompt=QUESTION, max_new_tokens=NEW)[0]["generated_text"]
    with pytest.raises(InputError, match=r"unknown prompt family 'alpaca'; accepted: mistral, vicuna"):
        pipeline("image-to-text", model=str(bare), device="cpu", prompt_family="alpaca")(photo, prompt=QUESTION)


@pytest.mark.parametrize(
    ("special_tokens", "expected_prompt"),
    [
        (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3_PROMPT),
        (("<|im_start|>", "<|im_end|>"), CHATML_PROMPT),
        ((), VICUNA_PROMPT),
    ],
    ids=["llama3", "chatml", "vicuna"],
)
def test_llama_checkpoint_family_is_told_by_its_tokenizer(
    tiny_checkpoint_factory, photo, tmp_path, special_tokens, expected_prompt
):
    """Vicuna, Llama-3 and Yi all report model type llama: their special tokens tell them apart."""
    from transformers import pipeline

    bare = _without_chat_template(tiny_checkpoint_factory(text="llama"), tmp_path / "llama", special_tokens)
    built = pipeline("image-to-text", model=str(bare), device="cpu")
    assert built.model.config.text_config.model_type == "llama"
    assert not getattr(built.processor, "chat_template", None)
    received, expected = _received_and_expected(built, photo, expected_prompt)
    assert torch.equal(received, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": -1}, "batch_size must be a whole number of at least 1"),
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
        ({"batch_size": "2"}, "batch_size must be a whole number of at least 1"),
        ({"timeout": "abc"}, "timeout must be a number of seconds > 0"),
    ],
)
def test_bad_batch_sizes_and_timeouts_are_refused_naming_them(pipe, photo, tall, kwargs, message):
    with pytest.raises(InputError, match=message):
        pipe([photo, tall], prompt=QUESTION, max_new_tokens=1, **kwargs)  # -1 returned [] (answers lost)


def test_a_continued_assistant_turn_keeps_the_space_that_joins_it(pipe, reference_pipe, photo):
    """'The chart' + ' shows' stays 'The chart shows' when joined (the answer was stripped to 'shows')."""
    messages, reference = continued_chat(photo), reference_pipe
    shows = reference.processor.tokenizer.convert_tokens_to_ids("▁shows")

    class Shows(LogitsProcessor):  # the first new token is " shows", whatever the random model says
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            self.start = self.start or input_ids.shape[1]
            if input_ids.shape[1] == self.start:
                scores[:] = -float("inf")
                scores[:, shows] = 0
            return scores

    def forced(call, **kwargs):
        generate = {"max_new_tokens": 3, "logits_processor": LogitsProcessorList([Shows()])}
        return call(messages, generate_kwargs=generate, **kwargs)

    expected = forced(reference, return_full_text=False)[0]["generated_text"]
    ours = forced(pipe)[0]["generated_text"]
    assert expected.startswith(" shows") and ours == expected.rstrip()


def test_a_length_given_as_none_or_a_config_without_one_gets_the_default_length(pipe, photo):
    from llava_next_plugin.pipeline import DEFAULT_MAX_NEW_TOKENS

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "model-agnostic default max_length" warning either
        for kwargs in ({"max_new_tokens": None}, {"max_length": None}, {"generation_config": GenerationConfig()}):
            ids = pipe(photo, prompt=QUESTION, return_tensors=True, min_new_tokens=25, **kwargs)[0]
            assert 20 < len(ids["generated_token_ids"]) <= DEFAULT_MAX_NEW_TOKENS, kwargs


def test_generators_datasets_and_dict_items_are_taken_as_by_transformers(pipe, photo, tall):
    one = pipe(photo, prompt=QUESTION, max_new_tokens=NEW)
    answers = pipe((image for image in [photo, tall]), prompt=QUESTION, max_new_tokens=NEW)
    assert not isinstance(answers, list)  # an iterator, as transformers gives for a generator
    answers = list(answers)
    assert answers[0] == one and answers[1] == pipe(tall, prompt=QUESTION, max_new_tokens=NEW)
    assert pipe({"images": photo, "text": QUESTION}, max_new_tokens=NEW) == one
    assert pipe([{"image": photo, "text": QUESTION}], max_new_tokens=NEW) == [one]
    with pytest.raises(InputError, match="has key\\(s\\) \\['picture'\\]"):
        pipe({"picture": photo, "text": QUESTION})


def test_a_dataset_is_read_to_its_length_and_lazy_inputs_are_batched(pipe, photo, tall, monkeypatch):
    class Computed(torch.utils.data.Dataset):
        """Items computed from the index: for-in would never stop (no IndexError)."""

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return [photo, tall][index % 2]

    rows: list[int] = []
    generate = pipe.model.generate

    def counting(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "generate", counting)
    answers = list(pipe(Computed(), prompt=QUESTION, max_new_tokens=NEW, batch_size=2))
    assert len(answers) == 3 and rows == [2, 1]  # len() items, two to a generate call
    assert answers == [pipe(image, prompt=QUESTION, max_new_tokens=NEW) for image in (photo, tall, photo)]
    rows.clear()
    items = ({"images": image, "text": QUESTION} for image in (photo, tall))
    assert list(pipe(items, max_new_tokens=NEW, batch_size=2)) == answers[:2] and rows == [2]
    rows.clear()
    lists = [[photo, tall], [photo, tall], [tall, photo]]  # a list item is a batch of its own, whatever batch_size
    assert list(pipe(iter(lists), prompt=QUESTION, max_new_tokens=NEW, batch_size=2)) == [
        pipe(item, prompt=QUESTION, max_new_tokens=NEW) for item in lists
    ]
    rows.clear()
    pair = [{"images": photo, "text": QUESTION}, {"images": tall, "text": QUESTION}]
    assert pipe(pair, max_new_tokens=NEW) == answers[:2] and rows == [1, 1]  # batch_size 1 unless asked


def test_a_prompt_beside_chat_messages_and_misplaced_pipeline_arguments_are_refused(checkpoint, pipe, photo):
    from transformers import pipeline

    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": QUESTION}]}]
    with pytest.raises(InputError, match="chat messages and a prompt were both given"):
        pipe(messages, prompt="Something else?")
    with pytest.raises(InputError, match="chat messages and a prompt were both given"):
        pipe([messages, messages], prompt="Something else?")
    with pytest.raises(InputError, match="prompt given when building the pipeline.*default_prompt="):
        pipeline("image-to-text", model=str(checkpoint), device="cpu", prompt=QUESTION)
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = pipe(photo, text=bare, max_new_tokens=NEW)
    assert pipe({"images": photo, "text": bare}, max_new_tokens=NEW) == expected  # an item's chat text


def test_text_only_prompts_and_a_one_item_prompt_list(pipe, photo):
    text_only = pipe(text="Say hello.", max_new_tokens=NEW)
    chat = pipe([{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}], max_new_tokens=NEW)
    assert text_only == chat
    assert pipe(photo, prompt=[QUESTION], max_new_tokens=NEW) == [pipe(photo, prompt=QUESTION, max_new_tokens=NEW)]


def test_a_file_object_is_one_image_and_a_dict_items_images_are_one_request(pipe, photo, tall, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    one = pipe(photo, prompt=QUESTION, max_new_tokens=NEW)
    with open(path, "rb") as file:  # an iterator of lines, but one image
        assert pipe(file, prompt=QUESTION, max_new_tokens=NEW) == one
    both = pipe({"images": [photo, tall], "text": QUESTION}, max_new_tokens=NEW)
    assert both == pipe([[photo, tall]], prompt=[QUESTION], max_new_tokens=NEW)[0] and len(both) == 1


def test_none_in_a_call_keeps_the_pipelines_own_default(checkpoint, photo):
    from transformers import pipeline

    short = pipeline("image-to-text", model=str(checkpoint), device="cpu", max_new_tokens=3)
    ids = short(photo, prompt=QUESTION, return_tensors=True, max_new_tokens=None, min_new_tokens=3)
    assert len(ids[0]["generated_token_ids"]) == 3
