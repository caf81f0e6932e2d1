"""Structured output in the kernel: json_schema's (or a Lark grammar's) matcher masks every draw,
so even tiny-llama's random weights produce schema-valid JSON at any temperature, in forks and in
every turn; refusals change nothing; compiled grammars are cached; a kernel without schemas never
loads llguidance; tools reach a chat template that takes them, and are refused by one that does not."""
import json
import subprocess
import sys as _sys

import pytest

import kernel
from kernel.argcheck import MAX_SCHEMA_BYTES
from kernel.errors import EINVAL, KvosError
from kernel.grammar import compile_grammar
from kernel.sampling import SamplingParams
from tests.helpers.schemas import PERSON, assert_valid
from tests.kernel_helpers import TINY, frames

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def tiny():
    k = kernel.boot(memory=frames(256))
    sys = k.syscalls()
    return k, sys, sys.spawn_tenant(TINY)


def run(sys, pid):
    """Read to the end of the turn, then wait: (exit status, logprob entries)."""
    entries = []
    while True:
        r = sys.read(pid, timeout=10)
        entries += r.logprobs
        if r.turn_done:
            return sys.wait(pid), entries


@pytest.mark.parametrize("seed", range(6))
def test_every_sampled_output_is_valid_under_its_schema(tiny, seed):
    k, sys, tid = tiny
    status, _ = run(sys, sys.spawn(tid, "Hello", max_tokens=96, temperature=1.0 + seed / 5, seed=seed,
                                   json_schema=PERSON))
    assert status.reason == "stop", status
    assert_valid(PERSON, json.loads(status.text))
    assert list(json.loads(status.text)) == list(PERSON["properties"])      # in the schema's order
    k.fsck()


def test_penalties_and_min_p_with_a_schema(tiny):
    _, sys, tid = tiny
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3,
              "maxItems": 6}
    for seed in range(3):
        status, _ = run(sys, sys.spawn(tid, "Hi", max_tokens=64, temperature=0.8, seed=seed, min_p=0.01,
                                       json_schema=schema, repetition_penalty=1.2, presence_penalty=0.5,
                                       frequency_penalty=0.5))
        assert status.reason == "stop", status
        assert_valid(schema, json.loads(status.text))


def test_forks_and_seeds_reproduce_valid_outputs(tiny):
    _, sys, tid = tiny
    first = [sys.wait(pid) for pid in sys.spawn_n(tid, "Once upon", 4, max_tokens=96, seed=7, json_schema=PERSON)]
    again = [sys.wait(pid) for pid in sys.spawn_n(tid, "Once upon", 4, max_tokens=96, seed=7, json_schema=PERSON)]
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert len({s.text for s in first}) > 1
    for s in first:
        assert_valid(PERSON, json.loads(s.text))


def test_each_turn_of_an_interactive_process_is_one_value(tiny):
    k, sys, tid = tiny
    pid = sys.spawn(tid, [{"role": "user", "content": "a person"}], max_tokens=96, seed=3, json_schema=PERSON,
                    interactive=True)
    texts = []
    for turn in range(2):
        if turn:
            sys.write(pid, [{"role": "user", "content": "another"}])
        before = len(texts[-1]) if texts else 0
        while not sys.read(pid, timeout=10).turn_done:
            pass
        texts.append(k.procs[pid].out_bytes.decode())
        assert_valid(PERSON, json.loads(texts[-1][before:]))
    assert sys.wait(pid).reason == "stop"


def test_greedy_constrained_output_follows_the_mask(tiny):
    _, sys, tid = tiny
    schema = {"enum": ["kvos", "page table", "fork"]}
    status = sys.wait(sys.spawn(tid, "The answer:", max_tokens=20, temperature=0, json_schema=schema))
    assert json.loads(status.text) in schema["enum"] and status.reason == "stop"


@pytest.mark.parametrize("schema, match", [
    ({"type": "frobnicate"}, "json_schema cannot be compiled"),
    ([1, 2], "json_schema must be a JSON Schema"),
    ("not json", "json_schema is not JSON"),
    ({"x": float("nan")}, "json_schema must be JSON"),
    ({"description": "x" * MAX_SCHEMA_BYTES}, f"at most {MAX_SCHEMA_BYTES} bytes"),
])
def test_bad_schemas_are_refused_and_change_nothing(tiny, schema, match):
    k, sys, tid = tiny
    before = (sys.meminfo(), len(sys.ps()))
    with pytest.raises(KvosError, match=match) as err:
        sys.spawn(tid, "Hello", json_schema=schema)
    assert err.value.errno == EINVAL
    assert (sys.meminfo(), len(sys.ps())) == before


def test_compiled_grammars_are_cached_per_program_and_schema(tiny):
    k, sys, tid = tiny
    program = k.tenants[tid].program
    text = SamplingParams(json_schema=PERSON).json_schema
    assert compile_grammar(program, "json_schema", text) is compile_grammar(program, "json_schema", text)
    other = SamplingParams(json_schema={"type": "integer"}).json_schema
    assert compile_grammar(program, "json_schema", other) is not compile_grammar(program, "json_schema", text)


def test_a_matcher_error_ends_its_process_with_the_reason(tiny):
    k, sys, tid = tiny
    pid = sys.spawn(tid, "Hello", max_tokens=30, json_schema=PERSON)
    k.procs[pid].constraint.matcher.consume_token(0)      # a special token no JSON spells: the matcher breaks
    status = sys.wait(pid)
    assert status.reason == "error" and "json_schema" in status.error
    k.fsck()


def test_a_lark_grammar_with_an_embedded_schema(tiny):
    _, sys, tid = tiny
    grammar = 'start: "answer: " value "!"\nvalue: %json {"type": "integer", "minimum": 1, "maximum": 99}'
    for seed in range(3):
        status = sys.wait(sys.spawn(tid, "Hi", max_tokens=16, temperature=1.5, seed=seed, grammar=grammar))
        assert status.reason == "stop" and status.text.startswith("answer: ") and status.text.endswith("!")
        assert 1 <= int(status.text[len("answer: "):-1]) <= 99
    with pytest.raises(KvosError, match="json_schema and grammar are exclusive"):
        sys.spawn(tid, "Hi", grammar=grammar, json_schema=PERSON)
    with pytest.raises(KvosError, match="grammar cannot be compiled"):
        sys.spawn(tid, "Hi", grammar="start: undefined_rule")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}}]


def test_tools_reach_a_template_that_takes_them_and_no_other(tiny):
    from tests.helpers import tiny_tools
    k, sys, tid = tiny
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(KvosError, match="takes no tools"):
        sys.spawn(tid, chat, tools=TOOLS)
    with pytest.raises(KvosError, match="tools go with a chat prompt"):
        sys.spawn(tid, "Weather?", tools=TOOLS)
    ttid = sys.spawn_tenant(tiny_tools.program())
    assert sys.tenantinfo(ttid).chat_tools == "hermes" and sys.tenantinfo(tid).chat_tools is None
    plain, with_tools = (k.procs[sys.spawn(ttid, chat, max_tokens=1, **kw)].tokens for kw in ({}, {"tools": TOOLS}))
    program = k.tenants[ttid].program
    assert '"get_weather"' in program.decode(with_tools) and "get_weather" not in program.decode(plain)
    history = chat + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    assert sys.wait(sys.spawn(ttid, history, tools=TOOLS, max_tokens=2)).reason in ("stop", "length")
    for pid in [p.pid for p in sys.ps()]:
        sys.kill(pid)
        sys.wait(pid)
    sys.kill_tenant(ttid)


def test_a_kernel_without_schemas_never_imports_llguidance():
    code = ("import sys, kernel; k = kernel.boot(memory='4MiB'); s = k.syscalls(); t = s.spawn_tenant('tiny-llama');"
            "s.wait(s.spawn(t, 'Hi', max_tokens=4, repetition_penalty=1.2, logprobs=1));"
            "print('llguidance' in sys.modules)")
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
