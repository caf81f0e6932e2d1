"""kvos bench: kvos measured against the systems users would pick instead, on the same requests.

workloads.py builds the token ids, systems/ holds one module per system (each run as its
own process, protocol in child.py), runner.py runs them in turn, metrics.py and report.py
turn their records into the table, cli.py is the command (`kvos bench`, `make bench`).
"""
