import sys

from pyeff.cli import main

sys.exit(main())
