"""The kvos command: help everywhere, run --json, chat, the /proc views, one-line errors, and the demo.

Fast tests use the tiny model in-process (main(argv)); a few run the installed
console script, not on a terminal, as CI and `make demo` piped to a file do.
The slow test runs the real demo with SmolLM2 end to end.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel_helpers import TINY
from userspace.shell.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
KVOS = [sys.executable, "-m", "userspace.shell.main"]


def kvos(*args, input=None, timeout=120, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    for name in ("KVOS_DEBUG", "KVOS_URL", "KVOS_KEY"):
        env.pop(name, None)
    return subprocess.run(KVOS + list(args), input=input, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def subcommands() -> list:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_every_command_has_help(capsys):
    names = subcommands()
    assert {"demo", "top", "pull", "run", "chat", "ps", "pagemap", "meminfo", "dmesg"} <= set(names)
    for argv in [["--help"]] + [[name, "--help"] for name in names]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0, argv
        assert "usage: kvos" in capsys.readouterr().out


def test_inspect_commands_say_where_they_look(capsys):
    for name in ("ps", "pagemap", "meminfo", "dmesg"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "It asks a running kvosd" in text and "Only with --local does it boot a fresh kernel" in text, name
    with pytest.raises(SystemExit):
        main(["top", "--help"])
    assert "With --local" in " ".join(capsys.readouterr().out.split())


def test_run_json_one_object_per_process(capsys):
    assert main(["run", "--json", "--model", TINY, "--max-tokens", "6", "hello there", "what is paging?"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    objs = [json.loads(line) for line in lines]
    assert [o["prompt"] for o in objs] == ["hello there", "what is paging?"]
    for o in objs:
        assert {"pid", "prompt", "text", "token_ids", "finish_reason", "timings"} <= set(o)
        assert len(o["token_ids"]) == 6 and o["finish_reason"] == "length"
        assert o["timings"]["elapsed"] >= o["timings"]["ttft"] > 0
    assert len({o["pid"] for o in objs}) == 2


def test_run_with_a_prediction_gives_the_same_reply(capsys, tmp_path):
    argv = ["run", "--json", "--model", TINY, "--max-tokens", "24", "--speculate", "4", "hello there"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["prediction"] is None
    guess = tmp_path / "guess.txt"
    guess.write_text(plain["text"])
    assert main(argv + ["--prediction", f"@{guess}"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["token_ids"] == plain["token_ids"] and again["prediction"]["accepted"] > 0
    assert main(argv + ["--prediction", "@/nonexistent/guess"]) != 0
    assert "--prediction @/nonexistent/guess" in capsys.readouterr().err


def test_run_reads_prompts_from_a_file_and_stdin(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    from_file = kvos("run", "--json", "--model", TINY, "--max-tokens", "3", "-f", str(prompts))
    assert from_file.returncode == 0, from_file.stderr
    assert [json.loads(x)["prompt"] for x in from_file.stdout.splitlines()] == ["first prompt", "second prompt"]
    from_stdin = kvos("run", "--json", "--model", TINY, "--max-tokens", "3", input="one\ntwo\nthree\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert len(from_stdin.stdout.splitlines()) == 3


def test_run_text_output(capsys):
    assert main(["run", "--model", TINY, "--max-tokens", "4", "--raw", "[not markup]"]) == 0
    out = capsys.readouterr().out
    assert "[pid 1] [not markup]" in out and "(length, 4 tokens" in out


def test_run_structured_output_options(capsys, tmp_path):
    """--choice, --regex, --grammar and --json-schema @FILE: every reply is valid under them (sampled)."""
    pytest.importorskip("llguidance")
    schema = tmp_path / "schema.json"
    # n bounded: random weights would write an unbounded integer's digits past max_tokens
    schema.write_text(json.dumps({"type": "object", "required": ["n"],
                                  "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                                  "additionalProperties": False}))
    cases = [(["--choice", "yes", "--choice", "no way"], lambda t: t in ("yes", "no way")),
             (["--regex", "[a-z]{2}[0-9]"], lambda t: re.fullmatch("[a-z]{2}[0-9]", t)),
             (["--grammar", 'root ::= "x" [0-9] [0-9]?'], lambda t: re.fullmatch("x[0-9]{1,2}", t)),
             (["--json-schema", f"@{schema}"], lambda t: isinstance(json.loads(t)["n"], int))]
    for options, valid in cases:
        argv = ["run", "--json", "--model", TINY, "--max-tokens", "24", "--temperature", "1.2", "--seed", "5"]
        assert main(argv + options + ["a", "b", "c"]) == 0
        for line in capsys.readouterr().out.strip().splitlines():
            reply = json.loads(line)
            assert reply["finish_reason"] == "stop" and valid(reply["text"]), (options, reply)


@pytest.mark.parametrize("argv, errno, code", [
    (["run", "--model", TINY, "--regex", "a", "--choice", "b", "hi"], "EINVAL", 22),
    (["run", "--model", TINY, "--regex", "(", "hi"], "EINVAL", 22),
    (["run", "--model", TINY, "--json-schema", "@/no/such/file.json", "hi"], "EINVAL", 22),
    (["run", "--model", "no-such-model", "hi"], "ENOENT", 2),
    (["run", "--model", TINY, "--max-tokens", "-1", "hi"], "EINVAL", 22),
    (["run", "--model", TINY, "--memory", "lots", "hi"], "EINVAL", 22),
    (["pagemap", "999", "--local", "--model", TINY, "--steps", "1"], "ESRCH", 3),
])
def test_an_error_is_one_line_and_its_errno(capsys, argv, errno, code):
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("kvos: ") or
           line.startswith(f"kvos: {errno}")]
    failures = [line for line in err if line.startswith("kvos: E")]
    assert len(failures) == 1 and failures[0].startswith(f"kvos: {errno}: "), err
    assert "Traceback" not in "\n".join(err)


def test_error_from_the_console_script_has_no_traceback():
    result = kvos("run", "--model", TINY, "--top-k", "-3", "hi")
    assert result.returncode == 22
    assert result.stderr.strip().splitlines()[-1].startswith("kvos: EINVAL: ")
    assert "Traceback" not in result.stderr


def test_interrupt_exits_130(monkeypatch, capsys):
    import userspace.shell.commands as commands

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "run_main", interrupted)
    assert main(["run", "--model", TINY, "x"]) == 130


def test_chat_streams_each_turn_from_stdin():
    result = kvos("chat", "--model", TINY, "--max-tokens", "5", input="hello\nand again\n\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2          # one reply line per turn


def test_chat_reset_and_exit():
    """/reset starts the conversation over (so the same first message gets the same greedy reply),
    /exit ends it: what follows is never sent."""
    result = kvos("chat", "--model", TINY, "--max-tokens", "5", input="hello\n/reset\nhello\n/exit\nnot sent\n")
    assert result.returncode == 0, result.stderr
    first, again = result.stdout.splitlines()
    assert first == again and "starts over" in result.stderr


def local_json(out: str):
    """A --local --json result: marked as the in-process kernel's, the syscall's value under "result"."""
    marked = json.loads(out)
    assert marked["local"] is True and "not a running kvosd" in marked["note"]
    return marked["result"]


def test_ps_pagemap_meminfo_dmesg_local_as_json(capsys):
    args = ["--local", "--model", TINY, "--steps", "4", "--json"]
    assert main(["ps"] + args) == 0
    captured = capsys.readouterr()
    assert "kvos: --local: not a running kvosd: a fresh kernel booted by this command" in captured.err
    procs = local_json(captured.out)
    pids = [p["pid"] for p in procs]
    assert len(procs) == 4 and all(p["pages"] > 0 for p in procs)
    assert main(["pagemap", str(pids[0])] + args) == 0
    pm = local_json(capsys.readouterr().out)
    # the shm segment's pages and the fork's make the first pages shared
    assert pm["pages"][0]["refcount"] > 1 and pm["pages"][0]["pinned"]
    assert main(["meminfo"] + args) == 0
    info = local_json(capsys.readouterr().out)
    assert info["pinned"] > 0 and info["tokens_stored"] > 0
    assert main(["dmesg"] + args) == 0
    events = {e["event"] for e in local_json(capsys.readouterr().out)}
    assert {"boot", "shm", "spawn", "fork", "admit"} <= events


def test_pagemap_table_shows_tokens_as_text(capsys):
    assert main(["pagemap", "2", "--local", "--model", TINY, "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert "pagemap of pid 2" in captured.out and "s-n-p" in captured.out
    assert "--local: not a running kvosd" in captured.err


def test_proc_views_without_a_daemon_say_so_in_one_line_and_boot_nothing(tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    for argv in (["ps"], ["meminfo", "--json"], ["dmesg"], ["pagemap", "2"], ["kill", "3"], ["nice", "3", "1"],
                 ["top"]):
        result = kvos(*argv, env=env)
        assert result.returncode != 0 and result.stdout == "", (argv, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "kvos serve" in lines[0] and "--url" in lines[0], (argv, result.stderr)
    result = kvos("ps", "--local", "--url", "http://127.0.0.1:9", env=env)
    assert result.returncode == 22 and "takes no --url" in result.stderr


def test_sim_is_wired_when_its_module_exists():
    import importlib.util
    if importlib.util.find_spec("userspace.sim.cli") is None:
        assert "sim" not in subcommands()
    else:
        assert "sim" in subcommands()


def quick_demo_args(*extra):
    from userspace.shell.options import add_demo_options
    parser = argparse.ArgumentParser()
    add_demo_options(parser)
    return parser.parse_args(["--model", TINY, "--quick", *extra])


def check_summary(summary, info, stat, replies):
    """The summary's numbers are meminfo's and schedstat's, and its replies account for every token."""
    assert summary["finished"] and not summary["errors"]
    for key in ("page_cache_hits", "page_cache_evictions", "cow_faults", "swapped_out_pages", "swapped_in_pages"):
        assert summary[key] == info[key], key
    for key in ("steps", "generated_tokens", "prefill_tokens", "decode_tokens", "cached_tokens", "preemptions",
                "swap_outs", "swap_ins", "reclaims", "recomputed_tokens", "admissions", "exits"):
        assert summary[key] == stat[key], key
    assert summary["frames"] == info["total"] and summary["swap_slots"] == info["swap_total"]
    served = {t["name"]: t["served_tokens"] for t in stat["tenants"]}
    assert {t["name"]: t["served_tokens"] for t in summary["tenants"]} == served
    assert sum(served.values()) == stat["prefill_tokens"] + stat["decode_tokens"]
    assert {t["name"]: t["weight"] for t in summary["tenants"]} == {"assistant": 3.0, "batch": 1.0}
    # beams generate nothing (each round writes its chosen token as input); every other reply's tokens were sampled
    assert sum(len(r["tokens"]) for r in replies if r["kind"] != "beam") == stat["generated_tokens"]
    assert summary["tokens_per_second"] == pytest.approx(stat["generated_tokens"] / summary["wall_seconds"])
    u = summary["kv_utilization"]
    assert 0 < u["mean"] <= u["peak"] <= 1 and u["samples"] > 0
    kinds = [r["kind"] for r in replies]
    assert kinds.count("beam") == 3 and kinds.count("sample") == 3 and kinds.count("batch") == 2
    assert kinds.count("chat") == 4 and kinds.count("follow-up") >= 1


def test_quick_demo_summary_equals_meminfo_and_schedstat(capsys):
    from dataclasses import asdict

    from userspace.shell.demo import close, run_demo
    summary, session = run_demo(quick_demo_args("--every", "0.05"))
    sys_root = session.kernel.syscalls()
    info, stat = asdict(sys_root.meminfo()), asdict(sys_root.schedstat())
    check_summary(summary, info, stat, summary["replies"])
    # memory pressure was real: the pool is smaller than the workload
    assert summary["preemptions"] > 0 and summary["swap_outs"] > 0 and summary["cow_faults"] > 0
    assert summary["page_cache_hits"] > 0
    assert "frames" in capsys.readouterr().out          # the plain progress lines
    session.kernel.fsck()
    assert info["mapped"] == info["pinned"]              # only the shared system prompt stays mapped
    close(session)                                       # the kernel shuts down: every frame comes back


def test_quick_demo_console_script_not_on_a_terminal():
    text = kvos("demo", "--model", TINY, "--quick", "--every", "0.1")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "step" in out and "Replies" in out and "What the kernel did" in out and "KV utilisation" in out
    as_json = kvos("demo", "--model", TINY, "--quick", "--json")
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    check_summary(summary, summary["meminfo"], summary["schedstat"], summary["replies"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_demo_end_to_end():
    """`kvos demo` as `make demo` runs it, not on a terminal: SmolLM2, preemption, swap and reclaim for real."""
    result = kvos("demo", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    check_real = summary["replies"]
    assert summary["model"] == "smollm2-135m"
    assert summary["swap_outs"] > 0 and summary["swap_ins"] > 0 and summary["reclaims"] > 0
    assert summary["preemptions"] >= summary["swap_outs"] + summary["reclaims"]
    assert summary["cow_faults"] > 0 and summary["page_cache_hits"] > 0
    info, stat = summary["meminfo"], summary["schedstat"]
    for key in ("page_cache_hits", "cow_faults", "swapped_out_pages"):
        assert summary[key] == info[key]
    for key in ("steps", "generated_tokens", "preemptions", "swap_outs", "reclaims"):
        assert summary[key] == stat[key]
    assert sum(len(r["tokens"]) for r in check_real if r["kind"] != "beam") == stat["generated_tokens"]
    assert len([r for r in check_real if r["kind"] in ("chat", "batch")]) == 12
    assert all(r["finish_reason"] in ("stop", "length") for r in check_real)
    assert any("Paris" in r["text"] for r in check_real)     # the real model answers the first question


def test_the_command_line_and_a_daemon_client_start_without_torch():
    # `kvos ps --url ...` answered in 1.3 s when building the parser (kvos sim's experiment list)
    # and the client (kernel/__init__, kernel.sampling) imported torch; 0.14 s without it.
    code = ("import sys; import userspace.daemon.client; from userspace.shell.main import build_parser; "
            "build_parser(); print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_underscored_options_typos_and_the_simulated_device(capsys):
    assert main(["run", "--json", "--model", TINY, "--max_tokens", "3", "--top_k=5", "hi"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    for argv, said in ((["run", "--model", TINY, "--max-tokns", "3", "hi"], "did you mean --max-tokens?"),
                       (["run", "--device", "sim:a100-80g", "hi"], "argument --device: sim:a100-80g: the simulated"),
                       (["chat", "--device", "sim:h100"], "kvos sim"),
                       (["ps", "--local", "--device", "sim:h100"], "no tokenizer")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"usage: kvos {argv[0]}" in err and said in err, err
