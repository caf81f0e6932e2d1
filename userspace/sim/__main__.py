"""python -m userspace.sim EXPERIMENT: the same command as `kvos sim`."""
import sys

from userspace.sim.cli import main

sys.exit(main())
