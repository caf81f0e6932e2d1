"""`kvos lab`: teaching labs on the real kernel, graded like xv6's (docs/labs/README.md).

catalog.py names the labs; regions.py finds their solution regions in the source; tree.py copies
the project (start); grade.py grades a working copy in a clean copy of the pristine project;
predict/ asks generated questions answered by running kvos; cli.py wires the subcommands.
"""
