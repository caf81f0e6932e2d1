"""Multi-turn chat on one interactive process: its pages stay between turns.

The first turn spawns with the whole conversation in the model's chat
template; later turns write() only the new messages, so nothing said before is
computed again.
"""


class Chat:
    def __init__(self, sys, tid, system: str | None = None, **params):
        self.sys, self.tid, self.params = sys, tid, params
        self.messages = [{"role": "system", "content": system}] if system else []
        self.pid = None

    def send(self, text: str, stream: bool = False, poll: float = 0.05):
        """Say `text`; returns the reply (or, with stream=True, yields its pieces)."""
        pieces = self._turn({"role": "user", "content": text}, poll)
        return pieces if stream else "".join(pieces)

    def _turn(self, message, poll):
        self.messages.append(message)
        if self.pid is None:
            self.pid = self.sys.spawn(self.tid, list(self.messages), interactive=True, **self.params)
        else:
            self.sys.write(self.pid, [message])
        reply = []
        while True:
            r = self.sys.read(self.pid, timeout=poll)
            if r.text:
                reply.append(r.text)
                yield r.text
            if r.turn_done:
                break
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def close(self):
        """End the process (its full pages stay in the page cache). -> ExitStatus"""
        if self.pid is None:
            return None
        status, self.pid = self.sys.wait(self.pid), None
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chat(sys, tid, messages, **params):
    """One reply to a conversation (list of {role, content}). -> ExitStatus"""
    return sys.wait(sys.spawn(tid, list(messages), **params))
