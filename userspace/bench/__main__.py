"""`python -m userspace.bench ...`: the bench command without the kvos shell."""
import sys

from userspace.bench.cli import main

sys.exit(main())
