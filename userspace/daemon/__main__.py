"""`python -m userspace.daemon serve ...`: kvosd without the kvos shell."""
import sys

from userspace.daemon.cli import main

sys.exit(main())
