"""The experiments of `kvos sim`: each module reproduces one claim of the seed article.

A module has NAME, CLAIM, QUICK (small sizes, for tests), run_experiment(gpu, model,
seed, **sizes) -> a JSON-ready dict, tables(result) -> rich tables, plot(result, path)
and headline(result) -> [(claim, the article's figure, what kvos measured)].
"""
from userspace.sim.experiments import batching, chunked, memory, padding, paging, sharing

EXPERIMENTS = {m.NAME: m for m in (memory, batching, paging, sharing, padding, chunked)}
