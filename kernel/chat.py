"""The tokens that continue a conversation held by an interactive process.

A process that ended its turn holds the chat so far. write(pid, messages)
must add only what the model's template puts between the end of the reply and
the start of the next one: the template's closing of the assistant message
(minus the end-of-turn token the model already emitted), then the new messages
and the generation prompt. Both pieces are read off the model's own template,
rendered around anchor messages, so any template that renders a conversation
as a prefix of its extension works.
"""
from kernel.errors import EINVAL, KvosError

_SYSTEM = "kvos-anchor-system"
_REPLY = "kvos-anchor-reply"


def chat_continuation(program, messages: list, last_token: int | None) -> list:
    render = getattr(program, "render_chat", None)
    if render is None:
        raise KvosError(EINVAL, f"{program.name} has no chat template to continue a conversation with")
    anchor = [{"role": "system", "content": _SYSTEM}, {"role": "assistant", "content": _REPLY}]
    head = render(anchor, add_generation_prompt=False)
    full = render(anchor + list(messages), add_generation_prompt=True)
    if not full.startswith(head) or _REPLY not in head:
        raise KvosError(EINVAL, f"{program.name}'s chat template does not extend a conversation by appending")
    closing = program.encode(head[head.index(_REPLY) + len(_REPLY):])
    if closing and last_token is not None and closing[0] == last_token:
        closing = closing[1:]        # the model ended its reply with this token itself
    return closing + program.encode(full[len(head):])
