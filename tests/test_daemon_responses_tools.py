"""Function tools in the Responses API, through the unmodified openai client against kvosd on
tiny-tools (tiny-llama under a Hermes template that takes tools): forced calls as function_call
items (streamed with their argument events, equal to chat completions' call), a call's output
continuing the stored conversation or a whole history, auto, and what a continuation may not change."""
import json

import openai
import pytest

from tests.helpers.openai_server import client_fixture, server_fixture
from tests.helpers.schemas import WEATHER, assert_valid

KEY, ROOT, TOOLS_KEY = "rtools-key-for-tests", "rtools-root-for-tests", "rtools-tools-key-for-tests"
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
pytest.importorskip("llguidance")

server = server_fixture(KEY, TOOLS_KEY, ROOT)

TOOLS = [{"type": "function", "name": "get_weather", "description": "The forecast", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
ASK = "What is the weather in Paris?"


tools_client = client_fixture(TOOLS_KEY, "tools_client")


def test_a_forced_call_is_a_function_call_item_streamed_or_not(tools_client, server):
    """tool_choice required or named: the reply is one function_call item whose arguments fit the
    tool's schema; streamed, the same item comes with its argument events; the chat completions
    endpoint, given the same conversation, calls the same function with the same arguments."""
    kw = dict(model="tools", input=ASK, tools=TOOLS, temperature=0, max_output_tokens=80, store=False)
    for choice, name in (("required", None), ({"type": "function", "name": "get_time"}, "get_time")):
        r = tools_client.responses.create(**kw, tool_choice=choice)
        assert r.status == "completed" and r.output_text == ""
        (item,) = r.output
        assert item.type == "function_call" and item.call_id.startswith("call_") and item.status == "completed"
        assert name is None or item.name == name
        schema = next(t["parameters"] for t in TOOLS if t["name"] == item.name)
        assert_valid(schema, json.loads(item.arguments))
        chat_choice = choice if isinstance(choice, str) else {"type": "function", "function": {"name": name}}
        reply = tools_client.chat.completions.create(model="tools", messages=[{"role": "user", "content": ASK}],
                                                     tools=CHAT_TOOLS, tool_choice=chat_choice, temperature=0,
                                                     max_tokens=80)
        (call,) = reply.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == (item.name, item.arguments)
        events = list(tools_client.responses.create(**kw, tool_choice=choice, stream=True))
        kinds = [e.type for e in events]
        assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.function_call_arguments.delta", "response.function_call_arguments.done",
                         "response.output_item.done", "response.completed"]
        assert events[3].delta == events[4].arguments == item.arguments and events[4].name == item.name
        assert events[-1].response.output[0].arguments == item.arguments
    assert server.daemon.root.meminfo().mapped == 0


def test_a_call_s_output_continues_the_stored_conversation(tools_client):
    """previous_response_id with a function_call_output: the result is written into a fork of the
    stored process (its conversation is not computed again) and the model answers it; the same
    conversation sent whole, its call as a function_call input item, gives the same reply."""
    kw = dict(model="tools", tools=TOOLS, temperature=0, max_output_tokens=80)
    r1 = tools_client.responses.create(input=ASK, tool_choice="required", **kw)
    (call,) = r1.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    r2 = tools_client.responses.create(input=[result], previous_response_id=r1.id, tool_choice="required", **kw)
    assert r2.usage.input_tokens_details.cached_tokens == r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.usage.input_tokens > r2.usage.input_tokens_details.cached_tokens
    whole = tools_client.responses.create(input=[
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        result], tool_choice="required", store=False, **kw)
    assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in r2.output] == \
        [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in whole.output]
    for change in ({"tool_choice": "auto"}, {"tools": TOOLS[:1]}):
        with pytest.raises(openai.BadRequestError) as err:
            tools_client.responses.create(input=[result], previous_response_id=r1.id, **{**kw, "tool_choice":
                                                                                           "required", **change})
        assert "differs from the conversation's" in err.value.body["message"]
    for rid in (r1.id, r2.id):
        tools_client.responses.delete(rid)


def test_auto_may_answer_in_text(tools_client):
    """tool_choice auto (the default with tools): whatever the model writes, the reply is a message,
    function_call items, or both, and what is not a call stays text."""
    for seed_temperature in (0, 1.0):
        r = tools_client.responses.create(model="tools", input=ASK, tools=TOOLS, temperature=seed_temperature,
                                          max_output_tokens=24, store=False)
        assert r.output and {i.type for i in r.output} <= {"message", "function_call"}
        assert r.tool_choice == "auto" and [t.name for t in r.tools] == ["get_weather", "get_time"]
    with pytest.raises(openai.BadRequestError, match="with tools is not supported"):
        tools_client.responses.create(model="tools", input=ASK, tools=TOOLS, include=["message.output_text.logprobs"])
