"""tiny-tools: tiny-llama's weights and vocabulary under a chat template that takes tools and
calls them in the Hermes format (as Qwen2.5's does), for the tool-call tests. Registered as a
binfmt, so a tenant (or kvosd's tenants file) can name it."""
import torch

from kernel.program import register_binfmt
from userspace.programs import tiny
from userspace.programs.llama import LlamaProgram, fuse_hf_weights
from userspace.programs.tokenizer import TextTokenizer

NAME = "tiny-tools"
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call, return a JSON object with the function name and arguments within <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

_program = None


def program() -> LlamaProgram:
    global _program
    if _program is None:
        base = tiny.tiny_tokenizer()
        tokenizer = TextTokenizer(base.backend, HERMES_TEMPLATE, base.special_tokens)
        weights = fuse_hf_weights(tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, seed=0))
        _program = LlamaProgram(NAME, tiny.TINY_CONFIG, weights, tokenizer, b"tiny-tools-for-tests",
                                torch.device("cpu"), torch.float32)
    return _program


def _load(spec, device):
    return program() if spec == NAME else None


def register() -> None:
    register_binfmt(_load, first=True)
