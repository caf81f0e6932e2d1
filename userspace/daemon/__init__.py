"""kvosd: the kernel as a daemon (docs/daemon.md).

server.py boots a kernel and serves it: the syscall table over HTTP (sysapi.py, generated
from kernel.syscalls.SYSCALLS), an OpenAI-compatible API (openai_api.py; request bodies in
openai_requests.py) and Prometheus metrics (metrics.py). client.py is the syscall handle over
HTTP; cli.py is `kvos serve` and connect(). Importing this package imports no server code.
"""
