import sys

from avatarcli.cli import main

sys.exit(main())
