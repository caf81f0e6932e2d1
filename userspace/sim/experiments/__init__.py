"""The experiments of `kvos sim`: each module reproduces one claim of the seed article (tp and speculate
go beyond it).

A module has NAME, CLAIM, QUICK (small sizes, for tests), run_experiment(gpu, model,
seed, **sizes) -> a JSON-ready dict, tables(result) -> rich tables, plot(result, path)
and headline(result) -> [(claim, the article's figure, what kvos measured)].
"""
import importlib

# The names, in the order `kvos sim all` runs them. The modules import the kernel, and with it
# torch: they load when EXPERIMENTS is first read, so building the kvos command line stays light.
NAMES = ("memory", "batching", "paging", "sharing", "padding", "chunked", "tp", "speculate")


def __getattr__(name: str):
    if name == "EXPERIMENTS":
        modules = [importlib.import_module(f"userspace.sim.experiments.{n}") for n in NAMES]
        experiments = {m.NAME: m for m in modules}
        globals()["EXPERIMENTS"] = experiments
        return experiments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
