"""What kvosd keeps of each OpenAI request once it has ended: counters, its end-to-end latency,
its choices' finish reasons, and one log line (tenant, pids, tokens, time to first token,
duration, finish reasons), structured so that --log-format json gives each as a field.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("kvosd.requests")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}


def finished(metrics, run, endpoint: str) -> None:
    """Count and log a request whose processes have all ended (or whose client left: outcome
    "disconnected", its choices counted as such and its latency not observed)."""
    now = time.monotonic()
    reasons = [s.reason for s in run.statuses] or [run.outcome] * len(run.pids)
    metrics.requests.labels(run.tenant, endpoint, run.outcome).inc()
    for reason in reasons:
        metrics.finish_reasons.labels(run.tenant, endpoint, reason).inc()
    if run.outcome != "disconnected":
        metrics.latency.labels(run.tenant, endpoint).observe(now - run.started)
    fields = {"tenant": run.tenant, "pids": list(run.pids), "outcome": run.outcome, "finish_reason": reasons}
    if run.statuses:                  # reaped: token counts are known (prompt tokens once per prompt)
        firsts = sorted({run.prompt_of.index(p) for p in run.prompt_of})
        fields["prompt_tokens"] = sum(run.statuses[i].prompt_tokens for i in firsts)
        fields["completion_tokens"] = sum(len(s.tokens) for s in run.statuses)
    if run.first_token is not None:
        fields["ttft"] = round(run.first_token - run.started, 4)
    fields["duration"] = round(now - run.started, 4)
    log.info("%s", PATHS.get(endpoint, endpoint), extra=fields)
