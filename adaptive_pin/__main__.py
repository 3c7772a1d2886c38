import sys

from adaptive_pin.cli import main

sys.exit(main())
