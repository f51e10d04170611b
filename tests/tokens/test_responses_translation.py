"""Pure translations of issue 12: Responses input items -> chat messages and tools, a chat
answer -> a Response, Responses usage, and the embedding encodings (no network)."""

from __future__ import annotations

import base64
import struct

import pytest

from leaky_tokens.settings import DEFAULT_CATALOGUE
from leaky_tokens.tokens.inference.catalogue import Catalogue
from leaky_tokens.tokens.inference.embeddings import (
    as_encoding,
    decode_base64,
    encode_base64,
    parse_embedding_request,
)
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest
from leaky_tokens.tokens.inference.responses import (
    chat_tools,
    input_messages,
    parse_responses_request,
    response_from_chat,
    usage_from_responses,
)
from leaky_tokens.tokens.inference.wire import Usage

CATALOGUE = Catalogue(DEFAULT_CATALOGUE)


def test_instructions_and_input_items_become_chat_messages_with_tool_turns() -> None:
    messages = input_messages(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "summary": []},
            ],
        }
    )
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Weather?"}
    assert messages[2]["role"] == "assistant"
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]  # one turn
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert len(messages) == 4


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": ""},
        {"input": [{"type": "image_generation_call"}]},
        {"input": [{"role": "robot", "content": "x"}]},
        {"instructions": 3, "input": "x"},
    ],
)
def test_unusable_input_is_a_400_naming_the_parameter(body: dict[str, object]) -> None:
    with pytest.raises(InvalidInferenceRequest) as refused:
        input_messages(body)
    assert refused.value.details


def test_function_tools_translate_and_other_tools_are_refused_for_chat_models() -> None:
    tools = chat_tools([{"type": "function", "name": "w", "parameters": {"type": "object"}}])
    assert tools == [
        {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
    ]
    with pytest.raises(InvalidInferenceRequest):
        chat_tools([{"type": "web_search"}])


def test_a_chat_answer_becomes_a_response_with_its_usage_and_status() -> None:
    request = parse_responses_request(
        {"model": "qwen-turbo", "input": "hi", "max_output_tokens": 5}, CATALOGUE
    )
    chat = {
        "created": 1_700_000_000,
        "choices": [
            {
                "message": {
                    "content": "Hello",
                    "tool_calls": [{"id": "c9", "function": {"name": "w", "arguments": '{"a":1}'}}],
                },
                "finish_reason": "length",
            }
        ],
    }
    response = response_from_chat(request, chat, Usage(7, 5, 2))
    assert response["object"] == "response"
    assert response["model"] == "qwen-turbo"
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][0]["content"][0]["text"] == "Hello"
    assert response["output"][1]["call_id"] == "c9"
    assert response["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 12,
    }
    assert usage_from_responses(response["usage"]) == Usage(7, 5, 2, 0)


def test_previous_response_id_and_embedding_models_are_refused() -> None:
    with pytest.raises(InvalidInferenceRequest) as stateful:
        parse_responses_request(
            {"model": "gpt-4o-mini", "input": "x", "previous_response_id": "resp_1"}, CATALOGUE
        )
    assert stateful.value.details == [
        {"field": "previous_response_id", "message": stateful.value.message}
    ]
    with pytest.raises(InvalidInferenceRequest):
        parse_responses_request({"model": "text-embedding-3-small", "input": "x"}, CATALOGUE)


def test_base64_is_little_endian_float32_both_ways() -> None:
    values = [0.5, -1.25, 3.0]
    encoded = encode_base64(values)
    assert base64.b64decode(encoded) == struct.pack("<3f", *values)
    assert decode_base64(encoded) == values
    assert as_encoding(values, "base64") == encoded
    assert as_encoding(encoded, "float") == values
    assert as_encoding(encoded, "base64") == encoded
    assert as_encoding(values, "float") == values


def test_embedding_requests_are_checked_as_openai_checks_them() -> None:
    parsed = parse_embedding_request(
        {"model": "text-embedding-3-small", "input": [[1, 2], "two"], "dimensions": 8},
        CATALOGUE,
    )
    assert parsed.inputs == [[1, 2], "two"]
    assert parsed.encoding_format == "float"  # the API's default (the SDK asks for base64)
    assert parsed.dimensions == 8
    for body, param in (
        ({"model": "text-embedding-3-small", "input": ""}, "input"),
        ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "hex"}, None),
        ({"model": "text-embedding-v3", "input": ["x"] * 11}, "input"),
        ({"model": "gemini-embedding-001", "input": [1, 2]}, "input"),
        ({"model": "gpt-4o-mini", "input": "x"}, "model"),
    ):
        with pytest.raises(InvalidInferenceRequest) as refused:
            parse_embedding_request(body, CATALOGUE)
        if param:
            assert refused.value.details is not None
            assert refused.value.details[0]["field"] == param
