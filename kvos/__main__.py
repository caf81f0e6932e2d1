"""python -m kvos: the kvos command (the same as the `kvos` script)."""
import sys

from userspace.shell.main import main

sys.exit(main())
