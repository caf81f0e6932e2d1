"""The tokens that continue a conversation held by an interactive process (write's prepare half).

A process that ended its turn holds the chat so far. write(pid, messages) must add
only what the model's template puts between the end of the reply and the start of
the next one: the template's closing of the assistant message, then the new
messages and the generation prompt. Both pieces are read off the model's own
template, rendered around anchor messages, so any template that renders a
conversation as a prefix of its extension works. This runs in the caller's
context; the kernel drops the closing's first token if the reply already ended
with it (the model emitted its end-of-turn token itself).
"""
from kernel.errors import EINVAL, KvosError

_SYSTEM = "kvos-anchor-system"
_REPLY = "kvos-anchor-reply"


def chat_continuation(program, messages: list) -> tuple[list, list]:
    """(the template's closing of the reply, the new messages with the generation prompt) as token ids."""
    render = getattr(program, "render_chat", None)
    if render is None:
        raise KvosError(EINVAL, f"{program.name} has no chat template to continue a conversation with")
    anchor = [{"role": "system", "content": _SYSTEM}, {"role": "assistant", "content": _REPLY}]
    head = render(anchor, add_generation_prompt=False)
    full = render(anchor + list(messages), add_generation_prompt=True)
    if not full.startswith(head) or _REPLY not in head:
        raise KvosError(EINVAL, f"{program.name}'s chat template does not extend a conversation by appending")
    closing = program.encode(head[head.index(_REPLY) + len(_REPLY):])
    return closing, program.encode(full[len(head):])


_OPEN = "kvos-anchor-open-final-message"


def open_final_message_text(program, messages: list, tools=None) -> str:
    """The chat in its template with its last message left open (vLLM's and transformers'
    continue_final_message): the text ends with that message's content, as given, and the model
    continues it (an assistant reply begun by the caller, "prefilling" it).

    The template renders the chat with an anchor as the last content and no generation prompt; the
    text before the anchor, then the content, is the prompt. An anchor rather than a search for the
    content itself: an empty content, or one that also occurs earlier, still cuts in the right place."""
    render = getattr(program, "render_chat", None)
    if render is None:
        raise KvosError(EINVAL, f"{program.name} has no chat template to continue a message with")
    last = dict(messages[-1])
    content, last["content"] = last["content"], _OPEN
    anchored = list(messages[:-1]) + [last]
    text = render(anchored, add_generation_prompt=False, tools=tools) if tools else \
        render(anchored, add_generation_prompt=False)
    if text.count(_OPEN) != 1:
        raise KvosError(EINVAL, f"{program.name}'s chat template does not show the final message's content "
                                f"as given, so it cannot be continued")
    return text[:text.index(_OPEN)] + content
