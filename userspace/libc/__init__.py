"""libc: what programs usually want, written only on syscalls.

generate / generate_many (spawn + wait), stream (read as it comes), Chat
(multi-turn through write on an interactive process), parallel_sample (fork
after the prompt), beam_search (fork the best continuations, kill the rest), score and
loglikelihood (a prompt's tokens scored by the model: spawn's prompt_logprobs).
Every function takes a syscall handle (kernel.syscalls(...) or a daemon client).
"""
from userspace.libc.beam import beam_search
from userspace.libc.chat import Chat, chat
from userspace.libc.generate import generate, generate_many, parallel_sample, stream
from userspace.libc.score import loglikelihood, score

__all__ = ["generate", "generate_many", "stream", "parallel_sample", "Chat", "chat", "beam_search", "score",
           "loglikelihood"]
