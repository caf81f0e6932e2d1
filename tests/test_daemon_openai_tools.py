"""Tool calls in /v1/chat/completions, through the unmodified openai client against kvosd on
tiny-tools (tiny-llama under a Hermes template that takes tools): forced calls (required, named)
whose arguments fit their schema, streamed or not; auto; a tool result continuing the chat; the
parser; /tokenize giving the template the same tools."""
import json

import openai
import pytest

from kernel.errors import KvosError
from tests.helpers.openai_server import client_fixture, server_fixture
from tests.helpers.schemas import WEATHER, assert_valid

KEY, ROOT, TOOLS_KEY = "calls-key-for-tests", "calls-root-for-tests", "calls-tools-key-for-tests"
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
pytest.importorskip("llguidance")

server = server_fixture(KEY, TOOLS_KEY, ROOT)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


tools_client = client_fixture(TOOLS_KEY, "tools_client")


@pytest.mark.parametrize("seed", range(3))
def test_a_required_tool_call_is_parsed_and_its_arguments_are_valid(tools_client, seed):
    reply = tools_client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                                 temperature=1.0, seed=seed, n=2, max_tokens=80)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        assert_valid(schema, json.loads(call.function.arguments))


def test_a_named_tool_call_streamed_or_not(tools_client):
    kw = dict(model="tools", messages=ASK, tools=TOOLS, temperature=0.8, seed=4, max_tokens=80,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = tools_client.chat.completions.create(**kw).choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert_valid(WEATHER, json.loads(call.function.arguments))
    chunks = [c for c in tools_client.chat.completions.create(**kw, stream=True) if c.choices]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, t.function.arguments) for t in calls] == \
        [(0, "get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_tool_call_takes_no_other_constraint(tools_client):
    for body in ({"structured_outputs": {"regex": "a+"}}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError, match="and a forced tool call"):
            tools_client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                                 max_tokens=8, extra_body=body)


def test_auto_lets_the_model_choose_and_a_tool_result_continues_the_chat(tools_client):
    reply = tools_client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, max_tokens=8, seed=1)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = tools_client.chat.completions.create(model="tools", messages=history, tools=TOOLS, max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="tool_calls.0.function.arguments is not JSON"):
        tools_client.chat.completions.create(model="tools", max_tokens=2, tools=TOOLS, messages=[
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])


def test_tool_calls_are_parsed_from_the_hermes_format():
    from userspace.daemon.openai_tools import parse_calls
    text = ('Let me look. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call> and '
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>not json</tool_call>')
    content, calls = parse_calls(text, TOOLS)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("get_time",
                                                                                                {"zone": "UTC"})]
    assert content.startswith("Let me look.") and "get_time" not in content and "nope" in content
    assert parse_calls("no calls here", TOOLS) == ("no calls here", [])


def test_tokenize_gives_the_tools_to_the_template_as_a_chat_completion_does(server):
    from tests.test_daemon_conventions import call
    tid = next(t.tid for t in server.daemon.root.schedstat().tenants if t.name == "tools")
    root = server.daemon.root
    for add in (True, False):
        body = {"messages": ASK, "tools": TOOLS, "add_generation_prompt": add}
        status, _, reply = call(server.url, "POST", "/tokenize", body, key=TOOLS_KEY)
        assert status == 200, reply
        with_tools = reply["tokens"]
        assert with_tools == root.tokenize(tid, ASK, add_generation_prompt=add, tools=TOOLS)
        assert root.detokenize(tid, with_tools).count("get_weather") == 1         # the template listed them
        assert len(with_tools) > len(root.tokenize(tid, ASK, add_generation_prompt=add))
    # A template that takes no tools refuses them, as spawn does; text prompts take none.
    status, _, reply = call(server.url, "POST", "/tokenize", {"messages": ASK, "tools": TOOLS}, key=KEY)
    assert status == 400, reply
    with pytest.raises(KvosError):
        root.tokenize(tid, "text", tools=TOOLS)


def test_a_begun_reply_that_calls_a_tool_keeps_its_beginning_with_echo(tools_client):
    """continue_final_message with echo (vLLM's) and a forced call: the call is parsed from what the
    model added, and the content is the message it continued."""
    begun = ASK + [{"role": "assistant", "content": "Let me look that up."}]
    reply = tools_client.chat.completions.create(
        model="tools", messages=begun, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80,
        extra_body={"add_generation_prompt": False, "continue_final_message": True, "echo": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert choice.message.content == "Let me look that up."
