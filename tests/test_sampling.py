"""SamplingParams is the one definition of each sampling setting: the CLI, the engine and the HTTP body follow it."""

import dataclasses

import pytest

from examplegpt.cli import build_parser
from examplegpt.config import GenerateConfig, ServeConfig, field_docs
from examplegpt.errors import UserError
from examplegpt.sampling import GENERATE_DEFAULTS, TOKEN_SETTINGS, SamplingParams, out_of_range
from examplegpt.serve import request_model
from examplegpt.text import CompletionText, crop_prompt, window_after_slide
from examplegpt.tokenizer import encode


def test_every_token_setting_is_a_generate_flag_with_samplingparams_help_range_and_default():
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    docs, fields = field_docs(SamplingParams), {f.name: f for f in dataclasses.fields(GenerateConfig)}
    for f in dataclasses.fields(SamplingParams):
        if f.name not in TOKEN_SETTINGS:
            continue
        assert "--" + f.name.replace("_", "-") in help_text and docs[f.name].split()[0] in help_text
        assert fields[f.name].metadata.get("range") == f.metadata.get("range")
        assert fields[f.name].default == GENERATE_DEFAULTS.get(f.name, f.default)


def test_every_setting_of_the_http_body_carries_samplingparams_range_and_help():
    body = request_model(ServeConfig(max_tokens_limit=100), vocab_size=50257, capacity=8).model_json_schema()
    for f in dataclasses.fields(SamplingParams):
        if f.name not in (*TOKEN_SETTINGS, "max_tokens", "logprobs"):
            continue
        schema = body["properties"][f.name]
        assert schema["description"] == field_docs(SamplingParams)[f.name]
        variant = next(v for v in schema.get("anyOf", [schema]) if v.get("type") != "null")
        bounds = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
        for kind, bound in f.metadata.get("range", {}).items():
            assert variant[bounds[kind]] <= bound if kind in ("le", "lt") else variant[bounds[kind]] == bound


@pytest.mark.parametrize(
    "settings, words",
    [({"temperature": -1}, "temperature must be >= 0"), ({"top_p": -0.1}, "top_p must be in [0, 1]"),
     ({"top_k": -1}, "top_k must be >= 0"), ({"repetition_penalty": float("nan")}, "repetition_penalty must be > 0"),
     ({"seed": -1}, "seed must be in [0, ")],
)  # fmt: skip
def test_one_range_check_for_the_engine_and_the_command(settings, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
        SamplingParams(**settings)
    with pytest.raises(UserError, match=words.split()[0]):
        GenerateConfig(**settings)
    assert out_of_range(SamplingParams()) is None


def test_stop_strings_cut_the_text_and_hold_back_what_could_begin_one():
    text = CompletionText(["END"])
    shown = ""
    for token in encode("one two EN"):
        assert not text.push(token)
        shown += text.take()
    assert shown == "one two "  # "EN" could begin "END": held back
    stopped = [text.push(t) for t in encode("D three")]
    assert stopped[0] and text.text == "one two " and text.finished
    assert shown + text.take() == "one two "


def test_prompt_cropping_and_sliding_keep_the_last_tokens():
    assert crop_prompt(list(range(10)), context=4) == [7, 8, 9]
    assert crop_prompt([1, 2], context=4) == [1, 2]
    assert list(range(20))[window_after_slide(20, context=8)] == [16, 17, 18, 19]
