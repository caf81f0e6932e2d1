"""The Responses API's server-sent events for an output item: a message's opening (before its text
streams) and an item's finish, or a whole item sent at once (a reply that may hold tool calls is
sent when it has ended, since a call cannot be told from text before it closes). `event` is the
stream's own event writer (it numbers them)."""
from __future__ import annotations


def message_opening(event, item_id: str, index: int = 0):
    """The events that open a message item whose text is about to stream."""
    yield event("response.output_item.added", output_index=index, item={
        "type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []})
    yield event("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})


def item_events(event, index: int, item: dict, opened: bool):
    """The events that finish an output item (opened: a message whose opening and deltas were sent;
    otherwise the item is sent whole: opened, its text or arguments in one delta, done)."""
    if item["type"] == "function_call":
        yield event("response.output_item.added", output_index=index, item={**item, "arguments": "",
                                                                          "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    name=item["name"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
        return
    part = item["content"][0]
    if not opened:
        yield from message_opening(event, item["id"], index)
        yield event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                    delta=part["text"], logprobs=part["logprobs"])
    yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                text=part["text"], logprobs=part["logprobs"])
    yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                part=item["content"][0])
    yield event("response.output_item.done", output_index=index, item=item)
