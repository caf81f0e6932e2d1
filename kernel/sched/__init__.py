"""The scheduler: who computes how many tokens each step (scheduler.py), in what order and who is
preempted (policies.py), the plan it hands the kernel (plan.py), and schedstat (stats.py)."""
