"""The scheduler: who computes how many tokens each step (scheduler.py), who comes in (admission.py),
who makes room and how (preempt.py), in what order and who is a victim (policies.py), the plan it hands
the kernel (plan.py), and schedstat (stats.py)."""
