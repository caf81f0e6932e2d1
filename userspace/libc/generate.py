"""One-shot generation: spawn and wait, many at once, streamed, or n samples of one prompt."""


def generate(sys, tid, prompt, **params):
    """Run one prompt to the end. -> ExitStatus (tokens, text, reason)"""
    return sys.wait(sys.spawn(tid, prompt, **params))


def generate_many(sys, tid, prompts, **params) -> list:
    """Spawn every prompt first (they share steps), then wait for each. -> [ExitStatus]"""
    pids = [sys.spawn(tid, p, **params) for p in prompts]
    return [sys.wait(pid) for pid in pids]


def stream(sys, tid, prompt, poll: float = 0.05, **params):
    """Yield text as the process produces it; the generator's return value is the ExitStatus."""
    pid = sys.spawn(tid, prompt, **params)
    try:
        while True:
            r = sys.read(pid, timeout=poll)
            if r.text:
                yield r.text
            if r.turn_done:
                break
    except GeneratorExit:
        sys.kill(pid)
        sys.wait(pid)
        raise
    return sys.wait(pid)


def parallel_sample(sys, tid, prompt, n: int, **params) -> list:
    """n independent samples of one prompt. The n - 1 forks wait until the first has computed
    the prompt, then map its pages from the page cache: the prompt is prefilled once. -> [ExitStatus]"""
    params.setdefault("temperature", 1.0)
    # spawn_n spawns and forks in one syscall: no step comes between (a step could sample the
    # parent's first token, which the forks would then inherit), in process or over HTTP alike.
    pids = sys.spawn_n(tid, prompt, n, **params)
    return [sys.wait(p) for p in pids]
