import sys

from upop.cli.main import main

sys.exit(main())
